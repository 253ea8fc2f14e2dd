"""Training stages as config: which parts of the model train, LoRA, a frozen quantized base, per-part learning rates.

    stage = get_stage("llava-stage1")                 # or a Stage(...), or a .json file with Stage's fields
    plan = apply_stage(model, stage)                  # freezes, adds LoRA, returns optimizer groups and counts
    print(plan.describe())                            # "trainable parameters: 4,160 of 1,234,567 (0.34%): ..."

Parts (by parameter name; every family has the same module tree, see docs/INTERNALS.md):
    vision           the ViT                               vision.*
    connector        projector / perceiver / pixel shuffle connector.*
    cross_attention  IDEFICS gated cross-attention blocks  text.cross_blocks.*
    decoder          the language model (embeddings, layers, head), without the cross-attention blocks
    extra_embeddings IDEFICS' decoupled embeddings and head rows of the added tokens
    lora             the LoRA adapters `stage.lora` adds (the wrapped base weights stay frozen)
Weights the forward never reaches (LLaVA's last ViT layer, an unused post-layernorm) never train.

Recipes (the published settings):
    llava-stage1   connector only, lr 1e-3, LLaVA `plain` template: images + caption   (LLaVA-1.5 pretraining)
    llava-stage2   connector + decoder, lr 2e-5, chat template, answers only           (LLaVA-1.5 instruction tuning)
    idefics        perceiver + gated cross-attention only, lr 1e-4                     (IDEFICS: LM and ViT frozen)
    lora           LoRA r=128/alpha=256 on every decoder projection, lr 2e-4, connector at lr 2e-5 (LLaVA LoRA)
    qlora          the same LoRA over an int4 weight-only frozen base (QLoRA-style)
    full           everything the model has, lr 1e-5
All use AdamW, cosine decay with 3% warmup.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

from torch import nn

PARTS = ("vision", "connector", "cross_attention", "decoder", "extra_embeddings", "lora")
DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRASpec:
    r: int = 8
    alpha: float = 16.0
    targets: tuple = DECODER_PROJECTIONS
    under: str = "text.layers"  # only Linear layers below this module (the decoder's own layers)


@dataclass
class Stage:
    name: str = "custom"
    train: tuple = ("connector",)
    lr: float = 1e-4
    lr_scales: dict = field(default_factory=dict)  # part -> multiplier of lr (default 1)
    template: str = "chat"  # "chat": labels on answers; "plain": LLaVA stage 1 (images + caption)
    lora: Optional[LoRASpec] = None
    quantize: Optional[str] = None  # "int8" / "int4": the frozen base under LoRA is weight-only quantized
    warmup: float = 0.03
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    strict: bool = True  # a part the model lacks is an error (False: skipped, e.g. cross_attention outside IDEFICS)

    def __post_init__(self):
        unknown = [p for p in self.train if p not in PARTS]
        if unknown:
            raise ValueError(f"unknown parts {unknown}; parts are {', '.join(PARTS)}")
        if "lora" in self.train and self.lora is None:
            self.lora = LoRASpec()
        if self.lora is not None and "lora" not in self.train:
            self.train = tuple(self.train) + ("lora",)
        if self.quantize is not None and self.lora is None:
            raise ValueError("a quantized base trains through LoRA only: give the stage a LoRA spec")
        if self.template not in ("chat", "plain"):
            raise ValueError(f"template must be 'chat' or 'plain', not {self.template!r}")


_LLAVA_LORA = LoRASpec(r=128, alpha=256.0)
RECIPES = {
    "llava-stage1": Stage("llava-stage1", ("connector",), lr=1e-3, template="plain"),
    "llava-stage2": Stage("llava-stage2", ("connector", "decoder"), lr=2e-5),
    "idefics": Stage("idefics", ("connector", "cross_attention"), lr=1e-4),
    "lora": Stage("lora", ("connector", "lora"), lr=2e-4, lr_scales={"connector": 0.1}, lora=_LLAVA_LORA),
    "qlora": Stage("qlora", ("connector", "lora"), lr=2e-4, lr_scales={"connector": 0.1}, lora=_LLAVA_LORA,
                   quantize="int4"),
    "full": Stage("full", ("vision", "connector", "cross_attention", "decoder", "extra_embeddings"), lr=1e-5,
                  strict=False),
}


def get_stage(spec: Union[str, Stage, dict], **overrides) -> Stage:
    """A recipe name, a Stage, a dict of Stage fields or a .json file of them; `overrides` replace fields
    (None values are ignored)."""
    if isinstance(spec, Stage):
        stage = spec
    elif isinstance(spec, dict):
        stage = _from_dict(spec)
    elif spec in RECIPES:
        stage = RECIPES[spec]
    elif str(spec).endswith(".json") and Path(spec).is_file():
        stage = _from_dict(json.loads(Path(spec).read_text()))
    else:
        raise ValueError(f"unknown stage {spec!r}; use one of {', '.join(RECIPES)} or a .json stage file")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(stage, **overrides) if overrides else replace(stage)


def _from_dict(d: dict) -> Stage:
    d = dict(d)
    if isinstance(d.get("lora"), dict):
        d["lora"] = LoRASpec(**{**d["lora"], "targets": tuple(d["lora"].get("targets", DECODER_PROJECTIONS))})
    d["train"] = tuple(d.get("train", ("connector",)))
    return Stage(**d)


def stage_dict(stage: Stage) -> dict:
    return asdict(stage)


def part_of(name: str) -> Optional[str]:
    """Which part a parameter belongs to (by its name in VLMModel)."""
    if ".lora_" in name:
        return "lora"
    if name.startswith("vision."):
        return "vision"
    if name.startswith(("connector.", "anyres.")):  # LLaVA-NeXT's image_newline trains with its projector
        return "connector"
    if name.startswith("text.cross_blocks."):
        return "cross_attention"
    if name.startswith(("text.embed_tokens_extra.", "text.lm_head_extra.")):
        return "extra_embeddings"
    if name.startswith("text."):
        return "decoder"
    return None


@dataclass
class StagePlan:
    """What apply_stage did: optimizer groups (one per trained part), trainable counts per part, the total."""

    stage: Stage
    groups: list
    trainable_by_part: dict
    total_parameters: int
    lora_layers: list = field(default_factory=list)

    @property
    def trainable(self) -> int:
        return sum(self.trainable_by_part.values())

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v:,}" for k, v in self.trainable_by_part.items())
        share = 100.0 * self.trainable / max(1, self.total_parameters)
        return (f"stage {self.stage.name}: trainable parameters: {self.trainable:,} of {self.total_parameters:,} "
                f"({share:.2f}%): {parts}")


def apply_stage(model: nn.Module, stage: Stage, seed: int = 0) -> StagePlan:
    """Freeze everything, then: quantize the frozen base (if asked), add LoRA (seeded, so every process of a
    distributed run builds the same adapters), and unfreeze the stage's parts. Returns the optimizer groups."""
    import torch

    from .lora import add_lora

    model.requires_grad_(False)
    lora_layers = []
    if stage.quantize is not None:
        _quantize_base(model, stage.quantize)
    if stage.lora is not None:
        torch.manual_seed(seed)
        spec = stage.lora
        lora_layers = add_lora(model, targets=tuple(spec.targets), r=spec.r, alpha=spec.alpha, under=spec.under)
    wanted, idle = set(stage.train), never_used(model)
    by_part: dict = {}
    for name, p in model.named_parameters():
        part = part_of(name)
        if part in wanted and p.is_floating_point() and not name.startswith(idle):
            p.requires_grad_(True)
            by_part.setdefault(part, []).append(p)
    missing = [p for p in stage.train if p not in by_part]
    if missing and (stage.strict or not by_part):
        raise ValueError(f"stage {stage.name}: this model has no parameters in {missing} "
                         f"(cross_attention exists in IDEFICS only, extra_embeddings too)")
    groups = [{"params": ps, "lr_scale": float(stage.lr_scales.get(part, 1.0)), "name": part,
               "weight_decay": stage.weight_decay} for part, ps in by_part.items()]
    counts = {part: sum(p.numel() for p in ps) for part, ps in by_part.items()}
    total = sum(p.numel() for p in model.parameters()) + sum(  # quantized weights are buffers, not parameters
        m.in_features * m.out_features if hasattr(m, "in_features") else m.num_embeddings * m.embedding_dim
        for m in model.modules() if hasattr(m, "dequantize") and hasattr(m, "export"))
    plan = StagePlan(stage, groups, counts, total, lora_layers)
    assert plan.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad), "groups != trainable"
    return plan


def never_used(model: nn.Module) -> tuple:
    """Name prefixes of weights the forward never reaches, so they are not trained (nor counted): ViT layers past
    the feature layer (LLaVA reads layer -2, so the last layer is unused) and an unused post-layernorm."""
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return ()
    n = cfg.vision.num_layers
    stop = cfg.vision.feature_layer % (n + 1)
    idle = [f"vision.layers.{i}." for i in range(stop, n)]
    if not cfg.vision.post_norm_features:
        idle.append("vision.post_norm.")
    return tuple(idle)


def _quantize_base(model: nn.Module, mode: str) -> None:
    """Weight-only quantization of the frozen decoder (vlmkit.models.quant: projections int4/int8, token table and
    head int8), unless the model was loaded quantized already; gradients then flow through it to the LoRA layers."""
    from ..models import quant
    from .lora import train_through_all_quantized

    done = quant.quantization_of(model)
    if done is None:
        quant.quantize_model(model, mode)
    elif done["mode"] != mode:
        raise ValueError(f"the model is {done['mode']}-quantized but the stage asks for {mode}")
    train_through_all_quantized(model)
