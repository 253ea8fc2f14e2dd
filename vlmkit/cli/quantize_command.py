"""`vlmkit quantize SRC DST --int4|--int8 [--group-size N]`: quantize a model folder once and write the result,
so later loads read the small weights directly (no float copy, no quantizing at every start)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .common import CLIError, arg, command, load_progress

GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 packer takes


@command("quantize", "write a model folder quantized to int8 or int4, once",
         arg("src", help="model folder in Hugging Face format (or 'default')"),
         arg("dst", help="folder to write (must not exist, or be empty)"),
         arg("--int4", dest="mode", action="store_const", const="int4", help="4-bit groups (decoder), int8 head"),
         arg("--int8", dest="mode", action="store_const", const="int8", help="8-bit per output channel"),
         arg("--group-size", type=int, default=32, help=f"int4 group size, one of {GROUP_SIZES} (default 32)"))
def cmd_quantize(args) -> int:
    src, dst = _check(args)
    from ..api import QUANTIZE_VISION, resolve, write_model_folder
    from ..checkpoints.quantized import load_quantized, saved_quantization

    folder = resolve(src)
    saved = saved_quantization(folder)
    if saved:
        raise CLIError(f"{src!r} is already saved {saved['mode']}-quantized; quantize the float model it came from")
    model = load_quantized(folder, args.mode, vision=QUANTIZE_VISION, group_size=args.group_size,
                           progress=load_progress(args))
    # written beside DST and renamed at the end: an interrupted run leaves no half-written model under DST
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    try:
        write_model_folder(model, tmp, folder)
        if dst.exists():
            dst.rmdir()  # empty (checked): rename needs it gone
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {dst} ({args.mode}, group size {args.group_size})" if args.mode == "int4" else
          f"wrote {dst} ({args.mode})")
    return 0


def _check(args) -> tuple[str, Path]:
    """Every bad input, before torch is imported."""
    if args.mode is None:
        raise CLIError("say how to quantize: --int4 or --int8")
    if args.group_size not in GROUP_SIZES:
        raise CLIError(f"--group-size must be one of {GROUP_SIZES}, got {args.group_size}")
    src = args.src
    if src != "default":
        path = Path(src).expanduser()
        if not path.is_dir():
            raise CLIError(f"model folder {src!r} {'is a file, not a model folder' if path.exists() else 'does not exist'}")
        if not (path / "config.json").is_file():
            raise CLIError(f"{src!r} is not a model folder: it has no config.json")
    dst = Path(args.dst).expanduser()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CLIError(f"{args.dst!r} exists and is not an empty folder; choose a new one")
    if not dst.parent.is_dir():
        raise CLIError(f"{args.dst!r}: its parent folder does not exist")
    return src, dst
