"""The API key: every request but `GET /health` must carry `Authorization: Bearer <key>` (OpenAI clients send it
from `api_key=`), or HTTP Basic credentials whose password is the key (what a browser sends for the chat page after
its login prompt, and then on every request the page makes). Anything else gets 401 in the dialect's JSON.

Keys are compared as SHA-256 digests of their UTF-8 bytes with `hmac.compare_digest` (as vLLM does), so neither the
time taken nor a length mismatch tells a client how much of a guess was right. vLLM's key guards its API routes and
leaves a list of others open; here only /health is open, as the Ollama routes and the chat page run the model too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
from typing import Callable, Iterable

from .checks import APIError, log_api_error

PUBLIC_PATHS = ("/health",)  # liveness probes carry no credentials
LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine (a name other than localhost may resolve anywhere)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class APIKeyMiddleware:
    """Pure ASGI middleware (it wraps the whole app, the mounted chat page included)."""

    def __init__(self, app, keys: Iterable[str], render: Callable[[str, APIError], object]):
        keys = list(keys)
        if not keys or any(not isinstance(k, str) or not k for k in keys):
            raise ValueError("API keys must be non-empty strings")
        self.app, self.render = app, render  # render(path, APIError) -> the dialect's JSON response
        # surrogateescape: a key from the command line holding bytes that are not UTF-8 keeps those bytes
        self.digests = [_digest(k.encode("utf-8", "surrogateescape")) for k in keys]

    def presented_key(self, headers) -> bytes | None:
        """The key a request presents (its bytes), from `Bearer KEY` or Basic `user:KEY` (any user name), else
        None."""
        value = next((raw for name, raw in headers if name == b"authorization"), None)
        if not value:
            return None
        scheme, _, param = value.strip().partition(b" ")
        param = param.strip()
        if scheme.lower() == b"bearer":
            return param
        if scheme.lower() == b"basic":
            try:
                decoded = base64.b64decode(param, validate=True)
            except (binascii.Error, ValueError):
                return None
            return decoded.partition(b":")[2]
        return None

    def authorized(self, headers) -> bool:
        key = self.presented_key(headers)
        if key is None:
            return False
        digest = _digest(key)
        match = False
        for known in self.digests:  # no early exit: every key is compared
            match |= hmac.compare_digest(digest, known)
        return match

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind not in ("http", "websocket"):  # lifespan
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path in PUBLIC_PATHS or self.authorized(scope.get("headers") or []):
            return await self.app(scope, receive, send)
        if kind == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        await self.render(path, unauthorized(scope, path))(scope, receive, send)


def unauthorized(scope, path: str) -> APIError:
    presented = any(name == b"authorization" for name, _ in scope.get("headers") or [])
    e = APIError(401, ("invalid API key" if presented else "missing API key") + ": this server needs "
                 "'Authorization: Bearer <key>' (the key `vlmkit serve` was started with: --api-key or "
                 "VLMKIT_API_KEY)", code="invalid_api_key")
    api = path.startswith(("/v1/", "/api/"))
    # A browser asks for a password only when told the Basic scheme; API clients are told Bearer.
    e.headers = {"WWW-Authenticate": 'Bearer realm="vlmkit"' if api else 'Basic realm="vlmkit", charset="UTF-8"'}
    log_api_error(scope.get("method", ""), path, e)
    return e


__all__ = ["APIKeyMiddleware", "is_loopback", "PUBLIC_PATHS"]
