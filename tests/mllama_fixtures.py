"""A tiny random Llama 3.2 Vision (Mllama) checkpoint built by transformers, with its processor and a Llama 3.2
style chat template: the reference tests/test_mllama.py compares vlmkit against."""

from __future__ import annotations

import copy

import torch

from hf_fixtures import _make_init_nontrivial, _quiet, _smollm2_tokenizer

IMAGE = "<|image|>"
# The Llama 3 tokens the chat template writes; <|image|> comes last so its id equals the text vocab_size, as in the
# real checkpoints (128256: an input-only row of the embedding table, never a logit).
TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>",
          "<|finetune_right_pad_id|>", IMAGE]

# Llama 3.2 Vision's template without tools: a system block with the dates when there is no image.
TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- set image_ns = namespace(has_images=false) %}"
    "{%- for message in messages %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{%- set image_ns.has_images = true %}{%- endif %}"
    "{%- endfor %}{%- endfor %}"
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


def build_tokenizer():
    tok = copy.deepcopy(_smollm2_tokenizer())
    tok.add_special_tokens({"extra_special_tokens": TOKENS})
    tok.bos_token, tok.eos_token, tok.pad_token = "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"
    tok.padding_side = tok.init_kwargs["padding_side"] = "left"
    tok.chat_template = TEMPLATE
    return tok


def build_processor(tok=None, tile: int = 28, max_tiles: int = 4):
    import transformers as tf
    tok = tok if tok is not None else build_tokenizer()
    ip = tf.MllamaImageProcessorPil(size={"height": tile, "width": tile}, max_image_tiles=max_tiles)
    return tf.MllamaProcessor(ip, tok, chat_template=TEMPLATE)


def build_config(tok, tile: int = 28, max_tiles: int = 4):
    import transformers as tf
    image_id = tok.convert_tokens_to_ids(IMAGE)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_global_layers=2,
                  attention_heads=4, image_size=tile, patch_size=14, max_num_tiles=max_tiles,
                  intermediate_layers_indices=[1, 3], vision_output_dim=32 * 3, initializer_range=0.1,
                  supported_aspect_ratios=[[w, h] for w in range(1, max_tiles + 1)
                                           for h in range(1, max_tiles + 1) if w * h <= max_tiles])
    # 5 decoder layers, cross-attention at 1 and 3 (self-attention around them, the last one too).
    text = dict(vocab_size=image_id, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1, 3],
                rms_norm_eps=1e-5, initializer_range=0.1, max_position_embeddings=2048,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                # Llama 3.2's RoPE, its original context shrunk so all three frequency bands occur at head_dim 16
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    return tf.MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_id)


def build_model(tok, seed: int = 0):
    import transformers as tf
    torch.manual_seed(seed)
    model = tf.MllamaForConditionalGeneration(build_config(tok)).to(torch.float32)
    _make_init_nontrivial(model, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():  # every gate open (transformers starts the cross-attention and tile gates at 0)
        for name, p in model.named_parameters():
            if "gate" in name and p.numel() == 1:
                p.copy_(0.4 + 0.4 * torch.rand(p.shape, generator=gen))
    return model.eval()


def build_checkpoint(folder: str, seed: int = 0) -> str:
    _quiet()
    processor = build_processor()
    model = build_model(processor.tokenizer, seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def load_hf(folder: str):
    import transformers as tf
    _quiet()
    model = tf.MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return model, tf.AutoProcessor.from_pretrained(folder)
