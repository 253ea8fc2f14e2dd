"""What every subcommand shares: the `@command` registry, flag types and flag groups, model and image loading
(checked before torch is imported, so bad input fails in a fraction of a second), and the output helpers."""

from __future__ import annotations

import argparse
import json
import logging
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


def one_line(text: str) -> str:
    return " ".join(str(text).split()) or "unknown error"


# ------------------------------------------------------------------------------------------------ registry

def arg(*flags, **kwargs) -> tuple:
    """One `add_argument` call, kept for later: arg("--json", action="store_true", help=...)."""
    return flags, kwargs


# name -> (help, arg specs, func, description); in registration order, the order of `vlmkit --help`
COMMANDS: dict[str, tuple[str, tuple, Callable[[argparse.Namespace], int], str]] = {}


def command(name: str, help: str, *arguments: tuple, description: Optional[str] = None):
    """Register `func(args) -> exit code` as `vlmkit NAME` with the given `arg(...)` specs; `help` is its line in
    `vlmkit --help` and, unless `description` is given, the description of `vlmkit NAME --help`."""
    def register(func):
        COMMANDS[name] = (help, arguments, func, description or help)
        return func
    return register


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def float_in(low: float, high: float, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open else '['}{low}, {high}], got {text}")
        return value
    return parse


# The spellings vlmkit.api.load accepts; written out so that parsing a command line does not import torch.
DTYPES = ["float32", "fp32", "float16", "fp16", "bfloat16", "bf16"]

MODEL = (
    arg("--model", "-m", default="default", metavar="M",
        help="model folder in Hugging Face format, or 'default' (the embedded model)"),
    arg("--dtype", choices=DTYPES, default=None,
        help="compute dtype of the float parts (default: what is fast on the device: bf16 on GPUs and on CPUs with "
             "bf16 units, fp16 on MPS, fp32 on other CPUs)"),
    arg("--device", default="auto",
        help="auto (the default: CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps"),
    arg("--quantize", choices=["int8", "int4"], default=None, help="weight-only quantization"),
    arg("--mmproj", default=None, metavar="FILE",
        help="llama.cpp projector GGUF; --model is then the text GGUF (a folder holding both needs no --mmproj)"),
)
# Shared by every command that loads a model (serve lists its flags one by one).
ADAPTER = arg("--adapter", default=None, metavar="DIR",
              help="a peft LoRA adapter folder for the model (adapter_config.json + adapter_model.safetensors, as "
                   "`vlmkit train` or peft write it): merged into the weights, or kept beside quantized ones")
MODEL = MODEL + (ADAPTER,)
GENERATION = (
    arg("--max-new-tokens", type=positive_int, default=256, metavar="N", help="answer length cap (default 256)"),
    arg("--temperature", type=float_in(0, 100), default=0.0, metavar="T",
        help="sampling temperature; 0 (the default) decodes greedily"),
    arg("--top-p", type=float_in(0, 1, low_open=True), default=1.0, metavar="P", help="nucleus sampling mass"),
    arg("--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest tokens (0 = off)"),
    arg("--repetition-penalty", type=float_in(0, 100, low_open=True), default=1.0, metavar="R"),
    arg("--seed", type=int, default=None, metavar="S", help="random seed for sampling"),
)

REMOTE_IMAGES = arg("--no-remote-images", action="store_true",
                    help="refuse http(s) image URLs (by default they are downloaded: public addresses only, "
                         "20 MB and 10 s at most)")


LOG_LEVELS = ["debug", "info", "warning", "error", "critical"]
# Every subcommand takes it (cli/__init__.py adds it); absent, logging stays as Python leaves it (warnings only).
LOG_LEVEL = arg("--log-level", type=str.lower, choices=LOG_LEVELS, default=None,
                help="log messages of this level and above to stderr (default: warnings; `serve`: info)")


def configure_logging(level: Optional[str]) -> None:
    """--log-level -> the root logger (every library's messages, vlmkit's included), one line each on stderr."""
    if level is None:
        return
    root = logging.getLogger()
    root.setLevel(level.upper())
    if not root.handlers:  # an embedding program's (or pytest's) handlers are kept
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)


def load_progress(args) -> Optional[bool]:
    """The model load's progress bar: off with --log-level error or critical (asked to be quiet), else auto (on
    when stderr is a terminal, unless VLMKIT_NO_PROGRESS=1)."""
    return False if getattr(args, "log_level", None) in ("error", "critical") else None


# ------------------------------------------------------------------------------------------------ inputs

def load_model(args, describe: bool = False):
    """The model named by --model, with its dtype / device / quantize options (describe: only its `info()` dict,
    read from the config without the weights)."""
    name, mmproj, adapter = args.model, getattr(args, "mmproj", None), getattr(args, "adapter", None)
    if adapter is not None:
        check_adapter_folder(adapter)
    from ..checkpoints.gguf_header import is_gguf_folder  # torch-free

    if mmproj is not None or is_gguf_folder(name):
        return _load_gguf(args, name, mmproj, describe)
    if name != "default" and not os.path.isdir(os.path.expanduser(name)):  # before importing torch (seconds)
        what = "is a file, not a model folder" if os.path.exists(name) else "does not exist"
        raise CLIError(f"model folder {name!r} {what}")
    if name != "default" and not os.path.isfile(os.path.join(os.path.expanduser(name), "config.json")):
        raise CLIError(f"{name!r} is not a model folder: it has no config.json")
    if describe:  # from the config and the checkpoint headers, without torch's second of import where it can
        from ..checkpoints.header_info import describe_from_headers

        info = describe_from_headers(name, dtype=args.dtype, device=args.device,
                                     native_resolution=_native_resolution)
        if info is not None:
            return info
    from .. import api

    if name == "default" and not (api.default_model_path() / "config.json").is_file():
        raise CLIError("no model given and the embedded default model is not installed; pass --model FOLDER "
                       "(a local Hugging Face folder)")
    if describe:
        return api.describe(name, dtype=args.dtype, device=args.device)
    from ..checkpoints.peft import AdapterError

    try:
        return api.load(name, dtype=args.dtype, device=args.device, quantize=args.quantize, adapter=adapter,
                        progress=load_progress(args), allow_remote_images=remote_images_allowed(args))
    except NotImplementedError as e:
        raise CLIError(f"--quantize {args.quantize}: {e}") from None
    except AdapterError as e:
        raise CLIError(f"--adapter {adapter}: {e}") from None


def _native_resolution(folder):
    from ..processing.image_ops import native_resolution_of_folder  # numpy + PIL, no torch: Qwen2-VL folders only

    return native_resolution_of_folder(folder)


def check_adapter_folder(path: str) -> None:
    """The --adapter folder exists and holds a peft adapter's two files (checked before torch is imported)."""
    if not os.path.isdir(os.path.expanduser(path)):
        what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
        raise CLIError(f"adapter folder {path!r} {what}")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not os.path.isfile(os.path.join(os.path.expanduser(path), name)):
            raise CLIError(f"{path!r} is not a peft adapter folder: it has no {name}")


def _load_gguf(args, name: str, mmproj, describe: bool):
    """A llama.cpp pair: --model TEXT.gguf --mmproj MMPROJ.gguf, or --model FOLDER holding both."""
    for label, path in (("--model", name), ("--mmproj", mmproj)):
        if path is not None and mmproj is not None and not os.path.isfile(os.path.expanduser(path)):
            raise CLIError(f"{label} {path!r} is not a GGUF file")
    from .. import api
    from ..checkpoints.folder_config import CheckpointError
    from ..checkpoints.peft import AdapterError

    adapter = getattr(args, "adapter", None)
    try:
        m = api.load(os.path.expanduser(name), dtype=args.dtype, device=args.device,
                     quantize=getattr(args, "quantize", None), mmproj=os.path.expanduser(mmproj) if mmproj else None,
                     adapter=adapter, progress=load_progress(args), allow_remote_images=remote_images_allowed(args))
        return m.info() if describe else m  # a pair has no config.json to describe it from: its weights are read
    except CheckpointError as e:
        raise CLIError(str(e)) from None
    except AdapterError as e:
        raise CLIError(f"--adapter {adapter}: {e}") from None


def is_image_url(path: str) -> bool:
    return path[:8].lower().startswith(("http://", "https://"))


def check_image_files(paths, allow_remote: bool = True) -> None:
    """Cheap checks of every image, before any is decoded: an http(s) URL (fetched later, unless `allow_remote` is
    off), else an existing, readable file whose header is an image's."""
    from PIL import Image, UnidentifiedImageError

    for path in paths or []:
        if is_image_url(path):
            if not allow_remote:
                raise CLIError(f"image {path[:100]!r} is a URL and --no-remote-images is set; download the image "
                               "and pass the file's path")
            continue
        if re.match(r"[a-z][a-z0-9+.-]*://", path, re.IGNORECASE):
            raise CLIError(f"image {path[:100]!r} is a URL vlmkit does not fetch (only http and https); download "
                           "the image and pass the file's path")
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


def load_images(paths, allow_remote: bool = True) -> list:
    """Open (or download: public addresses only, size and time capped) every image up front, before the model
    loads, so a bad file or URL fails fast, naming it."""
    from ..processing.images import ImageError, ImageLimits, load_image

    check_image_files(paths, allow_remote)
    limits = ImageLimits(allow_remote=allow_remote)
    images = []
    for path in paths or []:
        try:
            images.append(load_image(path, limits=limits))
        except ImageError as e:
            if is_image_url(path):
                raise CLIError(f"could not fetch image {e.source}: {e.reason}") from None
            raise CLIError(f"cannot read image {path!r}: {e.reason}") from None
    return images


def remote_images_allowed(args) -> bool:
    """`serve` opts in (--allow-remote-images); every other command fetches unless --no-remote-images."""
    if getattr(args, "allow_remote_images", None) is not None:
        return bool(args.allow_remote_images)
    return not getattr(args, "no_remote_images", False)


STRUCTURED = (
    arg("--json-schema", default=None, metavar="SCHEMA",
        help="the answer is JSON valid against this schema: JSON text or a .json file ('{}': any JSON object)"),
    arg("--regex", default=None, metavar="RE", help="the whole answer matches this regular expression"),
    arg("--grammar", default=None, metavar="LARK",
        help="the answer follows this Lark grammar (llguidance's dialect): text or a file"),
)


def structured_options(args) -> dict:
    """--json-schema / --regex / --grammar as generate()'s options, checked before the model loads."""
    given = [flag for flag in ("json_schema", "regex", "grammar") if getattr(args, flag, None) is not None]
    if len(given) > 1:
        raise CLIError(f"give one of --json-schema, --regex, --grammar, not {len(given)}")
    if not given:
        return {}
    flag, value = given[0], getattr(args, given[0])
    if flag != "regex" and os.path.isfile(os.path.expanduser(value)):
        value = open(os.path.expanduser(value), encoding="utf-8").read()
    if flag == "json_schema":
        try:
            value = json.loads(value)
        except ValueError as e:
            raise CLIError(f"--json-schema is neither a JSON schema nor a file holding one: {e}") from None
        if not isinstance(value, dict):
            raise CLIError(f"--json-schema must be a JSON object, got {type(value).__name__}")
        value = value or True  # '{}': any JSON object
    from ..generation.constraints import Constraint

    try:
        Constraint(flag, value).grammar_text()
    except ValueError as e:
        raise CLIError(f"--{flag.replace('_', '-')}: {e}") from None
    return {flag: value}


def generation_options(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                temperature=args.temperature if args.temperature > 0 else 1.0, top_p=args.top_p,
                top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)


# ------------------------------------------------------------------------------------------------ output

def write_stream(pieces) -> str:
    out = []
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        out.append(piece)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(out)


def status(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
