"""The families as checkpoint formats: HF config.json <-> VLMConfig (one module per family line), tensor-name
prefixes, aliases; `FAMILIES` is the registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from ...config import VLMConfig
from .common import UnsupportedCheckpoint
from .gemma import gemma3_from_hf, gemma3_to_hf, paligemma_from_hf, paligemma_to_hf
from .idefics import idefics2_from_hf, idefics2_to_hf, idefics3_from_hf, idefics3_to_hf, idefics_from_hf, idefics_to_hf
from .llava import llava_from_hf, llava_next_from_hf, llava_next_to_hf, llava_to_hf
from .mllama import mllama_from_hf, mllama_to_hf
from .qwen2_vl import qwen2_vl_from_hf, qwen2_vl_to_hf

__all__ = ["FAMILIES", "Family", "UnsupportedCheckpoint", "family_for_architecture", "idefics3_to_hf",
           "llava_next_from_hf"]


@dataclass
class Family:
    name: str
    architectures: tuple
    from_hf: Callable[[dict], VLMConfig]
    to_hf: Callable[[VLMConfig], dict]
    prefixes: dict  # V vision, T text model, H lm head, C connector, X cross-attention layers
    aliases: list = field(default_factory=list)  # (other tools' prefix, canonical prefix)
    # The same prefixes as transformers 5 names the modules in memory (what PEFT adapters are keyed by); None:
    # the file's own prefixes.
    modules: Optional[dict] = None


# transformers 5 writes the hub's layout (model.layers..., visual...); in memory: model.language_model, model.visual
QWEN2_VL_PREFIXES = dict(V="visual.", T="model.", H="lm_head.", C="visual.merger.", X="")
QWEN2_VL_ALIASES = [("model.language_model.", "model."), ("model.visual.", "visual.")]
# transformers 5 saves Gemma 3 / PaliGemma as LLaVA (its in-memory names and the hub's older ones are aliases)
GEMMA_PREFIXES = dict(V="vision_tower.", T="language_model.model.", H="language_model.lm_head.",
                      C="multi_modal_projector.", X="")
GEMMA_ALIASES = [("model.vision_tower.vision_model.", "vision_tower."), ("model.vision_tower.", "vision_tower."),
                 ("vision_tower.vision_model.", "vision_tower."), ("model.language_model.", "language_model.model."),
                 ("lm_head.", "language_model.lm_head."), ("model.multi_modal_projector.", "multi_modal_projector.")]
# transformers 5 in memory: the composite model's parts under `model.`, the head at the top
LLAVA_MODULES = dict(V="model.vision_tower.", T="model.language_model.", H="lm_head.",
                     C="model.multi_modal_projector.", X="")
QWEN2_VL_MODULES = dict(V="model.visual.", T="model.language_model.", H="lm_head.", C="model.visual.merger.", X="")
IDEFICS2_PREFIXES = dict(V="model.vision_model.", T="model.text_model.", H="lm_head.", C="model.connector.", X="")

FAMILIES = {
    f.name: f
    for f in [
        Family(
            "llava", ("LlavaForConditionalGeneration",), llava_from_hf, llava_to_hf,
            dict(V="vision_tower.", T="language_model.model.", H="language_model.lm_head.",
                 C="multi_modal_projector.", X=""),
            # transformers >= 4.52 in memory, and the hub's original llava-hf layout
            aliases=[("model.vision_tower.vision_model.", "vision_tower."), ("model.vision_tower.", "vision_tower."),
                     ("vision_tower.vision_model.", "vision_tower."),
                     ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")],
            modules=LLAVA_MODULES,
        ),
        Family(
            "llava_next", ("LlavaNextForConditionalGeneration",), llava_next_from_hf, llava_next_to_hf,
            dict(V="vision_tower.", T="language_model.model.", H="language_model.lm_head.",
                 C="multi_modal_projector.", X="", N=""),
            aliases=[("model.vision_tower.vision_model.", "vision_tower."), ("model.vision_tower.", "vision_tower."),
                     ("vision_tower.vision_model.", "vision_tower."),
                     ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("model.image_newline", "image_newline")],
            modules=dict(LLAVA_MODULES, N="model."),
        ),
        Family(
            "idefics", ("IdeficsForVisionText2Text",), idefics_from_hf, idefics_to_hf,
            dict(V="model.vision_model.", T="model.", H="lm_head.", C="model.perceiver_resampler.",
                 X="model.gated_cross_attn_layers."),
        ),
        Family("idefics2", ("Idefics2ForConditionalGeneration",), idefics2_from_hf, idefics2_to_hf,
               IDEFICS2_PREFIXES),
        Family("idefics3", ("Idefics3ForConditionalGeneration",), idefics3_from_hf, idefics3_to_hf,
               IDEFICS2_PREFIXES),
        Family(
            "mllama", ("MllamaForConditionalGeneration",), mllama_from_hf, mllama_to_hf,
            dict(V="vision_model.", T="language_model.model.", H="language_model.lm_head.",
                 C="multi_modal_projector.", X="language_model.model.layers."),
            # transformers 5 in memory
            aliases=[("model.vision_model.", "vision_model."), ("model.language_model.", "language_model.model."),
                     ("lm_head.", "language_model.lm_head."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")],
            modules=dict(LLAVA_MODULES, V="model.vision_model.", X="model.language_model.layers."),
        ),
        Family("smolvlm", ("SmolVLMForConditionalGeneration",),
               lambda d: idefics3_from_hf(d, family="idefics3"),
               lambda c: idefics3_to_hf(c, "SmolVLMForConditionalGeneration", "smolvlm"), IDEFICS2_PREFIXES),
        Family("qwen2_vl", ("Qwen2VLForConditionalGeneration",), qwen2_vl_from_hf, qwen2_vl_to_hf,
               QWEN2_VL_PREFIXES, QWEN2_VL_ALIASES, QWEN2_VL_MODULES),
        Family("qwen2_5_vl", ("Qwen2_5_VLForConditionalGeneration",), qwen2_vl_from_hf,
               lambda c: qwen2_vl_to_hf(c, "Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"),
               QWEN2_VL_PREFIXES, QWEN2_VL_ALIASES, QWEN2_VL_MODULES),
        Family("gemma3", ("Gemma3ForConditionalGeneration",), gemma3_from_hf, gemma3_to_hf, GEMMA_PREFIXES,
               aliases=GEMMA_ALIASES, modules=LLAVA_MODULES),
        Family("paligemma", ("PaliGemmaForConditionalGeneration",), paligemma_from_hf, paligemma_to_hf,
               dict(GEMMA_PREFIXES, LINEAR="linear"), aliases=GEMMA_ALIASES,
               modules=dict(LLAVA_MODULES, LINEAR="linear")),
    ]
}


def family_for_architecture(hf_config: dict) -> Family:
    archs = hf_config.get("architectures") or []
    for fam in FAMILIES.values():
        if any(a in fam.architectures for a in archs):
            return fam
    known = sorted(a for f in FAMILIES.values() for a in f.architectures)
    raise UnsupportedCheckpoint(f"unsupported architecture {archs or hf_config.get('model_type')!r}; known: {known}")
