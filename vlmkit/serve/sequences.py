"""The model work of continuous batching: one request's chunked prefill (`Sequence`) and the running decode batch
(`DecodeBatch`) that sequences join when their prefill is done and leave when they finish.

A sequence is prefilled alone, in its own KV cache, a chunk of its prompt at a time; its images are encoded at its
first chunk and reach the model chunk by chunk: a splice model (LLaVA, Idefics2, Idefics3) gets the features of
the image tokens inside the chunk, a cross-attention model (IDEFICS) gets its image context once (kept in the
cache) and, per chunk, the rows of the image-attention mask for the chunk's tokens. Position ids follow from the
attention mask (real tokens before), so a chunked prompt sees exactly what a whole one does.

The decode batch is one left-padded cache: a joining sequence's cache is stacked onto it (both right-aligned at
the longer length), finished rows are dropped and the columns that became padding in every row are trimmed.
Each row keeps its own logit rules and RNG (`vlmkit.generation.loop.LogitsProcessor`, `choose_tokens`), so rows
with different sampling settings share the batch and a seeded row draws what `generate(..., seed=s)` draws.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn.functional as F

from ..generation.fast_path import FastSteps, fast_decoder
from ..generation.loop import LogitsProcessor, check_request, choose_tokens, sampling_generator
from ..models.kv_cache import StaticKVCache
from ..processing.formats import format_for
from .jobs import Job, JobText

__all__ = ["Sequence", "DecodeBatch", "prefill_together"]

# Batch keys the chunked prefill knows how to split; any other image input goes to the model whole, at once.
_CHUNKABLE = {"input_ids", "attention_mask", "pixel_values", "pixel_attention_mask", "image_attention_mask",
              "image_grid_thw", "image_sizes"}


class Sequence:
    """One job from prompt to finish: its prefill cursor and cache, its logit rules, its text."""

    def __init__(self, job: Job, model, tokenizer, *, eos_ids, pad_token_id: int, bad_words, context: int):
        self.job, self.model = job, model
        self.text = JobText(job, tokenizer, eos_ids)
        self.cfg = job.generation_config(eos_ids, pad_token_id, bad_words)
        device = model.device
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in job.batch.items()}
        check_request(model, batch, self.cfg, context)  # bad settings fail this job only, before any work
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if ids.shape[0] != 1:
            raise ValueError(f"a job holds one prompt, got a batch of {ids.shape[0]}")
        start = 0 if mask is None else int(mask[0].argmax())  # drop left padding: the row alone has none
        self.ids = ids[:, start:]
        self.mask = torch.ones_like(self.ids)
        self.images = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask") and v is not None}
        for key in ("image_attention_mask", "token_type_ids"):  # per-token inputs lose the padding too
            if key in self.images:
                self.images[key] = self.images[key][:, start:]
        self.chunkable = set(batch) <= _CHUNKABLE
        self.length = self.ids.shape[1]
        self.cache = StaticKVCache(len(model.text.layers), context)
        self.done_tokens = 0  # prompt tokens already in the cache
        self.features: Optional[torch.Tensor] = None  # splice: flat image features not fed yet
        self.processor = LogitsProcessor(self.cfg, self.ids, self.mask, self.length + self.cfg.max_new_tokens)
        self.generator = sampling_generator(self.cfg, device)
        self.step = 0  # new tokens chosen
        self.next_token: Optional[int] = None  # chosen, not fed to the model yet

    @property
    def remaining(self) -> int:
        return self.length - self.done_tokens

    @property
    def finished(self) -> bool:
        return self.text.done

    # ------------------------------------------------------------------------------------------ prefill
    def prefill(self, budget: int) -> int:
        """Feed up to `budget` more prompt tokens (all of them when the family cannot be chunked); after the last
        one, choose the first new token. Returns the number of tokens fed."""
        s = self.done_tokens
        e = self.length if not self.chunkable else min(self.length, s + max(1, budget))
        model, inputs = self.model, {}
        if s == 0:
            self.job.t_start = self.job.t_start or time.monotonic()
        if s == 0 and self.images:
            inputs = self._first_images() if self.chunkable else dict(self.images)
        chunk = self.ids[:, s:e]
        if self.features is not None:
            n = int((chunk == model.cfg.image_token_id).sum())
            inputs["image_features"] = self.features[:n][None] if n else None
            self.features = self.features[n:]
        if "image_attention_mask" in self.images:
            inputs["image_attention_mask"] = self.images["image_attention_mask"][:, s:e]
        if "image_grid_thw" in self.images:  # Qwen2-VL: each chunk's 3D positions come from the prompt so far
            inputs["image_grid_thw"] = self.images["image_grid_thw"]
        out = model(input_ids=chunk, attention_mask=self.mask[:, :e], cache=self.cache, logits_to_keep=1, **inputs)
        self.cache, self.done_tokens = out.cache, e
        self.cache.record(chunk)
        if e == self.length:
            self.images = {}  # the cache holds what decoding needs
            self.choose(out.logits[:, -1])
        return e - s

    def _first_images(self) -> dict:
        model = self.model
        pixels = self.images.get("pixel_values")
        if pixels is None:
            return {}
        features = model.image_features(pixels, self.images.get("pixel_attention_mask"),
                                        self.images.get("image_grid_thw"), self.images.get("image_sizes"))
        if model.cfg.merge == "splice":
            self.features = features.reshape(-1, features.shape[-1])
            return {}
        return {"image_features": features}  # cross-attention: the context, kept in the cache from here on

    def fail(self, exc: BaseException) -> None:
        self.job.fail(exc)
        self.text.done, self.cache = True, None

    # ------------------------------------------------------------------------------------------ tokens
    def choose(self, logits: torch.Tensor) -> None:
        """Pick the next token from this row's logits [1, V] with its own rules, record it, hand it to the text."""
        tok = choose_tokens(self.processor, logits, self.step, self.generator)
        self.processor.append(tok)
        if self.step == 0:
            self.job.t_first = time.monotonic()
            self.job.batch_size = max(self.job.batch_size, 1)
        self.step += 1
        self.next_token = int(tok)
        self.text.push(self.next_token)


def prefill_together(seqs: list, model, pad_token_id: int) -> tuple[StaticKVCache, torch.Tensor]:
    """Prefill fresh sequences whole in one left-padded forward (as a processor batch runs) and choose each one's
    first token. -> the rows' cache and attention mask. CollateError when their inputs cannot share a batch."""
    batch = format_for(model.cfg).merge([{"input_ids": s.ids, "attention_mask": s.mask, **s.images} for s in seqs],
                                        pad_token_id)
    now = time.monotonic()
    for s in seqs:
        s.job.t_start = s.job.t_start or now
    cache = StaticKVCache(len(model.text.layers), seqs[0].cache.max_length)
    out = model(**batch, cache=cache, logits_to_keep=1)
    for i, s in enumerate(seqs):
        s.done_tokens, s.images, s.cache = s.length, {}, None
        s.choose(out.logits[i : i + 1, -1])
    return out.cache, batch["attention_mask"]


def keep_rows(cache: StaticKVCache, mask: torch.Tensor, rows: list) -> tuple[StaticKVCache, torch.Tensor]:
    """The given rows of a left-padded cache, without the columns that are padding in all of them."""
    mask = mask[rows]
    start = int(mask.any(0).to(torch.long).argmax())  # first column holding a real token of some row
    return cache.select(rows, start=start), mask[:, start:]


class DecodeBatch:
    """The sequences decoding together: one left-padded cache, its attention mask, one new token per row a step."""

    def __init__(self, model):
        self.model = model
        self.fast_text = fast_decoder(model)
        self.rows: list[Sequence] = []
        self.cache: Optional[StaticKVCache] = None
        self.mask: Optional[torch.Tensor] = None  # [B, cache.length] long, 0 = left padding
        self.fast: Optional[FastSteps] = None

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, cache: StaticKVCache, mask: torch.Tensor, seqs: list) -> None:
        """Add prefilled sequences (their rows of `cache`, attention `mask`) to the batch; finished ones are left
        out."""
        alive = [i for i, s in enumerate(seqs) if not s.finished]
        if not alive:
            return
        if len(alive) < len(seqs):
            cache, mask = keep_rows(cache, mask, alive)
        if self.rows:
            cache, mask = StaticKVCache.stack_left_padded([self.cache, cache], [self.mask, mask])
        self.cache, self.mask = cache, mask
        self.rows += [seqs[i] for i in alive]
        for s in seqs:
            s.cache = None
        self.fast = None

    def drop_finished(self) -> None:
        """Remove the rows whose text is done; trim the columns that are padding in every remaining row."""
        keep = [i for i, s in enumerate(self.rows) if not s.finished]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self.fast = None
        if not self.rows:
            self.cache = self.mask = None
            return
        self.cache, self.mask = keep_rows(self.cache, self.mask, keep)

    def step(self) -> None:
        """Feed every row's chosen token, choose each row's next one."""
        tokens = torch.tensor([[s.next_token] for s in self.rows], dtype=torch.long, device=self.mask.device)
        if self.fast is None:
            self.fast = FastSteps(self.fast_text, self.cache, self.mask)
            longest = self.cache.length + max(s.cfg.max_new_tokens - s.step for s in self.rows)
            self.fast.start(self.cache, min(longest, self.cache.max_length))
        self.mask = F.pad(self.mask, (0, 1), value=1)
        if self.fast.ready:
            logits = self.fast(tokens)
        else:  # cross-attention (IDEFICS) and foreign decoders: the model's forward with the cache
            out = self.model(input_ids=tokens, attention_mask=self.mask, cache=self.cache, logits_to_keep=1)
            self.cache, logits = out.cache, out.logits[:, -1]
        for i, s in enumerate(self.rows):
            if not s.finished:
                s.choose(logits[i : i + 1])
