"""`--api-key` on every route but /health (OpenAI, Ollama, the chat page and its API), with the `openai` client and
plain HTTP; and `vlmkit serve`'s flags as vLLM spells them, the old spellings still working, checked in-process on
the app `vlmkit serve` builds (uvicorn's `run` replaced)."""

from __future__ import annotations

import base64
import json

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (make install-dev)")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (make install-dev)")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (make install-dev)")
openai = pytest.importorskip("openai", reason="the openai client is not installed (make install-dev)")

from fastapi.testclient import TestClient  # noqa: E402

import vlmkit  # noqa: E402
from test_serve import RED, LiveServer, data_uri  # noqa: E402
from vlmkit import cli  # noqa: E402
from vlmkit.cli import serve_command  # noqa: E402
from vlmkit.serve import auth, create_app  # noqa: E402

KEY, OTHER = "sk-test-0123456789", "second key"
MODEL = "tiny-llava"


@pytest.fixture(scope="module")
def vlm(hf_checkpoint_dir):
    return vlmkit.load(hf_checkpoint_dir("llava"))


@pytest.fixture(scope="module")
def server(vlm):
    with LiveServer(create_app(vlm, model_name=MODEL, ui=False, api_key=[KEY, OTHER])) as live:
        yield live


def basic(password: str, user: str = "anyone") -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_openai_client_needs_the_key(server):
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                             {"type": "image_url", "image_url": {"url": data_uri(RED)}}]}]
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert "Authorization: Bearer" in e.value.message
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    for key in (KEY, OTHER):  # each of several keys works
        right = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)
        assert right.chat.completions.create(model=MODEL, messages=messages, max_tokens=2).usage.completion_tokens
        assert right.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].text is not None


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/nope"),
    ("GET", "/api/tags"), ("POST", "/api/chat"), ("POST", "/api/generate"), ("GET", "/api/version"),
    ("GET", "/"), ("GET", "/docs"), ("GET", "/openapi.json"), ("OPTIONS", "/v1/models"), ("GET", "/health/x"),
])
def test_every_route_but_health_is_refused_without_the_key(server, method, path):
    for headers in ({}, bearer("wrong"), bearer(KEY + "x"), bearer(KEY[:-1]), {"Authorization": KEY},
                    {"Authorization": f"Token {KEY}"}, basic("wrong"), {"Authorization": "Basic !!"}):
        r = httpx.request(method, server.url + path, headers=headers, content=b"{}")
        assert r.status_code == 401, (path, headers, r.text)
        body = r.json()
        if path.startswith("/api/"):  # Ollama's dialect
            assert "API key" in body["error"]
        else:
            assert body["error"]["code"] == "invalid_api_key" and body["error"]["type"] == "invalid_request_error"
        scheme = "Bearer" if path.startswith(("/v1/", "/api/")) else "Basic"  # a browser asks for a password
        assert r.headers["www-authenticate"].startswith(scheme)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # probes need no key
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": f"bearer  {KEY}"}).status_code == 200
    assert httpx.get(server.url + "/api/tags", headers=basic(OTHER)).status_code == 200


def test_the_key_is_compared_in_constant_time(monkeypatch):
    calls = []
    real = auth.hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    middleware = auth.APIKeyMiddleware(None, [KEY, OTHER], render=None)
    assert not middleware.authorized([(b"authorization", b"Bearer x")])
    assert middleware.authorized([(b"authorization", f"Bearer {KEY}".encode())])
    # digests of equal length, and every key compared even after a match
    assert calls == [(32, 32)] * 4
    with pytest.raises(ValueError):
        auth.APIKeyMiddleware(None, [""], render=None)
    utf8 = auth.APIKeyMiddleware(None, ["clé-ü"], render=None)  # a key beyond ASCII: its UTF-8 bytes
    assert utf8.authorized([(b"authorization", "Bearer clé-ü".encode())])
    assert utf8.authorized([(b"authorization", b"Basic " + base64.b64encode("me:clé-ü".encode()))])
    assert not utf8.authorized([(b"authorization", "Bearer clé-ü".encode("latin-1"))])


def test_chat_page_and_its_api_need_the_key(vlm):
    pytest.importorskip("gradio", reason="gradio is not installed (make install-dev)")
    with TestClient(create_app(vlm, model_name=MODEL, ui=True, api_key=KEY)) as client:
        page = client.get("/")
        assert page.status_code == 401 and page.headers["www-authenticate"].startswith("Basic")
        for path in ("/config", "/gradio_api/info", "/gradio_api/queue/join"):
            assert client.get(path).status_code == 401, path
        page = client.get("/", headers=basic(KEY))  # what the browser sends after its login prompt
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert client.get("/config", headers=basic(KEY)).status_code == 200
        assert client.get("/health").status_code == 200


def test_loopback_hosts():
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.5.5.5"):
        assert auth.is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.4", "example.com", ""):
        assert not auth.is_loopback(host), host


# ------------------------------------------------------------------------------------------ vlmkit serve flags

@pytest.fixture
def started(monkeypatch):
    """`vlmkit serve ...` in-process: the app it would run, where and at which log level."""
    import vlmkit.serve.app as app_module

    seen = {}
    monkeypatch.setattr(app_module, "run", lambda app, **kw: seen.update(app=app, **kw))
    for name in serve_command.API_KEY_ENV:
        monkeypatch.delenv(name, raising=False)
    return seen


def test_vllm_spellings(hf_checkpoint_dir, started, capsys, monkeypatch):
    folder = hf_checkpoint_dir("llava")
    argv = ["serve", folder, "--served-model-name", "my-vlm", "--max-num-seqs", "3", "--limit-mm-per-prompt",
            '{"image": 1, "video": 0}', "--max-model-len", "1024", "--api-key", KEY, "--no-ui", "--dtype", "auto",
            "--port", "8123", "--log-level", "WARNING"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert started["port"] == 8123 and started["log_level"] == "warning"
    app, headers = started["app"], bearer(KEY)
    assert app.state.batcher.max_batch == 3 and app.state.engine.limits.max_images == 1
    with TestClient(app) as client:
        assert client.get("/v1/models").status_code == 401
        card = client.get("/v1/models", headers=headers).json()["data"][0]
        assert card["id"] == "my-vlm" and card["max_model_len"] == 1024
        body = {"model": "my-vlm", "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(RED)}},
            {"type": "image_url", "image_url": {"url": data_uri(RED)}}]}]}
        r = client.post("/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 400 and "max_images=1" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"model": "my-vlm", "prompt": "hi there", "max_tokens": 1023},
                        headers=headers)
        assert r.status_code == 400 and "1024" in r.json()["error"]["message"]  # the context is --max-model-len
    # the key from the environment; a plain count for --limit-mm-per-prompt
    monkeypatch.setenv("VLLM_API_KEY", OTHER)
    assert cli.main(["serve", folder, "--no-ui", "--limit-mm-per-prompt", "2"]) == 0
    with TestClient(started["app"]) as client:
        assert client.get("/v1/models", headers=bearer(OTHER)).status_code == 200
        assert client.get("/v1/models", headers=bearer(KEY)).status_code == 401
    monkeypatch.setenv("VLMKIT_API_KEY", KEY)  # vlmkit's own variable first
    assert cli.main(["serve", folder, "--no-ui"]) == 0
    with TestClient(started["app"]) as client:
        assert client.get("/v1/models", headers=bearer(KEY)).status_code == 200
    assert started["app"].state.engine.limits.max_images == 16


def test_old_spellings_still_work_and_are_hidden(hf_checkpoint_dir, started, capsys):
    folder = hf_checkpoint_dir("llava")
    assert cli.main(["serve", "--model", folder, "--name", "old", "--max-batch", "2", "--max-images", "5",
                     "--no-ui"]) == 0
    app = started["app"]
    assert app.state.engine.model_name == "old" and app.state.batcher.max_batch == 2
    assert app.state.engine.limits.max_images == 5
    assert cli.main(["serve", folder, "--model", folder + "/", "--no-ui"]) == 0  # the same folder twice: fine
    capsys.readouterr()
    assert cli.main(["serve", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for new in ("MODEL", "--served-model-name", "--max-num-seqs", "--limit-mm-per-prompt", "--api-key",
                "--max-model-len", "--quantization", "--log-level"):
        assert new in text, new
    for old in ("--name", "--max-batch", "--max-images", "--quantize ", "--model"):
        assert old not in text, old


def test_warning_when_open_beyond_loopback_without_a_key(hf_checkpoint_dir, started, capsys):
    folder = hf_checkpoint_dir("llava")
    assert cli.main(["serve", folder, "--host", "0.0.0.0", "--no-ui"]) == 0
    assert "warning: binding 0.0.0.0 without --api-key" in capsys.readouterr().err
    assert cli.main(["serve", folder, "--host", "0.0.0.0", "--no-ui", "--api-key", KEY]) == 0
    assert "warning" not in capsys.readouterr().err
    assert cli.main(["serve", folder, "--no-ui"]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["MODEL_A", "--model", "MODEL_B"], "two models given"),
    (["--limit-mm-per-prompt", "{\"image\": 0}"], "image count must be >= 1"),
    (["--limit-mm-per-prompt", "{\"video\": 2}"], "not supported"),
    (["--limit-mm-per-prompt", "{\"audio\": 0}"], "no 'image' count"),
    (["--limit-mm-per-prompt", "four"], "JSON like"),
    (["--limit-mm-per-prompt", "[4]"], "JSON like"),
    (["--limit-mm-per-prompt", "{\"image\": -1}"], "count >= 0"),
    (["--max-num-seqs", "0"], "must be >= 1"),
    (["--api-key", " "], "--api-key must not be empty"),
    (["--dtype", "int3"], "invalid choice"),
    (["--log-level", "loud"], "invalid choice"),
])
def test_bad_flags_are_one_line(started, capsys, extra, message):
    code = cli.main(["serve", "--no-ui", *extra])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert "app" not in started


def test_max_model_len_over_the_context_is_refused(hf_checkpoint_dir, started, capsys):
    assert cli.main(["serve", hf_checkpoint_dir("llava"), "--no-ui", "--max-model-len", "999999"]) == 2
    err = capsys.readouterr().err
    assert "--max-model-len" in err and "2048" in err and "app" not in started


def test_mm_limit_parser():
    assert serve_command.mm_limit('{"image": 4}') == 4
    assert serve_command.mm_limit(" 7 ") == 7
    assert serve_command.mm_limit(json.dumps({"image": {"count": 3, "width": 512, "height": 512}})) == 3
