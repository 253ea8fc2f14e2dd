"""Fine-tune any supported model on local data: `vlmkit train --model M --data FILE ...` or `finetune(cfg)`.

    from vlmkit.train.finetune import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(model="path/to/hf-folder", data=["llava.json"], stage="lora",
                                     batch_size=8, steps=200, out="runs/lora"))
    result["losses"]          # {step: loss}, result["final"]: the merged Hugging Face folder
    result["adapter"]         # LoRA stages: the peft adapter folder (None when the stage trains more than it holds)

One step = one global batch of `batch_size` examples (BatchPlan: a seeded, optionally length-grouped order), split
over the processes (torchrun) and then into micro-batches of `micro_batch_size` (gradient accumulation). The loss is
the sum of token losses over the whole global batch divided by its label-token count, so 1 process, N processes
and any accumulation give the same update. The steps run in the one training loop (loop.Loop); this module turns
the data into batches, applies the stage, evaluates on the way and saves the merged model. Files in `out`:
    checkpoint.safetensors   trainable weights + AdamW moments + step + RNG, written atomically every `ckpt_every`
                             steps with a sha256 of its content (verified on resume); rerunning the same command
                             resumes from it and reads the same batches; a resume on other data (by content) or
                             settings is refused
    metrics.jsonl            one JSON line per step (loss, lr, tokens, samples/s, grad norm, epoch; a non-finite
                             number is null) and per evaluation
    eval/step-N/             the eval harness's files for each periodic evaluation
    loss.png                 loss, learning rate and gradient norm against the step (evaluations marked), drawn at
                             the end from metrics.jsonl when matplotlib is installed; `vlmkit plot OUT` redraws it
    final/                   the trained model, LoRA merged, in Hugging Face format (transformers loads it)
    adapter/                 LoRA stages: the same training as a peft LoRA adapter for the base model
                             (adapter_config.json + adapter_model.safetensors; a trained connector as peft's
                             modules_to_save): `peft.PeftModel.from_pretrained(base, "adapter")` or
                             `vlmkit.load(base, adapter="adapter")`; written with --no-final too

A NaN or infinite loss stops the run with an error naming the step, before that step's update and without writing
final/; with `skip_nonfinite` such batches are skipped instead and counted (`skipped_nonfinite` in metrics.jsonl).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..data.collate import BatchPlan, Collator
from ..data.readers import DataError, read_dataset
from ..plots import LOSS_PNG, draw_if_possible, plot_training
from . import distributed as D
from .checkpoint import data_fingerprint
from .loop import Loop, StepBatch, TrainConfig, enable_gradient_checkpointing
from .metrics_log import MetricsLog
from .stages import apply_stage, get_stage, part_of, stage_dict

CHECKPOINT, METRICS, FINAL, ADAPTER = "checkpoint.safetensors", "metrics.jsonl", "final", "adapter"


@dataclass
class FinetuneConfig:
    model: str
    data: list
    out: str = "runs/finetune"
    stage: str = "lora"  # a recipe (stages.RECIPES) or a .json stage file
    format: str = "auto"  # llava | cauldron | interleaved | captions | auto
    split: Optional[str] = None
    image_root: Optional[str] = None
    on_bad_record: str = "skip"  # or "raise"
    steps: Optional[int] = None  # default: epochs x (examples // batch_size)
    epochs: float = 1.0
    batch_size: int = 8  # global: all processes, all micro-batches
    micro_batch_size: Optional[int] = None  # per process and forward pass; default: no accumulation
    lr: Optional[float] = None  # default: the stage's
    warmup: Optional[float] = None  # fraction of steps; default: the stage's (3%)
    weight_decay: Optional[float] = None
    grad_clip: float = 1.0
    max_length: Optional[int] = None
    group_by_length: bool = False
    pack_length: Optional[int] = None
    precision: str = "auto"  # auto (bf16 on GPUs and CPUs with bf16 units, else fp32) | fp32 | bf16 | fp16
    gradient_checkpointing: bool = False
    strategy: str = "auto"  # auto | none | ddp | fsdp
    device: Optional[str] = None  # None/"auto": CUDA, then MPS, then CPU (vlmkit.hardware.resolve_device)
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100
    eval_every: int = 0
    eval_task: Optional[str] = None
    eval_data: Optional[str] = None
    eval_limit: int = 50
    save_final: bool = True
    lora_r: Optional[int] = None
    lora_alpha: Optional[float] = None
    quantize: Optional[str] = None
    template: Optional[str] = None
    train_parts: Optional[list] = None  # overrides the stage's parts
    skip_nonfinite: bool = False  # skip (and count) a batch whose loss or gradient is NaN / inf, instead of stopping


def _say(ctx, log):
    def say(line: str) -> None:
        if ctx.is_main:
            (log or (lambda s: print(s, file=sys.stderr, flush=True)))(line)
    return say


def token_loss_sum(model, batch: dict) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the label tokens: averaging happens over the global batch."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")


def finetune(cfg: FinetuneConfig, log: Optional[Callable[[str], None]] = None,
             on_step: Optional[Callable[[int, float], None]] = None) -> dict:
    """Run (or resume) a fine-tuning job; returns {"losses", "trainable", "samples_per_s", "final", "skipped"}."""
    from ..api import load

    ctx = D.init_distributed(cfg.strategy, cfg.device)
    say = _say(ctx, log)
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    stage = get_stage(cfg.stage, lr=cfg.lr, warmup=cfg.warmup, weight_decay=cfg.weight_decay,
                      quantize=cfg.quantize, template=cfg.template,
                      train=tuple(cfg.train_parts) if cfg.train_parts else None)
    if stage.lora is not None and (cfg.lora_r or cfg.lora_alpha):
        stage.lora = replace(stage.lora, r=cfg.lora_r or stage.lora.r, alpha=cfg.lora_alpha or stage.lora.alpha)
    # Loaded quantized tensor by tensor when asked, so the float model never sits in memory whole; on the CPU
    # (weights train in float32 under autocast; moved to the training device below, where int4 layers repack
    # themselves for that device's kernels).
    m = load(cfg.model, dtype=torch.float32, device="cpu", quantize=stage.quantize)
    model, processor = m.model, m.processor
    plan = apply_stage(model, stage, seed=cfg.seed)
    say(plan.describe())
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    data = read_dataset(cfg.data, cfg.format, cfg.split, cfg.image_root, cfg.on_bad_record, log=lambda s: None)
    say(data.summary())  # every bad record with its index and reason
    model.to(ctx.device)
    # DDP must look for unused parameters only when a batch can skip the images (text-only examples).
    wrapped = D.wrap_model(model, ctx, find_unused=any(not ex.images for ex in data))
    base = D.unwrap(wrapped)
    # FSDP2 replaces the parameters: build the optimizer groups from the wrapped model's own, by name.
    by_part: dict = {}
    for name, p in base.named_parameters():
        if p.requires_grad:
            by_part.setdefault(part_of(name), []).append(p)
    groups = [{"params": by_part[g["name"]], "lr_scale": g["lr_scale"], "weight_decay": g["weight_decay"]}
              for g in plan.groups]
    collator = Collator(processor, template=stage.template, max_length=cfg.max_length,
                        pack_length=cfg.pack_length)
    lengths = [collator.approx_length(ex) for ex in data] if cfg.group_by_length else None
    batches = BatchPlan(len(data), cfg.batch_size, cfg.seed, lengths)
    per_process = cfg.batch_size // ctx.world
    micro = cfg.micro_batch_size or per_process
    if cfg.batch_size % ctx.world or per_process % micro:
        raise ValueError(f"batch_size {cfg.batch_size} must split into {ctx.world} processes x micro-batches of "
                         f"{micro}")
    total = cfg.steps or max(1, math.ceil(cfg.epochs * batches.steps_per_epoch))
    train_cfg = TrainConfig(steps=total, batch_size=cfg.batch_size, lr=stage.lr, warmup=stage.warmup,
                            min_lr_ratio=stage.min_lr_ratio, grad_clip=cfg.grad_clip, log_every=cfg.log_every,
                            ckpt_every=cfg.ckpt_every, seed=cfg.seed, precision=cfg.precision,
                            skip_nonfinite=cfg.skip_nonfinite, betas=(0.9, 0.999))
    fingerprint = {"examples": len(data), "content": data_fingerprint(data), "batch_size": cfg.batch_size,
                   "seed": cfg.seed, "stage": stage.name}
    loop = Loop(wrapped, groups, train_cfg, ctx, out / CHECKPOINT, label=stage.name, log=say,
                fingerprint=fingerprint, counters=("skipped",))
    start = loop.resume()
    metrics = MetricsLog(out / METRICS, start, ctx.is_main)
    if ctx.is_main:
        (out / "config.json").write_text(json.dumps({"finetune": asdict(cfg), "stage": stage_dict(stage),
                                                     "world_size": ctx.world}, indent=2, default=str))
    say(f"{len(data)} examples, {total} steps of {cfg.batch_size} ({ctx.world} process(es) x "
        f"{per_process // micro} micro-batch(es) of {micro}), strategy {ctx.strategy}, device {ctx.device}")

    # FSDP gathers each layer's weights in every process at once: a process whose micro-batch has no image would
    # skip the vision tower's gathers while the others wait in them (cross-attention batches always carry pixels).
    need_images = ctx.strategy == "fsdp" and not collator.format.cross_attention and any(ex.images for ex in data)

    def make_batch(step: int) -> StepBatch:
        mine = ctx.shard(batches.indices(step))
        micro_batches, bad = _encode(collator, data, [mine[i:i + micro] for i in range(0, len(mine), micro)],
                                     cfg.on_bad_record, need_images)
        skipped = int(ctx.sum(len(bad)))
        tokens = ctx.sum(sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches))
        return StepBatch(micro_batches, divisor=tokens, counts={"skipped": skipped},
                         record={"tokens": int(tokens), "epoch": round(batches.epoch_of(step + 1), 4)})

    def after_step(step: int, loss: float) -> None:
        if cfg.eval_every and cfg.eval_task and (step % cfg.eval_every == 0 or step == total):
            metrics.write({"step": step, "eval": _evaluate(cfg, wrapped, processor, step, ctx, say)})
        if on_step is not None:
            on_step(step, loss)

    losses = loop.run(make_batch, token_loss_sum, metrics, after_step)
    if ctx.is_main:
        drawn = draw_if_possible(lambda: plot_training(out), out / LOSS_PNG, "the training curves", say,
                                 then=f", then `vlmkit plot {out}`")
        if drawn:
            say(f"drew the training curves in {drawn}")
    final = adapter = trained = None
    if stage.lora is not None or (cfg.save_final and (ctx.strategy == "fsdp" or stage.quantize is not None)):
        trained = {n: D.full_tensor(p) for n, p in base.named_parameters() if p.requires_grad}  # collective
    if stage.lora is not None and ctx.is_main:
        adapter = save_peft_adapter(trained, base.cfg, stage, out / ADAPTER, source=m.folder, say=say)
    if cfg.save_final:
        final = save_merged(wrapped, cfg, stage, out / FINAL, ctx, source=m.folder, trained=trained)
        say(f"saved the merged model (Hugging Face format) to {final}")
    D.shutdown(ctx)
    return {"losses": losses, "trainable": plan.trainable, "trainable_by_part": plan.trainable_by_part,
            "samples_per_s": loop.samples_per_s, "final": final, "adapter": adapter,
            "skipped": loop.counters["skipped"], "skipped_nonfinite": loop.nonfinite, "examples": len(data)}


def _encode(collator: Collator, data, chunks: list, on_error: str, need_images: bool) -> tuple[list, list]:
    """Micro-batches of this process's examples; bad ones reported (index, reason) and skipped or raised. A
    micro-batch left empty (or, with `need_images`, without an image) gets a stand-in example whose labels are all
    masked, so every process runs the same forward/backward collectives while the update stays unchanged."""
    batches, bad = [], []
    for chunk in chunks:
        rows = []
        for i in chunk:
            try:
                rows.append(collator.encode(data[i]))
            except DataError as e:
                where = f"{data[i].source} record {data[i].index}"
                if on_error == "raise":
                    raise DataError(f"{where}: {e}") from None
                print(f"warning: skipping {where} (example {i}): {e}", file=sys.stderr, flush=True)
                bad.append((i, str(e)))
        if not rows or (need_images and not any(r.pixels is not None and len(r.pixels) for r in rows)):
            rows.append(_stand_in(collator, data, with_image=need_images))
        batches.append(collator.collate(rows))
    return batches, bad


def _stand_in(collator: Collator, data, with_image: bool):
    for i in range(len(data)):
        if with_image and not data[i].images:
            continue
        try:
            row = collator.encode(data[i])
        except DataError:
            continue
        row.labels = [-100] * len(row.labels)
        return row
    raise DataError("no example of the data set can be encoded")


def _evaluate(cfg: FinetuneConfig, wrapped, processor, step: int, ctx, say) -> dict:
    """The eval harness on the model as it is now. DDP / one process: the first process evaluates while the others
    wait. FSDP: every process must take part in each forward pass, so all evaluate; the first one writes."""
    from ..api import VLM
    from ..eval.runner import evaluate

    base = D.unwrap(wrapped)
    results = {}
    if ctx.is_main or ctx.strategy == "fsdp":
        base.eval()
        folder = Path(cfg.out) / "eval" / f"step-{step}" if ctx.is_main else Path(tempfile.mkdtemp())
        try:
            r = evaluate(VLM(base, processor, Path(cfg.model)), cfg.eval_task, cfg.eval_data, limit=cfg.eval_limit,
                         output_dir=folder, overwrite=True, model_name=f"{Path(cfg.model).name}@{step}",
                         log=lambda s: None, progress=False)
            results = r["metrics"]
            say(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()
                                                      if isinstance(v, (int, float))))
        finally:
            base.train()
            if not ctx.is_main:
                shutil.rmtree(folder, ignore_errors=True)
    ctx.barrier()
    return results


def save_peft_adapter(trained: dict, model_cfg, stage, folder: Path, source: Path, say) -> Optional[Path]:
    """The trained LoRA (and connector) as a peft adapter for the base model; a stage that trains more than a peft
    LoRA adapter holds (e.g. the whole decoder) gets none, said in the log."""
    from ..checkpoints.peft import AdapterError, save_adapter

    try:
        folder = save_adapter(folder, model_cfg, trained, stage.lora.r, stage.lora.alpha,
                              base_model=str(Path(source).resolve()))
    except AdapterError as e:
        say(f"no peft adapter written ({e}); final/ holds the merged model")
        return None
    say(f"saved the LoRA adapter (peft format) to {folder}")
    return folder


def save_merged(wrapped, cfg: FinetuneConfig, stage, folder: Path, ctx, source: Path,
                trained: Optional[dict] = None) -> Optional[Path]:
    """LoRA merged into the base weights, saved as a Hugging Face folder (+ the processor files) in the checkpoint's
    own dtype. Under FSDP (weights sharded) or over a quantized base (merged into the ORIGINAL float weights, not
    the dequantized ones), the first process rebuilds the float model and loads the trained tensors into it
    (`trained`: them gathered already, else gathered here)."""
    from ..api import load
    from ..checkpoints.folders import PROCESSOR_FILES, card_defaults
    from ..checkpoints.hf import save_model
    from ..checkpoints.model_card import write_model_card
    from .lora import merge_lora

    model = D.unwrap(wrapped)
    if ctx.strategy == "fsdp" or stage.quantize is not None:
        if trained is None:
            trained = {n: D.full_tensor(p) for n, p in model.named_parameters() if p.requires_grad}  # collective
        if not ctx.is_main:
            return None
        model = load(source, dtype=torch.float32).model
        apply_stage(model, replace(stage, quantize=None), seed=cfg.seed)
        unknown = sorted(set(trained) - set(model.state_dict()))
        if unknown:
            raise ValueError(f"trained tensors {unknown[:5]} have no place in the float model")
        model.load_state_dict(trained, strict=False)
    elif not ctx.is_main:
        return None
    model = model.cpu().eval()
    merge_lora(model)
    hf = model.cfg.extra.get("hf_config", {})
    dtype = hf.get("dtype") or hf.get("torch_dtype")
    if dtype in ("float16", "bfloat16"):
        model.to(getattr(torch, dtype))
    save_model(model, folder)
    for name in PROCESSOR_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    # The card shows file names, not this machine's paths.
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("model", "data", "out", "save_final")}
    settings.update({k: Path(settings[k]).name for k in ("eval_data", "image_root") if settings.get(k)})
    write_model_card(folder, model=model, source=source, training={**settings, "stage": stage_dict(stage)},
                     metrics=Path(cfg.out) / METRICS, datasets=cfg.data, title=Path(cfg.out).name,
                     **card_defaults(source))
    return folder
