"""`vlmkit info M`: `VLM.info()` as an aligned table, or as JSON."""

from __future__ import annotations

import json

from .common import DTYPES, arg, command, human_bytes, load_model


@command("info", "describe a model: family, parameters, image tokens, context, memory",
         arg("model", help="model folder in Hugging Face format, 'default', or a llama.cpp pair (a folder holding "
             "a text GGUF and its mmproj, or the text GGUF with --mmproj)"),
         arg("--mmproj", default=None, metavar="FILE", help="llama.cpp projector GGUF, with the text GGUF as MODEL"),
         arg("--json", action="store_true", help="print JSON"),
         arg("--dtype", choices=DTYPES, default=None,
             help="report as loaded in this dtype (default: the one chosen for the device)"),
         arg("--device", default="auto", help="report as loaded on this device: auto (the default: CUDA, then "
             "Apple MPS, then CPU), cpu, cuda, cuda:N or mps"))
def cmd_info(args) -> int:
    info = load_model(args, describe=True)  # from the config: no weight is read
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
        ("tokens per image", info["tokens_per_image"] if "anyres_grids" not in info else
         f"up to {info['tokens_per_image']} (anyres tiles on grids "
         f"{', '.join(f'{r}x{c}' for r, c in info['anyres_grids'])} + the whole image)"),
        ("image size", f"{info['image_size']} px" if isinstance(info["image_size"], int) else info["image_size"]),
        ("context length", f"{info['context_length']} tokens"),
        ("device", info["device"]), ("compute dtype", info["dtype"]),
        ("memory", f"{human_bytes(info['memory_bytes'])} of weights, "
                   f"{human_bytes(info['kv_cache_bytes_per_token'])} of KV cache per token"),
        ("folder", info["folder"]),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
