"""`Processor`: tokenizer + image processor + prompt rules -> the batch the model's forward takes.

    proc = Processor.from_folder(folder, cfg)
    batch = proc("USER: <image>\\nWhat is this? ASSISTANT:", [image])
    batch = proc([messages_a, messages_b], images=[[img1], [img2, img3]])      # left-padded batch

Output keys per family (laid out by formats/; what VLMModel.forward and the transformers models take):
    llava     input_ids, attention_mask, pixel_values [N, 3, H, W]              (N = all images, prompt order)
    llava_next input_ids, attention_mask, pixel_values [N, max_tiles, 3, S, S], image_sizes [N, 2]
    idefics   input_ids, attention_mask, pixel_values [B, M, 3, H, W], image_attention_mask [B, T, M]
    idefics2/3 input_ids, attention_mask, pixel_values [B, M, 3, H, W], pixel_attention_mask [B, M, H, W]
    qwen2_vl  input_ids, attention_mask, pixel_values [all patches, 3*T*p*p], image_grid_thw [N, 3]
    gemma3, paligemma  input_ids, attention_mask, token_type_ids, pixel_values [N, 3, H, W] (Gemma 3: crops after
              their image)
(no pixel keys for Idefics2/3 and LLaVA when the batch has no image). input_ids equal transformers' processors'
row by row; batches are padded on the LEFT (attention_mask 0 there). Nothing is ever truncated: a prompt longer than
`max_length` (default: the model's context) is an error.
"""

from __future__ import annotations

import os
from typing import Optional

from ..checkpoints.folder_config import image_config_from_folder
from ..checkpoints.io import read_json
from .batching import EncodedRow
from .chat_text import LiteralText, escape_messages, render_messages
from .formats import format_for
from .image_processors import image_processor_for
from .images import ImageError, ImageLimits, load_images
from .prompts import (
    IMAGE_TOKEN, PromptError, PromptRules, Slot, interleaved_segments, is_image_object, is_image_reference, is_messages,
    normalize_messages,
)
from .tokenizer import Tokenizer

__all__ = ["Processor", "PromptError"]

# processor_config.json "processor_class" -> family (for folders without a model config.json)
PROCESSOR_CLASSES = {
    "LlavaProcessor": "llava", "LlavaNextProcessor": "llava_next", "IdeficsProcessor": "idefics",
    "Idefics2Processor": "idefics2", "Idefics3Processor": "idefics3", "SmolVLMProcessor": "smolvlm",
    "Qwen2VLProcessor": "qwen2_vl", "Qwen2_5_VLProcessor": "qwen2_5_vl", "Gemma3Processor": "gemma3",
    "PaliGemmaProcessor": "paligemma", "MllamaProcessor": "mllama",
}


def image_processor_from_folder(folder, family: str, proc_cfg: Optional[dict] = None):
    """The folder's image processor alone (processor_config.json's section, else preprocessor_config.json): what
    `vlmkit info` needs, without the tokenizer."""
    return image_processor_for(family, image_config_from_folder(folder, proc_cfg))


class Processor:
    """Callable: `processor(prompts, images=None, *, add_generation_prompt=True, max_length=None, plain_text=False)
    -> dict`.

    family: llava | idefics | idefics2 | idefics3 | smolvlm (smolvlm = idefics3 prompt rules, its own images) | gemma3 |
    paligemma;
    `format` holds the family's rules (formats/).
    plain_text: the text parts of chat messages are plain text (what the server's chat APIs use): an `<image>` or
    a control token written in them is encoded as its characters; images come only from image parts and special
    tokens only from the chat template. Otherwise, as transformers, `<image>` in message text is a placeholder.
    """

    def __init__(self, tokenizer: Tokenizer, image_processor, rules: PromptRules, *, family: Optional[str] = None,
                 max_length: Optional[int] = None, limits: Optional[ImageLimits] = None,
                 pad_token_id: Optional[int] = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.rules = rules
        self.family = family or rules.family
        self.format = format_for(self.family)
        self.max_length = max_length
        self.limits = limits or ImageLimits()
        for token in self.format.required_tokens(rules):
            if tokenizer.token_to_id(token) is None:
                raise ValueError(f"the tokenizer has no {token!r} token, which {self.family} prompts need")
        self.image_token_id = tokenizer.token_to_id(rules.feature_token or rules.image_token)
        if pad_token_id is None:
            pad_token_id = tokenizer.pad_token_id
        if pad_token_id is None:
            pad_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_token_id = int(pad_token_id)
        self._expected_tokens: Optional[int] = None  # features per image the model makes, when images vary (LLaVA)
        added = [t.content for t in tokenizer.backend.get_added_tokens_decoder().values()]
        self._literal_text = LiteralText(added + [rules.image_token, rules.fake_token])

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_folder(cls, folder, cfg=None, *, limits: Optional[ImageLimits] = None,
                    max_length: Optional[int] = None) -> "Processor":
        """A Hugging Face folder: tokenizer files, processor_config.json (+ preprocessor_config.json), chat template.
        `cfg` (a VLMConfig) is read from config.json when not given; it supplies fallbacks for settings the processor
        files lack, the context length (default max_length) and consistency checks."""
        folder = str(folder)
        proc_cfg = read_json(os.path.join(folder, "processor_config.json"))
        if cfg is None and os.path.isfile(os.path.join(folder, "config.json")):
            from ..checkpoints.folder_config import config_from_folder

            cfg = config_from_folder(folder)[0]
        if cfg is not None:
            family = cfg.extra.get("hf_architecture", cfg.family)
        else:
            family = PROCESSOR_CLASSES.get(proc_cfg.get("processor_class"))
            if family is None:
                raise ValueError(f"{folder}: no config.json and no known processor_class in processor_config.json")
        image_processor = image_processor_from_folder(folder, family, proc_cfg)
        tokenizer = Tokenizer.from_folder(folder)
        splitting = bool(getattr(image_processor.settings, "do_image_splitting", False))
        rules = format_for(family).read_rules(proc_cfg, tokenizer.special_tokens, splitting, cfg)
        if max_length is None and cfg is not None:
            max_length = cfg.text.max_position_embeddings
        pad = tokenizer.pad_token_id
        if pad is None and cfg is not None:
            pad = cfg.text.pad_token_id
        proc = cls(tokenizer, image_processor, rules, family=family, max_length=max_length, limits=limits,
                   pad_token_id=pad)
        if cfg is not None:
            proc._check_against_model(cfg)
        return proc

    @classmethod
    def from_gguf(cls, text_meta: dict, image_cfg: dict, proc_cfg: dict, cfg, *,
                  limits: Optional[ImageLimits] = None) -> "Processor":
        """A llama.cpp pair: the tokenizer and chat template of the text GGUF's metadata (split as llama.cpp splits
        text, which is also what those models' own tokenizer.json does), image settings from the mmproj."""
        from .gguf_tokenizer import tokenizer_from_metadata

        tokenizer = tokenizer_from_metadata(text_meta, pretokenizer="llama.cpp")
        image_processor = image_processor_for(cfg.family, image_cfg)
        splitting = bool(getattr(image_processor.settings, "do_image_splitting", False))
        rules = format_for(cfg.family).read_rules(proc_cfg, tokenizer.special_tokens, splitting, cfg)
        proc = cls(tokenizer, image_processor, rules, family=cfg.family, limits=limits,
                   max_length=cfg.text.max_position_embeddings, pad_token_id=cfg.text.pad_token_id)
        proc._check_against_model(cfg)
        return proc

    def _check_against_model(self, cfg) -> None:
        """The prompt must hold exactly as many image tokens as the model makes features: check it once here."""
        if cfg.image_token_id is not None and cfg.image_token_id != self.image_token_id:
            raise ValueError(f"the model's image_token_id is {cfg.image_token_id} but the tokenizer's "
                             f"{self.rules.image_token!r} is {self.image_token_id}")
        self._expected_tokens = self.format.expected_tokens(self.rules, cfg)

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def image_token(self) -> str:
        return self.rules.image_token

    def placeholder(self, prompt) -> str:
        """The image placeholder a user's string (or interleaved list) prompt uses: the family's own token, or
        vlmkit's `<image>` when the prompt holds only that (Qwen2-VL's own is `<|image_pad|>`)."""
        texts = [prompt] if isinstance(prompt, str) else [x for x in prompt if isinstance(x, str)] \
            if isinstance(prompt, (list, tuple)) else []
        if any(self.image_token in t for t in texts) or not any(IMAGE_TOKEN in t for t in texts):
            return self.image_token
        return IMAGE_TOKEN

    @property
    def chat_template(self) -> str:
        t = self.tokenizer.chat_template
        return t if t is not None else self.format.template

    @property
    def eos_token_ids(self) -> list[int]:
        """Stop ids: the tokenizer's (eos + generation_config) plus `<end_of_utterance>` for the IDEFICS families."""
        ids = list(self.tokenizer.eos_token_ids)
        ids += [i for i in map(self.tokenizer.token_to_id, self.format.stop_tokens(self.rules)) if i is not None]
        return list(dict.fromkeys(ids))

    @property
    def bad_words_ids(self) -> list[list[int]]:
        """Tokens generation should never produce: `<image>` and `<fake_token_around_image>` (IDEFICS families,
        as their model cards pass to generate); none for LLaVA."""
        ids = [self.tokenizer.token_to_id(t) for t in self.format.banned_tokens(self.rules)]
        return [[i] for i in ids if i is not None]

    # ------------------------------------------------------------------------------------------------ chat
    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """The prompt text, as transformers' `processor.apply_chat_template(messages, add_generation_prompt=...)`
        (placeholders not yet expanded). Uses the per-family default when the checkpoint has no template."""
        rendered, _ = normalize_messages(messages, self.image_token)
        return self._render(rendered, add_generation_prompt)

    def _render(self, rendered: list[dict], add_generation_prompt: bool) -> str:
        template = None if self.tokenizer.chat_template is not None else self.format.template
        image_text = self.image_token + self.format.image_suffix
        return render_messages(lambda messages: self.tokenizer.render_chat(
            messages, add_generation_prompt=add_generation_prompt, chat_template=template), rendered, image_text)

    # ------------------------------------------------------------------------------------------------ call
    def __call__(self, prompts, images=None, *, add_generation_prompt: bool = True,
                 max_length: Optional[int] = None, plain_text: bool = False) -> dict:
        prompts, images = self._batch(prompts, images)
        parsed = [self._segments(p, i, add_generation_prompt, plain_text) for i, p in enumerate(prompts)]
        loaded = self.load_images(self._assign_images(parsed, images))
        image_batch = self.process_images(loaded)
        limit = max_length if max_length is not None else self.max_length
        rows = []
        for i, (segments, from_chat, literals) in enumerate(parsed):
            text = self.expand(segments, image_batch, i)
            add_special = self.add_special_tokens(text, from_chat)
            if literals:
                ids = self.tokenizer.encode_runs(LiteralText.split(text, literals), add_special_tokens=add_special)
            else:
                ids = self.tokenizer.encode(text, add_special_tokens=add_special)
            if limit is not None and len(ids) > limit:
                context = " (the model's context)" if limit == self.max_length else ""
                raise PromptError(f"prompt {i} is {len(ids)} tokens (image tokens included), longer than "
                                  f"max_length={limit}{context}; shorten it or use fewer/smaller images")
            rows.append(self.row(ids, image_batch, i))
        return self.collate(rows)

    # ------------------------------------------------------------------------------------------------ public steps
    # The training collator builds its rows with these, so its ids and images equal the processor's.
    def split(self, text: str) -> list:
        """Prompt text -> segments (strings and image Slots)."""
        return self.format.split(text, self.image_token)

    def load_images(self, sources: list[list]) -> list[list]:
        """Image sources per prompt -> PIL images, within the limits (per image and per request)."""
        loaded = []
        for i, prompt_sources in enumerate(sources):
            if len(prompt_sources) > self.limits.max_images:
                raise ImageError(f"prompt {i} has {len(prompt_sources)} images > max_images={self.limits.max_images}")
            prompt_sources = [self.format.prepare_image(x, self.limits) for x in prompt_sources]
            loaded.append(load_images(prompt_sources, self.limits))
        return loaded

    def process_images(self, loaded: list[list]) -> dict:
        """PIL images per prompt -> the image processor's output for the batch."""
        return self.format.process_images(self.image_processor, loaded)

    def expand(self, segments: list, image_batch: dict, index: int) -> str:
        """Prompt `index`'s segments -> its text, each placeholder expanded to the image's tokens."""
        return self.format.expand(segments, self.rules, image_batch, index, self.tokenizer.special_tokens,
                                  self._expected_tokens)

    def add_special_tokens(self, text: str, from_chat: bool) -> bool:
        """Whether encoding `text` adds the tokenizer's BOS (the family's rule)."""
        return self.format.add_special_tokens(text, from_chat, self.tokenizer.special_tokens.get("bos_token"))

    def row(self, ids: list, image_batch: dict, index: int) -> EncodedRow:
        """Prompt `index`'s ids and its slice of the image tensors, ready to collate."""
        return self.format.row(ids, image_batch, index, self.image_token_id, self.tokenizer.eos_token_id)

    def collate(self, rows: list, positions: bool = False) -> dict:
        """Rows -> a left-padded batch in the family's layout."""
        return self.format.collate(rows, self.pad_token_id, positions)

    # ------------------------------------------------------------------------------------------------ steps
    def _batch(self, prompts, images) -> tuple[list, Optional[tuple]]:
        """One prompt or a list of prompts -> list; images -> None, ("nested", per-prompt lists) or ("flat", list)."""
        nested_images = isinstance(images, (list, tuple)) and len(images) > 0 and all(
            isinstance(x, (list, tuple)) for x in images)
        if isinstance(prompts, str) or is_messages(prompts):
            batch = [prompts]
        elif isinstance(prompts, (list, tuple)):
            if not prompts:
                raise PromptError("empty prompt list")
            if any(isinstance(p, (list, tuple)) for p in prompts):
                batch = list(prompts)  # prompts that are interleaved lists or message lists
            elif not all(isinstance(p, str) for p in prompts):
                batch = [prompts]  # one interleaved prompt (it holds image objects)
            elif not nested_images and any(is_image_reference(p) for p in prompts):
                batch = [prompts]  # one interleaved prompt whose images are URLs / paths
            else:
                batch = list(prompts)  # several string prompts
        else:
            raise PromptError(f"a prompt is a string, an interleaved list or chat messages, "
                              f"not {type(prompts).__name__}")
        if images is None:
            return batch, None
        if is_image_object(images) or isinstance(images, str):
            images = [images]
        if not isinstance(images, (list, tuple)):
            raise PromptError(f"images must be a list of images (or a list of lists per prompt), "
                              f"not {type(images).__name__}")
        if nested_images:
            if len(images) != len(batch):
                raise PromptError(f"images has {len(images)} lists for {len(batch)} prompts")
            return batch, ("nested", [list(x) for x in images])
        if any(isinstance(x, (list, tuple)) for x in images):
            raise PromptError("images mixes single images and lists; give one list per prompt")
        return batch, ("flat", list(images))

    def _segments(self, prompt, index: int, add_generation_prompt: bool, plain_text: bool = False):
        """-> (segments, from_chat, literals). Slots of chat messages are already bound to their images (or None);
        literals: what the sentinels of plain-text chat parts stand for (see chat_text.py)."""
        literals: list[str] = []
        if isinstance(prompt, str):
            if not prompt.strip():
                raise PromptError(f"prompt {index} is empty")
            return self.split(prompt), False, literals
        if is_messages(prompt):
            rendered, message_images = normalize_messages(prompt, self.image_token, text_placeholders=not plain_text)
            if plain_text:
                rendered = escape_messages(rendered, self._literal_text, literals)
            text = self.format.chat_text(self._render(rendered, add_generation_prompt),
                                         self.tokenizer.special_tokens.get("bos_token"))
            segments = self.split(text)
            slots = [s for s in segments if isinstance(s, Slot)]
            if len(slots) != len(message_images):
                raise PromptError(f"prompt {index}: the chat template wrote {len(slots)} {self.image_token} "
                                  f"placeholders but the messages have {len(message_images)} images")
            for slot, image in zip(slots, message_images):
                slot.image = image
            return segments, True, literals
        if isinstance(prompt, (list, tuple)):
            if not prompt:
                raise PromptError(f"prompt {index} is empty")
            segments = interleaved_segments(prompt, self.image_token)
            if not any(isinstance(s, Slot) or s.strip() for s in segments):
                raise PromptError(f"prompt {index} is empty")
            return segments, False, literals
        raise PromptError(f"prompt {index}: a prompt is a string, an interleaved list or chat messages, "
                          f"not {type(prompt).__name__}")

    def _assign_images(self, parsed, images) -> list[list]:
        """Fill each prompt's open slots from `images`, in order; counts must match exactly."""
        need = [sum(1 for s in seg if isinstance(s, Slot) and s.image is None) for seg, _, _ in parsed]
        tok = self.image_token
        kind, images = images if images is not None else ("nested", [[] for _ in parsed])
        if kind == "nested":
            per = images
        elif len(parsed) == 1:
            per = [images]
        else:  # a flat list over a batch: split by each prompt's placeholder count (as transformers does)
            if sum(need) != len(images):
                raise PromptError(f"the prompts have {sum(need)} {tok} placeholders in all ({need} per prompt) "
                                  f"but {len(images)} images were given")
            per, start = [], 0
            for n in need:
                per.append(images[start:start + n])
                start += n
        out = []
        for i, ((segments, _, _), given, n) in enumerate(zip(parsed, per, need)):
            if len(given) != n:
                where = f"prompt {i}" if len(parsed) > 1 else "the prompt"
                inline = sum(1 for s in segments if isinstance(s, Slot) and s.image is not None)
                if n == 0 and inline:
                    raise PromptError(f"{where} carries its {inline} image(s) inline and has no open {tok} "
                                      f"placeholder, but {len(given)} more image(s) were given")
                if n == 0:
                    raise PromptError(f"{where} has no {tok} placeholder but {len(given)} image(s) were given "
                                      f"(a text-only prompt): put {tok} where each image goes")
                raise PromptError(f"{where} has {n} {tok} placeholder(s) but {len(given)} image(s) were given")
            it = iter(given)
            out.append([s.image if s.image is not None else next(it) for s in segments if isinstance(s, Slot)])
        return out
