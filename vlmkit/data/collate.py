"""Training batches for every family: chat template, placeholder expansion, labels, padding, packing, data order.

    collator = Collator(processor, template="chat")          # "chat": labels on the assistant answers (stage 2)
    batch = collator([example, ...])                          # "plain": LLaVA stage 1, labels on the caption
    model(**batch).logits; batch["labels"]                    # labels: -100 where no loss is taken

How labels are placed: each example becomes one text with marker characters around the spans that carry a loss;
the processor's own rules expand the image placeholders (so input_ids equal what the processor gives for the same
text), the markers are taken out, and a token carries its id as label when its characters overlap a span. Spans:
  chat          each assistant answer, through the first stop token after it (`<end_of_utterance>`, `<|im_end|>`,
                EOS); a template that writes no stop token after answers (LLaVA-1.5's) gets the EOS appended, as
                LLaVA's own training does. Prompts, system text, image tokens, BOS, padding: -100.
  plain         LLaVA's `plain` template: the images, then the caption (or a chat's first answer) + "\\n"; the
                caption and the "\\n" carry the loss.
  interleaved   open_flamingo's rule: the text that follows an image, through an end-of-chunk token (EOS) written
                before the next image and at the end; text before the first image and image tokens: -100.
Rows are left-padded in the family's layout by the processor's own collate (processing/formats/). `pack_length`
packs several examples into one row (positions restart at each example; IDEFICS image masks stay per example;
attention itself still spans the whole row).
"""

from __future__ import annotations

import random
from typing import Optional

import torch

from ..processing.batching import IGNORE, EncodedRow
from ..processing.images import ImageError
from ..processing.prompts import Slot
from .readers import IMAGE, DataError, Example

OPEN, CLOSE = "\ue000", "\ue001"  # private-use characters: no template or tokenizer writes them


def _lead_space(text: str) -> int:
    return len(text) - len(text.lstrip())


def _to_message(role: str, text: str) -> dict:
    """A turn's text with <image> placeholders -> chat content parts (text next to an image is stripped, so the
    template decides the layout, as LLaVA's preprocessing moves the image to the front)."""
    parts = []
    pieces = text.split(IMAGE)
    for k, piece in enumerate(pieces):
        if k:
            parts.append({"type": "image"})
        piece = piece.strip() if len(pieces) > 1 else piece
        if piece:
            parts.append({"type": "text", "text": piece})
    return {"role": role, "content": parts}


class Collator:
    """examples -> a training batch (the processor's keys + "labels"). Bad examples raise DataError."""

    def __init__(self, processor, template: str = "chat", max_length: Optional[int] = None,
                 pack_length: Optional[int] = None, caption_prompt: str = "Describe the image.",
                 caption_suffix: str = "\n", chunk_end: Optional[str] = None):
        if template not in ("chat", "plain"):
            raise ValueError(f"template must be 'chat' or 'plain', not {template!r}")
        self.processor, self.template = processor, template
        self.tok = processor.tokenizer
        self.max_length = max_length or processor.max_length
        self.pack_length = pack_length
        self.caption_prompt, self.caption_suffix = caption_prompt, caption_suffix
        self.eos = self.tok.special_tokens.get("eos_token")
        self.chunk_end = chunk_end if chunk_end is not None else (self.eos or "\n")
        self.stop_texts = [t for t in (self.tok.id_to_token(i) for i in processor.eos_token_ids) if t]
        self.format = processor.format
        if pack_length and not self.format.packable:
            raise ValueError(f"{self.format.name} training rows cannot be packed (its prefix attends both ways); "
                             f"train without packing")

    # ------------------------------------------------------------------------------------------ marked text
    def marked_text(self, ex: Example) -> tuple[str, bool]:
        """(text with OPEN/CLOSE around the loss spans, whether it came from the chat template)."""
        if ex.kind == "interleaved":
            return self._interleaved(ex.pieces), False
        if self.template == "plain":
            text = ex.caption if ex.kind == "caption" else next(t for r, t in ex.turns if r == "assistant")
            return IMAGE * len(ex.images) + self._span(text + self.caption_suffix), False
        if ex.kind == "caption":
            turns = [("user", IMAGE * len(ex.images) + self.caption_prompt), ("assistant", ex.caption)]
        else:
            turns = ex.turns
        return self._chat(turns), True

    @staticmethod
    def _span(text: str) -> str:
        k = _lead_space(text)  # the span opens at the first visible character (see module docstring)
        return text[:k] + OPEN + text[k:] + CLOSE

    def _chat(self, turns: list) -> str:
        messages = [_to_message(role, text) for role, text in turns]
        render = self.processor.apply_chat_template
        full = render(messages, add_generation_prompt=False)
        out, pos = [], 0
        for k, (role, answer) in enumerate(turns):
            if role != "assistant":
                continue
            prompt, through = render(messages[:k], add_generation_prompt=True), render(messages[:k + 1], False)
            if not (full.startswith(prompt) and full.startswith(through) and len(prompt) <= len(through)):
                raise DataError("the chat template does not render turns as prefixes of the conversation, "
                                "so answers cannot be located")
            region = full[len(prompt):len(through)]
            close, extra = self._answer_end(region, answer)
            start = len(prompt) + _lead_space(region)
            out += [full[pos:start], OPEN, full[start:len(prompt) + close], extra, CLOSE]
            pos = len(prompt) + close
        out.append(full[pos:])
        return "".join(out)

    def _answer_end(self, region: str, answer: str) -> tuple[int, str]:
        """Where the loss span ends inside an assistant turn's text: after the first stop token that follows the
        answer; without one, right after the answer, and the EOS is written there."""
        answer = answer.strip()
        at = region.find(answer) if answer else -1
        after = at + len(answer) if at >= 0 else 0
        found = [(region.find(s, after), s) for s in self.stop_texts if region.find(s, after) >= 0]
        if found:
            where, stop = min(found)
            return where + len(stop), ""
        return (after if at >= 0 else len(region.rstrip())), (self.eos or "")

    def _interleaved(self, pieces: list) -> str:
        out, seen_image, labeled, last_text = [], False, False, False
        for piece in pieces:
            if piece is None:
                if labeled:
                    out += [self.chunk_end, CLOSE]
                out.append(IMAGE)
                seen_image, labeled, last_text = True, False, False
                continue
            if last_text:
                out.append("\n\n")
            if seen_image and not labeled:
                k = _lead_space(piece)
                out += [piece[:k], OPEN, piece[k:]]
                labeled = True
            else:
                out.append(piece)
            last_text = True
        if labeled:
            out += [self.chunk_end, CLOSE]
        return "".join(out)

    # ------------------------------------------------------------------------------------------ encoding
    def encode(self, ex: Example) -> EncodedRow:
        """One example -> one row (ids, labels, images). DataError when it cannot be used."""
        proc = self.processor
        marked, from_chat = self.marked_text(ex)
        if from_chat:
            marked = self.format.chat_text(marked, self.tok.special_tokens.get("bos_token"))
        segments = proc.split(marked)
        if sum(isinstance(s, Slot) for s in segments) != len(ex.images):
            raise DataError(f"the text has {sum(isinstance(s, Slot) for s in segments)} image placeholders but "
                            f"the example has {len(ex.images)} images")
        try:
            loaded = proc.load_images([list(ex.images)])
        except ImageError as e:
            raise DataError(f"bad image: {e}") from None
        image_batch = proc.process_images(loaded)
        expanded = proc.expand(segments, image_batch, 0)
        plain = proc.expand([s.replace(OPEN, "").replace(CLOSE, "") if isinstance(s, str) else s
                             for s in segments], image_batch, 0)
        text, spans = _take_spans(expanded)
        if text != plain:
            raise DataError("placeholder expansion moved the label markers (an answer directly after an image?)")
        enc = self.tok.backend.encode(text, add_special_tokens=proc.add_special_tokens(text, from_chat))
        ids = list(enc.ids)
        if self.max_length and len(ids) > self.max_length:
            raise DataError(f"{len(ids)} tokens (image tokens included) > max_length={self.max_length}")
        labels = [i if e > s and any(s < b and e > a for a, b in spans) else IGNORE
                  for i, (s, e) in zip(ids, enc.offsets)]
        if not any(x != IGNORE for x in labels):
            raise DataError("no token carries a label (empty answer or caption?)")
        row = proc.row(ids, image_batch, 0)
        row.labels, row.positions, row.indices = labels, list(range(len(ids))), [ex.index]
        return self.format.training_row(row)

    def approx_length(self, ex: Example) -> int:
        """Tokens of the example without reading its images (for length grouping): text + a per-image estimate.
        Chats are rendered once, without locating the answers, to keep this cheap over a whole data set."""
        if ex.kind == "chat" and self.template == "chat":
            text = self.processor.apply_chat_template([_to_message(r, t) for r, t in ex.turns], False)
        else:
            text = self.marked_text(ex)[0]
        text = text.replace(OPEN, "").replace(CLOSE, "").replace(IMAGE, "")
        return len(self.tok.encode(text, add_special_tokens=False)) + len(ex.images) * self._image_cost()

    def _image_cost(self) -> int:
        return self.format.image_cost(self.processor.rules, self.processor.image_processor.settings)

    # ------------------------------------------------------------------------------------------ batches
    def __call__(self, examples: list) -> dict:
        return self.collate([self.encode(ex) for ex in examples])

    def collate(self, rows: list) -> dict:
        if self.pack_length:
            rows = pack_rows(rows, self.pack_length)
        return self.processor.collate(rows, positions=bool(self.pack_length))


def _take_spans(text: str) -> tuple[str, list]:
    """Remove OPEN/CLOSE markers -> (clean text, [(start, end)] spans in it)."""
    out, spans, start, n = [], [], None, 0
    for ch in text:
        if ch == OPEN:
            start = n
        elif ch == CLOSE:
            spans.append((start, n))
        else:
            out.append(ch)
            n += 1
    return "".join(out), spans


def pack_rows(rows: list, max_tokens: int) -> list:
    """Greedy packing in order: consecutive rows share a row while the total stays within max_tokens."""
    groups, current, size = [], [], 0
    for row in rows:
        if current and size + len(row.input_ids) > max_tokens:
            groups.append(current)
            current, size = [], 0
        current.append(row)
        size += len(row.input_ids)
    if current:
        groups.append(current)
    return [_join(g) for g in groups]


def _join(rows: list) -> EncodedRow:
    if len(rows) == 1:
        return rows[0]
    out = EncodedRow([], labels=[], positions=[])
    for r in rows:
        out.input_ids += r.input_ids
        out.labels += r.labels
        out.positions += r.positions
        out.indices += r.indices
    with_px = [r for r in rows if r.pixels is not None and len(r.pixels)]
    if with_px:
        h = max(r.pixels.shape[-2] for r in with_px)
        w = max(r.pixels.shape[-1] for r in with_px)
        if with_px[0].image_sizes is not None:  # LLaVA-NeXT: [M, tiles, 3, S, S] with different tile counts
            tiles = max(r.pixels.shape[1] for r in with_px)
            out.pixels = torch.cat([_pad_tiles(r.pixels, tiles) for r in with_px])
            out.image_sizes = torch.cat([r.image_sizes for r in with_px])
        else:
            out.pixels = torch.cat([_pad_hw(r.pixels, h, w) for r in with_px])
        if with_px[0].pixel_mask is not None:
            out.pixel_mask = torch.cat([_pad_hw(r.pixel_mask, h, w) for r in with_px])
    if rows[0].image_mask is not None:  # block-diagonal: each example sees only its own images
        t, m = len(out.input_ids), sum(r.image_mask.shape[1] for r in rows)
        out.image_mask = torch.zeros(t, m, dtype=rows[0].image_mask.dtype)
        ti = mi = 0
        for r in rows:
            out.image_mask[ti:ti + r.image_mask.shape[0], mi:mi + r.image_mask.shape[1]] = r.image_mask
            ti, mi = ti + r.image_mask.shape[0], mi + r.image_mask.shape[1]
    return out


def _pad_tiles(x: torch.Tensor, tiles: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, 0, 0, tiles - x.shape[1]))


def _pad_hw(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]))


class BatchPlan:
    """Which examples each global step reads: a seeded shuffle per epoch (optionally grouped by length, as
    LLaVA's / transformers' length-grouped sampler), a pure function of (seed, step), so a resumed run reads
    exactly the batches the uninterrupted run would have. Incomplete last batches of an epoch are dropped."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, lengths: Optional[list] = None,
                 group_size: int = 8):
        if n < batch_size:
            raise ValueError(f"{n} examples are fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed, self.lengths, self.group_size = n, batch_size, seed, lengths, group_size
        self.steps_per_epoch = n // batch_size
        self._cache: dict = {}

    def epoch_order(self, epoch: int) -> list:
        if epoch not in self._cache:
            order = list(range(self.n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            if self.lengths is not None:  # sort within mega-batches: similar lengths share a batch, order stays random
                mega = self.batch_size * self.group_size
                order = [i for k in range(0, self.n, mega)
                         for i in sorted(order[k:k + mega], key=lambda j: -self.lengths[j])]
            self._cache = {epoch: order}
        return self._cache[epoch]

    def indices(self, step: int) -> list:
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.epoch_order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch
