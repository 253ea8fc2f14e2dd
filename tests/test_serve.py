"""`vlmkit serve`: OpenAI and Ollama routes against a live server on a loopback port (uvicorn in a thread), the
official `openai` client, batching, cancellation on disconnect, the queue limit, a bad-input battery and a bounded
load test (numbers printed and written to test-artifacts/serve-load.txt, never asserted)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import statistics
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (make install-dev)")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (make install-dev)")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (make install-dev)")

import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402

import vlmkit  # noqa: E402
from vlmkit.processing.images import ImageLimits  # noqa: E402
from vlmkit.serve import create_app  # noqa: E402

ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "test-artifacts")
MODEL = "tiny-llava"
LIMITS = ImageLimits(max_pixels=200_000, max_bytes=200_000, max_images=2)
MAX_BODY = 512_000


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 (a port the OS picks) in a daemon thread."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def png_bytes(size=(40, 30), color=(220, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


RED = png_bytes()
BLUE = png_bytes((32, 48), (30, 60, 220))


@pytest.fixture(scope="module")
def vlm(hf_checkpoint_dir):
    return vlmkit.load(hf_checkpoint_dir("llava"))


@pytest.fixture(scope="module")
def server(vlm):
    app = create_app(vlm, model_name=MODEL, limits=LIMITS, max_batch=8, queue_limit=64, max_body_bytes=MAX_BODY,
                     max_tokens_limit=1600, ui=False)
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def openai_client(server):
    openai = pytest.importorskip("openai", reason="the openai client is not installed (make install-dev)")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def conversation(image):
    """A system message, an image turn, an answer and a follow-up, in vlmkit's message form."""
    return [
        {"role": "system", "content": [{"type": "text", "text": "You answer briefly."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                     {"type": "image", "image": image}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red rectangle."}]},
        {"role": "user", "content": [{"type": "text", "text": "And its color?"}]},
    ]


def openai_conversation():
    msgs = conversation(None)
    msgs[0]["content"] = "You answer briefly."  # plain string content, as most clients send
    msgs[1]["content"][1] = {"type": "image_url", "image_url": {"url": data_uri(RED)}}
    return msgs


def prompt_tokens(vlm, messages) -> int:
    return int(vlm.processor([messages])["attention_mask"].sum())


# ------------------------------------------------------------------------------------------ OpenAI client

def test_openai_client_plain_and_stream(server, openai_client, vlm):
    expected = vlm.chat(conversation(Image.open(io.BytesIO(RED))), max_new_tokens=12)
    n_prompt = prompt_tokens(vlm, conversation(Image.open(io.BytesIO(RED))))

    r = openai_client.chat.completions.create(model=MODEL, messages=openai_conversation(), max_tokens=12,
                                              temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected  # same text as vlmkit's own generate
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == n_prompt  # image tokens included
    assert 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == n_prompt + r.usage.completion_tokens

    chunks = list(openai_client.chat.completions.create(
        model=MODEL, messages=openai_conversation(), max_completion_tokens=12, stream=True,
        stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [r.choices[0].finish_reason]
    assert chunks[-1].usage.prompt_tokens == n_prompt
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_openai_sampling_stop_and_models(server, openai_client, vlm):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe it."},
                                             {"type": "image_url", "image_url": data_uri(BLUE)}]}]  # plain string url
    local = [{"role": "user", "content": [{"type": "text", "text": "Describe it."},
                                          {"type": "image", "image": Image.open(io.BytesIO(BLUE))}]}]
    # seeded sampling reproduces vlmkit's generate(seed=...)
    kw = dict(model=MODEL, messages=messages, max_tokens=10, temperature=0.9, top_p=0.95, seed=7)
    a = openai_client.chat.completions.create(**kw).choices[0].message.content
    b = openai_client.chat.completions.create(**kw).choices[0].message.content
    assert a == b == vlm.chat(local, max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.95, seed=7)
    # stop strings end the answer before the stop (OpenAI semantics)
    greedy = vlm.chat(local, max_new_tokens=16)
    stop = greedy.strip()[len(greedy.strip()) // 2:][:3]
    assert stop.strip(), greedy
    r = openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, stop=[stop])
    assert r.choices[0].message.content == greedy[: greedy.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    # models and health
    assert [m.id for m in openai_client.models.list().data] == [MODEL]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_openai_client_errors(openai_client):
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        openai_client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and "gpt-4o" in e.value.message
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=100_000)
    assert "max_tokens" in e.value.message


# ------------------------------------------------------------------------------------------ Ollama

def test_ollama_chat_streams_json_lines(server, vlm):
    expected = vlm.chat(conversation(Image.open(io.BytesIO(RED))), max_new_tokens=10)
    body = {"model": MODEL + ":latest", "options": {"num_predict": 10, "temperature": 0},
            "messages": [{"role": "system", "content": "You answer briefly."},
                         {"role": "user", "content": "What is in this picture?",
                          "images": [base64.b64encode(RED).decode()]},
                         {"role": "assistant", "content": "A red rectangle."},
                         {"role": "user", "content": "And its color?"}]}
    with httpx.stream("POST", server.url + "/api/chat", json=body, timeout=60) as r:  # streams by default
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line.strip()]
    assert len(lines) >= 2 and all(not x["done"] for x in lines[:-1])
    assert "".join(x["message"]["content"] for x in lines) == expected
    last = lines[-1]
    assert last["done"] is True and last["done_reason"] in ("stop", "length")
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
                "eval_duration"):
        assert isinstance(last[key], int) and last[key] >= 0, key
    assert last["prompt_eval_count"] == prompt_tokens(vlm, conversation(Image.open(io.BytesIO(RED))))
    assert 0 < last["eval_count"] <= 10
    assert last["total_duration"] >= last["eval_duration"] > 0

    one = httpx.post(server.url + "/api/chat", json={**body, "stream": False}, timeout=60).json()
    assert one["done"] is True and one["message"] == {"role": "assistant", "content": expected}
    assert one["eval_count"] == last["eval_count"]


def test_ollama_generate_and_tags(server, vlm):
    expected = vlm.chat([{"role": "user", "content": [{"type": "image", "image": Image.open(io.BytesIO(BLUE))},
                                                      {"type": "text", "text": "What color?"}]}], max_new_tokens=8)
    r = httpx.post(server.url + "/api/generate", timeout=60, json={
        "model": MODEL, "prompt": "What color?", "images": [base64.b64encode(BLUE).decode()], "stream": False,
        "options": {"num_predict": 8}})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["response"] == expected and out["done"] is True and out["eval_count"] <= 8
    tags = httpx.get(server.url + "/api/tags").json()["models"]
    assert [t["name"] for t in tags] == [MODEL + ":latest"] and tags[0]["details"]["family"] == "llava"
    assert httpx.post(server.url + "/api/generate", json={"model": MODEL}).json()["done"] is True  # load only


# ------------------------------------------------------------------------------------------ bad input

def _image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(data)}}


def _chat(content, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


BAD_OPENAI = [
    ("malformed JSON", b'{"model": "x", "messages": [', 400, "malformed JSON"),
    ("NaN", b'{"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
     "NaN"),
    ("empty body", b"", 400, "empty"),
    ("body not an object", [1, 2], 400, "JSON object"),
    ("messages not a list", {"model": MODEL, "messages": "hi"}, 400, "'messages'"),
    ("no messages", {"model": MODEL, "messages": []}, 400, "'messages'"),
    ("unknown role", {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ("unknown part", _chat([{"type": "audio", "audio": "x"}]), 400, "audio"),
    ("text not a string", _chat([{"type": "text", "text": 5}]), 400, "text must be a string"),
    ("temperature string", _chat("hi", temperature="hot"), 400, "'temperature' must be a number"),
    ("negative max_tokens", _chat("hi", max_tokens=-1), 400, "'max_tokens' must be >= 1"),
    ("too many tokens", _chat("hi", max_tokens=5000), 400, "over this server's limit"),
    ("stream not bool", _chat("hi", stream="yes"), 400, "'stream' must be a boolean"),
    ("stop not strings", _chat("hi", stop=[1]), 400, "'stop'"),
    ("n=2", _chat("hi", n=2), 400, "n=1"),
    ("unknown model", {**_chat("hi"), "model": "llama-9000"}, 404, "llama-9000"),
    ("missing model", {"messages": [{"role": "user", "content": "hi"}]}, 400, "'model' is required"),
    ("empty prompt", _chat(""), 400, "empty"),
    ("corrupt image", _chat([_image_part(b"this is not an image")]), 400, "not a recognised image"),
    ("truncated image", _chat([_image_part(png_bytes((64, 64))[:60])]), 400, "image"),
    ("bad base64", _chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]), 400,
     "invalid base64"),
    ("too many pixels", _chat([_image_part(png_bytes((600, 400)))]), 400, "too many pixels"),
    ("too many images", _chat([_image_part(RED)] * 3), 400, "too many images"),
    ("remote url refused", _chat([{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]), 400,
     "--allow-remote-images"),
    ("server path refused", _chat([{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]), 400,
     "data: URI or an http(s) URL"),
    ("file url refused", _chat([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]), 400,
     "data: URI or an http(s) URL"),
    ("prompt over context", _chat("hello " * 2100), 400, "context"),
    ("prompt + max_tokens over context", _chat("hello " * 1900, max_tokens=200), 400, "context of 2048"),
]

BAD_OLLAMA = [
    ("malformed JSON", "/api/chat", b"{nope", 400, "malformed JSON"),
    ("unknown model", "/api/chat", {"model": "llava:7b", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "llava:7b"),
    ("messages missing", "/api/chat", {"model": MODEL}, 400, "'messages'"),
    ("image not base64", "/api/chat", {"model": MODEL, "messages": [
        {"role": "user", "content": "hi", "images": ["%%% not base64 %%%"]}]}, 400, "not valid base64"),
    ("image a path", "/api/chat", {"model": MODEL, "messages": [
        {"role": "user", "content": "hi", "images": ["/etc/hosts"]}]}, 400, "raw base64"),
    ("corrupt image", "/api/generate", {"model": MODEL, "prompt": "hi",
                                        "images": [base64.b64encode(b"garbage" * 10).decode()]}, 400, "image"),
    ("options wrong type", "/api/generate", {"model": MODEL, "prompt": "hi", "options": "fast"}, 400,
     "'options'"),
    ("num_predict wrong type", "/api/generate", {"model": MODEL, "prompt": "hi", "options": {"num_predict": "x"}},
     400, "num_predict"),
    ("too many tokens", "/api/generate", {"model": MODEL, "prompt": "hi", "options": {"num_predict": 9999}}, 400,
     "limit"),
    ("prompt over context", "/api/generate", {"model": MODEL, "prompt": "hello " * 2100}, 400, "context"),
]


def _post(url, payload):
    if isinstance(payload, bytes):
        return httpx.post(url, content=payload, headers={"content-type": "application/json"}, timeout=30)
    return httpx.post(url, json=payload, timeout=30)


def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(server):
    failures = []
    for name, payload, status, needle in BAD_OPENAI:
        r = _post(server.url + "/v1/chat/completions", payload)
        try:
            err = r.json()["error"]
            ok = r.status_code == status and needle in err["message"] and err["type"] and "param" in err
        except (ValueError, KeyError, TypeError):
            ok, err = False, r.text[:300]
        if not ok:
            failures.append(f"openai {name}: {r.status_code} {err}")
    for name, path, payload, status, needle in BAD_OLLAMA:
        r = _post(server.url + path, payload)
        try:
            err = r.json()["error"]
            ok = r.status_code == status and isinstance(err, str) and needle in err
        except (ValueError, KeyError, TypeError):
            ok, err = False, r.text[:300]
        if not ok:
            failures.append(f"ollama {name}: {r.status_code} {err}")
    # 413 before the body is read (Content-Length) and while a chunked body streams in
    big = json.dumps(_chat([_image_part(os.urandom(MAX_BODY))])).encode()
    r = httpx.post(server.url + "/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    if r.status_code != 413 or "too large" not in r.json()["error"]["message"]:
        failures.append(f"413 (content-length): {r.status_code} {r.text[:200]}")
    r = httpx.post(server.url + "/api/chat", content=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]))
    if r.status_code != 413 or "too large" not in r.json()["error"]:
        failures.append(f"413 (chunked): {r.status_code} {r.text[:200]}")
    r = httpx.get(server.url + "/v1/chat/completions")
    if r.status_code != 405 or "POST" not in r.json()["error"]["message"]:
        failures.append(f"405: {r.status_code} {r.text[:200]}")
    r = httpx.get(server.url + "/api/nothing")
    if r.status_code != 404 or "error" not in r.json():
        failures.append(f"404: {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)
    # still serving
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    r = httpx.post(server.url + "/v1/chat/completions", json=_chat([{"type": "text", "text": "hi"},
                                                                    _image_part(RED)]), timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


# ------------------------------------------------------------------------------------------ concurrency

def _wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _long_stream(url, client):
    """An OpenAI streaming request that would run 1500 tokens; returns the open response after its first chunk."""
    req = client.build_request("POST", url + "/v1/chat/completions", json={
        **_chat("Tell me everything."), "max_tokens": 1500, "stream": True, "ignore_eos": True})
    r = client.send(req, stream=True)
    assert r.status_code == 200, r.read()
    lines = r.iter_lines()
    assert next(lines).startswith("data: ")
    r.lines = lines  # keep the iterator: closing it (even by garbage collection) closes the connection
    return r


def test_client_disconnect_cancels_its_generation(server):
    batcher = server.app.state.batcher
    before = batcher.stats["cancelled"]
    with httpx.Client(timeout=30) as client:
        r = _long_stream(server.url, client)
        r.close()  # the client goes away mid-answer
    assert _wait_for(lambda: batcher.stats["cancelled"] > before and batcher.running == 0), batcher.stats
    # a non-streamed request whose client leaves while it waits is cancelled too
    body = json.dumps({**_chat("Tell me everything."), "max_tokens": 1500, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert _wait_for(lambda: batcher.running == 1, 10)
    assert _wait_for(lambda: batcher.stats["cancelled"] > before + 1 and batcher.running == 0), batcher.stats


def test_queue_limit_gives_429_then_recovers(vlm):
    app = create_app(vlm, model_name=MODEL, max_batch=1, queue_limit=2, ui=False)
    with LiveServer(app) as live, httpx.Client(timeout=30) as client:
        batcher = app.state.batcher
        streams = [_long_stream(live.url, client) for _ in range(2)]  # one running, one queued
        r = client.post(live.url + "/v1/chat/completions", json=_chat("hi"))
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full", r.text
        assert "busy" in r.json()["error"]["message"] and r.headers["retry-after"]
        r = client.post(live.url + "/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 429 and "busy" in r.json()["error"]
        for s in streams:
            s.close()
        assert _wait_for(lambda: batcher.running == 0 and batcher.queued == 0), batcher.stats
        assert batcher.stats["cancelled"] == 2
        r = client.post(live.url + "/v1/chat/completions", json=_chat("hi"))
        assert r.status_code == 200, r.text


def test_batched_rows_match_single_generation(hf_checkpoint_dir):
    """Jobs decoded together (left padding, collated pixels) give what each gives alone."""
    from vlmkit.serve.batcher import Batcher, Job
    from vlmkit.serve.engine import Engine, GenParams

    for family in ("llava", "idefics", "idefics2", "idefics3"):
        m = vlmkit.load(hf_checkpoint_dir(family))
        batcher = Batcher(m, max_batch=4, batch_wait_ms=300)
        engine = Engine(m, batcher, model_name=family, limits=ImageLimits())
        prompts = [
            [{"role": "user", "content": [{"type": "image", "image": RED}, {"type": "text", "text": "What?"}]}],
            [{"role": "user", "content": [{"type": "text", "text": "A longer question without any image here?"}]}],
            [{"role": "user", "content": [{"type": "image", "image": png_bytes((70, 30), (0, 200, 0))},
                                          {"type": "image", "image": BLUE}, {"type": "text", "text": "Same?"}]}],
        ]
        results, done = [[] for _ in prompts], threading.Semaphore(0)
        jobs = []
        for i, p in enumerate(prompts):
            prep = engine.prepare(p, GenParams(max_tokens=[6, 9, 7][i]))

            def sink(event, i=i):
                if event[0] == "delta":
                    results[i].append(event[1])
                else:
                    results[i].append(event)
                    done.release()
            jobs.append(Job(batch=prep.batch, prompt_tokens=prep.prompt_tokens, max_tokens=prep.max_tokens,
                            sink=sink))
        for job in jobs:
            batcher.submit(job)
        batcher.start()
        try:
            for _ in jobs:
                assert done.acquire(timeout=60)
        finally:
            batcher.stop()
        assert batcher.stats["max_batch_seen"] == 3, (family, batcher.stats)
        for i, (p, job) in enumerate(zip(prompts, jobs)):
            assert results[i][-1][0] == "done", (family, results[i][-1])
            text = "".join(x for x in results[i] if isinstance(x, str))
            local = [{"role": "user", "content": [
                {**part, "image": Image.open(io.BytesIO(part["image"]))} if part["type"] == "image" else part
                for part in p[0]["content"]]}]
            assert text == m.chat(local, max_new_tokens=job.max_tokens), (family, i)
            assert job.completion_tokens <= job.max_tokens and job.batch_size == 3


def test_load_many_clients(server):
    """32 concurrent clients x 4 requests each on loopback: every request succeeds; numbers are printed."""
    clients, per_client = 32, 4
    batcher = server.app.state.batcher
    rows_before, batches_before = batcher.stats["rows"], batcher.stats["batches"]
    latencies, errors = [], []

    async def client(i: int, http: "httpx.AsyncClient"):
        for k in range(per_client):
            content = "Describe the picture." if (i + k) % 2 else [
                {"type": "text", "text": "What is this?"}, _image_part(RED if i % 2 else BLUE)]
            t = time.perf_counter()
            try:
                if k == 3 and i % 4 == 0:  # some Ollama traffic in the mix
                    r = await http.post("/api/chat", json={"model": MODEL, "stream": False, "options": {
                        "num_predict": 8}, "messages": [{"role": "user", "content": "Hello there"}]})
                else:
                    r = await http.post("/v1/chat/completions", json=_chat(content, max_tokens=8))
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
            except httpx.HTTPError as e:
                errors.append(repr(e))
            latencies.append(time.perf_counter() - t)

    async def main():
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
            t = time.perf_counter()
            await asyncio.gather(*(client(i, http) for i in range(clients)))
            return time.perf_counter() - t

    wall = asyncio.run(main())
    assert not errors, errors[:5]
    n = clients * per_client
    lat = sorted(latencies)
    p50, p95 = statistics.median(lat), lat[min(n - 1, int(round(0.95 * (n - 1))))]
    rows, batches = batcher.stats["rows"] - rows_before, batcher.stats["batches"] - batches_before
    report = (f"serve load test: {clients} clients x {per_client} requests (max_tokens=8, tiny random llava, CPU, "
              f"max_batch=8)\n"
              f"  requests: {n} in {wall:.2f} s = {n / wall:.1f} requests/s\n"
              f"  latency: p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms\n"
              f"  batches: {batches}, mean rows per batch {rows / max(1, batches):.2f}, "
              f"largest {batcher.stats['max_batch_seen']}\n")
    print("\n" + report)
    os.makedirs(ARTIFACTS, exist_ok=True)
    with open(os.path.join(ARTIFACTS, "serve-load.txt"), "w") as f:
        f.write(report)
    assert batcher.stats["max_batch_seen"] > 1  # requests really were decoded together
    assert httpx.get(server.url + "/health").json()["queued"] == 0


# ------------------------------------------------------------------------------------------ CLI

def test_cli_serve_subprocess(hf_checkpoint_dir):
    """`vlmkit serve` as users start it: its own process on a loopback port; remote image URLs enabled, yet
    loopback / private / link-local targets are refused; Ctrl-C stops it cleanly."""
    import signal
    import subprocess
    import sys

    folder = hf_checkpoint_dir("llava")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vlmkit", "serve", "--model", folder, "--port", str(port),
                             "--name", "cli-model", "--no-ui", "--allow-remote-images", "--max-batch", "4"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None
        assert _wait_for(up, 60) and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else ""
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "cli-model"
        r = httpx.post(url + "/v1/chat/completions", timeout=30, json={
            "model": "cli-model", "max_tokens": 5, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is it?"}, _image_part(RED)]}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0, r.text
        for target, why in [("http://127.0.0.1:9/a.png", "loopback"), ("http://localhost/a.png", "loopback"),
                            ("http://10.1.2.3/a.png", "private"), ("http://169.254.169.254/latest", "address"),
                            ("http://[::ffff:127.0.0.1]/a.png", "loopback")]:
            r = httpx.post(url + "/v1/chat/completions", timeout=30, json={
                "model": "cli-model", "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": target}}]}]})
            msg = r.json()["error"]["message"]
            assert r.status_code == 400 and "refusing to fetch" in msg and why in msg, (target, r.text)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out[-2000:]
    assert f"http://127.0.0.1:{port}" in out
    # each refused request is one line with its reason; no tracebacks
    refused = [line for line in out.splitlines() if "POST /v1/chat/completions -> 400: " in line]
    assert len(refused) == 5 and all("refusing to fetch" in line for line in refused), out[-3000:]
    assert "Traceback" not in out, out[-3000:]
