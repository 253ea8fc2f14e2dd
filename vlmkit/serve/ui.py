"""The Gradio chat page at /: a multimodal textbox (text + image upload), streamed answers with a stop button,
several turns, clickable examples, max-tokens and temperature controls, a clear button. It runs in the same process
as the API and goes through the same engine and batcher, so UI users and API clients are batched together and share
the queue limit.

A request the engine refuses (a corrupt image, a prompt over the context, a full queue) is answered in the chat as
an error reply, never raised: a raised error leaves Gradio's textbox disabled until the page is reloaded. Error
replies carry `metadata.title == ERROR_TITLE`; that exchange (the user turn that caused it and the reply) is left out
of the prompts that follow, so one bad image does not fail every later question. Messages of only spaces are
refused by a validator before anything is sent.

Images reach the UI as files in Gradio's upload folder; only files under that folder are read, with the server's
image limits. No asset is fetched from the internet (system fonts, analytics off).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import anyio

from ..api import is_default_model
from .engine import APIError, GenParams

log = logging.getLogger("vlmkit.serve")

ERROR_TITLE = "Error"  # the metadata title that marks a reply as an error (kept out of later prompts)
EMPTY_MESSAGE = "Type a question or attach an image."
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"  # a source checkout's examples/ (not in wheels)
# (image, question) rows of examples/README.md's table. The default model answers the first four right
# (recipes/default_model/probes/examples.py); it misses the position, word and chart questions, so other models
# get the rest too.
EXAMPLES = [("shapes.png", "What color is the circle?"), ("shapes.png", "What shape is yellow?"),
            ("count.png", "How many stars are there?"), ("count.png", "What color is the hexagon?"),
            ("text.png", "What word is written in the image?"), ("chart.png", "Which bar is the tallest?"),
            ("pie.png", "Which slice is the largest?")]
DEFAULT_MODEL_EXAMPLES = 4
FAMILY_NAMES = {"llava": "LLaVA", "idefics": "IDEFICS", "idefics2": "Idefics2", "idefics3": "Idefics3 / SmolVLM",
                "smolvlm": "Idefics3 / SmolVLM", "qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL"}


# --------------------------------------------------------------------------------------------- what is served

def model_note(vlm, model_name: str) -> str:
    """One line on what the served model can do."""
    if is_default_model(vlm):
        return ("This is vlmkit's small built-in model: it answers short questions about simple synthetic pictures "
                "of flat coloured shapes (which colour, which shape, like the examples). It was not trained on "
                "photos, and it often gets counting, words and charts wrong.")
    info = vlm.info()
    family = FAMILY_NAMES.get(info["family"], info["family"])
    arch = f", {info['architecture']}" if info.get("architecture") else ""
    return (f"**{model_name}** is a {family} vision-language model ({info['parameters'] / 1e6:,.0f}M parameters"
            f"{arch}, context {info['context_length']} tokens): ask about the images you attach; what it "
            "answers well is what this checkpoint was trained on.")


def chat_examples(vlm, folder: Optional[Path] = None) -> list[list]:
    """ChatInterface examples ([message] rows, as additional inputs require) from the images that exist."""
    folder = Path(folder) if folder is not None else EXAMPLES_DIR
    rows = EXAMPLES[:DEFAULT_MODEL_EXAMPLES] if is_default_model(vlm) else EXAMPLES
    return [[{"text": question, "files": [str(folder / image)]}] for image, question in rows
            if (folder / image).is_file()]


# --------------------------------------------------------------------------------------------- history -> prompt

def _content_items(content) -> list:
    """A message's content as a list of items (Gradio 6: a list of parts; older: a string, a dict or a
    (path, alt_text) tuple)."""
    return list(content) if isinstance(content, list) else [content]


def _file_path(item):
    """The path of a file item in any of Gradio's history forms, else None."""
    if isinstance(item, dict):
        if item.get("type") == "file" or "file" in item:
            item = item.get("file") or {}
        return item.get("path") if isinstance(item, dict) and item.get("path") else None
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], str):
        return item[0]
    return getattr(item, "path", None)


def is_error_reply(message) -> bool:
    metadata = message.get("metadata") if isinstance(message, dict) else getattr(message, "metadata", None)
    return isinstance(metadata, dict) and metadata.get("title") == ERROR_TITLE


def has_content(message) -> bool:
    """Whether a textbox value holds something to send: an attached file or text that is not only spaces."""
    if isinstance(message, dict):
        return bool(message.get("files")) or bool(str(message.get("text") or "").strip())
    return bool(str(message or "").strip())


class UIConversation:
    """Gradio's (message, history) -> vlmkit chat messages with image bytes inline."""

    def __init__(self, engine, upload_root: Path):
        self.engine, self.upload_root = engine, upload_root.resolve()

    def read_upload(self, path: str) -> bytes:
        p = Path(path).resolve()
        if self.upload_root not in p.parents:
            raise APIError(400, "the UI only reads images uploaded through it")
        size = p.stat().st_size
        if size > self.engine.limits.max_bytes:
            raise APIError(400, f"image too large: {size} bytes > {self.engine.limits.max_bytes}")
        return p.read_bytes()

    def parts(self, content, role: str) -> list[dict]:
        out = []
        for item in _content_items(content):
            if isinstance(item, str):
                if item.strip():
                    out.append({"type": "text", "text": item})
            elif isinstance(item, dict) and item.get("type") == "text":
                if str(item.get("text", "")).strip():
                    out.append({"type": "text", "text": str(item["text"])})
            else:
                path = _file_path(item)
                if path and role == "user":
                    out.append({"type": "image", "image": self.read_upload(path)})
        return out

    @staticmethod
    def kept_turns(history) -> list[tuple[str, object]]:
        """(role, content) of the history's user and assistant messages, without the exchanges that ended in an
        error reply (that reply, any partial answer before it, and the user turns that caused it)."""
        kept: list[tuple[str, object]] = []
        for h in history or []:
            if not isinstance(h, dict) or h.get("role") not in ("user", "assistant"):
                continue
            if h["role"] == "assistant" and is_error_reply(h):
                while kept and kept[-1][0] == "assistant":
                    kept.pop()
                while kept and kept[-1][0] == "user":
                    kept.pop()
                continue
            kept.append((h["role"], h.get("content")))
        return kept

    def messages(self, message, history) -> list[dict]:
        out: list[dict] = []
        turns = self.kept_turns(history)
        if isinstance(message, dict):
            files = [{"path": f} if isinstance(f, str) else f for f in message.get("files") or []]
            turns.append(("user", files + [message.get("text") or ""]))
        else:
            turns.append(("user", message or ""))
        for role, content in turns:
            parts = self.parts(content, role)
            if not parts:
                continue
            if out and out[-1]["role"] == role:  # Gradio may split one turn (files, text) in several messages
                out[-1]["content"].extend(parts)
            else:
                out.append({"role": role, "content": parts})
        if not out or out[-1]["role"] != "user":
            raise APIError(400, EMPTY_MESSAGE)
        return out


# --------------------------------------------------------------------------------------------- the page

def _setting(value, label: str, low: float, high: float) -> float:
    """A control's value checked (the page's sliders keep to their range; the page's API does not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise APIError(400, f"{label} must be a number from {low} to {high}, got {value!r}"[:200])
    return float(value)


def build_ui(engine, *, max_tokens: int = 256, title=None, examples_dir: Optional[Path] = None):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    from gradio.utils import get_upload_folder

    conversation = UIConversation(engine, Path(get_upload_folder()))
    max_tokens = max(1, min(max_tokens, engine.max_tokens_limit))

    def error_reply(text: str, message: str):
        # A failure after some text keeps that text on the page, with the error after it.
        error = gr.ChatMessage(content=message, metadata={"title": ERROR_TITLE})
        return [text, error] if text else error

    async def respond(message, history, answer_tokens, temperature):
        text, stream = "", None
        try:
            messages = await anyio.to_thread.run_sync(conversation.messages, message, history)
            params = GenParams(temperature=_setting(temperature, "Temperature", 0.0, 2.0))
            answer_tokens = int(_setting(answer_tokens, "Max tokens", 1, max_tokens))
            prepared = await engine.prepare_async(messages, params)
            # The control's value, cut to what the context leaves after the prompt.
            prepared.max_tokens = max(1, min(answer_tokens, engine.context - prepared.prompt_tokens))
            stream = engine.submit(prepared)
            async for piece in stream:
                text += piece
                yield text
        except APIError as e:
            yield error_reply(text, e.message)
            return
        except Exception as e:  # noqa: BLE001 -- a raised error would disable the textbox; say what failed
            log.exception("the chat page's request failed")
            yield error_reply(text, f"internal error: {type(e).__name__}: {e}")
            return
        finally:
            if stream is not None:
                stream.cancel()  # the user pressed stop or left: the job stops in the batcher
        if not text:
            yield "(empty answer)"

    def refuse_empty(message):
        return gr.validate(has_content(message), EMPTY_MESSAGE)

    name = engine.model_name
    examples = chat_examples(engine.vlm, examples_dir)
    controls = [
        gr.Slider(1, max_tokens, value=max_tokens, step=1, label="Max tokens", info="the longest answer"),
        gr.Slider(0.0, 2.0, value=0.0, step=0.1, label="Temperature", info="0: always the likeliest word"),
    ]
    description = (model_note(engine.vlm, name) + "\n\nAttach images with the paperclip (or drop them in), ask a "
                   "question; answers stream in (the square button stops one). The trash icon clears the "
                   "conversation." + (" Or click an example." if examples else ""))
    return gr.ChatInterface(
        respond, multimodal=True, title=title or f"vlmkit · {name}", description=description,
        textbox=gr.MultimodalTextbox(file_types=["image"], file_count="multiple", sources=["upload"],
                                     placeholder="Ask about an image…", show_label=False, stop_btn=True),
        chatbot=gr.Chatbot(label=name, height=480),
        additional_inputs=controls, additional_inputs_accordion=gr.Accordion("Settings", open=True),
        examples=examples or None, validator=refuse_empty,
        concurrency_limit=engine.batcher.max_batch, analytics_enabled=False, fill_height=True,
    )


def mount_ui(app, engine, *, max_tokens: int = 256, title=None, examples_dir: Optional[Path] = None):
    try:
        import gradio as gr
    except ImportError:
        raise ImportError("the chat page needs gradio: pip install 'vlmkit[ui]' (or pass ui=False)") from None

    demo = build_ui(engine, max_tokens=max_tokens, title=title, examples_dir=examples_dir)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    return gr.mount_gradio_app(app, demo, path="/", ssr_mode=False, theme=theme, show_error=True,
                               max_file_size=engine.limits.max_bytes)
