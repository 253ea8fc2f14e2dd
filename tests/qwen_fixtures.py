"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints built and saved by transformers, with their real processors."""

from __future__ import annotations

import copy

import torch

import hf_fixtures as F

QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# The Qwen2-VL-Instruct / Qwen2.5-VL-Instruct chat template (ChatML with vision tokens), as on the hub.
QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
# 28 px blocks (patch 14 x merge 2): images of 2..12 blocks, so the sample images get grids of several shapes.
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 12


def build_tokenizer():
    tok = copy.deepcopy(F._smollm2_tokenizer())
    tok.add_special_tokens({"extra_special_tokens": QWEN_TOKENS})
    tok.padding_side = tok.init_kwargs["padding_side"] = "left"
    tok.pad_token = "<|endoftext|>"  # Qwen's pad, distinct from <|im_end|> (EOS)
    tok.chat_template = QWEN_TEMPLATE
    return tok


def build_processor(tok=None):
    import transformers as tf
    from transformers.video_processing_utils import BaseVideoProcessor
    F._allow_smolvlm_processor()  # the processor insists on a video processor class the test env lacks
    tok = tok if tok is not None else build_tokenizer()
    ip = tf.Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return tf.Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=BaseVideoProcessor(),
                               chat_template=QWEN_TEMPLATE)


def build_config(tok, qwen25: bool = False, tie: bool = False):
    import transformers as tf
    ids = tok.convert_tokens_to_ids
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    tokens = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                  vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
                  tie_word_embeddings=tie)
    if qwen25:
        # window 56 px = 2x2 merged tokens per window; blocks 1 and 3 see the whole image
        vision = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64,
                      window_size=56, fullatt_block_indexes=[1, 3], patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, initializer_range=0.1)
        return tf.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **tokens)
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.1)
    return tf.Qwen2VLConfig(vision_config=vision, text_config=text, **tokens)


def build_checkpoint(folder: str, qwen25: bool = False, seed: int = 0, tie: bool = False) -> str:
    import transformers as tf
    F._quiet()
    processor = build_processor()
    tok = processor.tokenizer
    cfg = build_config(tok, qwen25, tie)
    torch.manual_seed(seed)
    cls = tf.Qwen2_5_VLForConditionalGeneration if qwen25 else tf.Qwen2VLForConditionalGeneration
    model = cls(cfg).to(torch.float32)
    F._make_init_nontrivial(model, seed)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():  # the default init (std 0.02) makes the image path nearly invisible in the logits
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() >= 2:
                p.normal_(0, 0.1, generator=gen)
    model.generation_config.eos_token_id = [tok.eos_token_id]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def load_hf(folder: str):
    import transformers as tf
    F._quiet()
    model = tf.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    processor = build_processor(tf.AutoTokenizer.from_pretrained(folder))
    processor.image_processor = tf.Qwen2VLImageProcessorPil.from_pretrained(folder)
    return model, processor


def prompt(n_images: int = 2, question: str = F.QUESTION) -> str:
    """The chat template's text for one user turn with `n_images` images."""
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + image * n_images
            + question + "<|im_end|>\n<|im_start|>assistant\n")
