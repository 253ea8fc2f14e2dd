"""`create_app(vlm, ...)`: one FastAPI app with the OpenAI routes (/v1), the Ollama routes (/api), /health and
the Gradio chat UI at /. Model work happens on the batcher thread; image decoding and prompt rendering in a small
thread pool; the event loop only parses JSON and moves text.

Every refused request gets a 4xx with a JSON error saying what is wrong: OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` under /v1, Ollama's `{"error": "..."}` under /api.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Optional, Sequence, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..processing.images import ImageLimits
from .auth import APIKeyMiddleware
from .batcher import Batcher
from .checks import APIError, BodyTooLarge, log_api_error, show_value
from .engine import Engine

log = logging.getLogger("vlmkit.serve")

DEFAULT_MAX_BODY = 32 * 1024 * 1024  # a 20 MB image as base64 is ~27 MB


def error_response(path: str, e: APIError) -> JSONResponse:
    if path.startswith("/api/"):
        body = {"error": e.message}
    else:
        body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with 413: at once from Content-Length, else while it streams in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        too_large = APIError(413, f"request body too large: the limit is {self.max_bytes} bytes",
                             code="payload_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > self.max_bytes:
                log_api_error(scope.get("method", ""), path, too_large)
                return await error_response(path, too_large)(scope, receive, send)
        total, started = 0, False

        async def limited_receive():
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_bytes:
                    raise BodyTooLarge(too_large.message)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            log_api_error(scope.get("method", ""), path, too_large)
            await error_response(path, too_large)(scope, receive, send)


def create_app(vlm, *, model_name: str = "vlmkit", limits: Optional[ImageLimits] = None, max_batch: int = 8,
               queue_limit: int = 64, batch_wait_ms: float = 5.0, max_body_bytes: int = DEFAULT_MAX_BODY,
               max_tokens_limit: int = 4096, default_max_tokens: int = 512, ui: bool = True,
               ui_max_tokens: int = 256, title: Optional[str] = None, max_prompt_tokens: Optional[int] = None,
               prefill_chunk: Optional[int] = None, api_key: Union[str, Sequence[str], None] = None,
               max_model_len: Optional[int] = None) -> FastAPI:
    """The server app for an in-process `vlmkit.VLM`.

    limits: image limits (payload bytes, pixels, images per request, allow_remote); allow_paths is always off.
    max_batch: prompts decoded together (or being prefilled); queue_limit: requests queued or running before new
    ones get 429; batch_wait_ms: on an idle server, how long the batcher gathers requests before its first step.
    max_body_bytes: larger request bodies get 413. max_tokens_limit: the most new tokens a request may ask for;
    default_max_tokens: when it asks for none (cut to what the context leaves). max_prompt_tokens: longer prompts
    (image tokens included) get 400 (None: the context is the limit). prefill_chunk: prompt tokens prefilled per
    scheduler step, so a long prompt is prefilled in chunks between the others' decode steps (None: by device).
    ui: mount the Gradio chat at / (ui_max_tokens per answer). api_key: a key (or several) every request but
    GET /health must present (auth.py); None: no key. max_model_len: the context a request may fill, prompt and
    answer together (None: the model's; never more)."""
    keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
    limits = replace(limits or ImageLimits(), allow_paths=False)
    batcher = Batcher(vlm, max_batch=max_batch, queue_limit=queue_limit, batch_wait_ms=batch_wait_ms,
                      prefill_chunk=prefill_chunk)
    engine = Engine(vlm, batcher, model_name=model_name, limits=limits, max_tokens_limit=max_tokens_limit,
                    default_max_tokens=default_max_tokens, max_prompt_tokens=max_prompt_tokens,
                    max_model_len=max_model_len)
    batcher.start()

    @asynccontextmanager
    async def lifespan(app):
        yield
        batcher.stop()

    app = FastAPI(title=title or f"vlmkit serve: {model_name}", lifespan=lifespan, docs_url="/docs",
                  redoc_url=None)
    app.state.engine = engine
    app.state.batcher = batcher
    app.state.ollama_name = model_name if ":" in model_name else f"{model_name}:latest"
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if keys:  # added last, so it runs first: no body is read for a request without the key
        app.add_middleware(APIKeyMiddleware, keys=keys, render=error_response)

    # A refused request logs one line (log_api_error); only a fault of the server logs a traceback.
    def refuse(request: Request, e: APIError) -> JSONResponse:
        log_api_error(request.method, request.url.path, e)
        return error_response(request.url.path, e)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return refuse(request, e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = str(e.detail)
        if e.status_code == 404:  # paths no route matches (the /v1 and /api catch-alls do not match newlines)
            message = f"no such endpoint: {request.method} {show_value(request.url.path)}"
        return refuse(request, APIError(e.status_code, message, code=str(e.status_code)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return refuse(request, APIError(400, f"invalid request: {e.errors()}"[:1000]))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(request.url.path, APIError(500, f"internal error: {type(e).__name__}: {e}",
                                                         type="server_error"))

    @app.get("/health")
    async def health():
        return engine.health()

    from . import completions_routes, ollama_routes, openai_routes

    routers = (openai_routes.router, completions_routes.router, ollama_routes.router)
    for router in routers:
        app.include_router(router)
    known = {(r.path, m) for router in routers for r in router.routes for m in getattr(r, "methods", None) or ()}

    # Unknown paths under /v1 and /api answer in their dialect's JSON (not the UI's HTML 404).
    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    @app.api_route("/api/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    async def not_found(request: Request, rest: str):
        path = request.url.path
        allowed = sorted(m for p, m in known if p == path)
        if allowed:
            raise APIError(405, f"{request.method} is not allowed on {path}; use {', '.join(allowed)}",
                           code="method_not_allowed")
        raise APIError(404, f"no such endpoint: {request.method} {path}", code="not_found")

    if ui:
        from .ui import mount_ui

        app = mount_ui(app, engine, max_tokens=ui_max_tokens, title=title)
    else:
        @app.get("/", include_in_schema=False)
        async def index():
            return {"name": "vlmkit serve", "model": model_name,
                    "endpoints": ["POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models",
                                  "POST /api/chat", "POST /api/generate", "GET /api/tags", "GET /health"]}
    return app


def run(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve `app` with uvicorn (blocking)."""
    import uvicorn
    from uvicorn.logging import DefaultFormatter

    # uvicorn sets up only its own loggers: vlmkit.serve's lines (one per refused request, with its reason) go
    # beside them, in the same form, unless the embedding program configured logging itself.
    logger = logging.getLogger("vlmkit")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(log_level.upper())
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


__all__ = ["create_app", "run", "BodyLimitMiddleware", "error_response"]
