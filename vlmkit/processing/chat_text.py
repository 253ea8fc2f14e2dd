"""Chat text as the chat template and the tokenizer should see it.

Two rules live here:
  * user text is text: in the chat APIs, a message that *writes* `<image>`, `<|im_start|>` or
    `<end_of_utterance>` must not become an image slot or a control token. Each such string (every added token of
    the tokenizer) in a text part is swapped for a private-use sentinel character before the template renders, so
    placeholder splitting never sees it, and the tokenizer encodes the sentinel back as the plain characters it
    stands for. Text without such strings renders and encodes exactly as before (parity with transformers holds).
  * a plain prompt through the template: a string with `<image>` placeholders or an interleaved list becomes one
    user turn (`as_user_message`), as Ollama's /api/generate does unless `raw`.
  * templates that only take text: a chat template written for a plain LLM concatenates `message['content']` as a
    string; given content parts it fails (or prints the list). Such templates get string content with the family's
    image placeholders instead.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

from .prompts import IMAGE_TOKEN, PromptError, interleaved_segments, split_placeholders

# Planes 15 and 16 are private use: no template, tokenizer or training marker (collate.py uses U+E000/E001) writes
# them. A user's own characters from these planes are escaped too, so every sentinel in a rendered prompt is ours.
_PLANES = ((0xF0000, 0xFFFFD), (0x100000, 0x10FFFD))
_SENTINEL = re.compile("[\U000F0000-\U000FFFFD\U00100000-\U0010FFFD]")
_CAPACITY = sum(hi - lo + 1 for lo, hi in _PLANES)


def _sentinel(k: int) -> str:
    for lo, hi in _PLANES:
        if k <= hi - lo:
            return chr(lo + k)
        k -= hi - lo + 1
    raise ValueError(f"too many distinct special-token strings in one prompt (more than {_CAPACITY})")


def _index(ch: str) -> int:
    code, offset = ord(ch), 0
    for lo, hi in _PLANES:
        if lo <= code <= hi:
            return offset + code - lo
        offset += hi - lo + 1
    raise KeyError(ch)


class LiteralText:
    """Escapes special-token strings in text into sentinels, and splits rendered text back into
    (piece, is_literal) runs. `literals` is the per-prompt table: sentinel k stands for literals[k]."""

    def __init__(self, tokens: Iterable[str]):
        tokens = sorted({t for t in tokens if t}, key=len, reverse=True)
        parts = [re.escape(t) for t in tokens] + [_SENTINEL.pattern]
        self._pattern = re.compile("|".join(parts))

    def escape(self, text: str, literals: list[str]) -> str:
        index = {s: k for k, s in enumerate(literals)}

        def swap(match: re.Match) -> str:
            s = match.group(0)
            if s not in index:
                index[s] = len(literals)
                literals.append(s)
            return _sentinel(index[s])

        return self._pattern.sub(swap, text)

    @staticmethod
    def split(text: str, literals: list[str]) -> list[tuple[str, bool]]:
        """Rendered text -> runs of (text, False) and (literal text, True); adjacent literals are joined."""
        runs: list[tuple[str, bool]] = []
        pos = 0
        for match in _SENTINEL.finditer(text):
            before = text[pos:match.start()]
            # A space before a literal goes with it, as the tokenizer would join them (" <" is one token in BPE).
            plain = before.rstrip(" ")
            if plain:
                runs.append((plain, False))
            literal = before[len(plain):] + literals[_index(match.group(0))]
            if runs and runs[-1][1]:
                runs[-1] = (runs[-1][0] + literal, True)
            else:
                runs.append((literal, True))
            pos = match.end()
        if pos < len(text):
            runs.append((text[pos:], False))
        return runs


def escape_messages(messages: list[dict], literal_text: LiteralText, literals: list[str]) -> list[dict]:
    """Messages (as normalize_messages returns them) with every text part escaped."""
    return [{**m, "content": [{**p, "text": literal_text.escape(p["text"], literals)} if p.get("type") == "text"
                              else p for p in m["content"]]} for m in messages]


def _part_repr_leaked(text: str, messages: list[dict]) -> bool:
    """A template that printed the content list itself (`{{ message['content'] }}`) shows its parts' repr."""
    marker = "{'type': '"
    return marker in text and not any(marker in p.get("text", "") for m in messages for p in m["content"])


def flatten_content(messages: list[dict], image_text: str) -> list[dict]:
    """Content parts -> one string per message: each image part becomes `image_text`, text parts follow in order."""
    return [{**m, "content": "".join(image_text if p.get("type") == "image" else p.get("text", "")
                                     for p in m["content"])} for m in messages]


def render_messages(render: Callable[[list[dict]], str], messages: list[dict], image_text: str) -> str:
    """render(messages) with content parts; a template that only takes string content is rendered again with
    flatten_content (the family's placeholders where the images were)."""
    try:
        text = render(messages)
    except TypeError:  # "can only concatenate str (not "list") to str"
        text = None
    if text is not None and not _part_repr_leaked(text, messages):
        return text
    try:
        return render(flatten_content(messages, image_text))
    except TypeError as e:
        raise ValueError(f"the chat template cannot render these messages, with content parts or as strings: "
                         f"{e}") from None


def as_user_message(prompt, image_token: str = IMAGE_TOKEN) -> list[dict]:
    """A string with placeholders, or an interleaved list, as one user turn of chat messages: each placeholder or
    image becomes an image part (a placeholder takes the next image from images=), each text piece a text part."""
    if isinstance(prompt, str):
        segments = split_placeholders(prompt, image_token)
    elif isinstance(prompt, (list, tuple)):
        segments = interleaved_segments(prompt, image_token)
    else:
        raise PromptError(f"a prompt is a string, an interleaved list or chat messages, not {type(prompt).__name__}")
    parts = [{"type": "text", "text": s} if isinstance(s, str)
             else {"type": "image"} if s.image is None else {"type": "image", "image": s.image}
             for s in segments if not isinstance(s, str) or s.strip()]
    if not parts:
        raise PromptError("the prompt is empty")
    return [{"role": "user", "content": parts}]
