"""What the scheduler runs: a `Job` (one request: its processor output, limits, sampling settings and the `sink`
its events go to) and `JobText`, which turns the job's tokens into the text the client sees.

Events handed to `job.sink`:

    ("delta", text)   a piece of the answer
    ("done", job)     finished: job.finish_reason ("stop" | "length" | "cancelled"), job.completion_tokens, timings
    ("error", exc)    the job failed (nothing more follows)
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..generation.loop import GenerationConfig
from ..generation.text_stream import TextStream

__all__ = ["Job", "JobText", "QueueFull", "Sampling"]


class QueueFull(Exception):
    """The queue holds `queue_limit` jobs already."""


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None


@dataclass(eq=False)
class Job:
    batch: dict  # processor output for ONE prompt (batch dimension 1)
    prompt_tokens: int
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple = ()
    ignore_eos: bool = False
    sink: Callable[[tuple], None] = lambda event: None
    constraint: Any = None  # structured output: a CompiledConstraint (vlmkit.generation.constraints); its own matcher
    # filled in by the scheduler
    completion_tokens: int = 0
    finish_reason: Optional[str] = None
    t_submit: float = 0.0
    t_start: float = 0.0  # its prefill started
    t_first: float = 0.0  # first token chosen (prefill done)
    t_end: float = 0.0
    batch_size: int = 0  # the most rows it was decoded together with (itself included)

    def __post_init__(self):
        self._cancelled = threading.Event()
        self._finished = False

    def generation_config(self, eos_ids: list, pad_token_id: int, bad_words: list) -> GenerationConfig:
        """This job's settings as the generation loop takes them (its own row's logit rules)."""
        s = self.sampling
        return GenerationConfig(
            max_new_tokens=self.max_tokens, do_sample=s.do_sample, temperature=s.temperature, top_p=s.top_p,
            top_k=s.top_k, repetition_penalty=s.repetition_penalty, seed=s.seed,
            eos_token_ids=[] if self.ignore_eos else list(eos_ids), pad_token_id=pad_token_id,
            bad_words_ids=bad_words, constraint=self.constraint)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def finished(self) -> bool:
        return self._finished

    def fail(self, exc: BaseException) -> None:
        if self._finished:
            return
        self.finish_reason, self._finished, self.t_end = "error", True, time.monotonic()
        self.sink(("error", exc))


class JobText:
    """A job's answer as text: the generation's `TextStream` (stop strings held back until decided, never
    streamed), its max_tokens, and the events its sink gets."""

    def __init__(self, job: Job, tokenizer, eos_ids):
        self.job = job
        self.stream = TextStream(tokenizer, job.stop, () if job.ignore_eos else eos_ids)
        self.done = False

    def emit(self, text: str) -> None:
        if text:
            self.job.sink(("delta", text))

    def push(self, tok: int) -> None:
        """Take the next chosen token; may finish the job ("stop" on eos or a stop string, "length")."""
        if self.done:
            return
        stream, job = self.stream, self.job
        self.emit(stream.push(tok))
        job.completion_tokens = len(stream.ids)
        if stream.done:
            self.finish("stop")
        elif len(stream.ids) >= job.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        job = self.job
        if reason != "cancelled":
            self.emit(self.stream.rest())
        job.finish_reason = reason
        job.t_end = time.monotonic()
        job._finished = True
        job.sink(("done", job))
