"""OpenAI-compatible routes: POST /v1/chat/completions, GET /v1/models, GET /v1/models/{id} (/v1/completions:
completions_routes.py).

Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}` (rendered in app.py).
Extensions beyond OpenAI's fields (as vLLM names them): `top_k`, `repetition_penalty`, `ignore_eos`.
`response_format` (json_object, json_schema) constrains the answer (see response_formats.py), as in
/v1/completions.
Temperature absent or 0 decodes greedily (vlmkit's default); > 0 samples.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .checks import (MIN_REPETITION_PENALTY, APIError, bad, get_bool, get_number, get_stop, log_api_error,
                     read_json, show_value)
from .engine import GenParams
from .response_formats import openai_constraint

router = APIRouter()

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def parse_messages(value, allow_remote: bool) -> list[dict]:
    """OpenAI messages -> vlmkit chat messages whose image parts carry their source (a data: URI or URL)."""
    if not isinstance(value, list) or not value:
        raise bad("'messages' must be a non-empty array of {role, content} objects", "messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role in ("tool", "function"):
            raise bad(f"{where}: role {show_value(role)} is not supported (this server has no tool calling)",
                      f"{where}.role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad(f"{where}.role must be one of {', '.join(ROLES)}, got {show_value(role)}", f"{where}.role")
        content = message.get("content")
        if content is None:
            content = []
        elif isinstance(content, str):
            content = [{"type": "text", "text": content}]
        elif not isinstance(content, list):
            raise bad(f"{where}.content must be a string or an array of content parts", f"{where}.content")
        parts = []
        for j, part in enumerate(content):
            pwhere = f"{where}.content[{j}]"
            if not isinstance(part, dict):
                raise bad(f"{pwhere} must be an object like {{'type': 'text', 'text': ...}}", pwhere)
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise bad(f"{pwhere}.text must be a string", f"{pwhere}.text")
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str) or not url:
                    raise bad(f"{pwhere}.image_url.url must be a string (a data: URI or an http(s) URL)",
                              f"{pwhere}.image_url")
                head = url[:8].lower()
                if head.startswith(("http://", "https://")):
                    if not allow_remote:
                        raise bad(f"{pwhere}: remote image URLs are disabled on this server (start it with "
                                  "--allow-remote-images); send the image as a data: URI", f"{pwhere}.image_url",
                                  "remote_images_disabled")
                elif not head.startswith("data:"):
                    raise bad(f"{pwhere}.image_url.url must be a data: URI or an http(s) URL, got "
                              f"{url[:40]!r}", f"{pwhere}.image_url", "invalid_image_url")
                parts.append({"type": "image", "image": url})
            else:
                raise bad(f"{pwhere}: unsupported content part type {show_value(kind)}; use 'text' or 'image_url'",
                          f"{pwhere}.type")
        out.append({"role": ROLES[role], "content": parts})
    return out


def parse_params(body: dict) -> tuple[GenParams, bool, bool]:
    """-> (params, stream, include_usage)."""
    tokens_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = get_number(body, tokens_field, low=1, integer=True)
    n = get_number(body, "n", low=1, integer=True)
    if n not in (None, 1):
        raise bad("only n=1 is supported", "n")
    for name in ("frequency_penalty", "presence_penalty"):  # checked, not applied
        get_number(body, name, low=-2, high=2)
    if body.get("logprobs"):
        raise bad("logprobs are not supported by this server", "logprobs")
    if body.get("tools") or body.get("functions"):
        raise bad("tools / function calling are not supported by this server", "tools")
    stream = get_bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    include_usage = get_bool(opts or {}, "include_usage", False, "stream_options.include_usage")
    constraint, constraint_param = openai_constraint(body)
    params = GenParams(
        max_tokens=max_tokens, max_tokens_param=tokens_field,
        temperature=get_number(body, "temperature", low=0, high=2),
        top_p=get_number(body, "top_p", low=0, high=1, low_open=True) or 1.0,
        top_k=get_number(body, "top_k", low=0, integer=True) or 0,
        repetition_penalty=get_number(body, "repetition_penalty", low=MIN_REPETITION_PENALTY, high=100) or 1.0,
        seed=get_number(body, "seed", integer=True),
        stop=get_stop(body.get("stop")),
        ignore_eos=get_bool(body, "ignore_eos", False),
        constraint=constraint, constraint_param=constraint_param,
    )
    return params, stream, include_usage


def usage(stream) -> dict:
    p, c = stream.prepared.prompt_tokens, stream.job.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def finish_reason(reason) -> str:
    return "length" if reason == "length" else "stop"


def error_body(e: APIError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    engine = request.app.state.engine
    body = await read_json(request)
    engine.check_model(body.get("model"))
    messages = parse_messages(body.get("messages"), engine.limits.allow_remote)
    params, stream, include_usage = parse_params(body)
    prepared = await engine.prepare_async(messages, params)
    handle = engine.submit(prepared)
    ident, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), engine.model_name

    if not stream:
        text = await handle.text(request)
        return JSONResponse({
            "id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason(handle.job.finish_reason)}],
            "usage": usage(handle),
        })

    def chunk(delta: dict, finish=None, **extra) -> str:
        data = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
        if include_usage:
            data.setdefault("usage", None)
        return f"data: {json.dumps(data)}\n\n"

    async def events():
        try:
            yield chunk({"role": "assistant", "content": ""})
            async for piece in handle:
                yield chunk({"content": piece})
            yield chunk({}, finish_reason(handle.job.finish_reason))
            if include_usage:
                last = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": usage(handle)}
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"
        except APIError as e:  # the response has started: the error travels as an event
            log_api_error(request.method, request.url.path, e)
            yield f"data: {json.dumps(error_body(e))}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # normal end, error, or the client went away (the generator is closed / cancelled)
            handle.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _model_card(engine) -> dict:
    return {"id": engine.model_name, "object": "model", "created": engine.created, "owned_by": "vlmkit",
            "max_model_len": engine.context}


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [_model_card(request.app.state.engine)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    engine = request.app.state.engine
    engine.check_model(model_id)
    return _model_card(engine)
