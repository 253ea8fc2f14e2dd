"""What a request is checked against before any work: the error a refusal raises (`APIError`, rendered by app.py
in the dialect's JSON) and its one log line, field checks (numbers finite and bounded, booleans, stop strings),
and the JSON body (size, syntax, no NaN/Infinity literals, no lone UTF-16 surrogates), each refusal naming the
field at fault."""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Optional


class APIError(Exception):
    """A request the server refuses; rendered as the dialect's JSON error with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None,
                 image_index: Optional[int] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers
        self.image_index = image_index  # which of the request's images is at fault (a dialect names its field)


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


log = logging.getLogger("vlmkit.serve")


def log_api_error(method: str, path: str, e: APIError) -> None:
    """One log line for a refused request; a traceback only for a fault of the server (a 500 with a cause)."""
    line = f"{method} {path} -> {e.status}: {' '.join(e.message.split())[:500]}"
    cause = e.__cause__
    if e.status == 500 and cause is not None:
        log.error(line, exc_info=(type(cause), cause, cause.__traceback__))
    elif e.status >= 500:
        log.warning(line)
    else:
        log.info(line)


# --------------------------------------------------------------------------------------------- field checks

# Integers a request may carry: what a sampler seed or a token count can hold. Past it a value is a typo or a probe,
# and Python would otherwise carry it on until something converts it to a float or a C integer and fails.
INT_LIMIT = 2**63 - 1
# Smaller penalties divide the logits of seen tokens into inf (NaN probabilities when sampling).
MIN_REPETITION_PENALTY = 0.01


def type_name(value) -> str:
    return "null" if value is None else {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__)


def show_value(value) -> str:
    """A value for an error message: short, on one line, ASCII-safe (repr escapes lone surrogates)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_LIMIT:
        return f"a {len(str(abs(value)))}-digit integer"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def get_number(body: dict, name: str, *, low=None, high=None, low_open=False, integer=False, param=None):
    """body[name] checked: a finite number (an integer when `integer`) in [low, high] (low excluded when low_open)
    and never past INT_LIMIT in magnitude; None when absent or null."""
    value = body.get(name, None)
    if value is None:
        return None
    param = param or name
    what = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"'{param}' must be {what}, got {type_name(value)} {show_value(value)}", param)
    if isinstance(value, float):
        if not math.isfinite(value):  # 1e400 parses to inf
            raise bad(f"'{param}' must be a finite number, got {value}", param)
        if integer:
            if not value.is_integer():
                raise bad(f"'{param}' must be an integer, got {value}", param)
            value = int(value)
    if abs(value) > INT_LIMIT:
        raise bad(f"'{param}' is out of range: got {show_value(value)}, the largest accepted magnitude is {INT_LIMIT}",
                  param)
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
        raise bad(f"'{param or name}' must be a boolean, got {type_name(value)}", param or name)
    return value


def get_stop(value, param: str = "stop") -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > 16 or any(not isinstance(s, str) or not s for s in value):
        raise bad(f"'{param}' must be a non-empty string or a list of up to 16 non-empty strings", param)
    return tuple(value)


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
        raise bad(f"the request body must be a JSON object, got {type_name(body)}", code="invalid_json")
    if _may_hold_surrogate(raw):
        where = _lone_surrogate_path(body)
        if where is not None:
            raise bad(f"'{where}' holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), which is "
                      "not valid Unicode text; send UTF-8 text or escape the full surrogate pair", where,
                      "invalid_unicode")
    return body


def _may_hold_surrogate(raw: bytes) -> bool:
    """A lone surrogate reaches a parsed body only from a \\uD800-\\uDFFF escape or from surrogate bytes (json
    decodes bytes with "surrogatepass"); most bodies have neither (base64 images hold no backslash), and one-byte
    searches are memchr-fast: ~10 ms for 27 MB, a fraction of parsing it."""
    return (b"\\" in raw and (b"\\ud" in raw or b"\\uD" in raw)) or b"\xed" in raw


def _has_lone_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # only surrogates fail to encode
        return True
    return False


_NAME = re.compile("[A-Za-z_][A-Za-z0-9_]*")


def _lone_surrogate_path(body) -> Optional[str]:
    """Where the first string (a value or a key) with a lone surrogate is, as 'messages[0].content'; iterative,
    as bodies may nest as deep as the JSON parser allows."""
    stack = [(body, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _has_lone_surrogate(value):
                return path
        elif isinstance(value, dict):
            items = []
            for key, item in value.items():
                name = key if _NAME.fullmatch(key) else f"[{json.dumps(key)}]"  # json.dumps escapes surrogates
                sub = f"{path}.{name}" if path and name[0] != "[" else path + name
                if _has_lone_surrogate(key):
                    return sub
                items.append((item, sub))
            stack.extend(reversed(items))
        elif isinstance(value, list):
            stack.extend(reversed([(item, f"{path}[{i}]") for i, item in enumerate(value)]))
    return None
