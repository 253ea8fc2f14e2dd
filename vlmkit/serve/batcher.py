"""The server's scheduler: one thread owns the model and runs continuous batching with chunked prefill.

    batcher = Batcher(vlm, max_batch=8, queue_limit=64, prefill_chunk=64)
    batcher.start()
    job = Job(batch=processor_output, prompt_tokens=n, max_tokens=64, sampling=Sampling(), sink=callback)
    batcher.submit(job)          # QueueFull when queue_limit jobs are already queued or running
    job.cancel()                 # the client went away: it stops at the next step

Each scheduler step:
1. queued jobs are admitted while fewer than `max_batch` run (prefilling or decoding);
2. prefill: fresh prompts of at most `prefill_chunk` tokens are prefilled whole, together in one forward (as a
   static batch would), at the step after they arrive; longer prompts share `prefill_chunk` tokens a step,
   shortest remaining first, so one long prompt never holds the others for more than a chunk;
3. sequences whose prefill is done (their first token chosen) join the decode batch;
4. one decode step for every row of the decode batch; finished rows leave it at once.
Rows decode together whatever their sampling settings: each keeps its own logit rules and RNG
(see `vlmkit.serve.sequences`). Events reach each job's sink as `vlmkit.serve.jobs` describes.

Stats: submitted, completed, cancelled, failed; batches = decode steps, rows = rows summed over decode steps
(rows / batches = mean decode batch), max_batch_seen = most rows in one decode step; prefill_chunks,
prefill_tokens.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Optional

import torch

from .jobs import Job, QueueFull, Sampling
from .sequences import DecodeBatch, Sequence, prefill_together

__all__ = ["Batcher", "Job", "Sampling", "QueueFull", "default_prefill_chunk"]


def default_prefill_chunk(device) -> int:
    """Prompt tokens per scheduler step: on a CPU a chunk at the end of a long context costs several short
    prompts' whole prefill, so chunks stay small; accelerators amortise bigger ones."""
    return 64 if torch.device(device).type == "cpu" else 512


class Batcher:
    def __init__(self, vlm, *, max_batch: int = 8, queue_limit: int = 64, batch_wait_ms: float = 5.0,
                 prefill_chunk: Optional[int] = None):
        """max_batch: sequences running at once (prefilling + decoding); queue_limit: queued + running before
        submit refuses; batch_wait_ms: on an idle server, how long to gather a burst before the first step;
        prefill_chunk: prompt tokens prefilled per step (None: `default_prefill_chunk` for the model's device)."""
        if max_batch < 1 or queue_limit < 1:
            raise ValueError("max_batch and queue_limit must be >= 1")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.vlm, self.model = vlm, vlm.model
        self.max_batch, self.queue_limit, self.batch_wait = max_batch, queue_limit, batch_wait_ms / 1000
        self.prefill_chunk = prefill_chunk or default_prefill_chunk(self.model.device)
        proc = vlm.processor
        self.tokenizer = proc.tokenizer
        self.eos_ids = list(proc.eos_token_ids)
        pad = proc.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.bad_words = [list(x) for x in proc.bad_words_ids]
        self.context = vlm.context_length
        self._pending: deque[Job] = deque()
        self._active: list[Job] = []  # admitted, not finished (shared with submit: under _cond)
        self._prefilling: list[Sequence] = []  # the scheduler thread's own
        self._decoding = DecodeBatch(self.model)
        self._cond = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.stats = {"submitted": 0, "completed": 0, "cancelled": 0, "failed": 0, "batches": 0, "rows": 0,
                      "max_batch_seen": 0, "prefill_chunks": 0, "prefill_tokens": 0}

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
            for job in self._active:
                job.cancel()
            self._cond.notify_all()
        for job in pending:
            job.fail(RuntimeError("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._active)

    def full(self) -> bool:
        return len(self._pending) + len(self._active) >= self.queue_limit

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._stop:
                raise RuntimeError("the server is shutting down")
            in_flight = len(self._pending) + len(self._active)
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
                while not self._pending and not self._active and not self._stop:
                    self._cond.wait()
                if self._stop:
                    break
                if not self._active:  # idle: gather a burst that arrives together
                    deadline = time.monotonic() + self.batch_wait
                    while len(self._pending) < self.max_batch and not self._stop:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                admitted = self._admit()
            for job in admitted:
                self._start_sequence(job)
            try:
                with torch.inference_mode():
                    self._step()
            except BaseException as e:  # noqa: BLE001 -- a failed decode step fails its rows, never the thread
                prefilling = {id(s.job) for s in self._prefilling}
                for job in list(self._active):  # the decode batch's rows and any that were joining it
                    if id(job) not in prefilling:
                        job.fail(e)
                self._decoding = DecodeBatch(self.model)
            self._retire()
        for seq in self._prefilling + self._decoding.rows:
            seq.text.finish("cancelled")
        self._prefilling, self._decoding = [], DecodeBatch(self.model)
        self._retire()

    def _admit(self) -> list[Job]:
        """Queued jobs that may start now (FIFO, while fewer than max_batch run); cancelled ones end here."""
        admitted = []
        while self._pending and len(self._active) < self.max_batch:
            job = self._pending.popleft()
            if job.cancelled:
                job.finish_reason, job._finished, job.t_end = "cancelled", True, time.monotonic()
                job.sink(("done", job))
                self._count(job)
                continue
            self._active.append(job)
            admitted.append(job)
        return admitted

    def _start_sequence(self, job: Job) -> None:
        try:
            seq = Sequence(job, self.model, self.tokenizer, eos_ids=self.eos_ids, pad_token_id=self.pad_token_id,
                           bad_words=self.bad_words, context=self.context)
        except Exception as e:  # noqa: BLE001 -- settings the generation loop refuses: this job only
            job.fail(e)
            return
        self._prefilling.append(seq)

    def _step(self) -> None:
        for seq in self._prefilling + self._decoding.rows:
            if seq.job.cancelled or self._stop:
                seq.text.finish("cancelled")
        self._decoding.drop_finished()
        chunk, ready = self.prefill_chunk, []
        # Fresh prompts of at most one chunk: prefilled whole, together, in one forward.
        short = [s for s in self._prefilling if not s.finished and s.done_tokens == 0 and s.length <= chunk]
        if len(short) > 1:
            try:
                cache, mask = prefill_together(short, self.model, self.pad_token_id)
            except Exception:  # noqa: BLE001 -- inputs that cannot share a batch, or one bad row: one by one below
                pass
            else:
                self._counted(len(short), sum(s.length for s in short))
                ready.append((cache, mask, short))
        # Longer prompts share `prefill_chunk` tokens a step, shortest remaining first (FIFO among equals).
        budget = chunk
        for seq in sorted(self._prefilling, key=lambda s: s.remaining):
            if seq.finished or seq.remaining == 0:
                continue
            is_short = seq.length <= chunk
            if not is_short and budget <= 0:
                continue
            try:
                fed = seq.prefill(seq.remaining if is_short else budget)
            except Exception as e:  # noqa: BLE001 -- e.g. image tokens that do not match the images
                seq.fail(e)
                continue
            budget -= 0 if is_short else fed
            self._counted(1, fed)
            if seq.remaining == 0:
                ready.append((seq.cache, seq.mask, [seq]))
        self._prefilling = [s for s in self._prefilling if s.remaining > 0 and not s.finished]
        for cache, mask, seqs in ready:
            self._decoding.join(cache, mask, seqs)
        batch = self._decoding
        if len(batch):
            n = len(batch)
            for seq in batch.rows:  # before the step: its tokens may finish the job
                seq.job.batch_size = max(seq.job.batch_size, n)
            batch.step()
            self.stats["batches"] += 1
            self.stats["rows"] += n
            self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], n)
            batch.drop_finished()

    def _counted(self, chunks: int, tokens: int) -> None:
        self.stats["prefill_chunks"] += chunks
        self.stats["prefill_tokens"] += tokens

    def _retire(self) -> None:
        with self._cond:
            done = [job for job in self._active if job.finished]
            if done:
                self._active = [job for job in self._active if not job.finished]
        for job in done:
            self._count(job)

    def _count(self, job: Job) -> None:
        reason = job.finish_reason
        name = "cancelled" if reason == "cancelled" else "failed" if reason == "error" else "completed"
        self.stats[name] += 1
