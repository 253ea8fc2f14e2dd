"""`vlmkit serve` under resource pressure: slow remote images must not delay other requests, the per-request
decoded-pixel budget refuses before decoding, and memory taken by huge images goes back to the OS afterwards.
Remote images come from a local server that trickles bytes (tests/slow_http.py), reached through a fake resolver."""

from __future__ import annotations

import io
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (make install-dev)")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (make install-dev)")

from PIL import Image  # noqa: E402
from slow_http import TricklingServer, route_public_host_to  # noqa: E402
from test_serve import LiveServer, data_uri, png_bytes  # noqa: E402

import vlmkit  # noqa: E402
from vlmkit.processing.images import ImageLimits  # noqa: E402
from vlmkit.serve import create_app  # noqa: E402

MODEL = "tiny-llava"


@pytest.fixture(scope="module")
def vlm(hf_checkpoint_dir):
    return vlmkit.load(hf_checkpoint_dir("llava"))


def chat(content, max_tokens=2) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}


def image_url(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def post(server, body, timeout=60):
    start = time.monotonic()
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=timeout)
    return r, time.monotonic() - start


def test_slow_remote_images_do_not_delay_other_requests(vlm, monkeypatch):
    limits = ImageLimits(allow_remote=True, timeout_s=3, max_images=4)
    app = create_app(vlm, model_name=MODEL, limits=limits, ui=False)
    with TricklingServer(interval=0.5) as slow, LiveServer(app) as server:
        route_public_host_to(monkeypatch, slow.port)
        text_only = chat("Say hi.")
        inline_image = chat([{"type": "text", "text": "What is it?"}, image_url(data_uri(png_bytes()))])
        r, idle_text = post(server, text_only)
        assert r.status_code == 200, r.text
        r, idle_image = post(server, inline_image)
        assert r.status_code == 200, r.text

        slow_results = []
        slow_requests = [threading.Thread(target=lambda path=path: slow_results.append(
            post(server, chat([{"type": "text", "text": "What is it?"}, image_url(f"http://slow.test{path}")]))))
            for path in ("/slow-headers", "/slow-body")]
        for thread in slow_requests:
            thread.start()
        slow.wait_for_connections(2)  # both downloads are in flight (more than the 2 prepare threads' worth)
        r, busy_text = post(server, text_only)
        assert r.status_code == 200, r.text
        r, busy_image = post(server, inline_image)
        assert r.status_code == 200, r.text
        assert slow.connections == 2, "the slow downloads ended before the other requests were answered"
        assert busy_text < max(1.5, 4 * idle_text), (busy_text, idle_text)
        assert busy_image < max(1.5, 4 * idle_image), (busy_image, idle_image)

        for thread in slow_requests:
            thread.join(30)
        for r, took in slow_results:  # each cut at its own deadline, with a 400 that says so
            assert r.status_code == 400 and "timed out after 3 s" in r.json()["error"]["message"], r.text
            assert took < 3 + 1.5, took


def test_remote_downloads_beyond_the_slots_get_429(vlm, monkeypatch):
    app = create_app(vlm, model_name=MODEL, limits=ImageLimits(allow_remote=True, timeout_s=3), ui=False)
    app.state.engine.downloads.limiter.total_tokens = 1  # one download slot
    with TricklingServer(interval=0.5) as slow, LiveServer(app) as server:
        route_public_host_to(monkeypatch, slow.port)
        first = threading.Thread(target=post, args=(server, chat([image_url("http://slow.test/slow-body")])))
        first.start()
        slow.wait_for_connections(1)
        r, took = post(server, chat([image_url("http://slow.test/slow-body")]))
        assert r.status_code == 429 and "remote image downloads" in r.json()["error"]["message"], r.text
        assert took < 1.0 and r.headers.get("Retry-After")
        first.join(30)


def big_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (40, 160, 90)).save(buffer, "PNG")  # one colour: tiny file, huge image
    return buffer.getvalue()


def test_request_pixel_budget_is_a_clear_400(vlm):
    limits = ImageLimits(max_request_pixels=1_000_000, max_images=16)
    app = create_app(vlm, model_name=MODEL, limits=limits, ui=False)
    with LiveServer(app) as server:
        image = image_url(data_uri(big_png(600)))  # 360 000 pixels each: two pass, three do not
        r, _ = post(server, chat([image, image]))
        assert r.status_code == 200, r.text
        r, _ = post(server, chat([image, image, image]))
        message = r.json()["error"]["message"]
        assert r.status_code == 400 and "max_request_pixels=1000000" in message and "1080000" in message, r.text


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_huge_images_neither_hold_memory_nor_delay_small_ones(vlm):
    # 16 one-colour 2500x2500 PNGs per request (~18 KB each on the wire, 100 Mpx decoded), two at once, twice;
    # during the first pair a request with one small image must not wait for their decoding.
    limits = ImageLimits(max_request_pixels=10**9, max_images=16)
    app = create_app(vlm, model_name=MODEL, limits=limits, ui=False, max_body_bytes=8 << 20)
    body = chat([{"type": "text", "text": "What is it?"}] + [image_url(data_uri(big_png(2500)))] * 16)
    small = chat([{"type": "text", "text": "What is it?"}, image_url(data_uri(png_bytes()))])
    with LiveServer(app) as server:
        r, idle_small = post(server, small)  # also warms up every code path once
        assert r.status_code == 200, r.text
        baseline = _rss_bytes()
        for round in range(2):
            results = []
            threads = [threading.Thread(target=lambda: results.append(post(server, body))) for _ in range(2)]
            start = time.monotonic()
            for thread in threads:
                thread.start()
            if round == 0:
                time.sleep(0.05)  # both big requests are on their way (an idle fast CPU decodes them in ~0.3 s)
                big_still_running = sum(thread.is_alive() for thread in threads)
                r, busy_small = post(server, small)
                assert r.status_code == 200, r.text
            for thread in threads:
                thread.join(120)
            big_wall = time.monotonic() - start
            assert [r.status_code for r, _ in results] == [200, 200], [r.text for r, _ in results]
            if round == 0:
                print(f"small image: {idle_small:.2f} s idle, {busy_small:.2f} s beside two big requests "
                      f"({big_wall:.1f} s)")
                assert big_still_running == 2 and busy_small < big_wall / 3, (busy_small, big_wall)
        grown = _rss_bytes() - baseline
        print(f"RSS baseline {baseline / 2**20:.0f} MiB, after 2x2 requests +{grown / 2**20:.0f} MiB")
        assert grown < 120 * 2**20, f"RSS stayed {grown / 2**20:.0f} MiB above its baseline"


def test_serve_flag_sets_the_request_pixel_budget(monkeypatch):
    from vlmkit import cli, serve
    from vlmkit.cli import serve_command
    from vlmkit.serve import app as app_module

    seen = {}
    monkeypatch.setattr(serve_command, "load_model", lambda args: object())
    monkeypatch.setattr(serve, "create_app", lambda vlm, **kw: seen.update(kw) or "app")
    monkeypatch.setattr(app_module, "run", lambda app, **kw: None)
    assert cli.main(["serve", "--no-ui", "--max-request-pixels", "1234"]) == 0
    assert seen["limits"].max_request_pixels == 1234
    assert cli.main(["serve", "--no-ui"]) == 0
    assert seen["limits"].max_request_pixels == ImageLimits().max_request_pixels == 100_000_000


def test_pixel_gate_admits_by_pixels():
    from vlmkit.serve.image_inputs import PixelGate

    gate, order = PixelGate(100), []
    with gate.admit(60):
        with gate.admit(30):  # fits beside the first
            order.append("small")
        huge = gate.admit(500)  # over the capacity: runs alone, once the 60 are released
        waiter = threading.Thread(target=lambda: huge.__enter__() or order.append("huge"))
        waiter.start()
        time.sleep(0.2)
        assert order == ["small"] and gate.in_use == 60
    waiter.join(5)
    assert order == ["small", "huge"] and gate.in_use == 100
    huge.__exit__(None, None, None)
    assert gate.in_use == 0
