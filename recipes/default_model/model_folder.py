"""The default model's folder: a fresh model (random ViT + connector in front of SmolLM2 from its GGUF), its
processor files, the shippable adapter folder, and reading an earlier one back."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlmkit.checkpoints.adapter import ADAPTER, grow_vocab, resolve_gguf, write_adapter_config
from vlmkit.checkpoints.families import idefics3_to_hf
from vlmkit.checkpoints.gguf import load_gguf_text
from vlmkit.config import ConnectorConfig, TextConfig, VLMConfig
from vlmkit.models.vlm import VLMModel
from vlmkit.processing.gguf_tokenizer import tokenizer_from_gguf
from vlmkit.processing.processor import Processor
from vlmkit.train.lora import lora_state_dict
from vlmkit.hardware import cpu_has_native_bf16

from .config import Architecture, RecipeConfig

ADDED_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]

# SmolLM2's own chat format. Text-only conversations keep SmolLM2's default system prompt, so plain questions are
# answered as SmolLM2 answers them; conversations with images drop it to keep sequences short.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(image=false) -%}"
    "{%- for m in messages -%}{%- if m['content'] is not string -%}{%- for p in m['content'] -%}"
    "{%- if p['type'] == 'image' -%}{%- set ns.image = true -%}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endfor -%}"
    "{%- if messages[0]['role'] != 'system' and not ns.image -%}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}{%- for p in m['content'] -%}"
    "{%- if p['type'] == 'image' -%}{{ '<image>' }}{%- elif p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{ '<|im_end|>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def image_processor_settings(arch: Architecture) -> dict:
    return {
        "image_processor_type": "Idefics3ImageProcessor", "do_convert_rgb": True, "do_resize": True,
        "size": {"longest_edge": arch.image_size}, "resample": 1, "do_image_splitting": False,
        "max_image_size": {"longest_edge": arch.image_size}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_pad": True,
    }


def write_processor_files(folder: Path, tok, arch: Architecture) -> int:
    """Tokenizer (SmolLM2's, from the GGUF, + the image tokens), chat template and image settings; returns the
    vocabulary size."""
    tok.add_special_tokens(ADDED_TOKENS)
    tok.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "model_max_length": 8192,
        "extra_special_tokens": ADDED_TOKENS, "padding_side": "left", "clean_up_tokenization_spaces": False,
    }, indent=2))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (folder / "processor_config.json").write_text(json.dumps({
        "processor_class": "Idefics3Processor", "image_seq_len": arch.tokens_per_image,
        "image_processor": image_processor_settings(arch),
    }, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "max_new_tokens": 128}, indent=2))
    return tok.vocab_size


def model_config(arch: Architecture, text: TextConfig, vocab_size: int, image_token_id: int) -> VLMConfig:
    vision = arch.vision_config()
    connector = ConnectorConfig(kind="pixel_shuffle", in_dim=vision.hidden_size, out_dim=text.hidden_size,
                                scale_factor=arch.shuffle)
    return VLMConfig(family="idefics3", vision=vision, connector=connector, text=replace(text, vocab_size=vocab_size),
                     image_token_id=image_token_id, tokens_per_image=arch.tokens_per_image)


def prepare_folder(out: Path, cfg: RecipeConfig) -> tuple[VLMModel, Processor]:
    """A fresh model (random vision + connector, SmolLM2 text) and its processor, written as an adapter folder."""
    out.mkdir(parents=True, exist_ok=True)
    gguf = resolve_gguf(cfg.arch.base_gguf)
    text, text_state = load_gguf_text(gguf)
    tok = tokenizer_from_gguf(gguf)
    vocab = write_processor_files(out, tok, cfg.arch)
    vlm = model_config(cfg.arch, text, vocab, tok.token_to_id("<image>"))
    hf = idefics3_to_hf(vlm)
    hf.update({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2})
    write_adapter_config(out, hf, cfg.arch.base_gguf, cfg.language.lora_spec())
    model = VLMModel.random(vlm, seed=cfg.seed)
    model.load_state_dict(grow_vocab(text_state, vocab), strict=False)
    model.text.requires_grad_(False)
    return model, Processor.from_folder(out, vlm)


def pixels(processor, images: list) -> torch.Tensor:
    batch = processor.image_processor([[im] for im in images])
    return batch["pixel_values"].flatten(0, 1)


def precision() -> str:
    """bf16 autocast where the hardware has bf16 matmuls (GPUs; CPUs with AMX / AVX512-BF16: about 2x faster
    there), float32 otherwise; weights and optimizer state stay float32."""
    return "bf16" if torch.cuda.is_available() or cpu_has_native_bf16() else "fp32"


def export_adapter(model: VLMModel, out: Path, dest: Path) -> None:
    """Write the shippable folder: processor files + config + fp16 vision/connector/LoRA weights."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json",
                 "generation_config.json", "config.json"):
        if out.resolve() != dest.resolve():
            shutil.copyfile(out / name, dest / name)
    state = model.state_dict()
    keep = {k: v for k, v in state.items() if k.startswith(("vision.", "connector."))}
    keep.update(lora_state_dict(model))
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in keep.items()}, str(dest / ADAPTER),
              metadata={"format": "pt"})


def load_weights(model: VLMModel, state: dict, keys, what: str) -> None:
    """Copy `keys` of `state` (an adapter's weights) into `model`; every one of them must be there."""
    keys = list(keys)
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"no weights for {what}: {missing[:5]}")
    model.load_state_dict({k: state[k].float() for k in keys}, strict=False)


def adapter_weights(folder: Path) -> dict:
    path = Path(folder) / ADAPTER
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not an adapter folder of the default model (no {ADAPTER})")
    return load_file(path)


def load_vision(model: VLMModel, folder: Path, connector: bool = False) -> dict:
    """The ViT (and with `connector`, the connector) of an adapter folder, an earlier default model, instead of
    stages 0a and 0b; returns all the folder's weights (its LoRA too) as read."""
    parts = ("vision.", "connector.") if connector else ("vision.",)
    state = adapter_weights(folder)
    load_weights(model, state, [k for k in model.state_dict() if k.startswith(parts)],
                 f"the {' and '.join(p[:-1] for p in parts)} of {folder}")
    return state
