"""`vlmkit export --model M --gguf OUT_DIR [--gguf-type TYPE]`: a model as llama.cpp / Ollama files, a text GGUF and
its `mmproj` GGUF (vision tower + projector), named and described as llama.cpp's own converter writes them."""

from __future__ import annotations

from pathlib import Path

from .common import CLIError, arg, command

GGUF_TYPES = ["f16", "q8_0", "q4_0", "q4_1", "f32"]  # vlmkit.checkpoints.gguf_export.GGUF_TYPES, without torch


@command("export", "write a model as llama.cpp / Ollama GGUF files (text model + mmproj)",
         arg("--model", "-m", default="default", metavar="M",
             help="model folder in Hugging Face format, or 'default' (the embedded model)"),
         arg("--gguf", required=True, metavar="OUT_DIR", help="folder to write <name>-<type>.gguf and mmproj-*.gguf"),
         arg("--gguf-type", choices=GGUF_TYPES, default="f16",
             help="type of the weight matrices (default f16; the mmproj of a 4-bit export is f16)"),
         arg("--name", default=None, help="file name stem (default: the model folder's name)"))
def cmd_export(args) -> int:
    model_path = args.model
    if model_path != "default":
        path = Path(model_path).expanduser()
        if not path.is_dir() or not (path / "config.json").is_file():
            raise CLIError(f"{model_path!r} is not a model folder (a Hugging Face folder with config.json)")
    out = Path(args.gguf).expanduser()
    if out.exists() and not out.is_dir():
        raise CLIError(f"--gguf {args.gguf!r} is a file, not a folder")
    from ..api import load
    from ..checkpoints.folder_config import CheckpointError
    from ..checkpoints.gguf_export import export_gguf

    m = load(model_path, dtype="float32", device="cpu")
    name = args.name or ("default" if model_path == "default" else Path(model_path).resolve().name)
    try:
        text, mmproj = export_gguf(m.model, m.folder, out, name, args.gguf_type)
    except CheckpointError as e:
        raise CLIError(str(e)) from None
    card = write_gguf_card(m, out, name, args.gguf_type, text, mmproj)
    print(f"wrote {text}\nwrote {mmproj}" + (f"\nwrote {card}" if card else ""))
    return 0


def write_gguf_card(m, out: Path, name: str, gguf_type: str, text: Path, mmproj: Path):
    """OUT_DIR/README.md: the Hub's card for a GGUF pair (how llama.cpp, Ollama and vlmkit load it)."""
    from ..checkpoints.folders import card_defaults
    from ..checkpoints.model_card import write_model_card

    usage = "\n".join([
        "```bash",
        f"vlmkit run --model {text.name} --mmproj {mmproj.name} --image photo.jpg \"Describe the image.\"",
        f"llama-mtmd-cli -m {text.name} --mmproj {mmproj.name} --image photo.jpg -p \"Describe the image.\"",
        "```", "",
        "Ollama: a Modelfile with `FROM ./" + text.name + "` then `FROM ./" + mmproj.name + "`, then `ollama create`.",
    ])
    # the Hub files GGUF files as quantized copies of their model (the default model stays SmolLM2's finetune)
    fields = {"base_model_relation": "quantized", **card_defaults(m.folder)}
    return write_model_card(out, model=m.model, source=m.folder, usage=usage, title=f"{name} GGUF ({gguf_type})",
                            tags=["gguf", "llama.cpp", gguf_type], **fields)
