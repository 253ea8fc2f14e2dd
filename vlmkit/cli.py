"""The `vlmkit` command line.

    vlmkit run [--model M] --image a.png [--image b.png] [--max-new-tokens N] [--temperature T] "question"
    vlmkit chat [--model M] [--image PATH] [--system TEXT]      (stdin lines; /image PATH, /reset, /help, /exit)
    vlmkit info M [--json]

Answers stream to stdout; status lines and errors go to stderr. Bad input (missing model folder, unreadable image, an
image URL, placeholder/image count mismatch, prompt over the context, bad flag values) ends with one line
`vlmkit: error: ...` and exit code 2; an unexpected failure with exit code 1 (set VLMKIT_DEBUG=1 for the traceback).

Adding a subcommand: one function decorated with `@command(name, help, *arguments)`; nothing else to register.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Callable, Optional

PROG = "vlmkit"
USAGE_ERROR, FAILURE = 2, 1


class CLIError(Exception):
    """An error the user can fix; printed as one line."""

    def __init__(self, message: str, code: int = USAGE_ERROR):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------------ registry

def arg(*flags, **kwargs) -> tuple:
    """One `add_argument` call, kept for later: arg("--json", action="store_true", help=...)."""
    return flags, kwargs


COMMANDS: dict[str, tuple[str, tuple, Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, *arguments: tuple):
    """Register `func(args) -> exit code` as `vlmkit NAME` with the given `arg(...)` specs."""
    def register(func):
        COMMANDS[name] = (help, arguments, func)
        return func
    return register


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _float_in(low: float, high: float, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open else '['}{low}, {high}], got {text}")
        return value
    return parse


def _dtypes() -> list[str]:
    return ["float32", "fp32", "float16", "fp16", "bfloat16", "bf16"]


MODEL = (
    arg("--model", "-m", default="default", metavar="M",
        help="model folder in Hugging Face format, or 'default' (the embedded model)"),
    arg("--dtype", choices=_dtypes(), default=None, help="weights dtype (default: as stored)"),
    arg("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)"),
    arg("--quantize", choices=["int8", "int4"], default=None, help="weight-only quantization"),
)
GENERATION = (
    arg("--max-new-tokens", type=_positive_int, default=256, metavar="N", help="answer length cap (default 256)"),
    arg("--temperature", type=_float_in(0, 100), default=0.0, metavar="T",
        help="sampling temperature; 0 (the default) decodes greedily"),
    arg("--top-p", type=_float_in(0, 1, low_open=True), default=1.0, metavar="P", help="nucleus sampling mass"),
    arg("--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest tokens (0 = off)"),
    arg("--repetition-penalty", type=_float_in(0, 100, low_open=True), default=1.0, metavar="R"),
    arg("--seed", type=int, default=None, metavar="S", help="random seed for sampling"),
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line gives one line (and exit code 2), not the whole usage block."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog=PROG, description="Open vision-language models on your machine.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, arguments, func) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        for flags, kwargs in arguments:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(func=func)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a bad flag (argparse has printed its usage line)
        return e.code if isinstance(e.code, int) else USAGE_ERROR
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        return _fail(str(e), e.code)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    except BrokenPipeError:  # `vlmkit run ... | head`
        _quiet_stdout()
        return 0
    except Exception as e:  # noqa: BLE001 -- one line, not a traceback; VLMKIT_DEBUG shows it
        if os.environ.get("VLMKIT_DEBUG"):
            raise
        code, message = _classify_error(e)
        return _fail(message, code)


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"{PROG}: error: {_one_line(message)}\n")
    return code


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "unknown error"


def _classify_error(e: Exception) -> tuple[int, str]:
    """Map the library's exceptions to (exit code, message)."""
    from .processing.images import ImageError

    if isinstance(e, FileNotFoundError):
        return USAGE_ERROR, str(e.args[0] if len(e.args) == 1 else e)
    if isinstance(e, ImageError):
        return USAGE_ERROR, f"bad image: {e}"
    if isinstance(e, NotImplementedError):
        return USAGE_ERROR, str(e)
    if isinstance(e, ValueError):  # PromptError, CheckpointError, generation settings, prompt too long
        return USAGE_ERROR, str(e)
    return FAILURE, f"{type(e).__name__}: {e}"


def _quiet_stdout() -> None:
    try:  # stdout's reader is gone: silence the flush at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


# ------------------------------------------------------------------------------------------------ helpers

def _load_model(args):
    """The model named by --model, with its dtype / device / quantize options."""
    name = args.model
    if name != "default" and not os.path.isdir(os.path.expanduser(name)):  # before importing torch (seconds)
        what = "is a file, not a model folder" if os.path.exists(name) else "does not exist"
        raise CLIError(f"model folder {name!r} {what}")
    if name != "default" and not os.path.isfile(os.path.join(os.path.expanduser(name), "config.json")):
        raise CLIError(f"{name!r} is not a model folder: it has no config.json")
    from . import api

    if name == "default" and not (api.default_model_path() / "config.json").is_file():
        raise CLIError("no model given and the embedded default model is not installed; pass --model FOLDER "
                       "(a local Hugging Face folder)")
    try:
        return api.load(name, dtype=args.dtype, device=args.device, quantize=args.quantize)
    except NotImplementedError as e:
        raise CLIError(f"--quantize {args.quantize}: {e}") from None


def _check_image_files(paths) -> None:
    """Cheap checks of every image path, before any is decoded: not a URL (the CLI reads local files only, so
    nothing is fetched on a command line's behalf), an existing, readable file whose header is an image's."""
    from PIL import Image, UnidentifiedImageError

    for path in paths or []:
        if re.match(r"[a-z][a-z0-9+.-]*://", path, re.IGNORECASE):
            raise CLIError(f"image {path[:100]!r} is a URL: vlmkit run and chat do not fetch URLs; download the "
                           "image and pass the file's path")
        if not os.path.exists(path):
            raise CLIError(f"image file {path!r} does not exist")
        if not os.path.isfile(path):
            raise CLIError(f"image {path!r} is not a file" + (" (a folder)" if os.path.isdir(path) else ""))
        try:
            with Image.open(path):  # reads the header only
                pass
        except UnidentifiedImageError:
            raise CLIError(f"cannot read image {path!r}: not a recognised image file") from None
        except OSError as e:
            raise CLIError(f"cannot read image {path!r}: {e.strerror or e}") from None


def _load_images(paths) -> list:
    """Open every image up front (before the model loads) so a bad file fails fast, naming the file."""
    from .processing.images import ImageError, load_image

    _check_image_files(paths)
    images = []
    for path in paths or []:
        try:
            images.append(load_image(path))
        except ImageError as e:
            raise CLIError(f"cannot read image {path!r}: {e.reason}") from None
    return images


def _generation_options(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                temperature=args.temperature if args.temperature > 0 else 1.0, top_p=args.top_p,
                top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)


def _write_stream(pieces) -> str:
    out = []
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        out.append(piece)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(out)


def _status(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


# ------------------------------------------------------------------------------------------------ commands

@command("run", "answer one prompt about images, streaming the answer",
         *MODEL, *GENERATION,
         arg("--image", "-i", action="append", default=[], metavar="PATH",
             help="an image (repeat for several); placed where the prompt's <image> placeholders are, else first"),
         arg("--system", default=None, metavar="TEXT", help="a system message"),
         arg("prompt", help="the question or instruction"))
def cmd_run(args) -> int:
    from .tasks import Chat, user_content

    if not args.prompt.strip() and not args.image:
        raise CLIError("the prompt is empty")
    # Everything about the input is checked before the model loads (seconds): paths and headers, the count of
    # <image> placeholders against the images, then every image decoded.
    _check_image_files(args.image)
    user_content(args.prompt, args.image)
    images = _load_images(args.image)
    m = _load_model(args)
    chat = Chat(m, system=args.system)
    _write_stream(chat.stream(args.prompt, images, **_generation_options(args)))
    return 0


CHAT_HELP = "commands: /image PATH (attach to the next turn), /reset (forget the conversation), /help, /exit"


@command("chat", "multi-turn chat in the terminal (reads lines from stdin)",
         *MODEL, *GENERATION,
         arg("--image", "-i", action="append", default=[], metavar="PATH", help="an image for the first turn"),
         arg("--system", default=None, metavar="TEXT", help="a system message"))
def cmd_chat(args) -> int:
    from .processing.images import ImageError
    from .tasks import Chat

    pending = _load_images(args.image)
    m = _load_model(args)
    chat = Chat(m, system=args.system)
    options = _generation_options(args)
    interactive = sys.stdin.isatty()
    failed = False  # a bad turn or /image: reported, the chat goes on, the exit code is 2
    if interactive:
        _status(f"{PROG} chat with {m.info()['family']} model {args.model}; {CHAT_HELP}")
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:  # EOF
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            name, _, rest = line.partition(" ")
            rest = rest.strip()
            if name in ("/exit", "/quit", "/bye"):
                break
            if name == "/reset":
                chat.reset()
                pending = []
                _status("(conversation cleared)")
            elif name == "/help":
                _status(CHAT_HELP)
            elif name == "/image":
                try:
                    pending += _load_images([rest]) if rest else []
                    _status(f"(image attached: {rest}; {len(pending)} for the next turn)" if rest
                            else "usage: /image PATH")
                except CLIError as e:
                    failed = True
                    _status(f"{PROG}: error: {_one_line(e)}")
            else:
                _status(f"unknown command {name}; {CHAT_HELP}")
            continue
        try:
            pieces = chat.stream(line, pending, **options)
        except (ImageError, ValueError) as e:  # bad turn: say so, keep the conversation as it was
            failed = True
            _status(f"{PROG}: error: {_one_line(e)}")
            continue
        pending = []
        _write_stream(pieces)
    return USAGE_ERROR if failed else 0


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def model_info(m) -> dict:
    """m.info() plus the parameter split (vision / connector / cross-attention / text) and the KV cache size."""
    info = dict(m.info())
    cfg = m.config
    info["family"] = cfg.extra.get("hf_architecture", cfg.family)

    def count(module, keep=lambda name: True) -> int:
        return sum(p.numel() for name, p in module.named_parameters() if keep(name)) if module is not None else 0

    model = m.model
    info["vision_parameters"] = count(getattr(model, "vision", None))
    info["connector_parameters"] = count(getattr(model, "connector", None))
    info["cross_attention_parameters"] = count(getattr(model, "text", None), lambda n: n.startswith("cross_blocks"))
    info["text_parameters"] = count(getattr(model, "text", None)) - info["cross_attention_parameters"]
    t = cfg.text
    itemsize = next(model.parameters()).element_size()
    info["kv_cache_bytes_per_token"] = 2 * t.num_layers * t.num_kv_heads * t.head_dim * itemsize
    return info


@command("info", "describe a model: family, parameters, image tokens, context, memory",
         arg("model", help="model folder in Hugging Face format, or 'default'"),
         arg("--json", action="store_true", help="print JSON"),
         arg("--dtype", choices=_dtypes(), default=None, help="report as loaded in this dtype"))
def cmd_info(args) -> int:
    args.device, args.quantize = None, None
    info = model_info(_load_model(args))
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    n = info["parameters"]
    split = f"vision {info['vision_parameters']:,}, connector {info['connector_parameters']:,}"
    if info["cross_attention_parameters"]:
        split += f", cross-attention {info['cross_attention_parameters']:,}"
    split += f", text {info['text_parameters']:,}"
    rows = [
        ("family", info["family"]), ("architecture", info["architecture"]),
        ("parameters", f"{n:,} ({split})"), ("connector", f"{info['connector']} ({info['merge']} merge)"),
        ("tokens per image", info["tokens_per_image"]), ("image size", f"{info['image_size']} px"),
        ("context length", f"{info['context_length']} tokens"), ("dtype", info["dtype"]),
        ("memory", f"{_human_bytes(info['memory_bytes'])} of weights, "
                   f"{_human_bytes(info['kv_cache_bytes_per_token'])} of KV cache per token"),
        ("folder", info["folder"]),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0



@command("train", "fine-tune a model on local data (--model M --data FILE --stage ...), or train the embedded "
                  "default model (--recipe default)",
         arg("--recipe", choices=["default"], default=None,
             help="'default' reproduces the embedded default model (the other flags below do not apply to it "
                  "except --out, --batch-size, --shape-steps, --vision-steps, --word-steps, --word-class-weight, "
                  "--word-position-scale, --word-extreme-scale, --init-vision, --init-from, --language-steps, --lr, "
                  "--ship)"),
         arg("--out", default=None, metavar="DIR",
             help="working folder: checkpoint, metrics.jsonl, final/ (resumable; default runs/default for "
                  "--recipe default, runs/finetune otherwise)"),
         arg("--shape-steps", type=int, default=600,
             help="--recipe default: steps of the first vision-only stage (shapes alone; 0 skips it)"),
         arg("--vision-steps", type=int, default=400, help="--recipe default: steps of the vision-only stage"),
         arg("--word-steps", type=int, default=300,
             help="--recipe default: steps of stage 0c, image tokens taught to be word-like (0 skips it)"),
         arg("--word-class-weight", type=float, default=1.0,
             help="--recipe default: weight of the closest-word classification term in stage 0c and in stage 1's "
                  "auxiliary loss (v6: 1; v5 shipped with 0, see the model card)"),
         arg("--word-position-scale", type=float, default=0.5,
             help="--recipe default: how much of an object's position words ('left', 'top', ...) its image token "
                  "carries in stage 0c's targets (v7: 0.5; 0 before)"),
         arg("--word-extreme-scale", type=float, default=0.5,
             help="--recipe default: how much of 'biggest' / 'smallest' the image token of the object "
                  "they name carries in stage 0c's targets, with its own classification term (v8: 0.5; 0 before)"),
         arg("--init-from", default=None, metavar="DIR",
             help="--recipe default: go on training this adapter folder (an earlier default model: ViT, connector "
                  "and LoRA) in stages 0c and 1"),
         arg("--init-vision", default=None, metavar="DIR",
             help="--recipe default: take the ViT of this adapter folder (an earlier default model) instead of "
                  "training it in the shape and vision stages"),
         arg("--language-steps", type=int, default=800, help="--recipe default: steps of the language stage"),
         arg("--batch-size", type=_positive_int, default=None,
             help="samples per step, all processes together (default 16 for --recipe default, 8 otherwise)"),
         arg("--ship", default=None, metavar="DIR", help="--recipe default: write the shippable adapter folder here"),
         arg("--model", "-m", default=None, metavar="M", help="the model to fine-tune: a Hugging Face folder"),
         arg("--data", "-d", action="append", default=[], metavar="PATH",
             help="training data (repeat for several): LLaVA JSON, The Cauldron, OBELICS-style interleaved, caption "
                  "pairs; .json/.jsonl/.parquet/.arrow, a datasets folder, or a folder of images + .txt captions"),
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
         arg("--steps", type=_positive_int, default=None, help="optimizer steps (default: --epochs over the data)"),
         arg("--epochs", type=float, default=1.0, help="passes over the data when --steps is not given"),
         arg("--micro-batch-size", type=_positive_int, default=None, metavar="N",
             help="samples per forward pass and process; the rest is gradient accumulation"),
         arg("--lr", type=float, default=None,
             help="peak learning rate (default: the stage's; --recipe default: stage 1's, default 1e-3)"),
         arg("--warmup", type=_float_in(0, 1), default=None, help="warmup fraction (default: the stage's, 0.03)"),
         arg("--weight-decay", type=float, default=None),
         arg("--grad-clip", type=float, default=1.0, help="gradient norm clip (0: off)"),
         arg("--max-length", type=_positive_int, default=None, help="longer examples are reported and skipped"),
         arg("--group-by-length", action="store_true", help="batch examples of similar length together"),
         arg("--pack", type=_positive_int, default=None, metavar="TOKENS",
             help="pack several examples per row, up to TOKENS tokens"),
         arg("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
             help="autocast dtype (default: bf16 on GPUs, fp32 on CPUs); weights stay float32"),
         arg("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass"),
         arg("--strategy", choices=["auto", "none", "ddp", "fsdp"], default="auto",
             help="data parallelism under torchrun (default: DDP when several processes)"),
         arg("--device", default=None, help="cpu or cuda (default: cuda when available)"),
         arg("--seed", type=int, default=0),
         arg("--log-every", type=_positive_int, default=10, metavar="N"),
         arg("--ckpt-every", type=_positive_int, default=100, metavar="N", help="checkpoint every N steps"),
         arg("--eval-every", type=int, default=0, metavar="N", help="run --eval-task every N steps (0: never)"),
         arg("--eval-task", default=None, metavar="NAME", help="an eval task (see vlmkit eval)"),
         arg("--eval-data", default=None, metavar="PATH", help="its data"),
         arg("--eval-limit", type=_positive_int, default=50, metavar="N", help="items per evaluation"),
         arg("--lora-r", type=_positive_int, default=None), arg("--lora-alpha", type=float, default=None),
         arg("--quantize", choices=["int8", "int4"], default=None, help="frozen base quantized under LoRA"),
         arg("--template", choices=["chat", "plain"], default=None,
             help="labels on chat answers, or LLaVA's plain images + caption (default: the stage's)"),
         arg("--no-final", action="store_true", help="do not write the merged model to OUT/final"),
         arg("--skip-nonfinite", action="store_true",
             help="skip a batch whose loss or gradient is NaN or infinite (counted in metrics.jsonl as "
                  "skipped_nonfinite) instead of stopping the run with an error naming the step"))
def cmd_train(args) -> int:
    from pathlib import Path

    if args.recipe == "default":
        from .train.default_recipe import train_default

        train_default(Path(args.out or "runs/default"), args.vision_steps, args.language_steps,
                      args.batch_size or 16, Path(args.ship) if args.ship else None, shape_steps=args.shape_steps,
                      word_steps=args.word_steps, init_vision=Path(args.init_vision) if args.init_vision else None,
                      word_class_weight=args.word_class_weight,
                      init_from=Path(args.init_from) if args.init_from else None,
                      position_scale=args.word_position_scale, language_lr=args.lr or 1e-3,
                      extreme_scale=args.word_extreme_scale)
        return 0
    if not args.model or not args.data:
        raise CLIError("give --model FOLDER and --data FILE to fine-tune (or --recipe default)")
    if not os.path.isfile(os.path.join(os.path.expanduser(args.model), "config.json")):
        raise CLIError(f"{args.model!r} is not a model folder (no config.json)")
    for path in args.data:
        if not os.path.exists(path):
            raise CLIError(f"data {path!r} does not exist")
    from .train.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(
        model=args.model, data=list(args.data), out=args.out or "runs/finetune", stage=args.stage,
        format=args.format, split=args.split, image_root=args.image_root, on_bad_record=args.on_bad_record,
        steps=args.steps, epochs=args.epochs, batch_size=args.batch_size or 8,
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
        _status(f"{PROG} train: {len(result['losses'])} steps, {result['samples_per_s']:.2f} samples/s; "
                f"{where}{skipped}")
    return 0


@command("eval", "score a model on a benchmark (vqav2, textvqa, docvqa, chartqa, mmmu, mmbench, synthetic, or a spec)",
         *MODEL,
         arg("--task", "-t", required=True, metavar="NAME", help="a built-in task, or a .yaml/.json task spec file"),
         arg("--data", "-d", default=None, metavar="PATH",
             help="the benchmark: parquet / JSON lines / JSON / TSV, or a folder (datasets save_to_disk, Hub layout)"),
         arg("--split", default=None, help="the split of a folder that holds several (default: validation)"),
         arg("--limit", type=_positive_int, default=None, metavar="N", help="only the first N items"),
         arg("--batch-size", type=_positive_int, default=8, metavar="B", help="prompts generated together (default 8)"),
         arg("--output", "-o", default=None, metavar="DIR",
             help="where predictions.jsonl, results.json and results.md go (default eval-results/TASK-MODEL); "
                  "a rerun with the same model and settings resumes, one with other settings is refused"),
         arg("--max-new-tokens", type=_positive_int, default=None, metavar="N",
             help="answer length cap (default: the task's)"),
         arg("--image-root", default=None, metavar="DIR", help="the folder relative image paths start from"),
         arg("--seed", type=int, default=0, metavar="S", help="seed of MMMU's random choice for unreadable answers"),
         arg("--overwrite", action="store_true",
             help="drop the predictions already in --output instead of resuming (needed to rerun a folder with "
                  "other settings)"))
def cmd_eval(args) -> int:
    from .eval.runner import evaluate

    results = evaluate(lambda: _load_model(args), args.task, args.data, split=args.split, limit=args.limit,
                       batch_size=args.batch_size, output_dir=args.output, max_new_tokens=args.max_new_tokens,
                       seed=args.seed, overwrite=args.overwrite, image_root=args.image_root, model_name=args.model,
                       load_options={"dtype": args.dtype, "quantize": args.quantize})
    sys.stdout.write(results["markdown"])
    _status(f"{PROG} eval: {results['n']} items ({results['failed']} failed); "
            f"predictions and results in {os.path.dirname(results['files']['results'])}")
    return 0


@command("serve", "serve a model over HTTP: OpenAI /v1/chat/completions, Ollama /api/chat and /api/generate, "
                  "a chat page at /",
         *MODEL,
         arg("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"),
         arg("--port", type=_positive_int, default=8000, help="port (default 8000)"),
         arg("--name", default=None, metavar="NAME", help="the model name clients use (default: the folder name)"),
         arg("--allow-remote-images", action="store_true",
             help="fetch http(s) image URLs (never loopback, private or link-local addresses)"),
         arg("--max-batch", type=_positive_int, default=8, metavar="N", help="prompts decoded together (default 8)"),
         arg("--queue-limit", type=_positive_int, default=64, metavar="N",
             help="requests queued or running before new ones get 429 (default 64)"),
         arg("--max-tokens", type=_positive_int, default=4096, metavar="N",
             help="the most new tokens a request may ask for (default 4096, at most the context)"),
         arg("--max-prompt-tokens", type=_positive_int, default=None, metavar="N",
             help="longest prompt accepted, image tokens included (default: the model's context)"),
         arg("--prefill-chunk", type=_positive_int, default=None, metavar="N",
             help="prompt tokens prefilled per scheduler step, between the running requests' decode steps "
                  "(default 64 on CPU, 512 on a GPU)"),
         arg("--max-body-mb", type=_positive_int, default=32, metavar="MB", help="request body cap (default 32)"),
         arg("--max-images", type=_positive_int, default=16, metavar="N", help="images per request (default 16)"),
         arg("--max-image-pixels", type=_positive_int, default=40_000_000, metavar="N",
             help="decoded pixels per image (default 40000000)"),
         arg("--max-request-pixels", type=_positive_int, default=100_000_000, metavar="N",
             help="decoded pixels of all images of one request together, checked before decoding "
                  "(default 100000000: four 6000x4000 photos)"),
         arg("--no-ui", action="store_true", help="no Gradio chat page at /"))
def cmd_serve(args) -> int:
    try:
        from .serve import create_app, default_model_name
        from .serve.app import run
        if not args.no_ui:
            import gradio  # noqa: F401
    except ImportError as e:
        raise CLIError(f"vlmkit serve needs the serve extra ({e.name} is missing): pip install 'vlmkit[serve]'"
                       + ("" if args.no_ui else " (or pass --no-ui)")) from None
    from .processing.images import ImageLimits

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        _status(f"warning: binding {args.host}: anyone who can reach this address can use the model")
    m = _load_model(args)
    limits = ImageLimits(max_pixels=args.max_image_pixels, max_images=args.max_images,
                         max_request_pixels=args.max_request_pixels, allow_remote=args.allow_remote_images,
                         allow_paths=False)
    name = args.name or default_model_name(args.model)
    app = create_app(m, model_name=name, limits=limits, max_batch=args.max_batch, queue_limit=args.queue_limit,
                     max_tokens_limit=args.max_tokens, max_body_bytes=args.max_body_mb * 1024 * 1024,
                     ui=not args.no_ui, max_prompt_tokens=args.max_prompt_tokens, prefill_chunk=args.prefill_chunk)
    _status(f"{PROG} serve: {name!r} on http://{args.host}:{args.port} (OpenAI API /v1, Ollama API /api"
            + ("" if args.no_ui else ", chat page /") + ")")
    run(app, host=args.host, port=args.port)
    return 0

@command("bench", "time vlmkit against transformers and llama.cpp on this machine (float32 / int8 / int4) and "
                  "write bench/results.md (runs from a source checkout: the code is in bench/)",
         arg("--model", "-m", default="default", metavar="M",
             help="the VLM to time (default: the embedded model, else runs/default, else its architecture untrained)"),
         arg("--quantize", choices=["int8", "int4"], default=None, help="time float32 and only this mode"),
         arg("--out", default=None, metavar="FILE", help="where the table goes (default bench/results.md)"),
         arg("--threads", type=_positive_int, default=None, help="threads for every engine (default: all cores)"),
         arg("--new-tokens", type=_positive_int, default=128, metavar="N", help="tokens per decode run"),
         arg("--repeat", type=_positive_int, default=3, metavar="R", help="timed runs per row"),
         arg("--eval-limit", type=int, default=450, metavar="N", help="benchmark items for the accuracy rows"),
         arg("--skip", action="append", default=[], choices=["decode", "vlm", "memory", "accuracy", "profile"]))
def cmd_bench(args) -> int:
    import importlib.util
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "bench"
    if not (folder / "run.py").is_file():
        raise CLIError("vlmkit bench runs from a source checkout (its code is in bench/, next to vlmkit/)")
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location("vlmkit_bench_run", folder / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    if args.out is None:
        args.out = str(folder / "results.md")
    return run.main(args=args)


if __name__ == "__main__":
    sys.exit(main())
