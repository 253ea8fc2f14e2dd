"""Tiny random-weight Gemma 3 and PaliGemma (1 and 2) checkpoints built by transformers, saved as Hugging Face
folders with their real processors (SmolLM2's tokenizer plus each family's named tokens and Gemma's turn tokens)."""

from __future__ import annotations

import copy
import tempfile

import torch

from hf_fixtures import _make_init_nontrivial, _quiet, _smollm2_tokenizer

# Gemma's chat template (google/gemma-3-4b-it, trimmed to what the tests render: system folded into the first user
# turn, "assistant" written "model", images as <start_of_image>).
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = \"\" -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)

GEMMA3_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>"]
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vision_use_head=False)


def build_tokenizer(family: str):
    import transformers as tf
    tok = copy.deepcopy(_smollm2_tokenizer())
    tok.add_special_tokens({"extra_special_tokens": TURN_TOKENS})
    folder = tempfile.mkdtemp(prefix="gemma-tok-")
    tok.save_pretrained(folder)
    named = GEMMA3_TOKENS if family == "gemma3" else {"image_token": "<image>"}
    tok = tf.AutoTokenizer.from_pretrained(folder, extra_special_tokens=named)
    tok.padding_side = tok.init_kwargs["padding_side"] = "left"
    tok.pad_token = "<|endoftext|>"
    if family == "gemma3":
        tok.add_bos_token = tok.init_kwargs["add_bos_token"] = True  # Gemma's tokenizer writes <bos>
        tok.chat_template = GEMMA3_TEMPLATE
    else:
        tok.chat_template = None  # PaliGemma checkpoints have none (SmolLM2's would come along otherwise)
    return tok


def build_processor(family: str, tok=None, pan_and_scan: bool = False):
    import transformers as tf
    tok = tok if tok is not None else build_tokenizer(family)
    if family == "gemma3":
        ip = tf.Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, do_pan_and_scan=pan_and_scan,
                                        pan_and_scan_min_crop_size=8, pan_and_scan_max_num_crops=3,
                                        pan_and_scan_min_ratio_to_activate=1.2)
        return tf.Gemma3Processor(ip, tok, image_seq_length=4, chat_template=GEMMA3_TEMPLATE)
    ip = tf.SiglipImageProcessorPil(size={"height": 28, "width": 28})
    ip.image_seq_length = 4
    return tf.PaliGemmaProcessor(ip, tok)


def build_config(family: str, tok):
    import transformers as tf
    ids = tok.convert_tokens_to_ids
    special = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-6, **special)
    if family == "gemma3":
        # 3 layers: local, global, local; a window of 6 tokens is shorter than the prompts, so it matters.
        text.update(num_hidden_layers=3, sliding_window=6, query_pre_attn_scalar=12,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
        return tf.Gemma3Config(
            vision_config=dict(image_size=32, patch_size=8, **_VISION), text_config=text, mm_tokens_per_image=4,
            boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
            image_token_index=ids("<image_soft_token>"), **special)
    vision = dict(image_size=28, patch_size=14, projection_dim=64, **_VISION)
    if family == "paligemma":
        text.update(model_type="gemma", num_hidden_layers=2)
    else:  # PaliGemma 2: Gemma 2 with soft-capping, sliding layers, sandwich norms
        text.update(model_type="gemma2", num_hidden_layers=2, sliding_window=5, query_pre_attn_scalar=20,
                    attn_logit_softcapping=4.0, final_logit_softcapping=3.0)
    return tf.PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=ids("<image>"),
                              projection_dim=64, hidden_size=64, **special)


def build_model(family: str, tok, seed: int = 0):
    import transformers as tf
    cfg = build_config(family, tok)
    torch.manual_seed(seed)
    cls = tf.Gemma3ForConditionalGeneration if family == "gemma3" else tf.PaliGemmaForConditionalGeneration
    model = cls(cfg).to(torch.float32)
    _make_init_nontrivial(model, seed)
    with torch.no_grad():  # transformers starts Gemma 3's projection at zero: the image path would not matter
        for name, p in model.named_parameters():
            if name.endswith("mm_input_projection_weight"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
    if family == "gemma3":
        model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    return model.eval()


def build_checkpoint(family: str, folder: str, seed: int = 0, pan_and_scan: bool = False) -> str:
    """family: gemma3 | paligemma | paligemma2."""
    _quiet()
    tok = build_tokenizer(family)
    processor = build_processor(family, tok, pan_and_scan)
    model = build_model(family, processor.tokenizer, seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def load_hf(folder: str):
    import transformers as tf
    _quiet()
    model = tf.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return model, tf.AutoProcessor.from_pretrained(folder)
