"""Ollama-compatible routes: POST /api/chat, POST /api/generate, GET /api/tags, POST /api/show, GET /api/ps,
GET /api/version.

As Ollama: images are raw base64 strings (data: URIs are accepted too), answers stream as JSON lines
(`application/x-ndjson`) unless `"stream": false`, and the last object has `done: true`, `done_reason` and the
durations in nanoseconds (total_duration, load_duration = time waiting for the model, which stays loaded,
prompt_eval_count/_duration, eval_count/_duration). Errors are `{"error": "..."}`.
Options read: temperature (absent or 0: greedy), top_p, top_k, num_predict (-1/-2: up to the server's
default), stop, seed, repeat_penalty; others are ignored. `format` ("json" or a JSON schema) constrains the
answer (response_formats.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from datetime import datetime, timezone

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .checks import (MIN_REPETITION_PENALTY, APIError, bad, get_bool, get_number, get_stop, log_api_error,
                     read_json, show_value, type_name)
from .engine import GenParams
from .response_formats import ollama_format

router = APIRouter()

OLLAMA_VERSION = "0.9.0"  # the API level these routes follow


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# A URL (any scheme), a Unix, home-relative or Windows path, or a file name with an image extension.
_LOCATION = re.compile(r"[a-z][a-z0-9+.-]*:|[/~\\]|\.\.?[/\\]|.*\.(png|jpe?g|gif|webp|bmp|tiff?|avif|ppm)$",
                       re.IGNORECASE)


def decode_image(value, where: str, max_bytes: int):
    """A raw base64 string (Ollama's form) -> bytes; a data: URI passes through for load_image.

    Base64 is tried first, as Ollama does: base64 of a JPEG starts with "/9j/", so a leading "/" is no sign of a
    path. A string that starts with "/" but does not decode to JPEG's first bytes cannot be an image (its first
    byte would be 0xFC-0xFF, which only JPEG's 0xFF 0xD8 begins with among image formats): that one is a path."""
    if not isinstance(value, str) or not value:
        raise bad(f"{where} must be a base64 string (the image file's bytes, base64-encoded), got "
                  f"{type_name(value)} {show_value(value)}")
    if value[:5].lower() == "data:":
        return value
    if len(value) * 3 // 4 > max_bytes + 3:
        raise bad(f"{where}: image too large: ~{len(value) * 3 // 4} bytes > max_bytes={max_bytes}")
    compact = "".join(value.split())
    try:
        data = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        data = None
    if data is not None and not (value.startswith("/") and not data.startswith(b"\xff\xd8")):
        return data
    if _LOCATION.match(value):
        raise bad(f"{where}: images are raw base64 strings here (the image file's bytes, base64-encoded) or data: "
                  f"URIs; URLs and file paths are not accepted, got {show_value(value)}")
    raise bad(f"{where} is not valid base64 (send the image file's bytes, base64-encoded, or a data: URI)")


def _images(value, where: str, max_bytes: int) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad(f"'{where}' must be an array of base64 strings")
    return [decode_image(v, f"{where}[{j}]", max_bytes) for j, v in enumerate(value)]


def parse_options(body: dict) -> GenParams:
    """Ollama's options -> GenParams."""
    opts = body.get("options")
    if opts is None:
        opts = {}
    if not isinstance(opts, dict):
        raise bad("'options' must be an object")
    num_predict = get_number(opts, "num_predict", integer=True, param="options.num_predict")
    if num_predict is not None and num_predict < 0:
        num_predict = None  # -1 (infinite) / -2 (fill the context): the server default, cut to the context
    elif num_predict == 0:
        raise bad("'options.num_predict' must be >= 1 (or -1)")
    return GenParams(
        max_tokens=num_predict, max_tokens_param="options.num_predict",
        temperature=get_number(opts, "temperature", low=0, high=100, param="options.temperature"),
        top_p=get_number(opts, "top_p", low=0, high=1, low_open=True, param="options.top_p") or 1.0,
        top_k=get_number(opts, "top_k", low=0, integer=True, param="options.top_k") or 0,
        repetition_penalty=get_number(opts, "repeat_penalty", low=MIN_REPETITION_PENALTY, high=100,
                                      param="options.repeat_penalty") or 1.0,
        seed=get_number(opts, "seed", integer=True, param="options.seed"),
        stop=get_stop(opts.get("stop"), "options.stop"),
        constraint=ollama_format(body.get("format")), constraint_param="format",
    )


def _check_unsupported(body: dict) -> None:
    if body.get("tools"):
        raise bad("'tools' are not supported by this server")


def parse_chat_messages(value, max_bytes: int) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise bad("'messages' must be a non-empty array of {role, content, images} objects")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise bad(f"{where}.role must be 'system', 'user' or 'assistant', got {show_value(role)}")
        content = m.get("content", "")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise bad(f"{where}.content must be a string")
        parts = [{"type": "image", "image": img} for img in _images(m.get("images"), f"{where}.images", max_bytes)]
        if content:
            parts.append({"type": "text", "text": content})
        out.append({"role": role, "content": parts})
    return out


async def _prepare(engine, prompt, params, images=None, *, image_fields: list, text_fields: str, raw: bool = False):
    """engine.prepare_async, its errors in this API's terms (Ollama's errors have only a message): which field
    holds the bad image or text, and that a raw prompt places its images with <image> placeholders itself."""
    try:
        return await engine.prepare_async(prompt, params, images)
    except APIError as e:
        if e.code == "invalid_image":
            i = e.image_index if e.image_index is not None else -1
            field = image_fields[i] if 0 <= i < len(image_fields) else image_fields[0].split("[0]")[0] + "[]"
            e.message = f"{field}: {e.message}"
        elif raw and e.code == "invalid_prompt":
            e.message = f"'prompt' with 'raw': true (no chat template): {e.message}"
        elif e.code in ("invalid_prompt", "context_length_exceeded"):
            e.message = f"{text_fields}: {e.message}"
        raise


async def _respond(request: Request, engine, prepared, kind: str, stream_mode: bool):
    """Stream (default) or one JSON object, Ollama style; kind is 'chat' or 'generate'."""
    handle = engine.submit(prepared)
    model = request.app.state.ollama_name

    def piece_obj(text: str) -> dict:
        if kind == "chat":
            return {"model": model, "created_at": _now(), "message": {"role": "assistant", "content": text},
                    "done": False}
        return {"model": model, "created_at": _now(), "response": text, "done": False}

    def final_obj(text: str) -> dict:
        out = piece_obj(text)
        out["done"] = True
        out["done_reason"] = "length" if handle.job.finish_reason == "length" else "stop"
        out.update(handle.timings_ns)
        if kind == "generate":
            out["context"] = []
        return out

    if not stream_mode:
        text = await handle.text(request)
        return JSONResponse(final_obj(text))

    async def lines():
        try:
            async for piece in handle:
                yield json.dumps(piece_obj(piece)) + "\n"
            yield json.dumps(final_obj("")) + "\n"
        except APIError as e:  # the response has started: the error travels as the last line
            log_api_error(request.method, request.url.path, e)
            yield json.dumps({"error": e.message}) + "\n"
        finally:
            handle.cancel()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.post("/api/chat")
async def chat(request: Request):
    engine = request.app.state.engine
    body = await read_json(request)
    engine.check_model(body.get("model"), ollama=True)
    _check_unsupported(body)
    messages = parse_chat_messages(body.get("messages"), engine.limits.max_bytes)
    params = parse_options(body)
    stream = get_bool(body, "stream", True)
    image_fields = [f"messages[{i}].images[{j}]" for i, m in enumerate(body["messages"])
                    for j in range(len(m.get("images") or []))]
    prepared = await _prepare(engine, messages, params, image_fields=image_fields or ["messages[0].images[0]"],
                              text_fields="'messages'")
    return await _respond(request, engine, prepared, "chat", stream)


@router.post("/api/generate")
async def generate(request: Request):
    engine = request.app.state.engine
    body = await read_json(request)
    engine.check_model(body.get("model"), ollama=True)
    _check_unsupported(body)
    prompt, system = body.get("prompt", ""), body.get("system")
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise bad("'prompt' must be a string")
    if system is not None and not isinstance(system, str):
        raise bad("'system' must be a string")
    if body.get("suffix"):
        raise bad("'suffix' (fill-in-the-middle) is not supported by this server")
    images = _images(body.get("images"), "images", engine.limits.max_bytes)
    params = parse_options(body)
    stream = get_bool(body, "stream", True)
    raw = get_bool(body, "raw", False)
    model = request.app.state.ollama_name
    if not prompt and not images:  # Ollama: an empty prompt just loads the model
        return JSONResponse({"model": model, "created_at": _now(), "response": "", "done": True,
                             "done_reason": "load"})
    image_fields = [f"images[{j}]" for j in range(len(images))] or ["images[0]"]
    if raw:  # the prompt as written (with <image> placeholders for the images), no chat template
        prepared = await _prepare(engine, prompt, params, images, image_fields=image_fields, text_fields="'prompt'",
                                  raw=True)
    else:
        messages = ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []) + [
            {"role": "user", "content": [{"type": "image", "image": x} for x in images]
             + ([{"type": "text", "text": prompt}] if prompt else [])}]
        prepared = await _prepare(engine, messages, params, image_fields=image_fields,
                                  text_fields="'prompt'" + (" and 'system'" if system else ""))
    return await _respond(request, engine, prepared, "generate", stream)


def _details(engine) -> dict:
    vlm = engine.vlm
    cfg = vlm.config
    n = sum(p.numel() for p in vlm.model.parameters())
    size = f"{n / 1e9:.1f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"
    family = cfg.extra.get("hf_architecture", cfg.family)
    return {"parent_model": "", "format": "safetensors", "family": family, "families": [family],
            "parameter_size": size, "quantization_level": str(vlm.model.dtype).removeprefix("torch.").upper()}


def _size(engine) -> int:
    return sum(p.numel() * p.element_size() for p in engine.vlm.model.parameters())


def _tag(request: Request) -> dict:
    engine, name = request.app.state.engine, request.app.state.ollama_name
    return {"name": name, "model": name,
            "modified_at": datetime.fromtimestamp(engine.created, timezone.utc).isoformat().replace("+00:00", "Z"),
            "size": _size(engine), "digest": hashlib.sha256(name.encode()).hexdigest(), "details": _details(engine)}


@router.get("/api/tags")
async def tags(request: Request):
    return {"models": [_tag(request)]}


@router.get("/api/ps")
async def ps(request: Request):
    tag = _tag(request)
    tag.update(expires_at="2999-01-01T00:00:00Z", size_vram=0)
    return {"models": [tag]}


@router.get("/api/version")
async def version():
    return {"version": OLLAMA_VERSION}


@router.post("/api/show")
async def show(request: Request):
    engine = request.app.state.engine
    body = await read_json(request)
    engine.check_model(body.get("model", body.get("name")), ollama=True)
    return {"modelfile": "", "parameters": "", "template": engine.vlm.processor.chat_template or "",
            "details": _details(engine), "model_info": {"general.architecture": _details(engine)["family"],
                                                        "context_length": engine.context},
            "capabilities": ["completion", "vision"], "modified_at": _tag(request)["modified_at"]}
