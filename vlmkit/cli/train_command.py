"""`vlmkit train`: fine-tune a Hugging Face folder on local data (vlmkit.train.finetune)."""

from __future__ import annotations

import os

from .common import PROG, CLIError, arg, command, float_in, positive_int, status


@command("train", "fine-tune a model on local data (--model M --data FILE --stage ...)",
         arg("--model", "-m", default=None, metavar="M", help="the model to fine-tune: a Hugging Face folder"),
         arg("--data", "-d", action="append", default=[], metavar="PATH",
             help="training data (repeat for several): LLaVA JSON, The Cauldron, OBELICS-style interleaved, caption "
                  "pairs; .json/.jsonl/.parquet/.arrow, a datasets folder, or a folder of images + .txt captions"),
         arg("--out", default="runs/finetune", metavar="DIR",
             help="working folder: checkpoint, metrics.jsonl, final/, adapter/ (LoRA stages: peft format) "
                  "(resumable; default runs/finetune)"),
         arg("--batch-size", type=positive_int, default=8,
             help="samples per step, all processes together (default 8)"),
         arg("--format", default="auto", choices=["auto", "llava", "cauldron", "interleaved", "captions"],
             help="record format (default: detected)"),
         arg("--split", default=None, help="the split of a datasets / Hub folder"),
         arg("--image-root", default=None, metavar="DIR", help="where relative image paths live"),
         arg("--on-bad-record", choices=["skip", "raise"], default="skip",
             help="a malformed record: report and skip it (default, counted), or stop"),
         arg("--stage", default="lora", metavar="NAME",
             help="llava-stage1, llava-stage2, idefics, lora, qlora, full, or a .json stage file (default lora)"),
         arg("--train", default=None, metavar="PARTS",
             help="override the stage's trained parts: comma list of vision,connector,cross_attention,decoder,"
                  "extra_embeddings,lora"),
         arg("--steps", type=positive_int, default=None, help="optimizer steps (default: --epochs over the data)"),
         arg("--epochs", type=float, default=1.0, help="passes over the data when --steps is not given"),
         arg("--micro-batch-size", type=positive_int, default=None, metavar="N",
             help="samples per forward pass and process; the rest is gradient accumulation"),
         arg("--lr", type=float, default=None, help="peak learning rate (default: the stage's)"),
         arg("--warmup", type=float_in(0, 1), default=None, help="warmup fraction (default: the stage's, 0.03)"),
         arg("--weight-decay", type=float, default=None),
         arg("--grad-clip", type=float, default=1.0, help="gradient norm clip (0: off)"),
         arg("--max-length", type=positive_int, default=None, help="longer examples are reported and skipped"),
         arg("--group-by-length", action="store_true", help="batch examples of similar length together"),
         arg("--pack", type=positive_int, default=None, metavar="TOKENS",
             help="pack several examples per row, up to TOKENS tokens"),
         arg("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
             help="autocast dtype (default: bf16 on GPUs and on CPUs with bf16 units, else fp32); weights stay "
                  "float32"),
         arg("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass"),
         arg("--strategy", choices=["auto", "none", "ddp", "fsdp"], default="auto",
             help="data parallelism under torchrun (default: DDP when several processes)"),
         arg("--device", default="auto", help="auto (the default: CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N "
             "or mps"),
         arg("--seed", type=int, default=0),
         arg("--log-every", type=positive_int, default=10, metavar="N"),
         arg("--ckpt-every", type=positive_int, default=100, metavar="N", help="checkpoint every N steps"),
         arg("--eval-every", type=int, default=0, metavar="N", help="run --eval-task every N steps (0: never)"),
         arg("--eval-task", default=None, metavar="NAME", help="an eval task (see vlmkit eval)"),
         arg("--eval-data", default=None, metavar="PATH", help="its data"),
         arg("--eval-limit", type=positive_int, default=50, metavar="N", help="items per evaluation"),
         arg("--lora-r", type=positive_int, default=None), arg("--lora-alpha", type=float, default=None),
         arg("--quantize", choices=["int8", "int4"], default=None, help="frozen base quantized under LoRA"),
         arg("--template", choices=["chat", "plain"], default=None,
             help="labels on chat answers, or LLaVA's plain images + caption (default: the stage's)"),
         arg("--no-final", action="store_true", help="do not write the merged model to OUT/final"),
         arg("--skip-nonfinite", action="store_true",
             help="skip a batch whose loss or gradient is NaN or infinite (counted in metrics.jsonl as "
                  "skipped_nonfinite) instead of stopping the run with an error naming the step"),
         description="Fine-tune a model on local data (--model M --data FILE --stage ...). The embedded default "
                     "model is reproduced by `python -m recipes.default_model` in a source checkout.")
def cmd_train(args) -> int:
    if not args.model or not args.data:
        raise CLIError("give --model FOLDER and --data FILE to fine-tune")
    if not os.path.isfile(os.path.join(os.path.expanduser(args.model), "config.json")):
        raise CLIError(f"{args.model!r} is not a model folder (no config.json)")
    for path in args.data:
        if not os.path.exists(path):
            raise CLIError(f"data {path!r} does not exist")
    from ..train.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(
        model=args.model, data=list(args.data), out=args.out, stage=args.stage,
        format=args.format, split=args.split, image_root=args.image_root, on_bad_record=args.on_bad_record,
        steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, max_length=args.max_length, group_by_length=args.group_by_length,
        pack_length=args.pack, precision=args.precision, gradient_checkpointing=args.gradient_checkpointing,
        strategy=args.strategy, device=args.device, seed=args.seed, log_every=args.log_every,
        ckpt_every=args.ckpt_every, eval_every=args.eval_every, eval_task=args.eval_task, eval_data=args.eval_data,
        eval_limit=args.eval_limit, save_final=not args.no_final, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        quantize=args.quantize, template=args.template, skip_nonfinite=args.skip_nonfinite,
        train_parts=[p.strip() for p in args.train.split(",") if p.strip()] if args.train else None)
    result = finetune(cfg)
    if os.environ.get("RANK", "0") == "0":  # torchrun: the first process reports
        skipped = (f"; {result['skipped']} examples skipped (bad images or too long; counted each time read)"
                   if result["skipped"] else "")
        if result["skipped_nonfinite"]:
            skipped += f"; {result['skipped_nonfinite']} batches skipped for a non-finite loss"
        where = f"model in {result['final']}" if result["final"] else f"checkpoint in {cfg.out}"
        if result.get("adapter"):
            where += f", peft adapter in {result['adapter']}"
        status(f"{PROG} train: {len(result['losses'])} steps, {result['samples_per_s']:.2f} samples/s; "
               f"{where}{skipped}")
    return 0
