"""OpenAI's legacy text completions: POST /v1/completions.

The prompt is sent as written, with no chat template (the model's BOS rule still applies), as OpenAI and vLLM do.
vLLM's /v1/completions takes no images; vlmkit takes them as vLLM's offline `LLM.generate` does: `<image>`
placeholders in the prompt, filled in order from `multi_modal_data: {"image": [...]}` (an extra field; the openai
client sends it with `extra_body=`), each a data: URI (or an http(s) URL with `--allow-remote-images`). Sampling
fields, checks and errors are those of /v1/chat/completions; `max_tokens` defaults to 16, as OpenAI's and vLLM's.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .checks import APIError, bad, get_bool, log_api_error, read_json, show_value, type_name
from .engine import GenParams
from .openai_routes import error_body, finish_reason, parse_params, usage

router = APIRouter()

DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for this endpoint


def parse_prompt(value) -> str:
    """`prompt`: a string, or a list holding one string (what some clients send)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        raise bad(f"'prompt' holds {len(value)} prompts; this server takes one per request (send them as separate "
                  "requests: they are batched together)", "prompt")
    if isinstance(value, list) and value and all(isinstance(v, (int, list)) and not isinstance(v, bool)
                                                 for v in value):
        raise bad("'prompt' as token ids is not supported by this server; send the text", "prompt")
    raise bad(f"'prompt' must be a string, got {type_name(value)} {show_value(value)}", "prompt")


def parse_images(value, allow_remote: bool) -> list[str]:
    """`multi_modal_data`: {"image": SOURCE or [SOURCE, ...]}, SOURCE a data: URI, an http(s) URL or {"url": ...}."""
    if value is None:
        return []
    if not isinstance(value, dict):
        raise bad("'multi_modal_data' must be an object like {\"image\": [\"data:image/png;base64,...\"]}",
                  "multi_modal_data")
    for key in value:
        if key != "image":
            raise bad(f"'multi_modal_data.{key}' is not supported: this server takes images only", "multi_modal_data")
    images = value.get("image")
    if images is None:
        return []
    if not isinstance(images, list):
        images = [images]
    out = []
    for i, item in enumerate(images):
        where = f"multi_modal_data.image[{i}]"
        url = item.get("url") if isinstance(item, dict) else item
        if not isinstance(url, str) or not url:
            raise bad(f"'{where}' must be a data: URI or an http(s) URL string, got {type_name(item)}", where)
        head = url[:8].lower()
        if head.startswith(("http://", "https://")):
            if not allow_remote:
                raise bad(f"'{where}': remote image URLs are disabled on this server (start it with "
                          "--allow-remote-images); send the image as a data: URI", where, "remote_images_disabled")
        elif not head.startswith("data:"):
            raise bad(f"'{where}' must be a data: URI or an http(s) URL, got {url[:40]!r}", where, "invalid_image_url")
        out.append(url)
    return out


def _check_unsupported(body: dict) -> None:
    if body.get("suffix"):
        raise bad("'suffix' (insertion) is not supported by this server", "suffix")
    for name in ("best_of", "n"):
        value = body.get(name)
        if value is not None and value != 1:
            raise bad(f"only {name}=1 is supported", name)


async def _prepare(engine, prompt: str, params: GenParams, images: list):
    """engine.prepare_async, its errors naming this API's fields (the engine speaks of chat messages)."""
    try:
        return await engine.prepare_async(prompt, params, images)
    except APIError as e:
        if e.param == "messages":
            e.param = "multi_modal_data" if e.code == "invalid_image" else "prompt"
            if e.image_index is not None:
                e.message = f"multi_modal_data.image[{e.image_index}]: {e.message}"
            elif e.code == "invalid_prompt":
                e.message += (" (images go where the prompt has <image>, one placeholder per image of "
                              "multi_modal_data.image)")
        raise


@router.post("/v1/completions")
async def completions(request: Request):
    engine = request.app.state.engine
    body = await read_json(request)
    engine.check_model(body.get("model"))
    _check_unsupported(body)
    prompt = parse_prompt(body.get("prompt"))
    images = parse_images(body.get("multi_modal_data"), engine.limits.allow_remote)
    echo = get_bool(body, "echo", False)
    params, stream, include_usage = parse_params(body)
    if params.max_tokens is None:
        params.max_tokens = min(DEFAULT_MAX_TOKENS, engine.max_tokens_limit)
    prepared = await _prepare(engine, prompt, params, images)
    handle = engine.submit(prepared)
    ident, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), engine.model_name
    head = prompt if echo else ""

    def choice(text: str, finish=None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    if not stream:
        text = await handle.text(request)
        return JSONResponse({"id": ident, "object": "text_completion", "created": created, "model": model,
                             "choices": [choice(head + text, finish_reason(handle.job.finish_reason))],
                             "usage": usage(handle)})

    def event(choices: list, **extra) -> str:
        data = {"id": ident, "object": "text_completion", "created": created, "model": model, "choices": choices,
                **extra}
        if include_usage:
            data.setdefault("usage", None)
        return f"data: {json.dumps(data)}\n\n"

    async def events():
        try:
            if head:
                yield event([choice(head)])
            async for piece in handle:
                yield event([choice(piece)])
            yield event([choice("", finish_reason(handle.job.finish_reason))])
            if include_usage:
                yield event([], usage=usage(handle))
            yield "data: [DONE]\n\n"
        except APIError as e:  # the response has started: the error travels as an event
            log_api_error(request.method, request.url.path, e)
            yield f"data: {json.dumps(error_body(e))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
