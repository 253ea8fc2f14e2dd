"""The server's handling of inputs clients really send (in-process, starlette's TestClient, tiny LLaVA): Ollama
images in every common format, numbers and text Python cannot carry through, the "default" model name, the server
log (one line per refused request, a traceback only for a fault of the server)."""

from __future__ import annotations

import base64
import copy
import io
import json
import logging

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (make install-dev)")

from PIL import Image  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

import vlmkit  # noqa: E402
from vlmkit import api  # noqa: E402
from vlmkit.processing.images import ImageLimits  # noqa: E402
from vlmkit.serve import create_app  # noqa: E402
from vlmkit.serve.checks import APIError  # noqa: E402

MODEL = "tiny-llava"
FORMATS = ["JPEG", "PNG", "WEBP", "GIF"]


def image_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (30, 90, 200)).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def vlm(hf_checkpoint_dir):
    return vlmkit.load(hf_checkpoint_dir("llava"))


@pytest.fixture(scope="module")
def client(vlm):
    app = create_app(vlm, model_name=MODEL, limits=ImageLimits(max_bytes=100_000, max_images=2), max_tokens_limit=64,
                     max_body_bytes=200_000, ui=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def post(client, path: str, body: dict):
    """`body` as JSON text with lone surrogates escaped (\\ud800), as JSON can carry them."""
    return client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def chat_with_image(vlm, data: bytes, question: str, n: int) -> str:
    image = Image.open(io.BytesIO(data))
    return vlm.chat([{"role": "user", "content": [{"type": "image", "image": image},
                                                  {"type": "text", "text": question}]}], max_new_tokens=n)


# ------------------------------------------------------------------------------------------ Ollama images

@pytest.mark.parametrize("fmt", FORMATS)
def test_ollama_takes_raw_base64_of_every_common_format(client, vlm, fmt):
    data = image_bytes(fmt)
    encoded = base64.b64encode(data).decode()
    if fmt == "JPEG":
        assert encoded.startswith("/9j/")  # what made it look like a path
    expected = chat_with_image(vlm, data, "What color?", 4)
    r = post(client, "/api/chat", {"model": MODEL, "stream": False, "options": {"num_predict": 4}, "messages": [
        {"role": "user", "content": "What color?", "images": [encoded]}]})
    assert r.status_code == 200, r.text
    assert r.json()["message"]["content"] == expected
    r = post(client, "/api/generate", {"model": MODEL, "stream": False, "prompt": "What color?",
                                       "images": [encoded], "options": {"num_predict": 4}})
    assert r.status_code == 200, r.text
    assert r.json()["response"] == expected


@pytest.mark.parametrize("value, needle", [
    ("/etc/hosts", "raw base64 strings here"),  # valid base64, but no image starts with those bytes
    ("./cat.png", "raw base64 strings here"),
    ("~/cat.jpg", "raw base64 strings here"),
    ("C:\\pictures\\cat.jpg", "raw base64 strings here"),
    ("https://example.com/cat.jpg", "raw base64 strings here"),
    ("file:///etc/passwd", "raw base64 strings here"),
    ("%%% not base64 %%%", "not valid base64"),
    (base64.b64encode(b"garbage bytes").decode(), "not a recognised image"),
    (42, "must be a base64 string"),
])
def test_ollama_images_that_are_not_base64_images_get_a_clear_400(client, value, needle):
    r = post(client, "/api/chat", {"model": MODEL, "messages": [
        {"role": "user", "content": "hi", "images": [base64.b64encode(image_bytes("PNG")).decode(), value]}]})
    assert r.status_code == 400 and needle in r.json()["error"], r.text
    assert "messages[0].images[1]" in r.json()["error"]
    r = post(client, "/api/generate", {"model": MODEL, "prompt": "hi", "images": [value]})
    assert r.status_code == 400 and needle in r.json()["error"] and "images[0]" in r.json()["error"], r.text


# ------------------------------------------------------------------------------------------ odd values

HUGE = 10**400


@pytest.mark.parametrize("path, body, field", [
    ("/v1/chat/completions", {"max_tokens": HUGE}, "max_tokens"),
    ("/v1/chat/completions", {"max_completion_tokens": HUGE}, "max_completion_tokens"),
    ("/v1/chat/completions", {"n": HUGE}, "n"),
    ("/v1/chat/completions", {"seed": -HUGE}, "seed"),
    ("/v1/chat/completions", {"top_k": 2**64}, "top_k"),
    ("/v1/chat/completions", {"temperature": HUGE}, "temperature"),
    ("/api/chat", {"options": {"num_predict": HUGE}}, "options.num_predict"),
    ("/api/chat", {"options": {"seed": HUGE}}, "options.seed"),
    ("/api/generate", {"options": {"top_k": -HUGE}}, "options.top_k"),
])
def test_huge_integers_get_a_400_naming_the_field(client, path, body, field):
    base = ({"prompt": "hi"} if path == "/api/generate" else {"messages": [{"role": "user", "content": "hi"}]})
    r = post(client, path, {"model": MODEL, **base, **body})
    assert r.status_code == 400, r.text
    message = r.json()["error"] if path.startswith("/api/") else r.json()["error"]["message"]
    assert f"'{field}'" in message and "-digit integer" in message and len(message) < 300, message
    if path.startswith("/v1/"):
        assert r.json()["error"]["param"] == field


def test_overflowing_float_literals_are_not_numbers(client):
    for field in ("max_tokens", "temperature", "top_p"):
        raw = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "%s": 1e400}' % (MODEL, field)
        r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        assert "finite" in r.json()["error"]["message"]


def test_sampling_values_that_would_overflow_the_logits(client):
    ask = {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "hi hi hi"}]}
    for temperature in (1e-200, 1e-6, 1e-3):  # vLLM's rule: greedy under 1e-5, else at least 1e-2
        assert post(client, "/v1/chat/completions", {**ask, "temperature": temperature}).status_code == 200
    r = post(client, "/v1/chat/completions", {**ask, "temperature": 1, "repetition_penalty": 1e-300})
    assert r.status_code == 400 and r.json()["error"]["param"] == "repetition_penalty"
    r = post(client, "/api/generate", {"model": MODEL, "prompt": "hi", "options": {"temperature": 1e-200,
                                                                                   "num_predict": 2}})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path, body, field", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800 hi"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]},
     "messages[0].content[0].text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": ["x", "\ud801"]}, "stop[1]"),
    ("/api/chat", {"messages": [{"role": "user", "content": "\ud800 hi"}]}, "messages[0].content"),
    ("/api/generate", {"prompt": "\ud800 hi"}, "prompt"),
    ("/api/generate", {"prompt": "hi", "\ud800": 1}, '["\\ud800"]'),
])
def test_lone_surrogates_get_a_400_naming_the_field(client, path, body, field):
    r = post(client, path, {"model": MODEL, **body})
    assert r.status_code == 400, r.text
    message = r.json()["error"] if path.startswith("/api/") else r.json()["error"]["message"]
    assert f"'{field}'" in message and "surrogate" in message, message
    if path.startswith("/v1/"):
        assert r.json()["error"]["param"] == field


def test_surrogate_pairs_are_text(client):
    r = post(client, "/v1/chat/completions", {"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "user", "content": "smile \U0001f600"}]})  # json.dumps writes it as the pair \ud83d\ude00
    assert r.status_code == 200, r.text


def test_python_api_says_what_is_wrong_with_a_lone_surrogate(vlm):
    with pytest.raises(ValueError, match="lone UTF-16 surrogate"):
        vlm.generate("\ud800 hi", max_new_tokens=2)
    with pytest.raises(ValueError, match="surrogate '\\\\udfff' at character 3"):
        vlm.processor.tokenizer.encode("hi \udfff")


# ------------------------------------------------------------------------------------------ model names

def test_default_names_the_embedded_model(vlm, client):
    embedded = copy.copy(vlm)  # the tiny model standing in for the embedded one (same folder = same model)
    embedded.folder = api.default_model_path()
    app = create_app(embedded, model_name="vlmkit-default", ui=False)
    ask = {"max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    with TestClient(app, raise_server_exceptions=False) as c:
        for name in ("default", "vlmkit-default"):
            r = post(c, "/v1/chat/completions", {"model": name, **ask})
            assert r.status_code == 200 and r.json()["model"] == "vlmkit-default", r.text
            assert c.get(f"/v1/models/{name}").json()["id"] == "vlmkit-default"
        for name in ("default", "default:latest", "vlmkit-default:latest"):
            r = post(c, "/api/chat", {"model": name, "stream": False, "options": {"num_predict": 2},
                                      "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
            assert post(c, "/api/show", {"model": name}).status_code == 200
    r = post(client, "/v1/chat/completions", {"model": "default", **ask})  # another model is not "default"
    assert r.status_code == 404 and f"serves '{MODEL}'" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------------------ the server log

def serve_records(caplog) -> list:
    return [r for r in caplog.records if r.name.startswith(("vlmkit", "uvicorn", "fastapi", "starlette"))]


def test_refused_requests_log_one_line_each(client, vlm, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    engine = client.app.state.engine
    refused = [
        lambda: post(client, "/v1/chat/completions", {**chat, "max_tokens": HUGE}),  # 400
        lambda: post(client, "/api/chat", {**chat, "model": "llava:7b"}),  # 404
        lambda: client.get("/v1/chat/completions"),  # 405
        lambda: client.get("/nothing/here"),  # 404 outside the APIs
        lambda: client.post("/api/chat", content=b"x" * 300_000),  # 413 (Content-Length)
        lambda: client.post("/v1/chat/completions", content=iter([b"x" * 65536] * 5)),  # 413 (streamed body)
        lambda: client.post("/v1/chat/completions", content=b'{"model": [', headers={"content-type": "x"}),
    ]
    for send in refused:
        caplog.clear()
        r = send()
        assert 400 <= r.status_code < 500, r.text
        records = serve_records(caplog)
        assert len(records) == 1, [x.getMessage() for x in records]
        line = records[0].getMessage()
        assert records[0].exc_info is None and "\n" not in line and f"-> {r.status_code}" in line, line

    def busy():
        raise APIError(429, "server busy: retry later", type="rate_limit_error", code="queue_full")

    monkeypatch.setattr(engine, "check_busy", busy)
    caplog.clear()
    assert post(client, "/v1/chat/completions", chat).status_code == 429
    assert [(x.exc_info, x.getMessage()) for x in serve_records(caplog)] == [
        (None, "POST /v1/chat/completions -> 429: server busy: retry later")]


def test_errors_inside_streams_log_one_line_and_faults_a_traceback(client, vlm, caplog, monkeypatch):
    """A refusal found while a response streams is one line; a fault of the server (generation crashing) logs
    its traceback, in streams and in plain responses."""
    caplog.set_level(logging.INFO)

    def refuse(*args, **kwargs):
        raise ValueError("a setting generation cannot use")

    def crash(*args, **kwargs):
        raise RuntimeError("the model broke")

    chat = {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    for failure, status in ((refuse, 400), (crash, 500)):
        monkeypatch.setattr(vlm.model, "forward", failure)
        for path, body in (("/v1/chat/completions", {**chat, "stream": True}), ("/v1/chat/completions", chat),
                           ("/api/chat", {**chat, "options": {"num_predict": 3}})):
            caplog.clear()
            r = post(client, path, body)
            assert r.status_code in (200, status), r.text  # 200: the stream had started
            assert "a setting generation cannot use" in r.text or "the model broke" in r.text
            records = [x for x in serve_records(caplog) if x.name == "vlmkit.serve"]
            assert len(records) == 1 and f"-> {status}" in records[0].getMessage(), records
            if status == 500:
                assert records[0].exc_info and records[0].exc_info[0] is RuntimeError
            else:
                assert records[0].exc_info is None and "\n" not in records[0].getMessage()
    monkeypatch.undo()
    assert post(client, "/v1/chat/completions", chat).status_code == 200  # still serving
