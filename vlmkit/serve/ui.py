"""The Gradio chat page at /: a multimodal textbox (text + image upload), streamed answers, several turns, a
clear button. It runs in the same process as the API and goes through the same engine and batcher, so UI users and
API clients are batched together and share the queue limit.

Images reach the UI as files in Gradio's upload folder; only files under that folder are read, with the server's
image limits. No asset is fetched from the internet (system fonts, analytics off).
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio

from .engine import APIError, GenParams


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

    def messages(self, message, history) -> list[dict]:
        out: list[dict] = []
        turns = [(h.get("role"), h.get("content")) for h in history or [] if isinstance(h, dict)]
        if isinstance(message, dict):
            files = [{"path": f} if isinstance(f, str) else f for f in message.get("files") or []]
            turns.append(("user", files + [message.get("text") or ""]))
        else:
            turns.append(("user", message or ""))
        for role, content in turns:
            if role not in ("user", "assistant"):
                continue
            parts = self.parts(content, role)
            if not parts:
                continue
            if out and out[-1]["role"] == role:  # Gradio may split one turn (files, text) in several messages
                out[-1]["content"].extend(parts)
            else:
                out.append({"role": role, "content": parts})
        if not out or out[-1]["role"] != "user":
            raise APIError(400, "type a question or attach an image")
        return out


def build_ui(engine, *, max_tokens: int = 256, title=None):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    from gradio.utils import get_upload_folder

    conversation = UIConversation(engine, Path(get_upload_folder()))

    async def respond(message, history):
        try:
            messages = await anyio.to_thread.run_sync(conversation.messages, message, history)
            prepared = await engine.prepare_async(messages, GenParams())
            prepared.max_tokens = min(prepared.max_tokens, max_tokens)
            stream = engine.submit(prepared)
        except APIError as e:
            raise gr.Error(e.message) from None
        text = ""
        try:
            async for piece in stream:
                text += piece
                yield text
        except APIError as e:
            raise gr.Error(e.message) from None
        finally:
            stream.cancel()  # the user pressed stop or left: the row stops
        if not text:
            yield "(empty answer)"

    name = engine.model_name
    return gr.ChatInterface(
        respond, multimodal=True, title=title or f"vlmkit · {name}",
        description="Attach images with the paperclip (or drop them in), ask a question; answers stream in. "
                    "The trash icon clears the conversation.",
        textbox=gr.MultimodalTextbox(file_types=["image"], file_count="multiple", sources=["upload"],
                                     placeholder="Ask about an image…", show_label=False),
        chatbot=gr.Chatbot(label=name, height=480),
        concurrency_limit=engine.batcher.max_batch, analytics_enabled=False, fill_height=True,
    )


def mount_ui(app, engine, *, max_tokens: int = 256, title=None):
    import gradio as gr

    demo = build_ui(engine, max_tokens=max_tokens, title=title)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    return gr.mount_gradio_app(app, demo, path="/", ssr_mode=False, theme=theme, show_error=True,
                               max_file_size=engine.limits.max_bytes)
