"""Text-decoder rows: SmolLM2-135M-Instruct from its Q4_1 GGUF, the same prompts, greedy, a fixed number of new
tokens (eos ignored) -- vlmkit (float32 / int8 / int4, eager and compiled) vs transformers float32 (the same GGUF,
dequantized, as `from_pretrained(gguf_file=...)` loads it) vs llama.cpp (llama-cpp-python on the GGUF itself).

Decode tokens/s = batch * (new_tokens - 1) / (time of the last token - time of the first): prefill excluded."""

from __future__ import annotations

import time

import torch

from common import gguf_path, quantize_arg
from vlmkit.benchmark import best, time_tokens

QUESTIONS = [
    "What is the capital of France?", "Write a short poem about the sea.", "Explain photosynthesis simply.",
    "Give me three tips for learning to cook.", "What is the tallest mountain on Earth?",
    "Describe a cat to someone who has never seen one.", "Why is the sky blue?", "Name the planets in order.",
]


def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": q}]), add_special_tokens=False)
            for q in QUESTIONS]


def left_pad(rows, pad_id: int = 0) -> dict:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def vlmkit_decoder(mode: str, compile_: bool = False):
    from vlmkit.checkpoints.gguf import load_gguf_text
    from vlmkit.models.text import TextDecoder
    from vlmkit.models.quant import quantize_model
    from vlmkit.processing.gguf_tokenizer import tokenizer_from_gguf

    cfg, state = load_gguf_text(gguf_path())
    tok = tokenizer_from_gguf(gguf_path())
    decoder = TextDecoder(cfg)
    decoder.load_state_dict(state)
    del state
    decoder.eval()
    if quantize_arg(mode):
        quantize_model(decoder, mode)  # SmolLM2's Q4_1 blocks come back exactly: group 32, min/max per block
    if compile_:
        decoder.compile_decode()
    return decoder, tok


def run_vlmkit(decoder, rows, new_tokens: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s) for one batch."""
    return time_tokens(decoder, left_pad(rows), new_tokens)


def transformers_decoder():
    import transformers
    from transformers.integrations.gguf import read_gguf_metadata
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = gguf_path()
    layers = read_gguf_metadata(path)[0]["llama.block_count"]
    with torch.device("meta"):
        names_only = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=layers))
    parsed = load_gguf_checkpoint(path, return_tensors=True, model_to_load=names_only)
    config = transformers.AutoConfig.for_model(**parsed["config"])
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(parsed["tensors"], strict=False, assign=True)
    model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval()


def run_transformers(model, rows, new_tokens: int) -> tuple[float, float]:
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    batch = left_pad(rows)
    clock = Clock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, streamer=clock)
    assert out.shape[1] - batch["input_ids"].shape[1] == new_tokens
    first, last = clock.times[1], clock.times[-1]  # times[0]: the prompt itself
    return first - t0, len(rows) * (new_tokens - 1) / (last - first)


def measure(new_tokens: int = 128, repeat: int = 3, threads: int = 2, log=print) -> dict:
    """{impl: {"b1": tok/s, "b8": tok/s, "ttft_b1": s, ...}} for every implementation available."""
    results = {}
    decoder, tok = vlmkit_decoder("float32")
    rows = prompts(tok)
    for mode in ("float32", "int8", "int4"):
        # int8 compiled: slower than eager at batch 8 when measured (and minutes of compilation): not timed
        for compiled in (False, True) if mode != "int8" else (False,):
            name = f"vlmkit {mode}" + (" compiled" if compiled else "")
            try:
                t_load = time.perf_counter()
                decoder, _ = vlmkit_decoder(mode, compiled)
                if compiled:  # compile both batch shapes before timing (counted separately)
                    run_vlmkit(decoder, rows[:1], 4)
                    run_vlmkit(decoder, rows, 4)
                setup = time.perf_counter() - t_load
                ttft1, b1 = best(lambda: run_vlmkit(decoder, rows[:1], new_tokens), repeat)
                ttft8, b8 = best(lambda: run_vlmkit(decoder, rows, new_tokens), repeat)
                results[name] = {"b1": b1, "b8": b8, "ttft_b1": ttft1, "setup_s": setup}
                log(f"{name}: {b1:.1f} tok/s (batch 1), {b8:.1f} tok/s (batch 8), setup {setup:.1f} s")
            except Exception as e:  # noqa: BLE001 -- a failed row is reported, the others still run
                results[name] = {"error": f"{type(e).__name__}: {e}"}
                log(f"{name}: failed: {e}")
            decoder = None
    try:
        model = transformers_decoder()
        ttft1, b1 = best(lambda: run_transformers(model, rows[:1], new_tokens), repeat)
        ttft8, b8 = best(lambda: run_transformers(model, rows, new_tokens), repeat)
        results["transformers float32"] = {"b1": b1, "b8": b8, "ttft_b1": ttft1}
        log(f"transformers float32: {b1:.1f} tok/s (batch 1), {b8:.1f} tok/s (batch 8)")
        model = None
    except Exception as e:  # noqa: BLE001
        results["transformers float32"] = {"error": f"{type(e).__name__}: {e}"}
    try:  # in a child process: see llama_probe.py
        import json
        import os
        import subprocess
        import sys

        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run([sys.executable, os.path.join(here, "llama_probe.py"), json.dumps(
            {"threads": threads, "new_tokens": new_tokens, "repeat": repeat, "row": rows[0]})],
            capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": here})
        if out.returncode != 0:
            raise RuntimeError(f"llama.cpp exited with {out.returncode}: {out.stderr[-300:]}")
        results["llama.cpp Q4_1"] = json.loads(out.stdout.strip().splitlines()[-1])
        log(f"llama.cpp Q4_1: {results['llama.cpp Q4_1']['b1']:.1f} tok/s (batch 1)")
    except Exception as e:  # noqa: BLE001
        results["llama.cpp Q4_1"] = {"error": f"{type(e).__name__}: {e}"}
        log(f"llama.cpp: failed: {e}")
    return results
