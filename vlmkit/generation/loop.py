"""One generation loop for every model family: prefill, then decode one token at a time with the KV cache.

Logits are processed in the order and with the semantics of transformers' `generate` (repetition penalty,
bad words, min new tokens; then, only when sampling, temperature, top-k, top-p), so greedy decoding gives the
same tokens and seeded sampling the same draws (on CPU: `seed=s` here == `torch.manual_seed(s)` there).

Stop strings follow the OpenAI API: generation stops at the first occurrence and the stop string itself is
not part of the returned text (transformers' `stop_strings` keeps it); `text_stream.TextStream` turns tokens into
text, here and in the server.

Structured output (`cfg.constraint`, see constraints.py) is one more logit rule, after the others and before
the sampling ones: each constrained row keeps only the tokens its grammar allows, in the fast path too (it only
makes the logits).

Left padding is invisible to the logit rules: the repetition penalty and bad-word prefixes look at real tokens
only, so a padded row gets the tokens it would get alone (transformers also penalises / matches the pad id in
padded rows; unpadded rows are identical).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch

from .constraints import ConstraintRows, GrammarRows
from .fast_path import FastSteps, fast_decoder, new_cache
from .text_stream import TextStream

# Batch keys that describe the text; every other key (pixel_values, pixel_attention_mask, image_attention_mask,
# image_features, ...) is an image input, given to the model at the prefill only: the cache keeps what decode needs.
_TEXT_KEYS = ("input_ids", "attention_mask", "position_ids", "labels", "cache")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0  # used only when do_sample
    top_k: int = 0  # 0 = off; used only when do_sample
    top_p: float = 1.0  # 1.0 = off; used only when do_sample
    repetition_penalty: float = 1.0  # over prompt + generated ids, as transformers
    min_new_tokens: int = 0  # eos is forbidden before this many new tokens
    seed: Optional[int] = None  # None: torch's global RNG; else a fresh torch.Generator per call
    eos_token_ids: list[int] = field(default_factory=list)  # any of them ends a row (and is not returned)
    pad_token_id: Optional[int] = None  # fills finished rows; None: the first eos id (as transformers), else 0
    bad_words_ids: list[list[int]] = field(default_factory=list)  # token sequences that are never completed
    stop_strings: list[str] = field(default_factory=list)  # text stops before the first of these
    # Structured output: a CompiledConstraint for every row, or one per row (None: free); see constraints.py.
    constraint: ConstraintRows = None

    def __post_init__(self):
        self._normalize()

    def _normalize(self) -> None:
        # Accept the shapes users pass (OpenAI `stop` is a string or a list; eos ids come as int or list).
        if self.stop_strings is None or isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings] if self.stop_strings else []
        if self.eos_token_ids is None or isinstance(self.eos_token_ids, int):
            self.eos_token_ids = [] if self.eos_token_ids is None else [self.eos_token_ids]
        self.eos_token_ids = [int(i) for i in self.eos_token_ids]
        self.bad_words_ids = list(self.bad_words_ids or [])

    def validate(self) -> None:
        self._normalize()
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0 when do_sample=True, got {self.temperature}; "
                "for greedy decoding set do_sample=False"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        if not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}")
        for seq in self.bad_words_ids:
            if not isinstance(seq, (list, tuple)) or not seq or any(int(t) < 0 for t in seq):
                raise ValueError(f"bad_words_ids must be non-empty lists of token ids >= 0, got {seq!r}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        if self.constraint is not None and not self.eos_token_ids:
            raise ValueError("a constrained answer needs eos_token_ids to end on")


class LogitsProcessor:
    """All logit rules for one generation call. The repetition penalty keeps a [B, V] "seen" mask of prompt +
    generated ids, updated once per step, so it costs O(V) per step rather than a gather over the history."""

    def __init__(self, cfg: GenerationConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor, total_len: int):
        self.cfg = cfg
        self.eos = torch.tensor(cfg.eos_token_ids, dtype=torch.long, device=input_ids.device)
        eos_set = set(cfg.eos_token_ids)
        # transformers' NoBadWordsLogitsProcessor drops single-token bad words that are an eos id.
        bad = [list(map(int, s)) for s in cfg.bad_words_ids if not (len(s) == 1 and int(s[0]) in eos_set)]
        self.bad_single = sorted({s[0] for s in bad if len(s) == 1})
        by_prefix_len: dict[int, list[list[int]]] = {}
        for s in bad:
            if len(s) > 1:
                by_prefix_len.setdefault(len(s) - 1, []).append(s)
        dev = input_ids.device
        self.bad_multi = [
            (torch.tensor([s[:-1] for s in group], device=dev), torch.tensor([s[-1] for s in group], device=dev))
            for group in by_prefix_len.values()
        ]
        self.bad_ids = {t for s in bad for t in s}
        # Padding is -1 in the history so a bad-word prefix never matches across left padding
        # (transformers would compare against pad ids there; keeps a padded row equal to the row alone).
        self.history = None
        if self.bad_multi:
            self.history = torch.full((input_ids.shape[0], total_len), -1, dtype=torch.long, device=dev)
            self.history[:, : input_ids.shape[1]] = input_ids.masked_fill(attention_mask == 0, -1)
        self.length = input_ids.shape[1]
        self.prompt_ids, self.prompt_mask = input_ids, attention_mask
        self.vocab: Optional[int] = None  # known at the first call, from the logits
        self.seen: Optional[torch.Tensor] = None
        self.grammar = GrammarRows(cfg.constraint, input_ids.shape[0]) if cfg.constraint is not None else None

    def _first_call(self, vocab: int) -> None:
        self.vocab = vocab
        if self.bad_ids and max(self.bad_ids) >= vocab:
            raise ValueError(f"bad_words_ids {sorted(t for t in self.bad_ids if t >= vocab)} are >= vocab size {vocab}")
        if self.cfg.repetition_penalty != 1.0:
            # Column `vocab` absorbs padding and ids the head cannot produce (transformers clamps them the same
            # way); left padding is not penalised (transformers would penalise the pad id in padded rows only).
            ids = self.prompt_ids.clamp(max=vocab).masked_fill(self.prompt_mask == 0, vocab)
            seen = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=ids.device)
            self.seen = seen.scatter_(1, ids, True)

    def __call__(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """logits [B, V] float32 for new token number `step` (0-based) -> processed scores."""
        cfg, vocab = self.cfg, logits.shape[-1]
        if self.vocab is None:
            self._first_call(vocab)
        if self.seen is not None:
            penalised = torch.where(logits < 0, logits * cfg.repetition_penalty, logits / cfg.repetition_penalty)
            logits = torch.where(self.seen[:, :vocab], penalised, logits)
        if self.bad_single:
            logits[:, self.bad_single] = -float("inf")
        for prefixes, last_tokens in self.bad_multi:
            plen = prefixes.shape[1]
            if plen > self.length:
                continue
            matching = (self.history[:, None, self.length - plen : self.length] == prefixes).all(-1)  # [B, G]
            hits = torch.zeros_like(logits).index_add_(1, last_tokens, matching.to(logits.dtype))
            logits = logits.masked_fill(hits > 0, -float("inf"))
        if step < cfg.min_new_tokens and self.eos.numel():
            logits[:, self.eos] = -float("inf")
        if self.grammar is not None:
            logits = self.grammar.mask(logits)
        if cfg.do_sample:
            if cfg.temperature != 1.0:
                logits = logits / cfg.temperature
            if cfg.top_k:
                logits = top_k_filter(logits, cfg.top_k)
            if cfg.top_p < 1.0:
                logits = top_p_filter(logits, cfg.top_p)
        return logits

    def append(self, tokens: torch.Tensor) -> None:
        """Record the tokens chosen at this step (finished rows' pad ids too, as transformers does)."""
        if self.seen is not None:
            self.seen.scatter_(1, tokens.clamp(max=self.vocab)[:, None], True)
        if self.history is not None:
            self.history[:, self.length] = tokens
        if self.grammar is not None:
            self.grammar.advance(tokens.tolist())
        self.length += 1


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """TopKLogitsWarper: keep every token scoring >= the k-th best (ties at the border survive)."""
    kth_best = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    return logits.masked_fill(logits < kth_best, -float("inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """TopPLogitsWarper: sort ascending, drop tokens whose cumulative probability is <= 1 - top_p, always keep
    the most probable one (min_tokens_to_keep=1)."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    remove = sorted_logits.softmax(-1).cumsum(-1) <= (1 - top_p)
    remove[..., -1:] = False
    return logits.masked_fill(remove.scatter(1, sorted_idx, remove), -float("inf"))


def sampling_generator(cfg: GenerationConfig, device) -> Optional[torch.Generator]:
    """The RNG of a seeded sampling call (a fresh generator per call); None: greedy, or torch's global RNG."""
    if cfg.do_sample and cfg.seed is not None:
        return torch.Generator(device=device).manual_seed(cfg.seed)
    return None


def choose_tokens(processor: LogitsProcessor, logits: torch.Tensor, step: int,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next tokens [B] from the model's logits [B, V] for new token number `step`: the logit rules, then argmax
    (greedy) or a draw from the softmax (sampling). Does not record the tokens (`processor.append` does)."""
    logits = logits.to(dtype=torch.float32, copy=True)  # processors may write in place
    scores = processor(logits, step)
    if processor.cfg.do_sample:
        return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
    return scores.argmax(-1)


def model_context_length(model) -> Optional[int]:
    """max_position_embeddings of the text model, found on `model.cfg` / `model.config` (or their `.text`)."""
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    cfg = getattr(cfg, "text", cfg)
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if n else None


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def generate_tokens(
    model,
    batch: dict,
    cfg: GenerationConfig,
    *,
    max_length: Optional[int] = None,
    cache=None,
    stop_check: Optional[Callable[[torch.Tensor], Sequence[bool] | torch.Tensor]] = None,
) -> Iterator[torch.Tensor]:
    """Yield each step's next tokens [B] (long, on the model's device).

    batch: processor output, rows left-padded (attention_mask 0 on the left). A row finishes when it produces an
    eos id or when `stop_check(tokens)` (called after each step) flags it; finished rows then get pad_token_id.
    Stops when every row has finished or after max_new_tokens steps.
    max_length: the model's context (prompt + new tokens); None reads it from the model's config.
    cache: an empty cache object for the model (default: `new_cache(model, ...)`).
    Bad parameters raise here, at the call, not at the first step.
    """
    check_request(model, batch, cfg, max_length)
    return _decode_loop(model, batch, cfg, cache, stop_check)


def check_request(model, batch: dict, cfg: GenerationConfig, max_length: Optional[int] = None) -> None:
    cfg.validate()
    input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, tokens] with at least one token, got {tuple(input_ids.shape)}")
    lengths = attention_mask.sum(-1) if attention_mask is not None else torch.full((1,), input_ids.shape[1])
    if int(lengths.min()) == 0:
        raise ValueError("a prompt has no tokens (its attention_mask row is all zeros)")
    max_length = model_context_length(model) if max_length is None else max_length
    longest_prompt = int(lengths.max())
    if max_length is not None and longest_prompt + cfg.max_new_tokens > max_length:
        raise ValueError(
            f"prompt of {longest_prompt} tokens + max_new_tokens={cfg.max_new_tokens} exceeds the model's "
            f"context of {max_length} tokens; shorten the prompt or lower max_new_tokens"
        )


@torch.no_grad()
def _decode_loop(model, batch, cfg, cache, stop_check) -> Iterator[torch.Tensor]:
    input_ids = batch["input_ids"]
    b, t = input_ids.shape
    device = input_ids.device
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    total_len = t + cfg.max_new_tokens
    if cache is None:
        cache = new_cache(model, total_len)
    # A cache may arrive holding the keys/values of the prompt's first tokens (a reused prefix): feed the rest.
    past = cache.length
    if not 0 <= past < t:
        raise ValueError(f"the cache already holds {past} tokens; the prompt has {t}: at least one must be new")
    image_inputs = {k: v for k, v in batch.items() if k not in _TEXT_KEYS and v is not None}
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    record = getattr(cache, "record", None)

    # The full mask is allocated once; each step passes a growing view of it (no per-step concatenation).
    full_mask = torch.ones(b, total_len, dtype=attention_mask.dtype, device=device)
    full_mask[:, :t] = attention_mask
    processor = LogitsProcessor(cfg, input_ids, attention_mask, total_len)
    eos = processor.eos
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_ids[0] if cfg.eos_token_ids else 0)
    generator = sampling_generator(cfg, device)
    unfinished = torch.ones(b, dtype=torch.bool, device=device)
    fast = FastSteps(fast_decoder(model), cache, attention_mask)

    step_ids = input_ids[:, past:]
    for step in range(cfg.max_new_tokens):
        if step > 0 and fast.ready:
            logits = fast(step_ids)
        else:
            out = model(input_ids=step_ids, attention_mask=full_mask[:, : t + step], cache=cache, **image_inputs,
                        **extra)
            cache, image_inputs = out.cache, {}
            logits = out.logits[:, -1, :]
            if step == 0:
                fast.start(cache, t + cfg.max_new_tokens)
        if record is not None:
            record(step_ids)
        next_tokens = choose_tokens(processor, logits, step, generator)
        next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_id))
        processor.append(next_tokens)
        if eos.numel():
            unfinished &= ~torch.isin(next_tokens, eos)
        yield next_tokens
        if stop_check is not None:
            unfinished &= ~torch.as_tensor(stop_check(next_tokens), dtype=torch.bool, device=device)
        if not bool(unfinished.any()):
            return
        step_ids = next_tokens[:, None]


def generate(
    model, tokenizer, batch: dict, cfg: GenerationConfig, *, stream: bool = False, max_length=None, cache=None,
    stats: Optional[dict] = None,
):
    """New text per row: ids up to (not including) the first eos, `tokenizer.decode(ids, skip_special_tokens=True)`,
    cut before the first stop string (which is removed, as the OpenAI API does).

    stream=True (one row only) returns an iterator of text pieces whose concatenation is that same text; text that
    might be the start of a stop string is held back until decided, so a stop string never appears in the stream.
    stats (stream=True): a dict that gets `completion_tokens` (the answer's tokens, as the server counts them) once
    the stream ends.
    """
    check_request(model, batch, cfg, max_length)
    if stream:
        if batch["input_ids"].shape[0] != 1:
            raise ValueError(f"stream=True takes a batch of one prompt, got {batch['input_ids'].shape[0]}")
        return _stream(model, tokenizer, batch, cfg, max_length, cache, stats)
    texts = [TextStream(tokenizer, cfg.stop_strings, cfg.eos_token_ids, pieces=False)
             for _ in range(batch["input_ids"].shape[0])]

    def record(tokens: torch.Tensor) -> list[bool]:
        for text, tok in zip(texts, tokens.tolist()):
            text.push(tok)
        return [text.stopped for text in texts]

    for _ in generate_tokens(model, batch, cfg, max_length=max_length, cache=cache, stop_check=record):
        pass
    return [text.text() for text in texts]


def _stream(model, tokenizer, batch, cfg, max_length, cache, stats=None) -> Iterator[str]:
    text = TextStream(tokenizer, cfg.stop_strings, cfg.eos_token_ids)
    for tokens in generate_tokens(model, batch, cfg, max_length=max_length, cache=cache):
        piece = text.push(int(tokens[0]))
        if piece:
            yield piece
        if text.done:
            break  # closing the token generator ends generation
    rest = text.rest()
    if stats is not None:
        stats["completion_tokens"] = len(text.ids)
    if rest:
        yield rest
