"""What the routes share: turning a request into a queued `Job`, and streaming it (request checks: checks.py).

Both API dialects (OpenAI, Ollama) and the Gradio UI reduce a request to chat messages in vlmkit's form
(`{"role", "content": [{"type": "text", "text"}, {"type": "image", "image": SOURCE}]}`, SOURCE a data: URI, an
http(s) URL or raw bytes) plus `GenParams`; `Engine.prepare` loads the images under the server's `ImageLimits`
(local paths never allowed), applies the chat template, counts the prompt's tokens (image tokens included) and
checks them against the context; `Engine.submit` queues the job and returns a `Stream` to iterate.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import Any, Optional

import anyio

from ..allocator import release_freed_memory
from ..api import is_default_model
from ..generation.constraints import Constraint
from ..processing.early_resize import shrink_hint_for
from ..processing.images import TRIM_AFTER_PIXELS, ImageError, ImageLimits, load_images
from ..processing.prompts import PromptError
from .batcher import Batcher, Job, QueueFull, Sampling
from .checks import APIError, bad, show_value, type_name
from .image_inputs import DownloadSlotsFull, Downloader, PixelGate, image_sources, with_sources


# --------------------------------------------------------------------------------------------- params

@dataclass
class GenParams:
    max_tokens: Optional[int] = None  # None: the server default, cut to what the context leaves
    temperature: Optional[float] = None  # None or 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop: tuple = ()
    ignore_eos: bool = False
    max_tokens_param: str = "max_tokens"  # the field the request set max_tokens with, for errors
    constraint: Optional[Constraint] = None  # structured output (response_format / format)
    constraint_param: str = "response_format"  # the field it came from, for errors

    def __post_init__(self):
        if self.seed is not None and self.seed < 0:
            self.seed = None  # -1 and the like: "random", as several clients send it
        elif self.seed is not None and self.seed >= 2**63:
            raise bad(f"'seed' must be < 2**63, got {self.seed}", "seed")

    def sampling(self) -> Sampling:
        """As vLLM: a temperature under 1e-5 decodes greedily (its limit), one under 1e-2 is raised to 1e-2, as
        dividing the logits by less overflows them to inf and the probabilities to NaN."""
        if not self.temperature or self.temperature < 1e-5:
            return Sampling(repetition_penalty=self.repetition_penalty)
        return Sampling(True, max(float(self.temperature), 1e-2), float(self.top_p), int(self.top_k),
                        float(self.repetition_penalty), self.seed)


@dataclass
class Prepared:
    batch: dict
    prompt_tokens: int
    max_tokens: int
    params: GenParams
    t_arrival: float
    t_prepared: float
    constraint: Any = None  # the params' constraint compiled for the tokenizer (a CompiledConstraint)


class Stream:
    """Async iterator over a job's text pieces; then `.job` holds finish_reason, token counts and timings.
    `cancel()` stops the job's row (routes call it when the client goes away)."""

    def __init__(self, job: Job, prepared: Prepared, queue: asyncio.Queue):
        self.job, self.prepared, self._queue = job, prepared, queue
        self.text_parts: list[str] = []
        self.ended = False  # the terminal event ("done" / "error") was read

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        if self.ended:
            raise StopAsyncIteration
        kind, value = await self._queue.get()
        if kind == "delta":
            self.text_parts.append(value)
            return value
        self.ended = True
        if kind == "error":
            if isinstance(value, APIError):
                raise value
            if isinstance(value, ValueError):  # a setting generation refused
                raise bad(f"generation refused the request: {value}")
            raise APIError(500, f"generation failed: {type(value).__name__}: {value}", type="server_error") from value
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.job.cancel()

    async def text(self, request=None, poll_s: float = 0.25) -> str:
        """The whole answer; with a Starlette `request`, a client that disconnects cancels the job."""
        waiter = None
        if request is not None:
            async def watch():
                while not self.job.finished:
                    if await request.is_disconnected():
                        self.job.cancel()
                        return
                    await asyncio.sleep(poll_s)
            waiter = asyncio.ensure_future(watch())
        try:
            async for _ in self:
                pass
        finally:
            if waiter is not None:
                waiter.cancel()
            if not self.job.finished:
                self.job.cancel()
        return "".join(self.text_parts)

    @property
    def timings_ns(self) -> dict:
        """Ollama's duration fields, in nanoseconds."""
        job, p = self.job, self.prepared
        ns = lambda s: max(0, int(s * 1e9))  # noqa: E731
        return {
            "total_duration": ns((job.t_end or time.monotonic()) - p.t_arrival),
            "load_duration": ns(job.t_start - job.t_submit) if job.t_start else 0,  # waiting for the model
            "prompt_eval_count": p.prompt_tokens,
            "prompt_eval_duration": ns(job.t_first - job.t_start) if job.t_first else 0,
            "eval_count": job.completion_tokens,
            "eval_duration": ns(job.t_end - job.t_first) if job.t_first and job.t_end else 0,
        }


# --------------------------------------------------------------------------------------------- engine

class Engine:
    """prepare_async keeps requests from waiting on each other's image work: remote images download in their own
    threads (at most `max_fetches` at once, each under one hard deadline; a request that finds every slot taken
    gets 429 rather than a place in a queue); requests with images prepare in up to `image_threads` threads and
    decode once `decode_pixels` leaves room for their pixels (default: two full per-request budgets and half of
    one more, so small images never queue behind large ones); text-only requests render in `prepare_threads`
    threads of their own that image work never fills."""

    def __init__(self, vlm, batcher: Batcher, *, model_name: str, limits: ImageLimits,
                 max_tokens_limit: int = 4096, default_max_tokens: int = 512, prepare_threads: int = 2,
                 image_threads: int = 8, max_fetches: int = 16, decode_pixels: Optional[int] = None,
                 max_prompt_tokens: Optional[int] = None, max_model_len: Optional[int] = None):
        self.vlm, self.batcher, self.model_name = vlm, batcher, model_name
        self.limits = replace(limits, allow_paths=False)  # never read server files on a client's behalf
        self.context = vlm.context_length
        if max_model_len is not None:
            if not 2 <= max_model_len <= self.context:
                raise ValueError(f"max_model_len must be in [2, {self.context}] (the model's context), got "
                                 f"{max_model_len}")
            self.context = max_model_len
        self.max_tokens_limit = max(1, min(max_tokens_limit, self.context - 1))
        self.default_max_tokens = default_max_tokens
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
        self.max_prompt_tokens = max_prompt_tokens  # None: only the context bounds a prompt
        self.created = int(time.time())
        # The README's examples and `vlmkit.load("default")` call the embedded model "default".
        self.aliases = ("default",) if is_default_model(vlm) else ()
        self._image_limiter = anyio.CapacityLimiter(image_threads)
        self._text_limiter = anyio.CapacityLimiter(prepare_threads)
        self.decoding = PixelGate(decode_pixels or self.limits.max_request_pixels * 5 // 2)
        self.downloads = Downloader(self.limits, max_fetches)
        # Huge images are decoded straight to a size the family's preprocessing still reduces from.
        self._shrink = shrink_hint_for(getattr(vlm.processor, "image_processor", None))

    def check_model(self, name, *, ollama: bool = False) -> None:
        if name is None:
            raise APIError(400, "'model' is required", param="model", code="missing_required_parameter")
        if not isinstance(name, str):
            raise bad(f"'model' must be a string, got {type_name(name)}", "model")
        names = {self.model_name, *self.aliases}
        if ollama or ":" in name:
            names |= {n + ":latest" for n in names}
        if name not in names:
            raise APIError(404, f"model {show_value(name)} not found; this server serves {self.model_name!r}",
                           type="invalid_request_error", param="model", code="model_not_found")

    def check_max_tokens(self, params: GenParams) -> None:
        if params.max_tokens is not None and params.max_tokens > self.max_tokens_limit:
            name = params.max_tokens_param
            raise bad(f"'{name}' is {params.max_tokens}, over this server's limit of {self.max_tokens_limit}", name,
                      "max_tokens_exceeded")

    def check_busy(self) -> None:
        if self.batcher.full():
            raise _busy(f"server busy: queue_limit={self.batcher.queue_limit} requests are queued or running; "
                        "retry later")

    # ---------------------------------------------------------------------------------------- prepare
    def prepare(self, prompt, params: GenParams, images: Optional[list] = None, *,
                t_arrival: Optional[float] = None) -> Prepared:
        """Blocking: load images (limits), render the prompt, count tokens, check the context.
        `prompt` is chat messages whose image parts carry their source inline, or a raw string with `<image>`
        placeholders filled from `images`. Image sources may be already downloaded (`FetchedImage`)."""
        t_arrival = t_arrival if t_arrival is not None else time.monotonic()
        self.check_max_tokens(params)
        constraint = self._compile(params)
        try:
            batch, decoded_pixels = self._render(prompt, images)
        except ImageError as e:
            raise _invalid_image(e) from None
        except (PromptError, ValueError) as e:
            raise bad(f"invalid prompt: {e}", "messages", "invalid_prompt") from None
        if decoded_pixels >= TRIM_AFTER_PIXELS:
            release_freed_memory()  # the request's decoded images are gone now: hand their memory back to the OS
        n = int(batch["attention_mask"].sum())
        if self.max_prompt_tokens is not None and n > self.max_prompt_tokens:
            raise bad(f"the prompt is {n} tokens (image tokens included), over this server's limit of "
                      f"{self.max_prompt_tokens} (max_prompt_tokens, `vlmkit serve --max-prompt-tokens`); shorten it "
                      "or use fewer images", "messages", "prompt_too_long")
        room = self.context - n
        if params.max_tokens is None:
            if room < 1:
                raise bad(f"the prompt is {n} tokens (image tokens included), which fills the model's context of "
                          f"{self.context} tokens; shorten it or use fewer images", "messages",
                          "context_length_exceeded")
            max_tokens = min(self.default_max_tokens, room)
        else:
            max_tokens = params.max_tokens
            if max_tokens > room:
                raise bad(f"the prompt is {n} tokens (image tokens included) + max_tokens={max_tokens} is over the "
                          f"model's context of {self.context} tokens; shorten the prompt or lower max_tokens",
                          "messages", "context_length_exceeded")
        return Prepared(batch, n, max_tokens, params, t_arrival, time.monotonic(), constraint)

    def _compile(self, params: GenParams):
        """The request's structured-output constraint checked against the tokenizer (400 when refused)."""
        if params.constraint is None:
            return None
        eos = [] if params.ignore_eos else list(self.vlm.processor.eos_token_ids)
        try:
            return params.constraint.compile(self.vlm.processor.tokenizer, eos)
        except ValueError as e:
            raise bad(f"'{params.constraint_param}': {e}", params.constraint_param, "invalid_response_format") from None

    def _render(self, prompt, images) -> tuple[dict, int]:
        """The processor's batch for the prompt with its images loaded, and how many pixels those images held."""
        loaded = self._load_all(image_sources(prompt, images))
        pixels = sum(image.width * image.height for image in loaded)
        if isinstance(prompt, str):
            return self.vlm.processor([prompt], [loaded], max_length=10**9), pixels
        return self.vlm.processor([with_sources(prompt, None, loaded)[0]], None, max_length=10**9,
                                  plain_text=True), pixels

    def _load_all(self, sources: list) -> list:
        # Count and pixel budget are checked from the headers before decoding, and before waiting at the gate.
        return load_images(sources, self.limits, shrink=self._shrink, admit=self.decoding.admit)

    async def prepare_async(self, prompt, params: GenParams, images=None) -> Prepared:
        t_arrival = time.monotonic()
        self.check_busy()  # cheap refusals before downloading or decoding images
        self.check_max_tokens(params)
        sources = image_sources(prompt, images)
        if not sources:
            return await anyio.to_thread.run_sync(
                lambda: self.prepare(prompt, params, images, t_arrival=t_arrival), limiter=self._text_limiter)
        if len(sources) > self.limits.max_images:  # before downloading any of them
            raise _invalid_image(ImageError(f"too many images: {len(sources)} > max_images={self.limits.max_images}"))
        try:
            prompt, images = with_sources(prompt, images, await self.downloads.fetch_all(sources))
        except ImageError as e:
            raise _invalid_image(e) from None
        except DownloadSlotsFull as e:
            raise _busy(str(e)) from None
        return await anyio.to_thread.run_sync(
            lambda: self.prepare(prompt, params, images, t_arrival=t_arrival), limiter=self._image_limiter)

    # ---------------------------------------------------------------------------------------- submit
    def submit(self, prepared: Prepared) -> Stream:
        """Queue it (APIError 429 when the queue is full); must be called on the event loop."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(event: tuple) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the loop is gone (shutdown)
                pass

        p = prepared.params
        job = Job(batch=prepared.batch, prompt_tokens=prepared.prompt_tokens, max_tokens=prepared.max_tokens,
                  sampling=p.sampling(), stop=tuple(p.stop), ignore_eos=p.ignore_eos, sink=sink,
                  constraint=prepared.constraint)
        try:
            self.batcher.submit(job)
        except QueueFull as e:
            raise _busy(str(e)) from None
        except RuntimeError as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        return Stream(job, prepared, queue)

    def health(self) -> dict[str, Any]:
        b = self.batcher
        return {"status": "ok", "model": self.model_name, "queued": b.queued, "running": b.running,
                "max_batch": b.max_batch, "queue_limit": b.queue_limit, "context_length": self.context}


def _invalid_image(e: ImageError) -> APIError:
    if e.index is None:  # about the request's images together (count, pixel budget)
        return bad(f"images refused: {e.reason}", "messages", "invalid_image")
    return APIError(400, f"invalid image: {e}", param="messages", code="invalid_image", image_index=e.index)


def _busy(message: str) -> APIError:
    return APIError(429, message, type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
