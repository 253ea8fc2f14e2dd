"""The public API: `load`, `save` and `VLM` (model + processor + generation)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .checkpoints.adapter import is_adapter_folder, load_adapter_model
from .checkpoints.folder_config import config_from_folder, default_model_path, saved_quantization
from .checkpoints.folders import write_model_folder
from .checkpoints.gguf_header import gguf_pair
from .checkpoints.hf import load_model
from .checkpoints.peft import apply_adapter
from .checkpoints.quantized import load_quantized
from .generation.caches import (
    ImageFeatureCache, PrefixCache, PrefixEntry, crop_digest, crop_starts, image_run_starts,
)
from .generation.constraints import Constraint
from .generation.fast_path import fast_decoder, new_cache
from .generation.loop import GenerationConfig, generate
from .hardware import compute_dtype, resolve_device
from .models.kv_cache import StaticKVCache
from .models.meta import shapes_only
from .models.summary import model_info, parameter_count
from .models.quant import QuantSpec, check_mode, memory_bytes, quantization_of, quantize_as_saved
from .models.vlm import VLMModel, flat_images
from .processing.chat_text import as_user_message
from .processing.image_ops import native_resolution_info
from .processing.images import ImageLimits
from .processing.prompts import is_messages

def is_default_model(m) -> bool:
    """Whether `m` (a VLM) is the embedded default model."""
    folder = getattr(m, "folder", None)
    return folder is not None and Path(folder).resolve() == default_model_path().resolve()


def resolve(path_or_name) -> Path:
    if str(path_or_name) == "default":
        path = default_model_path()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"the embedded default model is not installed at {path}; pass a Hugging Face model folder instead"
            )
        return path
    path = Path(path_or_name).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path_or_name!r} is not a model folder (vlmkit loads local Hugging Face folders; nothing is downloaded)"
        )
    return path


# Quantize the vision tower too? Measured on the default model (bench/results.md): its ViT is small and its
# prefill is compute-bound, where the packed kernels are slower than float32 matmuls -- so no by default.
QUANTIZE_VISION = False


def load(path_or_name="default", dtype=None, device=None, quantize=None, compile: bool = False,
         caches: bool = True, mmproj=None, adapter=None, progress: Optional[bool] = None,
         allow_remote_images: bool = True) -> "VLM":
    """Load a model: "default" (the embedded model) or a local Hugging Face folder of any supported family.

    device: None or "auto" = CUDA, then Apple MPS, then the CPU; an unavailable device fails before any weight is
    read. dtype: what the float parts compute in; None = what is fast on the device (vlmkit.hardware.compute_dtype:
    bf16 on GPUs and on CPUs with bf16 units, fp16 on MPS, float32 on other CPUs), whatever the checkpoint stores.
    quantize: None, "int8" (per-channel) or "int4" (group-wise) weight-only quantization of the decoder (torch's
    packed kernels on the CPU and on CUDA GPUs, dequantized per call elsewhere),
    built tensor by tensor (see vlmkit.models.quant); a folder saved quantized loads quantized whatever is passed;
    the vision tower, connector and norms stay float in `dtype`.
    compile: torch.compile the decode step (first answers pay the compilation). caches: keep image features and
    the keys/values of recent prompts, so a follow-up turn re-reads neither (`VLM.clear_caches()` empties them).
    mmproj: a llama.cpp projector GGUF, with a text GGUF as `path_or_name` (a folder holding just the two works too).
    adapter: a peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors, as `vlmkit train` or
    peft's `save_pretrained` write it) for this base: merged into the float weights; over a quantized model its
    LoRA layers stay beside the quantized ones (see vlmkit.checkpoints.peft).
    progress: a bar of the bytes read on stderr; None = when stderr is a terminal and VLMKIT_NO_PROGRESS is unset.
    allow_remote_images: http(s) image URLs given to generate/chat/score are downloaded (public addresses only,
    size and time capped: vlmkit.processing.image_fetch); False refuses them.
    """
    from .processing.processor import Processor

    dev = resolve_device(device)  # first: a wrong device or dtype fails before anything is read
    dtype = compute_dtype(dev, dtype)  # dtype= overrides; an unknown name fails here
    limits = ImageLimits(allow_remote=allow_remote_images)
    pair = gguf_pair(path_or_name, mmproj)
    if pair is not None:  # a llama.cpp text GGUF + mmproj GGUF
        # here: the gguf library (~70 ms of import) is for pairs only
        from .checkpoints.gguf_mmproj import image_processor_config, load_gguf_vlm, processor_settings

        mode = check_mode(quantize)
        model, text_meta, mm_meta = load_gguf_vlm(*pair, dtype=dtype, device=dev,
                                                  quantize=QuantSpec(mode, vision=QUANTIZE_VISION) if mode else None,
                                                  progress=progress)
        if adapter is not None:
            apply_adapter(model, adapter)
        processor = Processor.from_gguf(text_meta, image_processor_config(mm_meta), processor_settings(model.cfg),
                                        model.cfg, limits=limits)
        return _finish_load(VLM(model, processor, None, caches=caches), compile)
    folder = resolve(path_or_name)
    mode, saved = check_mode(quantize), saved_quantization(folder)
    if mode or saved:
        model = load_quantized(folder, mode, dtype=dtype, device=dev, vision=QUANTIZE_VISION, progress=progress)
    elif is_adapter_folder(folder):  # the embedded default model: GGUF language model + trained adapter
        model = load_adapter_model(folder, dtype=dtype, device=dev, progress=progress)
    else:
        model = load_model(folder, dtype=dtype, device=dev, progress=progress)
    if adapter is not None:
        apply_adapter(model, adapter)
    processor = Processor.from_folder(folder, model.cfg, limits=limits)
    return _finish_load(VLM(model, processor, folder, caches=caches), compile)


def _finish_load(m: "VLM", compile: bool) -> "VLM":
    if compile:
        m.compile()
    return m


def save(m: "VLM", folder) -> None:
    """Write `m` as a Hugging Face folder (config, safetensors, processor files, a README.md model card) that `load`
    reads back (a quantized model stays quantized: vlmkit reads that folder, transformers does not)."""
    write_model_folder(m.model, folder, m.folder)


class VLM:
    def __init__(self, model: VLMModel, processor, folder: Optional[Path] = None, caches: bool = True):
        self.model = model
        self.processor = processor
        self.folder = Path(folder) if folder is not None else None
        self.caches = caches
        self.image_cache, self.prefix_cache = ImageFeatureCache(), PrefixCache()

    def clear_caches(self) -> None:
        """Forget cached image features and prompt keys/values (after changing the weights, or to time a cold
        start)."""
        self.image_cache.clear()
        self.prefix_cache.clear()

    def compile(self, **options) -> "VLM":
        """torch.compile the decode step (the first answer of each batch size / cache capacity compiles)."""
        text = fast_decoder(self.model)
        if text is None:
            raise ValueError(f"compile: {self.model.cfg.family} decode steps run through the full model "
                             "(gated cross-attention); only self-attention decoders compile")
        text.compile_decode(**options)
        return self

    @property
    def quantization(self) -> Optional[dict]:
        return quantization_of(self.model)

    @property
    def config(self):
        return self.model.cfg

    @property
    def context_length(self) -> int:
        return self.model.cfg.text.max_position_embeddings

    def _generation_config(self, max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, stop,
                           seed, bad_words=None, constraint: Optional[Constraint] = None) -> GenerationConfig:
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        eos = list(self.processor.eos_token_ids)
        compiled = None if constraint is None else constraint.compile(self.processor.tokenizer, eos)
        return GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
            repetition_penalty=repetition_penalty, seed=seed, eos_token_ids=eos,
            pad_token_id=self.processor.tokenizer.pad_token_id, stop_strings=stop,
            bad_words_ids=[list(x) for x in (self.processor.bad_words_ids if bad_words is None else bad_words)],
            constraint=compiled,
        )

    def _prompt(self, prompt, raw: Optional[bool]):
        """The prompt the processor gets. raw=True: as written (transformers' behaviour). raw=False: a string or an
        interleaved list becomes one user turn of the chat template (Ollama's /api/generate behaviour), with
        `<image>` placeholders as its image parts. raw=None (default): the chat template when the checkpoint has
        one, else as written. Chat messages always go through the template."""
        if is_messages(prompt):
            if raw:
                raise ValueError("raw=True takes a string or an interleaved list; chat messages always go through "
                                 "the chat template")
            return prompt
        if raw is None:
            raw = self.processor.tokenizer.chat_template is None
        return prompt if raw else as_user_message(prompt, self.processor.placeholder(prompt))

    def _batch(self, prompts, images, max_new_tokens: int, raw: Optional[bool] = True) -> dict:
        prompts = [self._prompt(p, raw) for p in prompts]
        batch = self.processor(prompts, images, max_length=self.context_length - max_new_tokens)
        return {k: (v.to(self.model.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    @torch.inference_mode()
    def generate(self, prompt, images=None, max_new_tokens: int = 128, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
                 stop: Union[str, Sequence[str], None] = None, stream: bool = False, seed: Optional[int] = None,
                 bad_words_ids=None, raw: Optional[bool] = None, stats: Optional[dict] = None,
                 json_schema=None, regex: Optional[str] = None, grammar: Optional[str] = None
                 ) -> Union[str, Iterator[str]]:
        """New text for one prompt (a string with <image> placeholders, an interleaved list, or chat messages).
        A string or list prompt goes through the chat template as one user turn unless raw=True (see _prompt).
        stats (stream=True): a dict that gets `prompt_tokens`, then `completion_tokens` when the stream ends.
        Structured output (at most one): json_schema (a JSON schema dict, or True for any JSON object), regex (the
        whole answer matches it), grammar (a Lark grammar, llguidance's dialect); the answer follows it unless
        max_new_tokens or a stop string cuts it first."""
        cfg = self._generation_config(max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty,
                                      stop, seed, bad_words_ids, Constraint.from_options(json_schema, regex, grammar))
        batch = self._batch([prompt], None if images is None else [list(images)], max_new_tokens, raw)
        if stream:
            if stats is not None:
                stats["prompt_tokens"] = int(batch["input_ids"].shape[1])
            return self._stream(batch, cfg, stats)
        batch, cache, crops = self._use_caches(batch, max_new_tokens)
        try:
            return generate(self.model, self.processor.tokenizer, batch, cfg, max_length=self.context_length,
                            cache=cache)[0]
        finally:
            self._remember(cache, crops)

    def _stream(self, batch, cfg, stats: Optional[dict] = None) -> Iterator[str]:
        # The loop runs each step under no_grad itself; an inference_mode block here would leak into the
        # caller's code between yielded pieces (and its tensors could not be written outside it: the cache is
        # made here, not in generate()).
        with torch.no_grad():
            batch, cache, crops = self._use_caches(batch, cfg.max_new_tokens)
        try:
            yield from generate(self.model, self.processor.tokenizer, batch, cfg, stream=True,
                                max_length=self.context_length, cache=cache, stats=stats)
        finally:
            self._remember(cache, crops)

    # ---- caches ----------------------------------------------------------------------------------------------
    def _use_caches(self, batch: dict, max_new_tokens: int):
        """Image features from the feature cache (only new crops are encoded) and, for one prompt, a KV cache
        that already holds the longest reusable prefix of an earlier prompt + answer. -> (batch, cache, crops)."""
        if not self.caches or self.model.cfg.merge != "splice":
            return batch, None, ()
        crops, features = (), None
        if batch.get("pixel_values") is not None and "image_grid_thw" in batch:  # Qwen2-VL: flat patches
            crops, features = self._patch_features(batch.pop("pixel_values"), batch["image_grid_thw"])
            batch["image_features"] = features
        elif batch.get("pixel_values") is not None:
            crops, features = self._image_features(batch.pop("pixel_values"), batch.pop("pixel_attention_mask", None),
                                                   batch.pop("image_sizes", None))
            batch["image_features"] = features
        ids = batch["input_ids"]
        if ids.shape[0] != 1 or fast_decoder(self.model) is None:
            return batch, None, crops
        ids = ids[0]
        per_crop = features.shape[1] if features is not None else 0
        total = ids.numel() + max_new_tokens
        entry, n = self.prefix_cache.lookup(ids, crops, self._crop_starts(ids, per_crop))
        if entry is None:
            return batch, new_cache(self.model, total), crops
        cache = StaticKVCache.from_prefix([k[:, :, :n] for k in entry.keys], [v[:, :, :n] for v in entry.values],
                                          ids[None, :n], total)
        if features is not None:  # only the image tokens after the prefix are fed: theirs are the last features
            fed = int((ids[n:] == self.model.cfg.image_token_id).sum())
            flat = features.reshape(-1, features.shape[-1])
            batch["image_features"] = flat[flat.shape[0] - fed:][None] if fed else None
        return batch, cache, crops

    def _image_features(self, pixel_values, pixel_mask, image_sizes=None) -> tuple[tuple, torch.Tensor]:
        """(crop digests, features [crops, tokens, width]) as VLMModel.image_features computes them.
        LLaVA-NeXT: its tiles are cached one by one, then packed; one key for all the images ([1, tokens, width]),
        as their token counts differ."""
        if getattr(self.model, "anyres", None) is not None:
            tiles = self.model.anyres_patches(pixel_values, image_sizes)
            digests, features = self._crop_features(tiles, None)
            key = ("anyres", digests, tuple(map(tuple, image_sizes.tolist())))
            return (key,), self.model.anyres_pack(features, image_sizes)
        return self._crop_features(*flat_images(pixel_values, pixel_mask))  # the real images, as the model takes them

    def _crop_features(self, flat, mask) -> tuple[tuple, torch.Tensor]:
        digests = tuple(crop_digest(flat[i], None if mask is None else mask[i]) for i in range(flat.shape[0]))
        # all of them on a first turn, repeats included: one call, exactly as the model would make it
        found = self._cached(digests, lambda missing: self.model.encode_images(
            flat[missing], None if mask is None else mask[missing]), unique=False)
        return digests, torch.stack([found[d] for d in digests])

    def _cached(self, digests, encode, unique: bool = True) -> dict:
        """digest -> features: from the image cache, the others encoded in one call (`encode(indexes)` -> their
        features in that order; one index per digest when `unique`) and kept."""
        found = {d: f for d in set(digests) if (f := self.image_cache.get(d)) is not None}
        missing = [i for i, d in enumerate(digests) if d not in found]
        if unique:
            missing = list({digests[i]: i for i in missing}.values())
        if missing:
            for i, f in zip(missing, encode(missing)):
                found[digests[i]] = f
                self.image_cache.put(digests[i], f)
        return found

    def _crop_starts(self, ids: torch.Tensor, per_crop: int) -> tuple:
        token = self.model.cfg.image_token_id
        if self.model.cfg.text.mrope_section is not None:  # Qwen2-VL: one run of image tokens per image, any length
            return image_run_starts(ids, token)
        return crop_starts(ids, token, per_crop)

    def _patch_features(self, pixel_values, grid) -> tuple[tuple, torch.Tensor]:
        """Qwen2-VL flat patches -> (image digests, features [1, all tokens, width]), each image (its patches and
        grid) cached alone: the ViT attends within an image, so encoding only the new ones gives the same
        features."""
        sizes = grid.prod(-1).tolist()
        parts = pixel_values.split(sizes)
        digests = [crop_digest(p, g) for p, g in zip(parts, grid)]

        def encode(missing):
            encoded = self.model.image_features(torch.cat([parts[i] for i in missing]),
                                                image_grid_thw=grid[missing])[0]
            return encoded.split([sizes[i] // self.model.cfg.vision.spatial_merge_size ** 2 for i in missing])

        found = self._cached(digests, encode)
        return tuple(digests), torch.cat([found[d] for d in digests])[None]

    def _remember(self, cache, crops: tuple) -> None:
        """Keep what a one-prompt generation left in its cache (prompt + answer) for the next turn."""
        if cache is None or getattr(cache, "token_ids", None) is None or cache.length == 0:
            return
        n = cache.length
        ids = cache.token_ids[0, :n].clone()
        per_crop = int((ids == self.model.cfg.image_token_id).sum()) // len(crops) if crops else 0
        self.prefix_cache.store(PrefixEntry(
            ids, crops, self._crop_starts(ids, per_crop),
            [k[:, :, :n] for k in cache.keys], [v[:, :, :n] for v in cache.values]))

    @torch.inference_mode()
    def generate_batch(self, prompts: Sequence, images=None, max_new_tokens: int = 128, do_sample: bool = False,
                       temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                       repetition_penalty: float = 1.0, stop=None, seed: Optional[int] = None,
                       bad_words_ids=None, raw: Optional[bool] = None, json_schema=None,
                       regex: Optional[str] = None, grammar: Optional[str] = None) -> list[str]:
        """Several prompts decoded together (left-padded); `images` is one list of images per prompt. raw,
        json_schema, regex, grammar: as generate (every row follows the constraint, each with its own matcher)."""
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"generate_batch got {len(prompts)} prompts but {len(images)} image lists")
        cfg = self._generation_config(max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty,
                                      stop, seed, bad_words_ids, Constraint.from_options(json_schema, regex, grammar))
        batch = self._batch(list(prompts), None if images is None else [list(x or []) for x in images],
                            max_new_tokens, raw)
        batch, _, _ = self._use_caches(batch, max_new_tokens) if len(prompts) > 1 else (batch, None, ())
        return generate(self.model, self.processor.tokenizer, batch, cfg, max_length=self.context_length)

    def chat(self, messages: list, images=None, **kwargs) -> str:
        """Answer the last user turn of chat messages, rendered with the checkpoint's chat template."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("chat() takes a list of {'role': ..., 'content': ...} messages")
        return self.generate(messages, images=images, **kwargs)

    @torch.inference_mode()
    def score(self, prompt, candidates: Sequence[str], images=None, raw: Optional[bool] = None) -> list[float]:
        """Log-likelihood (sum over its tokens) of each candidate continuation of `prompt` (after the assistant
        prompt of the chat template unless raw=True, as generate)."""
        if not candidates:
            return []
        batch = self._batch([prompt], None if images is None else [list(images)], 0, raw)
        tok = self.processor.tokenizer
        cand_ids = [tok.encode(c, add_special_tokens=False) for c in candidates]
        if any(not ids for ids in cand_ids):
            raise ValueError("score() candidates must be non-empty text")
        n, longest = len(cand_ids), max(map(len, cand_ids))
        prompt_ids = batch["input_ids"]
        # Right-pad the candidates after the shared prompt; padding positions are masked and not scored.
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        tails = torch.full((n, longest), pad, dtype=prompt_ids.dtype, device=prompt_ids.device)
        tail_mask = torch.zeros(n, longest, dtype=batch["attention_mask"].dtype, device=prompt_ids.device)
        for i, ids in enumerate(cand_ids):
            tails[i, : len(ids)] = torch.tensor(ids)
            tail_mask[i, : len(ids)] = 1
        inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        inputs["input_ids"] = torch.cat([prompt_ids.expand(n, -1), tails], dim=1)
        inputs["attention_mask"] = torch.cat([batch["attention_mask"].expand(n, -1), tail_mask], dim=1)
        if "image_attention_mask" in inputs:  # continuation tokens see what the last prompt token saw
            iam = inputs["image_attention_mask"]
            inputs["image_attention_mask"] = torch.cat([iam, iam[:, -1:].expand(-1, longest, -1)], 1).expand(n, -1, -1)
        if "cross_attention_mask" in inputs:  # Mllama's [1, T, M, tiles]: the same rule
            cam = inputs["cross_attention_mask"]
            inputs["cross_attention_mask"] = torch.cat([cam, cam[:, -1:].expand(-1, longest, -1, -1)], 1).expand(
                n, -1, -1, -1)
        if "image_grid_thw" in inputs:  # Qwen2-VL: flat patches and their grids, one copy per candidate
            inputs["pixel_values"] = inputs["pixel_values"].repeat(n, 1)
            inputs["image_grid_thw"] = inputs["image_grid_thw"].repeat(n, 1)
        elif "pixel_values" in inputs and self.processor.format.flat_pixels:  # one copy of the images per candidate
            for key in ("pixel_values", "image_sizes"):
                if key in inputs:
                    inputs[key] = inputs[key].repeat(n, *[1] * (inputs[key].dim() - 1))
        elif "pixel_values" in inputs:  # [B, M, ...]: the one row seen by every candidate
            for key in ("pixel_values", "pixel_attention_mask", "aspect_ratio_ids", "aspect_ratio_mask"):
                if key in inputs:
                    inputs[key] = inputs[key].expand(n, *inputs[key].shape[1:])
        logits = self.model(**inputs).logits[:, prompt_ids.shape[1] - 1 : -1].float()
        logp = F.log_softmax(logits, dim=-1).gather(-1, tails[..., None])[..., 0]
        return (logp * tail_mask).sum(dim=1).tolist()

    def info(self) -> dict:
        """What the model is and what it costs: family, parameters (all, and split into vision / connector /
        cross-attention / text, which add up to all), image tokens, context, compute dtype and device, bytes of the
        weights and of the KV cache per token."""
        return _info(self.model, self.processor.image_processor, self.folder, self.quantization)


def describe(path_or_name="default", dtype=None, device=None) -> dict:
    """`load(path_or_name, dtype, device).info()` without reading a weight: the model is built on the meta device
    from the folder's config (shapes and dtypes are all `info` needs); a folder saved quantized gets its quantized
    layers from its `quantization_config`."""
    from .processing.processor import image_processor_from_folder

    dev = resolve_device(device)
    dtype = compute_dtype(dev, dtype)
    folder = resolve(path_or_name)
    cfg, saved = config_from_folder(folder)[0], saved_quantization(folder)
    with shapes_only():
        model = VLMModel(cfg).to(dtype)
        if saved:
            quantize_as_saved(model, saved)
    image_processor = image_processor_from_folder(folder, cfg.extra.get("hf_architecture", cfg.family))
    info = _info(model, image_processor, folder, saved)
    return {**info, "device": str(torch.empty(0, device=dev).device)}  # as a loaded model says it: cuda -> cuda:0


def _info(model: VLMModel, image_processor, folder: Optional[Path], quantization: Optional[dict]) -> dict:
    text = getattr(model, "text", None)
    cross = parameter_count(text, lambda name: name.startswith("cross_blocks"))
    settings = getattr(image_processor, "settings", None)
    qwen = model.cfg.vision.flavour == "qwen2_vl" and settings is not None  # native resolution: ranges
    native = native_resolution_info(settings) if qwen else None
    parts = {"vision": parameter_count(getattr(model, "vision", None)),
             "connector": parameter_count(getattr(model, "connector", None))
             + parameter_count(getattr(model, "anyres", None)),
             "cross": cross, "text": parameter_count(text) - cross}
    return model_info(model.cfg, parameter_count(model), parts, dtype=str(model.dtype).removeprefix("torch."),
                      device=str(model.device), memory_bytes=memory_bytes(model),
                      itemsize=next(model.parameters()).element_size(), folder=folder, quantization=quantization,
                      native_resolution=native)


__all__ = ["load", "save", "describe", "VLM", "config_from_folder"]

