"""The Gradio chat page of `vlmkit serve`, driven in headless Chromium (Playwright with the system browser):
upload an image, ask, see the answer, ask a follow-up, clear. Screenshot: test-artifacts/serve-ui.png."""

from __future__ import annotations

import io
import os
import shutil
import time
from urllib.parse import urlparse

import pytest

pytest.importorskip("gradio", reason="the serve extra (gradio) is not installed (make install-dev)")
pytest.importorskip("fastapi", reason="the serve extra is not installed (make install-dev)")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (make install-dev)")

from PIL import Image  # noqa: E402

import vlmkit  # noqa: E402
from vlmkit.serve import create_app  # noqa: E402

from test_serve import ARTIFACTS, LiveServer, png_bytes  # noqa: E402

CHROMIUM = os.environ.get("VLMKIT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MODEL = "tiny-llava"
UI_TOKENS = 20


def _browser_or_skip(playwright):
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        found = shutil.which("chromium") or shutil.which("chromium-browser")
        pytest.skip(f"no Chromium at {CHROMIUM} (found: {found}); install it with `apt-get install chromium` "
                    "(make install-dev does this when run as root) or set VLMKIT_CHROMIUM")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def _norm(text: str) -> str:
    return " ".join(text.split())


def test_gradio_chat_in_a_browser(hf_checkpoint_dir, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="the playwright python package is not installed (make install-dev)")
    vlm = vlmkit.load(hf_checkpoint_dir("llava"))
    app = create_app(vlm, model_name=MODEL, ui=True, ui_max_tokens=UI_TOKENS, max_batch=4)
    image_path = tmp_path / "red-square.png"
    image_path.write_bytes(png_bytes((48, 48), (230, 30, 30)))
    image = Image.open(io.BytesIO(image_path.read_bytes()))
    q1, q2 = "What color is the square?", "And what shape is it?"
    turn1 = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": q1}]}]
    answer1 = vlm.chat(turn1, max_new_tokens=UI_TOKENS)
    turn2 = turn1 + [{"role": "assistant", "content": [{"type": "text", "text": answer1}]},
                     {"role": "user", "content": [{"type": "text", "text": q2}]}]
    answer2 = vlm.chat(turn2, max_new_tokens=UI_TOKENS)

    with LiveServer(app) as live, sync_api.sync_playwright() as p:
        # The API routes still answer with the UI mounted at /
        assert httpx.get(live.url + "/health").json()["status"] == "ok"
        assert httpx.get(live.url + "/v1/models").json()["data"][0]["id"] == MODEL
        browser = _browser_or_skip(p)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            outside = []

            def loopback_only(route):
                host = urlparse(route.request.url).hostname
                if route.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
                    return route.continue_()
                outside.append(route.request.url)
                return route.abort()

            page.route("**/*", loopback_only)
            page.goto(live.url + "/", wait_until="load", timeout=30_000)
            box = page.locator("textarea").first
            box.wait_for(timeout=30_000)

            # turn 1: an image and a question
            with page.expect_response(lambda r: "/upload" in r.url and r.status == 200, timeout=20_000):
                page.locator("input[type=file]").first.set_input_files(str(image_path))
            box.fill(q1)
            box.press("Enter")
            bots = page.locator("[data-testid=bot]")
            page.wait_for_function(
                "([n, want]) => { const b = document.querySelectorAll('[data-testid=bot]');"
                " return b.length >= n && b[n-1].innerText.split(/\\s+/).join(' ').trim() === want; }",
                arg=[1, _norm(answer1)], timeout=30_000)
            assert _norm(bots.nth(0).inner_text()) == _norm(answer1)
            assert page.locator("[data-testid=user] img").count() >= 1  # the uploaded image is in the chat

            # turn 2: a follow-up on the same conversation
            box.fill(q2)
            box.press("Enter")
            page.wait_for_function(
                "([n, want]) => { const b = document.querySelectorAll('[data-testid=bot]');"
                " return b.length >= n && b[n-1].innerText.split(/\\s+/).join(' ').trim() === want; }",
                arg=[2, _norm(answer2)], timeout=30_000)
            page.wait_for_timeout(300)  # let the last render settle before the screenshot
            page.evaluate("document.querySelectorAll('.bubble-wrap, [role=log]').forEach(e => e.scrollTop = 0)")
            os.makedirs(ARTIFACTS, exist_ok=True)
            page.screenshot(path=os.path.join(ARTIFACTS, "serve-ui.png"), full_page=True)

            # clear
            page.get_by_role("button", name="Clear").first.click()
            deadline = time.monotonic() + 10
            while bots.count() and time.monotonic() < deadline:
                page.wait_for_timeout(100)
            assert bots.count() == 0
            assert not outside, f"the page tried to reach beyond loopback: {outside[:5]}"
        finally:
            browser.close()
    assert app.state.batcher.stats["completed"] >= 2
