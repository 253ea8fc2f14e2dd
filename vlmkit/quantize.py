"""Weight-only quantization on torch's packed CPU kernels.

- int8: one scale per output channel, `torch.ops.aten._weight_int8pack_mm`.
- int4: groups of `group_size` input channels, asymmetric (w = q * scale + min, q in 0..15; scale and zero point
  in bf16, the kernels' dtype, so a saved model reloads bit for bit), `_weight_int4pack_mm_for_cpu` on the layout of
  `_convert_weight_to_int4pack_for_cpu`. That is GGUF Q4_1's formula with group 32, so Q4_1 tensors become int4
  modules directly, without a float detour (`from_q4_1`: the file's 4-bit values, its block scales in bf16).
- The token table (and the tied output head) is int8 per row in both modes: the head decides every greedy token,
  and llama.cpp keeps it at 8 bits too (SmolLM2's GGUF: Q8_0).

What gets quantized: the decoder's projections (and cross-attention blocks), the token table and head; the vision
tower and connector with `vision=True`. Norms, the patch convolution and position tables stay float.
`load_quantized` builds a quantized model tensor by tensor (never the whole float model at once) from a Hugging
Face folder, an adapter folder (GGUF text model) or a folder written by `save_quantized`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MODES = ("int8", "int4")
DEFAULT_GROUP = 32


def check_mode(mode) -> Optional[str]:
    if mode is None or mode in MODES:
        return mode
    raise ValueError(f"quantize must be one of {MODES} (or None), got {mode!r}")


# The packed CPU kernels are fast with bfloat16 activations only: measured on this project's 2-core AVX-512 box
# (M=1, 576x1536): bf16 52 us, float32 2,400 us (int4) / 1,300 us (int8), float16 as slow. So quantized layers take
# float32 in, run the kernel in bf16 with bf16 scales, and hand float32 back; the residual stream stays float32.
KERNEL_DTYPE = torch.bfloat16
REFINE = 16  # output heads: candidates whose logits are recomputed in float32 (see Int8Linear.project)


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.dtype == KERNEL_DTYPE else x2.to(KERNEL_DTYPE)
    return x2 if x2.is_contiguous() else x2.contiguous()


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 64-byte aligned: tensors read from a safetensors file sit at any offset of the mapping, and
    the int8 kernel crashes (SIGSEGV, seen) on a misaligned weight."""
    t = t.contiguous()
    return t if t.data_ptr() % 64 == 0 else t.clone()


class _Quantized(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        # Empty, but with the model's dtype and device (registered first: the first float buffer): code that reads
        # `module.weight.dtype / .device` keeps working; the weights themselves are in the buffers below.
        self.register_buffer("weight", torch.empty(0, dtype=dtype), persistent=False)

    def _out(self, y: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
        y = y.to(x.dtype) if y.dtype != x.dtype else y
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], n)


# ------------------------------------------------------------------------------------------------ int8

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 [N, K], scales [N]), symmetric per row; scales bf16-exact (the kernel's dtype)."""
    w = w.float()
    scales = (w.abs().amax(1).clamp(min=1e-12) / 127).to(KERNEL_DTYPE).float()
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


class Int8Linear(_Quantized):
    """y = (x @ q.T) * scale (+ bias). On CPU the packed kernel; elsewhere a dequantized F.linear."""

    kind = "int8"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias=None, dtype=torch.float32):
        super().__init__(dtype)
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", _aligned(qweight))
        self.register_buffer("scales", scales.to(KERNEL_DTYPE).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)

    @classmethod
    def from_float(cls, weight, bias=None, dtype=None) -> "Int8Linear":
        return cls(*quantize_int8(weight), bias, dtype or weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return F.linear(x, self.dequantize().to(x.dtype), self.bias)
        y = torch.ops.aten._weight_int8pack_mm(_rows(x, self.in_features), self.qweight, self.scales)
        return self._out(y, x, self.out_features)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """As an output head: the kernel's logits are bf16-rounded (0.125 apart near 25: greedy near-ties flip), so
        the `REFINE` best rows are recomputed exactly in float32 (int8 weights, float32 activations)."""
        y = Int8Linear.forward(self, h) if self.bias is None else Int8Linear.forward(self, h) - self.bias
        flat, hf = y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]).float()
        idx = flat.topk(min(REFINE, flat.shape[-1]), dim=-1).indices  # [rows, k]
        rows = self.qweight[idx].float() * self.scales[idx].float()[..., None]  # [rows, k, K]
        exact = torch.bmm(rows, hf[:, :, None])[..., 0].to(flat.dtype)
        y = flat.scatter(-1, idx, exact).reshape(y.shape)
        return y if self.bias is None else y + self.bias

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]

    def export(self) -> dict:
        return {"qweight": self.qweight, "scales": self.scales.float()}

    @classmethod
    def from_export(cls, t: dict, bias=None, dtype=torch.float32, group_size=None) -> "Int8Linear":
        return cls(t["qweight"], t["scales"], bias, dtype)


class Int8Embedding(Int8Linear):
    """Token table as int8 rows + a scale per row; `project(h)` is the tied output head on the same table."""

    kind = "embed8"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, dtype=torch.float32):
        super().__init__(qweight, scales, None, dtype)
        self.num_embeddings, self.embedding_dim = qweight.shape

    @classmethod
    def from_float(cls, weight, dtype=None) -> "Int8Embedding":
        return cls(*quantize_int8(weight), dtype or weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        dtype = self.weight.dtype
        return self.qweight[ids].to(dtype) * self.scales[ids].to(dtype).unsqueeze(-1)

    @classmethod
    def from_export(cls, t: dict, bias=None, dtype=torch.float32, group_size=None) -> "Int8Embedding":
        return cls(t["qweight"], t["scales"], dtype)


# ------------------------------------------------------------------------------------------------ int4

def quantize_int4(w: torch.Tensor, group_size: int = DEFAULT_GROUP):
    """[N, K] float -> (q uint8 [N, K] in 0..15, scales [N, K/g], mins [N, K/g]); w ~ q * scale + min, with scale
    and the kernel's zero (min + 8 scale) bf16-exact, as the module keeps them."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=2**-20).to(KERNEL_DTYPE).float()
    mins = _bf16_mins(lo, scales)
    q = torch.round((wg - mins[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(n, k), scales, mins


def _bf16_mins(mins: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The min the kernel will really use: its zero point (min + 8 scale) is rounded to bf16."""
    return (mins + 8 * scales).to(KERNEL_DTYPE).float() - 8 * scales


def int4_supported(n: int, k: int, group_size: int) -> bool:
    return k % group_size == 0 and group_size in (32, 64, 128, 256) and n % 16 == 0  # the packer's limits


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> uint8 [N, K/2]: column 2j in the low nibble, 2j + 1 in the high one."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1)


class Int4Linear(_Quantized):
    """Group-wise int4 weights in the CPU kernel's packed layout (only that copy is kept: `export` recovers the
    plain values by running the kernel on an identity matrix, so saving needs no knowledge of the layout)."""

    kind = "int4"

    def __init__(self, q: torch.Tensor, scales, mins, group_size: int, bias=None, dtype=torch.float32):
        super().__init__(dtype)
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).contiguous(), 2))
        # the kernel's form: [K/g, N, 2] = (scale, zero) with w = (q - 8) * scale + zero
        sz = torch.stack([scales.float().t(), (mins.float() + 8 * scales.float()).t()], dim=-1)
        self.register_buffer("scales_and_zeros", sz.to(KERNEL_DTYPE).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)

    @classmethod
    def from_float(cls, weight, bias=None, dtype=None, group_size: int = DEFAULT_GROUP) -> "Int4Linear":
        return cls(*quantize_int4(weight, group_size), group_size, bias, dtype or weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(_rows(x, self.in_features), self.packed, self.group_size,
                                                        self.scales_and_zeros)
        return self._out(y, x, self.out_features)

    project = forward

    def values(self) -> torch.Tensor:
        """The 4-bit values [N, K] (uint8), read through the kernel itself with scale 1 and zero 8 on an identity
        matrix: every number involved is a small integer, exact in bf16."""
        eye = torch.eye(self.in_features, dtype=KERNEL_DTYPE, device=self.packed.device)
        unit = torch.empty_like(self.scales_and_zeros)
        unit[..., 0], unit[..., 1] = 1, 8
        q = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, unit)
        return q.t().round().to(torch.uint8).contiguous()

    def _scales_mins(self):
        sz = self.scales_and_zeros.float()
        scales = sz[..., 0].t().contiguous()
        return scales, (sz[..., 1].t() - 8 * scales).contiguous()

    def dequantize(self) -> torch.Tensor:
        scales, mins = self._scales_mins()
        q = self.values().float().reshape(self.out_features, -1, self.group_size)
        return (q * scales[..., None] + mins[..., None]).reshape(self.out_features, self.in_features)

    def export(self) -> dict:
        scales, mins = self._scales_mins()
        return {"qweight": pack_nibbles(self.values()), "scales": scales, "mins": mins}

    @classmethod
    def from_export(cls, t: dict, bias=None, dtype=torch.float32, group_size=DEFAULT_GROUP) -> "Int4Linear":
        return cls(unpack_nibbles(t["qweight"]), t["scales"], t["mins"], group_size, bias, dtype)


def from_q4_1(raw: np.ndarray, rows: int, cols: int, dtype=torch.float32, row_order=None) -> Int4Linear:
    """A GGUF Q4_1 tensor (uint8 [rows, cols / 32 * 20]: per block of 32 a float16 scale d, a float16 min m and
    16 bytes holding elements i (low nibble) and i + 16 (high)) as an Int4Linear with group 32: the same
    weights, w = q * d + m. row_order: a permutation of the rows (llama.cpp's q/k RoPE order -> ours)."""
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // 32, 20)
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    qs = torch.from_numpy(blocks[..., 4:].copy())
    q = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(rows, cols)
    if row_order is not None:
        q, d, m = q[row_order], d[row_order], m[row_order]
    d = d.to(KERNEL_DTYPE).float()  # the kernel's bf16 block scales (the 4-bit values stay exactly the file's)
    return Int4Linear(q, d, _bf16_mins(m, d), 32, None, dtype)


# ------------------------------------------------------------------------------------------------ model

QUANT_MODULES = (Int8Linear, Int4Linear, Int8Embedding)
BUILDERS = {"int8": Int8Linear, "int4": Int4Linear, "embed8": Int8Embedding}


def target_kinds(model: nn.Module, mode: str, vision: bool = False, group_size: int = DEFAULT_GROUP) -> dict:
    """module name -> "int8" | "int4" | "embed8" for every module `mode` quantizes. int4 falls back to int8 where
    the kernel cannot take the shape (input width not a multiple of the group, odd row counts)."""
    check_mode(mode)
    kinds = {}
    for name, module in model.named_modules():
        local = name[len("text."):] if name.startswith("text.") else name
        if isinstance(module, nn.Embedding) and local == "embed_tokens":
            kinds[name] = "embed8"
        elif isinstance(module, nn.Linear) and local == "lm_head":
            kinds[name] = "int8"
        elif isinstance(module, nn.Linear) and (
            local.startswith(("layers.", "cross_blocks.")) and not name.startswith(("vision.", "connector."))
            or vision and name.startswith(("vision.", "connector."))
        ):
            n, k = module.weight.shape
            kinds[name] = "int4" if mode == "int4" and int4_supported(n, k, group_size) else "int8"
    return kinds


def make_module(kind: str, weight: torch.Tensor, bias=None, dtype=None, group_size: int = DEFAULT_GROUP):
    dtype = dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
    if kind == "embed8":
        return Int8Embedding.from_float(weight, dtype)
    if kind == "int4":
        return Int4Linear.from_float(weight, bias, dtype, group_size)
    return Int8Linear.from_float(weight, bias, dtype)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, vision: bool = False, group_size: int = DEFAULT_GROUP) -> nn.Module:
    """Replace the target modules of a float model in place (module by module, so the float copy of each goes
    away as its quantized one arrives). Returns the model, with `model.quantization` describing what was done."""
    if mode == "int4" and next(model.parameters()).device.type != "cpu":
        raise ValueError("int4 runs on torch's CPU kernels: quantize on the CPU, with device='cpu'")
    kinds = target_kinds(model, mode, vision, group_size)
    for name, kind in kinds.items():
        module = model.get_submodule(name)
        bias = getattr(module, "bias", None)
        model.set_submodule(name, make_module(kind, module.weight.data, None if bias is None else bias.data,
                                              group_size=group_size))
    describe(model, mode, group_size, kinds)
    return model


def describe(model: nn.Module, mode: str, group_size: int, kinds: dict) -> None:
    model.quantization = {"quant_method": "vlmkit", "mode": mode, "group_size": group_size, "modules": dict(kinds)}


def quantization_of(model: nn.Module) -> Optional[dict]:
    return getattr(model, "quantization", None)


def memory_bytes(model: nn.Module) -> int:
    """Bytes of the weights: parameters, and the buffers of quantized modules (where their weights live)."""
    tensors = {id(t): t for t in model.parameters()}
    tensors.update((id(t), t) for m in model.modules() if isinstance(m, QUANT_MODULES) for t in m.buffers())
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ------------------------------------------------------------------------------------------------ files

def saved_quantization(folder) -> Optional[dict]:
    """The `quantization_config` of a folder written by `save_quantized`, else None."""
    from .checkpoints.hf import read_config

    qc = read_config(folder).get("quantization_config")
    return qc if isinstance(qc, dict) and qc.get("quant_method") == "vlmkit" else None


def _key_map(model, kinds: dict) -> dict:
    """our name -> HF name for the float layout of `model` (quantized modules as their `.weight`)."""
    from .checkpoints.families import FAMILIES
    from .checkpoints.keymaps import build_key_map

    cfg = model.cfg
    family = FAMILIES[cfg.extra.get("hf_architecture", cfg.family)]
    names = [n for n in model.state_dict() if n.rpartition(".")[0] not in kinds or n.endswith(".bias")]
    names += [f"{name}.weight" for name in kinds]
    return build_key_map(names, cfg.connector.kind, family.prefixes)


def save_quantized(model, folder) -> None:
    """A Hugging Face-style folder: config.json with `quantization_config`, model.safetensors with float tensors
    under their usual names and each quantized weight as `<name>.qweight/.scales(/.mins)` (vlmkit reads it back;
    transformers does not)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from .checkpoints.hf import WEIGHTS, hf_config_for
    from .checkpoints.io import atomic_write

    info = quantization_of(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kinds = info["modules"]
    key_map = _key_map(model, kinds)
    tensors = {}
    for name, t in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module not in kinds or leaf == "bias":
            tensors[key_map[name]] = t.detach().contiguous().cpu()
    for name in kinds:
        base = key_map[f"{name}.weight"][: -len("weight")]
        for suffix, t in model.get_submodule(name).export().items():
            tensors[base + suffix] = t.detach().contiguous().cpu()
    hf = dict(hf_config_for(model.cfg))
    hf["dtype"] = str(model.dtype).removeprefix("torch.")
    hf["quantization_config"] = info
    atomic_write(folder / "config.json", lambda p: Path(p).write_text(json.dumps(hf, indent=2)))
    atomic_write(folder / WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)


class _Builder:
    """Fills a meta-device model: quantized modules as they come, float tensors assigned at the end."""

    def __init__(self, model, kinds: dict, dtype, group_size: int):
        self.model, self.kinds, self.dtype, self.group_size = model, kinds, dtype, group_size
        self.floats, self.biases, self.done = {}, {}, set()

    def tensor(self, name: str, t: torch.Tensor) -> None:
        module, _, leaf = name.rpartition(".")
        if t.is_floating_point():
            t = t.to(self.dtype)
        if module not in self.kinds:
            self.floats[name] = t
        elif leaf == "bias":
            self.biases[module] = t
        else:
            self.module(module, make_module(self.kinds[module], t, dtype=self.dtype, group_size=self.group_size))

    def module(self, name: str, module: nn.Module) -> None:
        self.model.set_submodule(name, module)
        self.done.add(name)

    def finish(self):
        model = self.model
        if set(self.kinds) - self.done:
            raise ValueError(f"no weights for {sorted(set(self.kinds) - self.done)[:10]}")
        for name, bias in self.biases.items():
            model.get_submodule(name).bias = nn.Parameter(bias, requires_grad=False)
        missing, unexpected = model.load_state_dict(self.floats, strict=False, assign=True)
        missing = [k for k in missing if k.rpartition(".")[0] not in self.kinds]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit the model: missing {missing[:10]}, unexpected {unexpected[:10]}")
        model.text.reset_buffers()
        return model.eval()


def _hf_tensors(folder, model, kinds: dict, saved: bool):
    """(name, tensor) in our names from a Hugging Face folder; for a saved quantized one, (name, module)."""
    from safetensors import safe_open

    from .checkpoints.hf import CheckpointError, weight_files

    files = weight_files(folder)
    key_map = _key_map(model, kinds if saved else {})
    handles = {}

    def read(hf_name):
        if hf_name not in files:
            raise CheckpointError(f"{folder}: tensor {hf_name} is missing")
        if files[hf_name] not in handles:
            handles[files[hf_name]] = safe_open(files[hf_name], "pt", device="cpu")
        return handles[files[hf_name]].get_tensor(hf_name)

    for ours, hf_name in key_map.items():
        module = ours[: -len(".weight")]
        if saved and ours.endswith(".weight") and module in kinds:
            parts = ("qweight", "scales", "mins") if kinds[module] == "int4" else ("qweight", "scales")
            yield module, {p: read(hf_name[: -len("weight")] + p) for p in parts}
        else:
            yield ours, read(hf_name)


def _adapter_tensors(folder, hf: dict, kinds: dict, dtype, text_cfg):
    """An adapter folder: vision/connector from adapter.safetensors, the text model straight from its GGUF -- Q4_1
    tensors become int4 modules as they are (LoRA-merged ones are requantized), the token table int8 row by row."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    from .checkpoints.adapter import ADAPTER, resolve_gguf
    from .checkpoints.gguf import open_gguf, state_dict_name, unpermute_rope_rows

    meta = hf["vlmkit_adapter"]
    adapter = load_file(folder / ADAPTER)
    lora = {k: v.float() for k, v in adapter.items() if ".lora_" in k}
    scale = meta["lora"]["alpha"] / meta["lora"]["r"] if lora else 0.0
    for k, v in adapter.items():
        if ".lora_" not in k:
            yield k, v.float()
    reader = open_gguf(resolve_gguf(meta["base_gguf"]))
    # head counts from the folder's own config: read_metadata would turn the whole vocabulary into Python strings
    # (~100 MB held at the load's peak) for two numbers
    gcfg = text_cfg
    vocab = text_cfg.vocab_size
    for t in reader.tensors:
        name = "text." + state_dict_name(t.name)
        module = name.rpartition(".")[0]
        cols, rows = (int(x) for x in t.shape) if len(t.shape) == 2 else (int(t.shape[0]), 1)
        heads = gcfg.num_heads if ".attn_q." in t.name else gcfg.num_kv_heads if ".attn_k." in t.name else None
        order = unpermute_rope_rows(torch.arange(rows), heads) if heads else None
        if kinds.get(module) == "int4" and t.tensor_type == GGMLQuantizationType.Q4_1 and module + ".lora_A" not in lora:
            yield module, from_q4_1(t.data, rows, cols, dtype, order)
        elif kinds.get(module) == "embed8":  # row chunks: never the float table (nor its grown copy) at once
            q = torch.zeros(max(rows, vocab or rows), cols, dtype=torch.int8)
            scales = torch.full((q.shape[0],), 1e-12)
            for i in range(0, rows, 4096):
                q[i : i + 4096], scales[i : i + 4096] = quantize_int8(torch.from_numpy(
                    np.asarray(dequantize(t.data[i : i + 4096], t.tensor_type), dtype=np.float32)))
            yield module, Int8Embedding(q, scales, dtype)
        else:
            w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
            w = w if order is None else w[order]
            if module + ".lora_A" in lora:
                w = w + lora[module + ".lora_B"] @ lora[module + ".lora_A"] * scale
            yield name, w


def load_quantized(folder, mode: Optional[str] = None, dtype=None, vision: bool = False,
                   group_size: int = DEFAULT_GROUP):
    """A quantized VLMModel from a Hugging Face folder, an adapter folder, or a folder saved quantized (whose own
    settings then apply; `mode` must be None or the same)."""
    from pathlib import Path

    from .checkpoints.adapter import is_adapter_folder
    from .checkpoints.hf import config_from_folder
    from .models.vlm import VLMModel

    folder = Path(folder)
    saved = saved_quantization(folder)
    if saved and mode not in (None, saved["mode"]):
        raise ValueError(f"{folder} is saved {saved['mode']}-quantized; load it with quantize=None or "
                         f"{saved['mode']!r}, or quantize the float model it came from")
    cfg, _, hf = config_from_folder(folder)
    with torch.device("meta"):
        model = VLMModel(cfg)
    if saved:
        mode, group_size, kinds = saved["mode"], saved["group_size"], dict(saved["modules"])
    else:
        kinds = target_kinds(model, check_mode(mode), vision, group_size)
        if is_adapter_folder(folder) and mode == "int4":
            # LoRA-merged projections stay 8-bit: the trained delta is far below a 4-bit step, and requantizing the
            # merged weight to 4 bits lost it (measured on the default model: "Paris" became "L'Etoile ...").
            from safetensors import safe_open

            from .checkpoints.adapter import ADAPTER
            with safe_open(folder / ADAPTER, "pt") as f:
                merged = {k[: -len(".lora_A")] for k in f.keys() if k.endswith(".lora_A")}
            kinds.update({name: "int8" for name in merged if kinds.get(name) == "int4"})
    if dtype is None and not is_adapter_folder(folder):  # as stored, like the float loader
        stored = hf.get("dtype") or hf.get("torch_dtype") or hf.get("text_config", {}).get("dtype")
        dtype = getattr(torch, stored) if isinstance(stored, str) and hasattr(torch, stored) else None
    builder = _Builder(model, kinds, dtype or torch.float32, group_size)
    if is_adapter_folder(folder) and not saved:
        source = _adapter_tensors(folder, hf, kinds, builder.dtype, cfg.text)
    else:
        source = _hf_tensors(folder, model, kinds, bool(saved))
    for name, item in source:
        if isinstance(item, nn.Module):
            builder.module(name, item)
        elif isinstance(item, dict):
            builder.module(name, BUILDERS[kinds[name]].from_export(item, None, builder.dtype, group_size))
        else:
            builder.tensor(name, item)
    model = builder.finish()
    describe(model, mode, group_size, kinds)
    return model
