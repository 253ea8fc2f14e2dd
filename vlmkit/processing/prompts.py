"""Prompt side of the processor: prompt forms -> segments, chat messages -> text, placeholder expansion per family.

Ground truth: transformers 5.x `LlavaProcessor`, `IdeficsProcessor`, `Idefics2Processor`, `Idefics3Processor` and
`SmolVLMProcessor` (the same prompt rules as Idefics3). Everything here is plain text / list manipulation; the
`Processor` (processor.py) loads the images, runs the image processor, tokenizes and batches.

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
import re
from dataclasses import dataclass
from typing import Any, Optional

IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
ROLES = ("system", "user", "assistant", "tool")
FAMILIES = ("llava", "idefics", "idefics2", "idefics3")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".avif", ".ppm", ".mpo")

# Defaults for checkpoints without a chat template (documented in the README / DESIGN).
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
DEFAULT_TEMPLATES = {
    "llava": LLAVA_TEMPLATE,
    "idefics": IDEFICS2_TEMPLATE,
    "idefics2": IDEFICS2_TEMPLATE,
    "idefics3": "{{ bos_token or '' }}" + IDEFICS2_TEMPLATE,
}


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


# ------------------------------------------------------------------------------------------------ expansion rules

@dataclass
class PromptRules:
    """A family's placeholder rules, read from processor_config.json (see Processor.from_folder).

    family: llava | idefics | idefics2 | idefics3 (SmolVLM uses the idefics3 rules).
    llava: tokens per image = (H // patch_size) * (W // patch_size) + num_additional_image_tokens
           - 1 when vision_feature_select_strategy == "default" (H, W of the processed image).
    idefics2: image_seq_len `<image>` between fake tokens, 5 times with do_image_splitting.
    idefics3: image_seq_len per tile, row/col tokens; see idefics3_image_string.
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

    def llava_tokens(self, height: int, width: int) -> int:
        n = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        return n - 1 if self.vision_feature_select_strategy == "default" else n


def expand_llava(text: str, rules: PromptRules, image_hw: list[tuple[int, int]]) -> str:
    return fill_placeholders(text, rules.image_token,
                             [rules.image_token * rules.llava_tokens(h, w) for h, w in image_hw])


def expand_idefics2(text: str, rules: PromptRules) -> str:
    """Idefics2Processor: `<fake><image>*n<fake>` (x5 when splitting), adjacent fakes merged, and a space after a
    closing fake token that is directly followed by a word."""
    fake, image = rules.fake_token, rules.image_token
    image_str = f"{fake}{image * rules.image_seq_len}{fake}"
    if rules.do_image_splitting:
        image_str = image_str * 5
    text = text.replace(image, image_str)
    text = text.replace(f"{fake}{fake}", fake)
    return re.sub(rf"{re.escape(fake)}(?=[^\s<])", f"{fake} ", text)


def idefics3_image_string(rows: int, cols: int, rules: PromptRules) -> str:
    """transformers' get_image_prompt_string (Idefics3 / SmolVLM)."""
    fake, image, glob, n = rules.fake_token, rules.image_token, rules.global_token, rules.image_seq_len
    if rows == 0 and cols == 0:
        return f"{fake}{glob}{image * n}{fake}"
    out = ""
    for r in range(rows):
        for c in range(cols):
            out += f"{fake}<row_{r + 1}_col_{c + 1}>{image * n}"
        out += "\n"
    return out + f"\n{fake}{glob}{image * n}{fake}"


def expand_idefics3(text: str, rules: PromptRules, grids: list[tuple[int, int]]) -> str:
    return fill_placeholders(text, rules.image_token, [idefics3_image_string(r, c, rules) for r, c in grids])


def idefics_text(segments: Segments, rules: PromptRules, bos_token: Optional[str], eos_token: Optional[str]) -> str:
    """IdeficsProcessor: BOS text, then each string item (spaces stripped at both ends) and, per image,
    `<fake><image><fake>` (`<image><fake>` right after another image: the fake token is shared)."""
    fake, image, eou = rules.fake_token, rules.image_token, rules.end_of_utterance
    full = bos_token or ""
    last_was_image = last_was_text = False
    for i, item in enumerate(segments):
        if i > 0:
            last_was_text = not last_was_image
        if isinstance(item, str):
            if rules.add_end_of_utterance_token and last_was_text:
                full += eou
            full += item.strip(" ")
            last_was_image = False
        else:
            full += image + fake if last_was_image else fake + image + fake
            last_was_image = True
    if rules.add_eos_token and eos_token:
        full += eos_token
    return full


def idefics_image_attention_mask(input_ids, image_token_id: int, eos_token_id: Optional[int], num_images: int):
    """IdeficsProcessor's image_attention_mask [B, T, num_images] (int64) for padded input_ids [B, T].

    Each token sees only the latest image at or before it; tokens before any image see none (so do left-padding
    tokens); after an EOS token no image is seen until the next image token (the EOS itself still sees its image);
    image indices >= num_images are dropped."""
    import torch

    ids = input_ids.tolist()
    out = torch.zeros(len(ids), len(ids[0]) if ids else 0, num_images, dtype=torch.long)
    for b, row in enumerate(ids):
        count, seen_eos = -1, False
        for t, tok in enumerate(row):
            if tok == image_token_id:
                count += 1
                seen_eos = False
            index = -1 if seen_eos else count
            if tok == eos_token_id:
                seen_eos = True
            if 0 <= index < num_images:
                out[b, t, index] = 1
    return out


def rules_for(family: str, proc_cfg: dict, special: dict, do_image_splitting: bool = False, cfg=None) -> PromptRules:
    """Prompt settings as transformers' processors read them: processor_config.json, then the tokenizer's named
    tokens (`special`: {"image_token": ...}); the model config (a VLMConfig) is the fallback for folders without
    processor files. do_image_splitting: the image processor's (Idefics2)."""
    has = bool(proc_cfg)
    if family == "llava":
        strategy_default = "default" if cfg is None or cfg.vision.drop_class_token else "full"
        extra_default = 1 if cfg is None or cfg.vision.class_token else 0
        return PromptRules(
            "llava",
            image_token=proc_cfg.get("image_token") or special.get("image_token") or IMAGE_TOKEN,
            patch_size=proc_cfg.get("patch_size") or (cfg.vision.patch_size if cfg is not None else 14),
            num_additional_image_tokens=proc_cfg.get("num_additional_image_tokens", 0 if has else extra_default),
            vision_feature_select_strategy=proc_cfg.get("vision_feature_select_strategy",
                                                        None if has else strategy_default),
        )
    if family == "idefics":
        return PromptRules(
            "idefics",
            add_end_of_utterance_token=bool(proc_cfg.get("add_end_of_utterance_token") or False),
            add_eos_token=bool(proc_cfg.get("add_eos_token") or False),
        )
    fallback = cfg.tokens_per_image if cfg is not None and cfg.tokens_per_image else None
    if family == "idefics2":
        return PromptRules(
            "idefics2",
            image_token=special.get("image_token") or IMAGE_TOKEN,
            fake_token=special.get("image_boundary_token") or FAKE_TOKEN,
            end_of_utterance=END_OF_UTTERANCE,
            image_seq_len=int(proc_cfg.get("image_seq_len") or fallback or 64),
            do_image_splitting=do_image_splitting,
        )
    if family in ("idefics3", "smolvlm"):
        named = family == "smolvlm"  # SmolVLMProcessor reads its tokens from the tokenizer's named tokens
        return PromptRules(
            "idefics3",
            image_token=(special.get("image_token") if named else None) or IMAGE_TOKEN,
            fake_token=(special.get("fake_image_token") if named else None) or FAKE_TOKEN,
            global_token=(special.get("global_image_token") if named else None) or GLOBAL_TOKEN,
            end_of_utterance=(special.get("end_of_utterance_token") if named else None) or END_OF_UTTERANCE,
            image_seq_len=int(proc_cfg.get("image_seq_len") or fallback or 169),
        )
    raise ValueError(f"unknown family {family!r}")


def default_chat_template(family: str) -> str:
    return DEFAULT_TEMPLATES["idefics3" if family == "smolvlm" else family]

