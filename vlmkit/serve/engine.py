"""What the routes share: request errors, field checks, turning a request into a queued `Job`, and streaming it.

Both API dialects (OpenAI, Ollama) and the Gradio UI reduce a request to chat messages in vlmkit's form
(`{"role", "content": [{"type": "text", "text"}, {"type": "image", "image": SOURCE}]}`, SOURCE a data: URI, an
http(s) URL or raw bytes) plus `GenParams`; `Engine.prepare` loads the images under the server's `ImageLimits`
(local paths never allowed), applies the chat template, counts the prompt's tokens (image tokens included) and
checks them against the context; `Engine.submit` queues the job and returns a `Stream` to iterate.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, replace
from typing import Any, Optional

import anyio

from ..processing.images import ImageError, ImageLimits, load_image
from ..processing.prompts import PromptError
from .batcher import Batcher, Job, QueueFull, Sampling


class APIError(Exception):
    """A request the server refuses; rendered as the dialect's JSON error with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# --------------------------------------------------------------------------------------------- field checks

def _type_name(value) -> str:
    return "null" if value is None else {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__)


def get_number(body: dict, name: str, *, low=None, high=None, low_open=False, integer=False, param=None):
    """body[name] checked: a number (an integer when `integer`) in [low, high] (low excluded when low_open);
    None when absent or null."""
    value = body.get(name, None)
    if value is None:
        return None
    param = param or name
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise bad(f"'{param}' must be {'an integer' if integer else 'a number'}, got {_type_name(value)} "
                  f"{value!r}"[:200], param)
    if integer:
        value = int(value)
    if low is not None and (value <= low if low_open else value < low):
        raise bad(f"'{param}' must be {'>' if low_open else '>='} {low}, got {value}", param)
    if high is not None and value > high:
        raise bad(f"'{param}' must be <= {high}, got {value}", param)
    return value


def get_bool(body: dict, name: str, default: bool, param=None) -> bool:
    value = body.get(name, None)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{param or name}' must be a boolean, got {_type_name(value)}", param or name)
    return value


def get_stop(value, param: str = "stop") -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > 16 or any(not isinstance(s, str) or not s for s in value):
        raise bad(f"'{param}' must be a non-empty string or a list of up to 16 non-empty strings", param)
    return tuple(value)


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

    def __post_init__(self):
        if self.seed is not None and self.seed < 0:
            self.seed = None  # -1 and the like: "random", as several clients send it
        elif self.seed is not None and self.seed >= 2**63:
            raise bad(f"'seed' must be < 2**63, got {self.seed}", "seed")

    def sampling(self) -> Sampling:
        if not self.temperature:
            return Sampling(repetition_penalty=self.repetition_penalty)
        return Sampling(True, float(self.temperature), float(self.top_p), int(self.top_k),
                        float(self.repetition_penalty), self.seed)


@dataclass
class Prepared:
    batch: dict
    prompt_tokens: int
    max_tokens: int
    params: GenParams
    t_arrival: float
    t_prepared: float


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
            raise APIError(500, f"generation failed: {type(value).__name__}: {value}", type="server_error")
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
    def __init__(self, vlm, batcher: Batcher, *, model_name: str, limits: ImageLimits,
                 max_tokens_limit: int = 4096, default_max_tokens: int = 512, prepare_threads: int = 2,
                 max_prompt_tokens: Optional[int] = None):
        self.vlm, self.batcher, self.model_name = vlm, batcher, model_name
        self.limits = replace(limits, allow_paths=False)  # never read server files on a client's behalf
        self.context = vlm.context_length
        self.max_tokens_limit = max(1, min(max_tokens_limit, self.context - 1))
        self.default_max_tokens = default_max_tokens
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
        self.max_prompt_tokens = max_prompt_tokens  # None: only the context bounds a prompt
        self.created = int(time.time())
        self._limiter = anyio.CapacityLimiter(prepare_threads)

    def check_model(self, name, *, ollama: bool = False) -> None:
        if name is None:
            raise APIError(400, "'model' is required", param="model", code="missing_required_parameter")
        if not isinstance(name, str):
            raise bad(f"'model' must be a string, got {_type_name(name)}", "model")
        names = {self.model_name}
        if ollama or ":" in name:
            names |= {self.model_name + ":latest"}
        if name not in names:
            raise APIError(404, f"model {name!r} not found; this server serves {self.model_name!r}",
                           type="invalid_request_error", param="model", code="model_not_found")

    def check_busy(self) -> None:
        if self.batcher.full():
            raise _busy(f"server busy: queue_limit={self.batcher.queue_limit} requests are queued or running; "
                        "retry later")

    # ---------------------------------------------------------------------------------------- prepare
    def prepare(self, prompt, params: GenParams, images: Optional[list] = None, *,
                t_arrival: Optional[float] = None) -> Prepared:
        """Blocking: load images (limits), render the prompt, count tokens, check the context.
        `prompt` is chat messages whose image parts carry their source inline, or a raw string with `<image>`
        placeholders filled from `images`."""
        t_arrival = t_arrival if t_arrival is not None else time.monotonic()
        if params.max_tokens is not None and params.max_tokens > self.max_tokens_limit:
            raise bad(f"max_tokens={params.max_tokens} is over this server's limit of {self.max_tokens_limit}",
                      "max_tokens", "max_tokens_exceeded")
        limits = self.limits
        try:
            if isinstance(prompt, str):
                loaded = self._load_all(list(images or []), limits)
                batch = self.vlm.processor([prompt], [loaded], max_length=10**9)
            else:
                prompt = self._load_inline(prompt, limits)
                batch = self.vlm.processor([prompt], None, max_length=10**9)
        except ImageError as e:
            raise bad(f"invalid image: {e}", "messages", "invalid_image") from None
        except (PromptError, ValueError) as e:
            raise bad(f"invalid prompt: {e}", "messages", "invalid_prompt") from None
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
        return Prepared(batch, n, max_tokens, params, t_arrival, time.monotonic())

    def _load_all(self, sources: list, limits: ImageLimits) -> list:
        if len(sources) > limits.max_images:
            raise ImageError(f"too many images: {len(sources)} > max_images={limits.max_images} per request")
        return [load_image(src, limits=limits, index=i) for i, src in enumerate(sources)]

    def _load_inline(self, messages: list, limits: ImageLimits) -> list:
        sources = [part["image"] for m in messages for part in m["content"] if part.get("type") == "image"]
        loaded = iter(self._load_all(sources, limits))
        return [{**m, "content": [{"type": "image", "image": next(loaded)} if part.get("type") == "image" else part
                                  for part in m["content"]]} for m in messages]

    async def prepare_async(self, prompt, params: GenParams, images=None) -> Prepared:
        t_arrival = time.monotonic()
        self.check_busy()  # cheap refusal before decoding images
        return await anyio.to_thread.run_sync(
            lambda: self.prepare(prompt, params, images, t_arrival=t_arrival), limiter=self._limiter)

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
                  sampling=p.sampling(), stop=tuple(p.stop), ignore_eos=p.ignore_eos, sink=sink)
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


def _busy(message: str) -> APIError:
    return APIError(429, message, type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})


# --------------------------------------------------------------------------------------------- request body

class BodyTooLarge(Exception):
    """Raised by the body-limit middleware while a request body streams in past the limit."""


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request) -> dict:
    """The request body as a JSON object, or an APIError saying what is wrong with it."""
    from starlette.requests import ClientDisconnect

    try:
        raw = await request.body()
    except BodyTooLarge as e:
        raise APIError(413, str(e), code="payload_too_large") from None
    except ClientDisconnect:
        raise bad("the client disconnected while sending the body") from None
    if not raw.strip():
        raise bad("the request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except json.JSONDecodeError as e:
        raise bad(f"malformed JSON in the request body: {e.msg} at line {e.lineno} column {e.colno}",
                  code="invalid_json") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"malformed JSON in the request body: {type(e).__name__}: {str(e)[:200]}",
                  code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {_type_name(body)}", code="invalid_json")
    return body
