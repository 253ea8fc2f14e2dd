"""Property-based fuzzing of the server's request parsing (hypothesis): requests for both APIs (OpenAI's chat and text
completions, Ollama's chat and generate) built from their fields, each field replaced by values of the wrong type,
huge or negative numbers, NaN/inf, deep nesting, odd Unicode (lone surrogates included), garbage or valid tiny
images, or deleted, plus extra fields. Whatever comes in, the answer is a 200 or a 4xx whose JSON error names the
field (OpenAI: error.param or the message; Ollama: the message), never a 5xx. In-process (starlette's TestClient) on
the tiny LLaVA with at most 3 new tokens."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
from dataclasses import dataclass

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (make install-dev)")
hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (make install-dev)")

from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

import vlmkit  # noqa: E402
from vlmkit.processing.images import ImageLimits  # noqa: E402
from vlmkit.serve import create_app  # noqa: E402

MODEL = "tiny-llava"
# Examples per route: 200 take ~30 s for the module on 2 shared cores; VLMKIT_FUZZ_EXAMPLES=2000 hunts longer.
EXAMPLES = int(os.environ.get("VLMKIT_FUZZ_EXAMPLES", 200))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def client(hf_checkpoint_dir):
    vlm = vlmkit.load(hf_checkpoint_dir("llava"))
    app = create_app(vlm, model_name=MODEL, limits=ImageLimits(max_pixels=100_000, max_bytes=100_000, max_images=2),
                     max_tokens_limit=3, default_max_tokens=3, max_body_bytes=300_000, ui=False)
    logger = logging.getLogger("vlmkit.serve")
    level = logger.level
    logger.setLevel(logging.WARNING)  # a line per refusal would flood a failure's report
    try:
        with TestClient(app, raise_server_exceptions=False) as c:
            yield c
    finally:
        logger.setLevel(level)


# ----------------------------------------------------------------------------------------------- values

@dataclass(frozen=True)
class Raw:
    """JSON text sent as written: numbers Python's json would not write (1e400 parses to inf), deep nesting."""

    text: str


def dump(value) -> str:
    """JSON text of `value`, Raw pieces verbatim; json.dumps escapes lone surrogates as \\udXXX."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(k) + ":" + dump(v) for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)  # NaN / Infinity literals included: the server refuses them as invalid JSON


def image_bytes(fmt: str, size=(6, 5)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, fmt)
    return buf.getvalue()


TINY = {fmt: image_bytes(fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP")}
B64 = {fmt: base64.b64encode(data).decode() for fmt, data in TINY.items()}

odd_text = st.one_of(
    st.text(max_size=12),
    st.text(st.characters(codec="utf-8"), max_size=12),  # any code point, lone surrogates excluded
    st.sampled_from(["\ud800 hi", "hi \udfff", "\U0001f600", "\x00", "<image>", "<|im_start|>", "\u202e", " ",
                     "", "a" * 3000, "%s%n", "../../etc/passwd", "/etc/hosts", "http://127.0.0.1/x.png"]),
)
huge_numbers = st.sampled_from([10**400, -(10**400), 2**63, 2**63 - 1, -(2**63), 2**64, 1e308, -1e308, 5e-324, 1e-200,
                                Raw("1e400"), Raw("-1e400"), Raw("1e-400"), Raw("-0"), Raw("NaN"),
                                Raw("Infinity"), float("nan"), float("inf")])
numbers = st.one_of(huge_numbers, st.integers(-5, 5), st.integers(),
                    st.floats(allow_nan=False, allow_infinity=False))
deep = st.integers(1, 3000).flatmap(lambda n: st.sampled_from(
    [Raw("[" * n + "]" * n), Raw('{"a":' * n + "1" + "}" * n)]))
leaves = st.one_of(st.none(), st.booleans(), numbers, odd_text)
junk = st.one_of(leaves, deep, st.recursive(
    leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd_text, inner, max_size=3),
    max_leaves=6))
garbage_b64 = st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode())
images_b64 = st.one_of(st.sampled_from(list(B64.values())), garbage_b64,
                       st.sampled_from([B64["PNG"][:30], "/9j/" + "A" * 20, "/9j/", "!!!", "data:image/png;base64,"
                                        + B64["PNG"], "data:image/png;base64,@@", "file:///etc/passwd",
                                        "https://example.com/a.jpg", "~/cat.png", "C:\\cat.jpg"]))
data_uris = images_b64.map(lambda s: s if s[:5] in ("data:", "file:", "https", "~/cat", "C:\\ca")
                           else "data:image/png;base64," + s)


def field(typed):
    """A field's value: mostly plausible for its type, often anything at all."""
    return st.one_of(typed, typed, junk)


# ----------------------------------------------------------------------------------------------- requests

def mutate(base: dict, fields: dict):
    """A strategy of (body, touched): `base` with some of `fields` (path -> strategy) set or deleted and maybe an
    extra field; `touched` lists the top-level names changed."""
    names = sorted(fields)

    @st.composite
    def build(draw):
        body = json.loads(json.dumps(base))
        touched = []
        for path in draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)):
            *parents, leaf = path.split(".")
            node = body
            for key in parents:
                node = node.get(key) if isinstance(node, dict) else None
                node = node[0] if isinstance(node, list) and node else node
            if not isinstance(node, dict):
                continue
            if draw(st.integers(0, 5)) == 0:
                node.pop(leaf, None)
            else:
                node[leaf] = draw(fields[path])
            touched.append(path.split(".")[0])
        if draw(st.integers(0, 4)) == 0:  # an extra field: ignored, or named if refused (a key that is no text)
            key = draw(odd_text)
            body[key] = draw(junk)
            touched.append(key)
        return body, touched

    return build()


def names_the_field(text: str, touched: list) -> bool:
    """`text` names one of the fields (or the singular: 'image 0' for 'images'), as written or escaped."""
    text = text.lower()
    return any(form in text for name in touched
               for form in {name.lower(), name.lower().rstrip("s"), ascii(name)[1:-1].lower(), json.dumps(name).lower()}
               if form)


def check(r, touched: list, ollama: bool) -> None:
    event(f"status {r.status_code}")
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code == 200:
        return
    assert 400 <= r.status_code < 500, r.status_code
    body = r.json()
    if ollama:
        message = body["error"]
        assert isinstance(message, str) and message
        named = message
    else:
        err = body["error"]
        assert isinstance(err["message"], str) and err["message"] and err["type"]
        message, named = err["message"], f"{err['param'] or ''} {err['message']}"
    if "JSON" in message or "too large" in message:  # about the body as a whole
        return
    assert names_the_field(named, touched), (touched, r.status_code, message)


def post(client, path: str, body: dict):
    return client.post(path, content=dump(body).encode("utf-8"), headers={"content-type": "application/json"})


OPENAI_BASE = {"model": MODEL, "max_tokens": 2, "messages": [
    {"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                 {"type": "image_url", "image_url": {"url": "data:image/png;base64," + B64["PNG"]}}]}]}
OPENAI_FIELDS = {
    "model": field(st.sampled_from([MODEL, "gpt-4o", "default", ""])),
    "messages": field(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                      "content": odd_text}), max_size=2)),
    "messages.role": field(st.sampled_from(["user", "system", "developer", "assistant", "tool", "robot"])),
    "messages.content": field(st.one_of(odd_text, st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url", "audio"]), "text": odd_text,
         "image_url": st.one_of(data_uris, st.fixed_dictionaries({"url": data_uris}))}), max_size=3))),
    "max_tokens": field(numbers), "max_completion_tokens": field(numbers), "n": field(numbers),
    "seed": field(numbers), "temperature": field(numbers), "top_p": field(numbers), "top_k": field(numbers),
    "repetition_penalty": field(numbers), "frequency_penalty": field(numbers), "presence_penalty": field(numbers),
    "stop": field(st.one_of(odd_text, st.lists(odd_text, max_size=20))),
    "stream": field(st.booleans()), "ignore_eos": field(st.booleans()), "logprobs": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": field(st.booleans())})),
    "response_format": field(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])})),
    "tools": field(st.lists(junk, max_size=2)), "user": field(odd_text),
}

OPTIONS = st.dictionaries(st.sampled_from(["num_predict", "temperature", "top_p", "top_k", "repeat_penalty",
                                           "seed", "stop", "num_ctx", "mirostat"]), junk | numbers, max_size=4)
OLLAMA_COMMON = {
    "model": field(st.sampled_from([MODEL, MODEL + ":latest", "default", "llava:7b"])),
    "stream": field(st.booleans()), "options": field(OPTIONS), "options.num_predict": field(numbers),
    "options.seed": field(numbers), "options.temperature": field(numbers), "options.top_k": field(numbers),
    "options.stop": field(st.lists(odd_text, max_size=3)), "format": field(st.sampled_from(["", "json"])),
    "keep_alive": field(odd_text), "tools": field(st.lists(junk, max_size=1)),
}
OLLAMA_CHAT_BASE = {"model": MODEL, "options": {"num_predict": 2, "seed": 1}, "messages": [
    {"role": "user", "content": "What is it?", "images": [B64["JPEG"]]}]}
OLLAMA_CHAT_FIELDS = {
    **OLLAMA_COMMON,
    "messages": field(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                                      "content": odd_text}), max_size=2)),
    "messages.role": field(st.sampled_from(["user", "system", "assistant", "tool"])),
    "messages.content": field(odd_text), "messages.images": field(st.lists(images_b64, max_size=3)),
}
OLLAMA_GENERATE_BASE = {"model": MODEL, "prompt": "What is it?", "stream": False, "images": [B64["PNG"]],
                        "options": {"num_predict": 2}}
OLLAMA_GENERATE_FIELDS = {
    **OLLAMA_COMMON, "prompt": field(odd_text), "system": field(odd_text), "suffix": field(odd_text),
    "raw": field(st.booleans()), "images": field(st.lists(images_b64, max_size=3)),
    "template": field(odd_text), "context": field(st.lists(st.integers(), max_size=3)),
}


@FUZZ
@given(request=mutate(OPENAI_BASE, OPENAI_FIELDS))
def test_openai_chat_completions_never_5xx(client, request):
    body, touched = request
    check(post(client, "/v1/chat/completions", body), touched, ollama=False)


COMPLETIONS_BASE = {"model": MODEL, "max_tokens": 2, "prompt": "USER: <image>\nWhat is it? ASSISTANT:",
                    "multi_modal_data": {"image": ["data:image/png;base64," + B64["PNG"]]}}
COMPLETIONS_FIELDS = {
    **{k: v for k, v in OPENAI_FIELDS.items() if not k.startswith("messages")},
    "prompt": field(st.one_of(odd_text, st.lists(odd_text, max_size=2), st.lists(st.integers(), max_size=3))),
    "multi_modal_data": field(st.dictionaries(st.sampled_from(["image", "video"]),
                                              st.one_of(data_uris, st.lists(data_uris, max_size=3)), max_size=2)),
    "multi_modal_data.image": field(st.lists(data_uris, max_size=3)),
    "echo": field(st.booleans()), "suffix": field(odd_text), "best_of": field(numbers),
}


@FUZZ
@given(request=mutate(COMPLETIONS_BASE, COMPLETIONS_FIELDS))
def test_openai_completions_never_5xx(client, request):
    body, touched = request
    check(post(client, "/v1/completions", body), touched, ollama=False)


@FUZZ
@given(request=mutate(OLLAMA_CHAT_BASE, OLLAMA_CHAT_FIELDS))
def test_ollama_chat_never_5xx(client, request):
    body, touched = request
    check(post(client, "/api/chat", body), touched, ollama=True)


@FUZZ
@given(request=mutate(OLLAMA_GENERATE_BASE, OLLAMA_GENERATE_FIELDS))
def test_ollama_generate_never_5xx(client, request):
    body, touched = request
    check(post(client, "/api/generate", body), touched, ollama=True)


@settings(FUZZ, max_examples=EXAMPLES // 2)
@given(request=mutate({"model": MODEL}, {"model": field(odd_text), "name": field(odd_text),
                                         "verbose": field(st.booleans())}))
def test_ollama_show_never_5xx(client, request):
    body, touched = request
    r = post(client, "/api/show", body)
    check(r, touched, ollama=True)


@settings(FUZZ, max_examples=EXAMPLES // 2)
@given(model_id=odd_text)
def test_openai_model_by_id_never_5xx(client, model_id):
    from urllib.parse import quote

    r = client.get("/v1/models/" + quote(model_id.encode("utf-8", "surrogatepass"), safe=""))
    assert r.status_code in (200, 404), (r.status_code, r.text[:300])
    if r.status_code == 404:  # a model that is not this one, or an id no route matches (a newline in it)
        err = r.json()["error"]
        assert err["param"] == "model" or err["message"].startswith("no such endpoint"), err
