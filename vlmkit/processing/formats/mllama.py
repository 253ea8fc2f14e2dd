"""Llama 3.2 Vision (Mllama) processing rules (transformers' MllamaProcessor).

One `<|image|>` token per image, no expansion: the text attends to the images through cross-attention layers, and
`cross_attention_mask` [B, T, M, tiles] says which tiles each token sees: from an image token on, that image's real
tiles, until the next image token (consecutive image tokens are one group: each sees to the end of the group's
span); tokens before the first image see none. The BOS text goes after any image tokens that open the prompt.
The batch: pixel_values [B, M, tiles, 3, S, S], aspect_ratio_ids [B, M], aspect_ratio_mask [B, M, tiles]
(missing images: all-zero pixels, id 0, only tile 0 set, as transformers pads them)."""

from __future__ import annotations

import torch

from ..batching import CollateError, EncodedRow, pad_tokens
from ..prompts import PromptRules, segments_text
from .base import Format

IMAGE = "<|image|>"

# Llama 3.2 Vision Instruct's chat template without tools: a system turn (with the dates) only when no image is
# given, images only in user turns, each turn closed by <|eot_id|>.
MLLAMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- set image_ns = namespace(has_images=false) %}"
    "{%- for message in messages %}{%- if message['content'] is not string %}"
    "{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{%- set image_ns.has_images = true %}{%- endif %}"
    "{%- endfor %}{%- endif %}{%- endfor %}"
    "{%- if image_ns.has_images and not system_message == '' %}"
    "{{- raise_exception('Prompting with images is incompatible with system messages.') }}{%- endif %}"
    "{%- if not image_ns.has_images %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

_IMAGE_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")


def cross_attention_spans(ids, image_token_id: int) -> list[tuple[int, int]]:
    """Per image token: the [start, end) token span that sees its image (MllamaProcessor's
    get_cross_attention_token_mask, with its end = -1 written as the length)."""
    ids = list(ids)
    where = [i for i, tok in enumerate(ids) if tok == image_token_id]
    spans = [[a, b] for a, b in zip(where, where[1:] + [len(ids)])]
    end = len(ids)
    for span in reversed(spans):  # an image token right before the next one shares that one's end
        if span[0] == span[1] - 1:
            span[1] = end
        end = span[1]
    return [tuple(s) for s in spans]


def cross_attention_mask(ids, image_token_id: int, num_tiles: list[int], max_tiles: int) -> torch.Tensor:
    """[T, len(num_tiles), max_tiles] long: 1 where token t sees tile k of image j."""
    out = torch.zeros(len(ids), len(num_tiles), max_tiles, dtype=torch.long)
    for j, ((start, end), tiles) in enumerate(zip(cross_attention_spans(ids, image_token_id), num_tiles)):
        out[start:end, j, :tiles] = 1
    return out


class MllamaFormat(Format):
    name = "mllama"
    template = MLLAMA_TEMPLATE
    cross_attention = True

    def read_rules(self, proc_cfg, special, do_image_splitting=False, cfg=None) -> PromptRules:
        return PromptRules("mllama", image_token=special.get("image_token") or IMAGE)

    def required_tokens(self, rules):
        return [rules.image_token]

    def stop_tokens(self, rules):
        return ["<|eot_id|>", "<|eom_id|>"]

    def banned_tokens(self, rules):
        return []  # <|image|> is an input-only row of the embedding table: never a logit

    def expected_tokens(self, rules, cfg):
        return None

    def expand(self, segments, rules, images, index, special, expected=None):
        """MllamaProcessor's build_string_from_input: the BOS text is added unless the prompt has it, after any
        image tokens that open the prompt."""
        text, image, bos = segments_text(segments, rules.image_token), rules.image_token, special.get("bos_token")
        if not bos or bos in text:
            return text
        leading = 0
        while text.startswith(image, leading * len(image)):
            leading += 1
        return image * leading + bos + text[leading * len(image):]

    def image_cost(self, rules, settings):
        return 1

    def row(self, ids, images, index, image_token_id, eos_token_id):
        out = EncodedRow(ids)
        tiles = images.get("num_tiles", [])[index] if "pixel_values" in images else []
        if tiles:
            n = len(tiles)
            out.pixels = images["pixel_values"][index, :n]
            out.pixel_mask = images["aspect_ratio_mask"][index, :n]
            out.extra["aspect_ratio_ids"] = images["aspect_ratio_ids"][index, :n]
            out.image_mask = cross_attention_mask(ids, image_token_id, tiles, out.pixels.shape[1])
        return out

    def pixel_batch(self, rows):
        with_px = [r for r in rows if r.pixels is not None and len(r.pixels)]
        if not with_px:
            return {}
        ref = with_px[0].pixels
        b, m, t = len(rows), max(len(r.pixels) for r in with_px), max(len(r.input_ids) for r in rows)
        tiles = ref.shape[1]
        out = {"pixel_values": ref.new_zeros(b, m, *ref.shape[1:]),
               "aspect_ratio_ids": torch.zeros(b, m, dtype=torch.long, device=ref.device),
               "aspect_ratio_mask": torch.zeros(b, m, tiles, dtype=torch.long, device=ref.device),
               "cross_attention_mask": torch.zeros(b, t, m, tiles, dtype=torch.long, device=ref.device)}
        out["aspect_ratio_mask"][:, :, 0] = 1
        for i, r in enumerate(rows):
            if r.pixels is None or not len(r.pixels):
                continue
            n = len(r.pixels)
            if r.pixels.shape[1:] != ref.shape[1:]:
                raise CollateError(f"tiles of {tuple(r.pixels.shape[1:])} and {tuple(ref.shape[1:])} in one batch")
            out["pixel_values"][i, :n] = r.pixels
            out["aspect_ratio_ids"][i, :n] = r.extra["aspect_ratio_ids"]
            out["aspect_ratio_mask"][i, :n] = r.pixel_mask
            out["cross_attention_mask"][i, t - len(r.input_ids):, :n] = r.image_mask
        return out

    def collate(self, rows, pad_token_id, positions=False):
        batch = pad_tokens(rows, pad_token_id, positions)
        batch.update(self.pixel_batch(rows))
        return batch

    def merge(self, batches, pad_token_id):
        if len(batches) == 1:
            return dict(batches[0])
        rows = []
        for b in batches:
            if set(b) - {"input_ids", "attention_mask", *_IMAGE_KEYS} or b["input_ids"].shape[0] != 1:
                raise CollateError("merge takes single-prompt Mllama batches")
            row = EncodedRow(b["input_ids"][0])
            if "pixel_values" in b:
                row.pixels, row.pixel_mask = b["pixel_values"][0], b["aspect_ratio_mask"][0]
                row.extra["aspect_ratio_ids"] = b["aspect_ratio_ids"][0]
                row.image_mask = b["cross_attention_mask"][0]
            rows.append(row)
        return self.collate(rows, pad_token_id)
