"""Gemma 3 and PaliGemma processing rules (transformers' Gemma3Processor and PaliGemmaProcessor).

Both take images as one flat list (pixel_values [N, 3, H, W], prompt order) and return token_type_ids: Gemma 3
marks each image feature token 1 (its model lets an image's tokens see each other); PaliGemma marks the suffix 1
(none at inference: the whole prompt is the bidirectional prefix)."""

from __future__ import annotations

import torch

from ..batching import CollateError, EncodedRow, pad_tokens
from ..prompts import PromptRules, fill_placeholders, segments_text
from .base import Format

# google/gemma-3-*-it's chat template: a system turn folds into the first user turn, the assistant is "model".
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = \"\" -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}"
    "{%- else -%}{{ raise_exception(\"Invalid content type\") }}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)
# PaliGemma is not a chat model: a conversation is its images and texts in order (the processor adds BOS and "\n").
# An answer (training) follows the prompt's "\n" and ends with EOS, as PaliGemmaProcessor's suffix.
PALIGEMMA_TEMPLATE = (
    "{%- for message in messages -%}{%- if message['role'] == 'assistant' -%}{{ '\n' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}{%- if item['type'] == 'image' -%}{{ '<image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}{%- endfor -%}"
)


class _FlatImagesFormat(Format):
    """Images as one flat list (Gemma 3 crops follow their image); token_type_ids in every batch."""

    flat_pixels = True

    def required_tokens(self, rules):
        return [t for t in (rules.image_token, rules.feature_token, rules.end_image_token) if t]

    def stop_tokens(self, rules):
        return []

    def banned_tokens(self, rules):
        return []  # transformers' generate bans nothing for these families

    def expected_tokens(self, rules, cfg):
        if cfg.tokens_per_image and rules.image_seq_len != cfg.tokens_per_image:
            raise ValueError(f"processor image_seq_length={rules.image_seq_len} but the model makes "
                             f"{cfg.tokens_per_image} features per image")
        return None

    def token_types(self, ids, image_token_id: int) -> list:
        raise NotImplementedError

    def row(self, ids, images, index, image_token_id, eos_token_id):
        out = EncodedRow(ids, token_types=self.token_types(list(ids), image_token_id))
        if "pixel_values" in images:
            start = sum(images["slots"][:index])
            out.pixels = images["pixel_values"][start:start + images["slots"][index]]
        return out

    def collate(self, rows, pad_token_id, positions=False):
        batch = pad_tokens(rows, pad_token_id, positions)
        t = batch["input_ids"].shape[1]
        types = torch.zeros_like(batch["input_ids"])
        for i, r in enumerate(rows):
            if r.token_types is not None and len(r.token_types):
                types[i, t - len(r.token_types):] = torch.as_tensor(r.token_types)
        batch["token_type_ids"] = types
        batch.update(self.pixel_batch(rows))
        return batch

    def pixel_batch(self, rows):
        images = [r.pixels for r in rows if r.pixels is not None and len(r.pixels)]
        return {"pixel_values": torch.cat(images)} if images else {}

    def merge(self, batches, pad_token_id):
        if len(batches) == 1:
            return dict(batches[0])
        rows = []
        for b in batches:
            keys = {"input_ids", "attention_mask", "pixel_values", "token_type_ids"}
            if set(b) - keys or b["input_ids"].shape[0] != 1:
                raise CollateError("merge takes single-prompt batches of input_ids, token_type_ids and pixels")
            types = b.get("token_type_ids")
            rows.append(EncodedRow(b["input_ids"][0], pixels=b.get("pixel_values"),
                                   token_types=None if types is None else types[0]))
        return self.collate(rows, pad_token_id)


class Gemma3Format(_FlatImagesFormat):
    """Gemma 3: each `<start_of_image>` becomes "\\n\\n<start_of_image>" + mm_tokens_per_image soft tokens +
    "<end_of_image>\\n\\n"; with pan-and-scan, "Here is the original image ... and here are some crops ..."."""

    name = "gemma3"
    template = GEMMA3_TEMPLATE

    def read_rules(self, proc_cfg, special, do_image_splitting=False, cfg=None) -> PromptRules:
        fallback = cfg.tokens_per_image if cfg is not None and cfg.tokens_per_image else 256
        return PromptRules(
            "gemma3", image_token=special.get("boi_token") or "<start_of_image>",
            feature_token=special.get("image_token") or "<image_soft_token>",
            end_image_token=special.get("eoi_token") or "<end_of_image>",
            end_of_utterance="<end_of_turn>",
            image_seq_len=int(proc_cfg.get("image_seq_length") or fallback),
        )

    def stop_tokens(self, rules):
        return [rules.end_of_utterance]  # the instruction-tuned checkpoints end a turn with it

    def expand(self, segments, rules, images, index, special, expected=None):
        full = f"\n\n{rules.image_token}{rules.feature_token * rules.image_seq_len}{rules.end_image_token}\n\n"
        first = sum(images["num_images"][:index]) if images else 0
        crops = images["num_crops"][first:first + images["num_images"][index]] if images else []
        strings = [full if not n else f"Here is the original image {full} and here are some crops to help you "
                   f"see better " + " ".join([full] * n) for n in crops]
        return fill_placeholders(segments_text(segments, rules.image_token), rules.image_token, strings)

    def image_cost(self, rules, settings):
        return rules.image_seq_len + 6

    def token_types(self, ids, image_token_id):
        return [int(i == image_token_id) for i in ids]


class PaliGemmaFormat(_FlatImagesFormat):
    """PaliGemma: the text up to the last `<image>`, BOS, the rest, "\\n"; each `<image>` becomes image_seq_length
    `<image>` tokens; the tokenizer adds nothing."""

    name = "paligemma"
    template = PALIGEMMA_TEMPLATE
    writes_bos = True
    packable = False  # packed examples' prefixes would attend to each other both ways

    def read_rules(self, proc_cfg, special, do_image_splitting=False, cfg=None) -> PromptRules:
        seq = (proc_cfg.get("image_processor") or {}).get("image_seq_length") or proc_cfg.get("image_seq_length")
        fallback = cfg.tokens_per_image if cfg is not None and cfg.tokens_per_image else 256
        return PromptRules("paligemma", image_token=special.get("image_token") or "<image>",
                           image_seq_len=int(seq or fallback))

    def expand(self, segments, rules, images, index, special, expected=None):
        token = rules.image_token
        text = segments_text(segments, token)
        cut = text.rfind(token) + len(token) if token in text else 0
        text = text[:cut] + (special.get("bos_token") or "") + text[cut:] + "\n"
        n = images["num_images"][index] if images else 0
        return fill_placeholders(text, token, [token * rules.image_seq_len] * n)

    def chat_text(self, text, bos):
        return text[len(bos):] if bos and text.startswith(bos) else text  # expand writes the BOS

    def add_special_tokens(self, text, from_chat, bos):
        return False

    def token_types(self, ids, image_token_id):
        return [0] * len(ids)  # all prefix: no suffix at inference

    def training_row(self, row):
        """From the first labelled token on, the row is the suffix (type 1, causal): as PaliGemmaProcessor's
        suffix, the answer never sees itself ahead."""
        first = next((i for i, x in enumerate(row.labels) if x != -100), len(row.labels))
        row.token_types = [0] * first + [1] * (len(row.labels) - first)
        return row
