"""Prompt side of the processor: prompt forms -> segments, chat messages -> text, the prompt settings' data.

Ground truth: transformers 5.x's VLM processors. Everything here is plain text / list manipulation and the same for
every family; each family's rules (expansion, BOS, batch layout) are in formats/, and the `Processor`
(processor.py) loads the images, runs the image processor, tokenizes and batches.

Prompt forms (one prompt):
  * a string with `<image>` placeholders, filled in order from `images=`;
  * an interleaved list of strings and images (IDEFICS style): PIL images, bytes, paths, data: URIs, http(s) URLs;
    a string item that is an http(s) URL, an image data: URI or an existing file path is an image, as IDEFICS's
    processor does for URLs (a path counts when it has an image extension); `<image>` inside a string item takes
    the next image from `images=`;
  * chat messages `[{"role": ..., "content": str | [parts]}]`, parts `{"type": "text", "text": ...}`,
    `{"type": "image"}` (next image from `images=`), `{"type": "image", "image" | "url" | "path" | "base64": X}`
    (inline), OpenAI `{"type": "image_url", "image_url": {"url": X}}`. Rendered with the checkpoint's chat template.

Each prompt becomes a list of *segments*: strings and `Slot`s (one per image, holding the image or None = "the next
one from images=").
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from typing import Any, Optional

IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
ROLES = ("system", "user", "assistant", "tool")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".avif", ".ppm", ".mpo")

# Chat templates for checkpoints without one (documented in the README / DESIGN; formats/ picks per family).
#   llava:    the llava-hf LLaVA-1.5 template           "USER: <image>\nWhat is this? ASSISTANT:"
#   idefics2: the HuggingFaceM4/idefics2-8b template    "User:<image>What is this?<end_of_utterance>\nAssistant:"
#   idefics:  the same turn format (IDEFICS-instruct);  the processor writes the BOS itself
#   idefics3: BOS text + the idefics2 format, as Idefics3-8B-Llama3 and SmolVLM's templates
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
IDEFICS2_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].capitalize() }}"
    "{% if message['content'] and message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


class PromptError(ValueError):
    """A prompt, its messages or its images are malformed; the message says which prompt and what is wrong."""


@dataclass
class Slot:
    """One image position in a prompt: `image` is the image source, or None for "the next one from images="."""

    image: Any = None


Segments = list  # list[str | Slot]


# ------------------------------------------------------------------------------------------------ prompt forms

def is_messages(prompt) -> bool:
    """A non-empty list of dicts (malformed messages are then reported by normalize_messages)."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(m, dict) for m in prompt)


def is_image_reference(item: str) -> bool:
    """A string item of an interleaved list that denotes an image (IDEFICS treats URLs so)."""
    s = item.strip(" ")
    if not s or "\n" in s or len(s) > 4096 or IMAGE_TOKEN in s:
        return False
    low = s[:11].lower()
    if low.startswith(("http://", "https://")):
        return not any(c.isspace() for c in s)
    if low.startswith("data:image/"):
        return True
    if os.path.splitext(s)[1].lower() not in IMAGE_EXTENSIONS:
        return False
    try:
        return os.path.isfile(s)
    except (OSError, ValueError):
        return False


def is_image_object(item) -> bool:
    """Anything `load_image` takes that is not a string: PIL images, bytes, path objects."""
    if isinstance(item, (bytes, bytearray, memoryview, os.PathLike)):
        return True
    return hasattr(item, "getbands") and hasattr(item, "size")  # PIL.Image.Image without importing PIL here


def split_placeholders(text: str, image_token: str = IMAGE_TOKEN) -> Segments:
    """"a<image><image>b" -> ["a", Slot(), Slot(), "b"] (empty pieces dropped)."""
    out: Segments = []
    pieces = text.split(image_token)
    for i, piece in enumerate(pieces):
        if i:
            out.append(Slot())
        if piece:
            out.append(piece)
    return out


def interleaved_segments(items, image_token: str = IMAGE_TOKEN) -> Segments:
    out: Segments = []
    for item in items:
        if isinstance(item, str):
            if is_image_reference(item):
                out.append(Slot(item.strip(" ")))
            elif image_token in item:
                out.extend(split_placeholders(item, image_token))
            else:
                out.append(item)  # kept even when empty: IDEFICS's fake-token sharing depends on it
        elif isinstance(item, Slot):
            out.append(item)
        elif isinstance(item, dict) or isinstance(item, (list, tuple)):
            raise PromptError(f"an interleaved prompt holds strings and images, not {type(item).__name__}")
        elif is_image_object(item):
            out.append(Slot(item))
        else:
            raise PromptError(f"cannot use a {type(item).__name__} in an interleaved prompt "
                              "(expected strings and images: PIL, bytes, paths, data: URIs or http(s) URLs)")
    return out


def segments_text(segments: Segments, image_token: str = IMAGE_TOKEN) -> str:
    return "".join(s if isinstance(s, str) else image_token for s in segments)


def fill_placeholders(text: str, token: str, replacements: list[str]) -> str:
    """Replace the i-th `token` in `text` with replacements[i] (transformers' get_text_with_replacements)."""
    pieces = text.split(token)
    if len(pieces) - 1 != len(replacements):
        raise PromptError(f"{len(pieces) - 1} {token} placeholders but {len(replacements)} images")
    out = [pieces[0]]
    for rep, piece in zip(replacements, pieces[1:]):
        out += [rep, piece]
    return "".join(out)


# ------------------------------------------------------------------------------------------------ chat messages

def _inline_image(part: dict):
    """The image an image part carries (None: take the next one from images=)."""
    if part.get("type") == "image_url":
        ref = part.get("image_url")
        ref = ref.get("url") if isinstance(ref, dict) else ref
        if not ref:
            raise PromptError("an image_url part needs image_url.url")
        return ref
    for key in ("image", "url", "path"):
        if part.get(key) is not None:
            return part[key]
    if part.get("base64") is not None:
        data = part["base64"]
        if isinstance(data, str) and not data[:5].lower() == "data:":
            try:
                return base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise PromptError("an image part's base64 field is not valid base64") from None
        return data
    return None


def normalize_messages(messages, image_token: str = IMAGE_TOKEN,
                       text_placeholders: bool = True) -> tuple[list[dict], list]:
    """Chat messages -> (messages as the template sees them, images in placeholder order).

    String content becomes one text part (VLM templates iterate over parts; given a string they would drop it).
    Image parts are shown to the template as {"type": "image"}; the returned list holds each image part's inline
    image or None ("next from images="), plus, with text_placeholders, None for every `<image>` written inside text
    (without it, text is plain text: see chat_text.py)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PromptError("chat messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    rendered, images = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise PromptError(f"message {i} is a {type(message).__name__}; expected a dict with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise PromptError(f"message {i}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        content = message.get("content")
        parts: list[dict] = []
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        elif content is None:
            content = []
        elif not isinstance(content, (list, tuple)):
            raise PromptError(f"message {i}: content must be a string or a list of parts, "
                              f"not {type(content).__name__}")
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise PromptError(f"message {i}, part {j}: expected a dict like {{'type': 'text', 'text': ...}}, "
                                  f"got {type(part).__name__}")
            kind = part.get("type")
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise PromptError(f"message {i}, part {j}: a text part needs a string 'text'")
                if text_placeholders:
                    images += [None] * text.count(image_token)
                parts.append({k: v for k, v in part.items() if v is not None})
            elif kind in ("image", "image_url"):
                images.append(_inline_image(part))
                parts.append({"type": "image"})
            else:
                raise PromptError(f"message {i}, part {j}: unknown content type {kind!r}; "
                                  "expected 'text', 'image' or 'image_url'")
        out = {k: v for k, v in message.items() if k != "content" and v is not None}
        out["content"] = parts
        rendered.append(out)
    if not images and not any(p.get("text", "").strip() for m in rendered for p in m["content"]):
        raise PromptError("the chat messages are empty (no text and no images)")
    return rendered, images


# ------------------------------------------------------------------------------------------------ prompt settings

@dataclass
class PromptRules:
    """A checkpoint's placeholder settings, read from processor_config.json by its format (formats/).

    family: llava | idefics | idefics2 | idefics3 (SmolVLM uses the idefics3 rules).
    llava: tokens per image = (H // patch_size) * (W // patch_size) + num_additional_image_tokens
           - 1 when vision_feature_select_strategy == "default" (H, W of the processed image).
    idefics2: image_seq_len `<image>` between fake tokens, 5 times with do_image_splitting.
    idefics3: image_seq_len per tile, row/col tokens; see formats.Idefics3Format.image_string.
    idefics: add_end_of_utterance_token / add_eos_token as IdeficsProcessor's call options (default False, which
             is what transformers 5 uses: its tokenizer check never finds the token).
    """

    family: str
    image_token: str = IMAGE_TOKEN
    fake_token: str = FAKE_TOKEN
    global_token: str = GLOBAL_TOKEN
    end_of_utterance: str = END_OF_UTTERANCE
    image_seq_len: int = 0
    do_image_splitting: bool = False
    patch_size: Optional[int] = None
    num_additional_image_tokens: int = 0
    vision_feature_select_strategy: Optional[str] = "default"
    add_end_of_utterance_token: bool = False
    add_eos_token: bool = False
    feature_token: Optional[str] = None  # what each image feature is written as, when not image_token (Gemma 3)
    end_image_token: Optional[str] = None  # Gemma 3's <end_of_image>

    def llava_tokens(self, height: int, width: int) -> int:
        n = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        return n - 1 if self.vision_feature_select_strategy == "default" else n
