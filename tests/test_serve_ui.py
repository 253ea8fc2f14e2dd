"""The Gradio chat page of `vlmkit serve`, driven in headless Chromium (Playwright with the system browser): upload an
image, ask, see the answer, ask a follow-up, clear; errors answered in the chat with the page still usable; the stop
button; examples and the max-tokens / temperature controls. Screenshot: test-artifacts/serve-ui.png.

One server and one browser serve the whole module (each test opens a fresh page: a fresh conversation)."""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest

pytest.importorskip("gradio", reason="the serve extra (gradio) is not installed (make install-dev)")
pytest.importorskip("fastapi", reason="the serve extra is not installed (make install-dev)")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (make install-dev)")

from PIL import Image  # noqa: E402

import vlmkit  # noqa: E402
from vlmkit.api import default_model_path  # noqa: E402
from vlmkit.serve import create_app  # noqa: E402
from vlmkit.serve.ui import (  # noqa: E402
    DEFAULT_MODEL_EXAMPLES, ERROR_TITLE, EXAMPLES, EXAMPLES_DIR, UIConversation, chat_examples, model_note,
)

from test_serve import ARTIFACTS, LiveServer, png_bytes  # noqa: E402

CHROMIUM = os.environ.get("VLMKIT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MODEL = "tiny-llava"
UI_TOKENS = 20  # what the tests set the max-tokens control to
UI_MAX_TOKENS = 1500  # the control's top (its default): the tiny model takes seconds for that, time to press stop
WANT_BOT = ("([n, want]) => { const b = document.querySelectorAll('[data-testid=bot]');"
            " return b.length >= n && b[n-1].innerText.split(/\\s+/).join(' ').trim() === want; }")
BOT_HAS = ("([n, part]) => { const b = document.querySelectorAll('[data-testid=bot]');"
           " return b.length >= n && b[n-1].innerText.includes(part); }")


def _norm(text: str) -> str:
    return " ".join(text.split())


def _text_turn(role: str, text: str) -> dict:
    return {"role": role, "content": [{"type": "text", "text": text}]}


# --------------------------------------------------------------------------------------------- without a browser

def test_error_exchanges_are_kept_out_of_the_prompt(tmp_path):
    error = {"title": ERROR_TITLE}
    history = [
        {"role": "user", "content": [{"type": "text", "text": "first"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "one"}], "metadata": None},
        {"role": "user", "content": [{"type": "file", "file": {"path": str(tmp_path / "corrupt.png")}}]},
        {"role": "user", "content": [{"type": "text", "text": "what is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "bad image"}], "metadata": error},
        {"role": "user", "content": [{"type": "text", "text": "tell a story"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "once upon"}]},  # streamed, then it failed
        {"role": "assistant", "content": [{"type": "text", "text": "failed"}], "metadata": error},
        {"role": "user", "content": [{"type": "text", "text": "second"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "two"}], "metadata": {"title": "a thought"}},
    ]
    conversation = UIConversation(SimpleNamespace(limits=None), tmp_path)
    assert conversation.messages({"text": "third", "files": []}, history) == [
        _text_turn("user", "first"), _text_turn("assistant", "one"), _text_turn("user", "second"),
        _text_turn("assistant", "two"), _text_turn("user", "third")]


def test_chat_function_answers_errors_instead_of_raising(hf_checkpoint_dir):
    """Errors come back as an error reply (a raised gr.Error would leave the page's textbox disabled)."""
    import asyncio

    from gradio.utils import get_upload_folder

    from vlmkit.serve.ui import build_ui

    app = create_app(vlmkit.load(hf_checkpoint_dir("llava")), model_name=MODEL, ui=False)
    respond = build_ui(app.state.engine, max_tokens=UI_TOKENS).fn
    upload = Path(get_upload_folder()) / "vlmkit-test" / "corrupt.png"
    upload.parent.mkdir(parents=True, exist_ok=True)
    upload.write_bytes(b"\x89PNG\r\n\x1a\nnot a png")

    async def replies(message, tokens=UI_TOKENS, temperature=0):
        return [r async for r in respond(message, [], tokens, temperature)]

    try:
        for message, settings, says in [
                ({"text": "what is it?", "files": [str(upload)]}, (), "invalid image"),
                ({"text": "word " * 2500, "files": []}, (), "context of 2048 tokens"),
                ({"text": "   ", "files": []}, (), "Type a question"),
                ({"text": "Hi", "files": []}, (UI_TOKENS, float("nan")), "Temperature must be a number from 0.0"),
                ({"text": "Hi", "files": []}, (10**6, 0), "Max tokens must be a number from 1")]:
            *_, last = asyncio.run(replies(message, *settings))
            assert last.metadata["title"] == ERROR_TITLE and says in last.content
        *_, answer = asyncio.run(replies({"text": "Hello", "files": []}))
        assert isinstance(answer, str) and answer.strip()
    finally:
        app.state.batcher.stop()


def test_model_note_and_examples(hf_checkpoint_dir):
    default = SimpleNamespace(folder=default_model_path())
    assert "synthetic" in model_note(default, "vlmkit-default") and "not trained on photos" in model_note(
        default, "vlmkit-default")
    shown = chat_examples(default)
    assert [(Path(e[0]["files"][0]).name, e[0]["text"]) for e in shown] == EXAMPLES[:DEFAULT_MODEL_EXAMPLES]
    vlm = vlmkit.load(hf_checkpoint_dir("llava"))
    note = model_note(vlm, MODEL)
    assert MODEL in note and "LLaVA" in note and "context 2048 tokens" in note
    assert len(chat_examples(vlm)) == len(EXAMPLES)
    assert chat_examples(vlm, folder=Path("/nonexistent")) == []
    # every example is a row of examples/README.md's table (image, question)
    readme = (EXAMPLES_DIR / "README.md").read_text()
    for image, question in EXAMPLES:
        assert f"| {question} |" in readme and f"`{image}`" in readme


# --------------------------------------------------------------------------------------------- in Chromium

def _browser_or_skip(playwright):
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        found = shutil.which("chromium") or shutil.which("chromium-browser")
        pytest.skip(f"no Chromium at {CHROMIUM} (found: {found}); install it with `apt-get install chromium` "
                    "(make install-dev does this when run as root) or set VLMKIT_CHROMIUM")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


@pytest.fixture(scope="module")
def ui(hf_checkpoint_dir):
    """The served app, its live URL, a browser, and every Stream the engine handed out (in order)."""
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="the playwright python package is not installed (make install-dev)")
    vlm = vlmkit.load(hf_checkpoint_dir("llava"))
    app = create_app(vlm, model_name=MODEL, ui=True, ui_max_tokens=UI_MAX_TOKENS, max_batch=4)
    engine, streams = app.state.engine, []
    submit = engine.submit

    def recorded_submit(prepared):
        stream = submit(prepared)
        streams.append(stream)
        return stream

    engine.submit = recorded_submit
    with LiveServer(app) as live, sync_api.sync_playwright() as p:
        browser = _browser_or_skip(p)
        try:
            yield SimpleNamespace(vlm=vlm, app=app, url=live.url, browser=browser, streams=streams)
        finally:
            browser.close()


@pytest.fixture
def page(ui, request):
    """A fresh page on the chat (loopback only: any request beyond it fails the test). A failing test leaves a
    screenshot of the page in test-artifacts/."""
    page = ui.browser.new_page(viewport={"width": 1000, "height": 1250})
    outside = []

    def loopback_only(route):
        host = urlparse(route.request.url).hostname
        if route.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    page.route("**/*", loopback_only)
    page.goto(ui.url + "/", wait_until="load", timeout=30_000)
    page.locator("textarea").first.wait_for(timeout=30_000)
    failed = request.session.testsfailed
    yield page
    if request.session.testsfailed > failed:
        os.makedirs(ARTIFACTS, exist_ok=True)
        page.screenshot(path=os.path.join(ARTIFACTS, f"serve-ui-failed-{request.node.name}.png"), full_page=True)
    page.close()
    assert not outside, f"the page tried to reach beyond loopback: {outside[:5]}"


def _set_number(page, label: str, value) -> None:
    field = page.get_by_label(f"number input for {label}")
    field.fill(str(value))
    field.press("Enter")  # Gradio takes a typed number on Enter / blur


def _ask(page, text: str, image: Path = None) -> None:
    box = page.locator("textarea").first
    # The box is disabled while an answer streams; re-enabling it also empties it (an image attached before that
    # would be dropped), so wait for it.
    page.wait_for_function("() => !document.querySelector('textarea').disabled", timeout=30_000)
    if image is not None:
        with page.expect_response(lambda r: "/upload" in r.url and r.status == 200, timeout=20_000):
            page.locator("input[type=file]").first.set_input_files(str(image))
    box.fill(text)
    box.press("Enter")


def _wait_answer(page, n: int, want: str) -> None:
    try:
        page.wait_for_function(WANT_BOT, arg=[n, _norm(want)], timeout=30_000)
    except Exception:  # say what the page shows instead
        shown = [_norm(b.inner_text()) for b in page.locator("[data-testid=bot]").all()]
        raise AssertionError(f"bot message {n} should read {_norm(want)!r}; the page shows {shown!r}") from None


def _answered(ui, index: int) -> str:
    return "".join(ui.streams[index].text_parts)


def _wait_until(page, done, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        page.wait_for_timeout(20)  # not time.sleep: the page's requests pass the route handler of this thread


def _finished_job(ui, page, index: int):
    """The job of the index-th request the page sent, once the batcher has ended it."""
    _wait_until(page, lambda: len(ui.streams) > index and ui.streams[index].job.finished, f"job {index}")
    return ui.streams[index].job


def _wait_streamed_answer(ui, page, n: int, index: int) -> None:
    """Bot message n shows the whole answer of request `index`, which ran to its end."""
    # `ended`: the page's handler has read the last piece (the job may end in the batcher before that)
    _wait_until(page, lambda: len(ui.streams) > index and ui.streams[index].ended, f"answer {index}")
    assert ui.streams[index].job.finish_reason in ("stop", "length") and _answered(ui, index).strip()
    _wait_answer(page, n, _answered(ui, index))


def _assert_prompt(ui, messages: list) -> None:
    """The last request's prompt is `messages` rendered by the model's processor (up to whitespace: the page
    keeps the tiny model's odd spaces in its answers its own way)."""
    decode = ui.vlm.processor.tokenizer.decode
    got = ui.streams[-1].prepared.batch["input_ids"][0].tolist()
    want = ui.vlm.processor([messages], None)["input_ids"][0].tolist()
    assert _norm(decode(got)) == _norm(decode(want))


def test_gradio_chat_in_a_browser(ui, page, tmp_path):
    vlm = ui.vlm
    image_path = tmp_path / "red-square.png"
    image_path.write_bytes(png_bytes((48, 48), (230, 30, 30)))
    image = Image.open(io.BytesIO(image_path.read_bytes()))
    q1, q2 = "What color is the square?", "And what shape is it?"
    turn1 = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": q1}]}]
    answer1 = vlm.chat(turn1, max_new_tokens=UI_TOKENS)
    turn2 = turn1 + [_text_turn("assistant", answer1), _text_turn("user", q2)]
    answer2 = vlm.chat(turn2, max_new_tokens=UI_TOKENS)

    # The API routes still answer with the UI mounted at /
    assert httpx.get(ui.url + "/health").json()["status"] == "ok"
    assert httpx.get(ui.url + "/v1/models").json()["data"][0]["id"] == MODEL
    assert "LLaVA vision-language model" in page.inner_text("body")  # the line on what the model can do
    _set_number(page, "Max tokens", UI_TOKENS)

    # turn 1: an image and a question; turn 2: a follow-up on the same conversation
    _ask(page, q1, image_path)
    _wait_answer(page, 1, answer1)
    assert page.locator("[data-testid=user] img").count() >= 1  # the uploaded image is in the chat
    _ask(page, q2)
    _wait_answer(page, 2, answer2)
    assert ui.streams[-1].job.max_tokens == UI_TOKENS
    page.wait_for_timeout(300)  # let the last render settle before the screenshot
    page.evaluate("document.querySelectorAll('.bubble-wrap, [role=log]').forEach(e => e.scrollTop = 0)")
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "serve-ui.png"), full_page=True)

    # clear
    bots = page.locator("[data-testid=bot]")
    page.get_by_role("button", name="Clear").first.click()
    deadline = time.monotonic() + 10
    while bots.count() and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    assert bots.count() == 0


def test_errors_are_answered_in_the_chat_and_the_next_question_works(ui, page, tmp_path):
    vlm, box = ui.vlm, page.locator("textarea").first
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png at all " * 20)
    _set_number(page, "Max tokens", UI_TOKENS)
    submitted = len(ui.streams)

    # spaces only: refused in the page, nothing sent, the box stays usable
    box.fill("    ")
    box.press("Enter")
    page.get_by_text("Type a question or attach an image.").first.wait_for(timeout=10_000)
    q1 = "Hello, who are you?"
    _ask(page, q1)
    answer1 = vlm.chat([_text_turn("user", q1)], max_new_tokens=UI_TOKENS)
    _wait_answer(page, 1, answer1)
    assert page.locator("[data-testid=user]").count() == 1  # the spaces never became a message

    # a corrupt image: the reply says so; the next question is answered, and that exchange is not in its prompt
    _ask(page, "What is in this picture?", corrupt)
    page.wait_for_function(BOT_HAS, arg=[2, "invalid image"], timeout=30_000)
    assert ERROR_TITLE in page.locator("[data-testid=bot]").nth(1).inner_text()
    history = [_text_turn("user", q1), _text_turn("assistant", _answered(ui, submitted))]
    q2 = "Tell me more."
    _ask(page, q2)
    _wait_streamed_answer(ui, page, 3, submitted + 1)
    _assert_prompt(ui, history + [_text_turn("user", q2)])
    history += [_text_turn("user", q2), _text_turn("assistant", _answered(ui, submitted + 1))]

    # a prompt over the model's context: the same
    _ask(page, "word " * 2500)
    page.wait_for_function(BOT_HAS, arg=[4, "context of 2048 tokens"], timeout=30_000)
    q3 = "And now?"
    _ask(page, q3)
    _wait_streamed_answer(ui, page, 5, submitted + 2)
    _assert_prompt(ui, history + [_text_turn("user", q3)])
    assert len(ui.streams) - submitted == 3  # only the three answered questions reached the batcher


def test_stop_button_cancels_the_job(ui, page):
    stats = ui.app.state.batcher.stats
    cancelled, submitted = stats["cancelled"], len(ui.streams)
    page.get_by_label("number input for Max tokens").wait_for()
    assert page.get_by_label("number input for Max tokens").input_value() == str(UI_MAX_TOKENS)
    _ask(page, "Tell me a long story.")
    page.wait_for_function(BOT_HAS, arg=[1, " "], timeout=30_000)  # text is streaming in
    page.get_by_role("button", name="Stop").click()
    assert len(ui.streams) == submitted + 1
    job = _finished_job(ui, page, submitted)
    assert job.finish_reason == "cancelled" and job.completion_tokens < UI_MAX_TOKENS
    assert stats["cancelled"] == cancelled + 1
    # the page takes the next question
    _set_number(page, "Max tokens", UI_TOKENS)
    _ask(page, "Short answer please.")
    _wait_streamed_answer(ui, page, 2, submitted + 1)


def test_examples_and_temperature(ui, page):
    submitted = len(ui.streams)
    _set_number(page, "Max tokens", UI_TOKENS)
    image, question = EXAMPLES[0]
    page.get_by_text(question).first.click()  # an example card: its image and question are sent at once
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(EXAMPLES_DIR / image)},
                                             {"type": "text", "text": question}]}]
    _wait_streamed_answer(ui, page, 1, submitted)
    _assert_prompt(ui, messages)
    assert ui.streams[submitted].job.sampling.do_sample is False

    _set_number(page, "Temperature", 0.7)
    _ask(page, "Again?")
    # A sampled answer of the tiny random model may hold Markdown the page renders its own way: count it, not read it.
    _wait_until(page, lambda: len(ui.streams) > submitted + 1 and ui.streams[submitted + 1].ended, "sampled answer")
    page.wait_for_function("() => document.querySelectorAll('[data-testid=bot]').length >= 2", timeout=30_000)
    sampling = ui.streams[submitted + 1].job.sampling
    assert sampling.do_sample and sampling.temperature == pytest.approx(0.7)


def test_chat_page_behind_an_api_key(ui, tmp_path):
    """With --api-key, the browser is asked for a password (HTTP Basic, the key as password); given it, the page
    uploads, queues and streams as without a key; without it, the page is refused."""
    key = "ui-test-key"
    app = create_app(ui.vlm, model_name=MODEL, ui=True, ui_max_tokens=UI_MAX_TOKENS, max_batch=2, api_key=key)
    image_path = tmp_path / "red.png"
    image_path.write_bytes(png_bytes((48, 48), (230, 30, 30)))
    question = "What color is the square?"
    turn = [{"role": "user", "content": [{"type": "image", "image": Image.open(image_path)},
                                         {"type": "text", "text": question}]}]
    answer = ui.vlm.chat(turn, max_new_tokens=UI_TOKENS)
    with LiveServer(app) as live:
        refused = ui.browser.new_context()
        try:
            assert refused.request.get(live.url + "/").status == 401  # (a page would wait for a password)
        finally:
            refused.close()
        context = ui.browser.new_context(http_credentials={"username": "me", "password": key},
                                         viewport={"width": 1000, "height": 1250})
        try:
            page = context.new_page()
            assert page.goto(live.url + "/", wait_until="load", timeout=30_000).status == 200
            page.locator("textarea").first.wait_for(timeout=30_000)
            _set_number(page, "Max tokens", UI_TOKENS)
            _ask(page, question, image_path)
            _wait_answer(page, 1, answer)
        finally:
            context.close()
