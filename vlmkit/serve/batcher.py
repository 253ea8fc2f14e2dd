"""Request queue + batching thread: several prompts decoded together by vlmkit's generation loop.

    batcher = Batcher(vlm, max_batch=8, queue_limit=64, batch_wait_ms=5)
    batcher.start()
    job = Job(batch=processor_output, prompt_tokens=n, max_tokens=64, sampling=Sampling(), sink=callback)
    batcher.submit(job)          # QueueFull when queue_limit jobs are already queued or running
    job.cancel()                 # the client went away: its row stops at the next step

One thread owns the model. It waits for a job, collects more for `batch_wait_ms` (up to `max_batch`, only jobs
with the same sampling settings, since one `GenerationConfig` drives a batch), left-pads their processor outputs
into one batch (`collate`) and runs `vlmkit.generation.generate_tokens` over it. Each step's tokens are turned
into text per row (incremental detokenisation, OpenAI stop strings held back until decided, each row's own
max_tokens) and handed to the job's `sink` as events:

    ("delta", text)   a piece of the answer
    ("done", job)     finished: job.finish_reason ("stop" | "length" | "cancelled"), job.completion_tokens, timings
    ("error", exc)    the job failed (nothing more follows)

A cancelled row is reported finished to the loop (its `stop_check` flag), so it gets pad tokens and, once every
row of the batch is finished or cancelled, the loop stops. Requests that arrive while a batch runs wait for it.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..generation import GenerationConfig, _cut, _held_back, _incremental_decoder, find_stop, generate_tokens

__all__ = ["Batcher", "Job", "Sampling", "QueueFull", "collate", "CollateError"]


class QueueFull(Exception):
    """The queue holds `queue_limit` jobs already."""


class CollateError(ValueError):
    """Processor outputs that cannot be merged into one batch (they then run one by one)."""


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None


_unique = itertools.count()


@dataclass(eq=False)
class Job:
    batch: dict  # processor output for ONE prompt (batch dimension 1)
    prompt_tokens: int
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple = ()
    ignore_eos: bool = False
    sink: Callable[[tuple], None] = lambda event: None
    # filled in by the batcher
    completion_tokens: int = 0
    finish_reason: Optional[str] = None
    t_submit: float = 0.0
    t_start: float = 0.0  # its batch started (prefill)
    t_first: float = 0.0  # first token chosen (prefill done)
    t_end: float = 0.0
    batch_size: int = 0  # rows in the batch it ran in

    def __post_init__(self):
        self._cancelled = threading.Event()
        self._finished = False
        s = self.sampling
        # Jobs batch together only under one GenerationConfig. Greedy ignores temperature/top-p/top-k; a seeded
        # sampling job runs alone so its draws are those of `generate(..., seed=s)`.
        if not s.do_sample:
            self.key = ("greedy", s.repetition_penalty, self.ignore_eos)
        elif s.seed is not None:
            self.key = ("seeded", next(_unique))
        else:
            self.key = ("sample", s.temperature, s.top_p, s.top_k, s.repetition_penalty, self.ignore_eos)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def finished(self) -> bool:
        return self._finished


class _Row:
    """Per-row text state: incremental decoder, stop strings held back until decided."""

    def __init__(self, job: Job, tokenizer):
        self.job, self.tokenizer = job, tokenizer
        self.decoder = _incremental_decoder(tokenizer)
        self.ids: list[int] = []
        self.current, self.emitted = "", 0
        self.done = False

    def emit(self, text: str) -> None:
        if text:
            self.job.sink(("delta", text))

    def push(self, tok: int) -> None:
        job, stops = self.job, list(self.job.stop)
        self.ids.append(tok)
        job.completion_tokens += 1
        piece = self.decoder.push(tok)
        if piece:
            self.current += piece
            stop_at = find_stop(self.current, stops, self.emitted) if stops else None
            if stop_at is not None:
                self.emit(self.current[self.emitted:stop_at])
                self.emitted = stop_at
                self.finish("stop")
                return
            safe_end = len(self.current) - (_held_back(self.current, stops) if stops else 0)
            if safe_end > self.emitted:
                self.emit(self.current[self.emitted:safe_end])
                self.emitted = safe_end
        if len(self.ids) >= job.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        job = self.job
        if reason != "cancelled":
            # The full decode is the ground truth (as generate's stream): send what the pieces have not.
            final = _cut(self.tokenizer.decode(self.ids, skip_special_tokens=True), list(job.stop))
            if len(final) > self.emitted and final.startswith(self.current[: self.emitted]):
                self.emit(final[self.emitted:])
        job.finish_reason = reason
        job.t_end = time.monotonic()
        job._finished = True
        job.sink(("done", job))


def collate(batches: list[dict], pad_token_id: int) -> dict:
    """Merge single-prompt processor outputs into one left-padded batch, as the processor pads a batch:
    input_ids (pad id) and attention_mask / image_attention_mask (0) on the left; LLaVA pixel_values
    [N, 3, H, W] concatenated in row order; IDEFICS-family pixel_values [B, M, 3, H, W] and pixel_attention_mask
    [B, M, H, W] padded with all-zero images (skipped by the model) and zero pixels bottom/right."""
    try:
        return _collate(batches, pad_token_id)
    except (RuntimeError, IndexError) as e:  # shapes that do not line up (e.g. LLaVA images of two sizes)
        raise CollateError(f"cannot merge these prompts into one batch: {e}") from None


def _collate(batches: list[dict], pad_token_id: int) -> dict:
    if len(batches) == 1:
        return dict(batches[0])
    keys = set().union(*batches)
    known = {"input_ids", "attention_mask", "pixel_values", "pixel_attention_mask", "image_attention_mask"}
    if keys - known:
        raise CollateError(f"cannot merge batch keys {sorted(keys - known)}")
    if any(b["input_ids"].shape[0] != 1 for b in batches):
        raise CollateError("collate takes single-prompt batches")
    width = max(b["input_ids"].shape[1] for b in batches)
    out = {
        "input_ids": torch.cat([F.pad(b["input_ids"], (width - b["input_ids"].shape[1], 0), value=pad_token_id)
                                for b in batches]),
        "attention_mask": torch.cat([F.pad(b["attention_mask"], (width - b["attention_mask"].shape[1], 0))
                                     for b in batches]),
    }
    pv = [b.get("pixel_values") for b in batches]
    present = [p for p in pv if p is not None]
    if present and present[0].dim() == 4:  # LLaVA: one flat list of images
        out["pixel_values"] = torch.cat(present)
    elif present:
        if any(p.dim() != 5 for p in present):
            raise CollateError("mixed pixel_values layouts")
        m = max(p.shape[1] for p in present)
        h = max(p.shape[3] for p in present)
        w = max(p.shape[4] for p in present)
        ref = present[0]
        out["pixel_values"] = torch.cat([
            torch.zeros(1, m, ref.shape[2], h, w, dtype=ref.dtype) if p is None
            else F.pad(p, (0, w - p.shape[4], 0, h - p.shape[3], 0, 0, 0, m - p.shape[1])) for p in pv])
        masks = [b.get("pixel_attention_mask") for b in batches]
        if any(x is not None for x in masks):
            mref = next(x for x in masks if x is not None)
            out["pixel_attention_mask"] = torch.cat([
                torch.zeros(1, m, h, w, dtype=mref.dtype) if x is None
                else F.pad(x, (0, w - x.shape[3], 0, h - x.shape[2], 0, m - x.shape[1])) for x in masks])
    iams = [b.get("image_attention_mask") for b in batches]
    if any(x is not None for x in iams):
        if any(x is None for x in iams):
            raise CollateError("image_attention_mask missing in some rows")
        m = max(x.shape[2] for x in iams)
        out["image_attention_mask"] = torch.cat([F.pad(x, (0, m - x.shape[2], width - x.shape[1], 0)) for x in iams])
    return out


class Batcher:
    def __init__(self, vlm, *, max_batch: int = 8, queue_limit: int = 64, batch_wait_ms: float = 5.0):
        if max_batch < 1 or queue_limit < 1:
            raise ValueError("max_batch and queue_limit must be >= 1")
        self.vlm = vlm
        self.max_batch, self.queue_limit, self.batch_wait = max_batch, queue_limit, batch_wait_ms / 1000
        proc = vlm.processor
        self.tokenizer = proc.tokenizer
        self.eos_ids = list(proc.eos_token_ids)
        pad = proc.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.bad_words = [list(x) for x in proc.bad_words_ids]
        self.context = vlm.context_length
        self._pending: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.stats = {"submitted": 0, "completed": 0, "cancelled": 0, "failed": 0, "batches": 0, "rows": 0,
                      "max_batch_seen": 0}

    # ------------------------------------------------------------------------------------------ control
    def start(self) -> "Batcher":
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="vlmkit-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            pending, self._pending = list(self._pending), deque()
            for job in self._running:
                job.cancel()
            self._cond.notify_all()
        for job in pending:
            self._fail(job, RuntimeError("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._running)

    def full(self) -> bool:
        return len(self._pending) + len(self._running) >= self.queue_limit

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._stop:
                raise RuntimeError("the server is shutting down")
            in_flight = len(self._pending) + len(self._running)
            if in_flight >= self.queue_limit:
                raise QueueFull(f"server busy: {in_flight} requests queued or running (queue_limit="
                                f"{self.queue_limit}); retry later")
            job.t_submit = time.monotonic()
            self._pending.append(job)
            self.stats["submitted"] += 1
            self._cond.notify_all()
        return job

    # ------------------------------------------------------------------------------------------ thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                deadline = time.monotonic() + self.batch_wait
                while len(self._pending) < self.max_batch and not self._stop:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                group = self._take_group()
                self._running = list(group)
            try:
                if group:
                    self._run_group(group)
            except BaseException as e:  # noqa: BLE001 -- never let the thread die with jobs waiting
                for job in group:
                    if not job.finished:
                        self._fail(job, e)
            finally:
                with self._cond:
                    self._running = []
                for job in group:
                    self._count(job)

    def _take_group(self) -> list[Job]:
        """The oldest live job plus up to max_batch-1 more with the same key (FIFO); cancelled ones are dropped."""
        group, keep = [], deque()
        key = None
        while self._pending:
            job = self._pending.popleft()
            if job.cancelled:
                job.finish_reason, job._finished = "cancelled", True
                job.sink(("done", job))
                self._count(job)
                continue
            if key is None:
                key = job.key
            if job.key == key and len(group) < self.max_batch:
                group.append(job)
            else:
                keep.append(job)
        self._pending = keep
        return group

    def _count(self, job: Job) -> None:
        reason = job.finish_reason
        name = "cancelled" if reason == "cancelled" else "failed" if reason == "error" else "completed"
        self.stats[name] += 1

    def _fail(self, job: Job, exc: BaseException) -> None:
        job.finish_reason, job._finished, job.t_end = "error", True, time.monotonic()
        job.sink(("error", exc))

    def _run_group(self, group: list[Job]) -> None:
        fits = max(j.prompt_tokens for j in group) + max(j.max_tokens for j in group) <= self.context
        batch = None
        if fits:
            try:
                batch = collate([j.batch for j in group], self.pad_token_id)
            except CollateError:
                batch = None
        if batch is None and len(group) > 1:
            for job in group:  # cannot share one batch: one by one
                if not job.finished:
                    self._decode([job], collate([job.batch], self.pad_token_id))
            return
        self._decode(group, batch)

    def _decode(self, group: list[Job], batch: dict) -> None:
        s, ignore_eos = group[0].sampling, group[0].ignore_eos
        cfg = GenerationConfig(
            max_new_tokens=max(j.max_tokens for j in group), do_sample=s.do_sample, temperature=s.temperature,
            top_p=s.top_p, top_k=s.top_k, repetition_penalty=s.repetition_penalty, seed=s.seed,
            eos_token_ids=[] if ignore_eos else list(self.eos_ids), pad_token_id=self.pad_token_id,
            bad_words_ids=self.bad_words)
        device = self.vlm.model.device
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        rows = [_Row(job, self.tokenizer) for job in group]
        eos = set(cfg.eos_token_ids)
        start = time.monotonic()
        for job in group:
            job.t_start, job.batch_size = start, len(group)
        self.stats["batches"] += 1
        self.stats["rows"] += len(group)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(group))
        first = [True]

        def record(tokens: torch.Tensor) -> list[bool]:
            if first[0]:
                now = time.monotonic()
                for job in group:
                    job.t_first = now
                first[0] = False
            for row, tok in zip(rows, tokens.tolist()):
                if row.done:
                    continue
                if row.job.cancelled or self._stop:
                    row.finish("cancelled")
                elif tok in eos:
                    row.finish("stop")
                else:
                    row.push(tok)
            return [row.done for row in rows]

        with torch.inference_mode():
            for _ in generate_tokens(self.vlm.model, batch, cfg, max_length=self.context, stop_check=record):
                pass
        for row in rows:
            row.finish("length")  # rows the loop ended at max_new_tokens (no-op for finished rows)
