"""Profiles for the targets a run misses: where the time goes (torch.profiler, operators by self CPU time), or the
bytes (per module kind), so results.md shows why."""

from __future__ import annotations

import cProfile
import io
import pstats

import torch

from common import quantize_arg
from vlmkit.benchmark import test_image


def _torch_profile(fn, rows: int = 14) -> str:
    fn()  # warm
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)


def decode_profile(mode: str, steps: int = 32) -> str:
    import decode

    decoder, tok = decode.vlmkit_decoder(mode)
    rows = decode.prompts(tok)[:1]
    return _torch_profile(lambda: decode.run_vlmkit(decoder, rows, steps))


def vlm_profile(folder, second: bool) -> str:
    import vlmkit
    from vlm import first_turn, second_turn

    m = vlmkit.load(folder)
    image = test_image()
    if not second:
        def fn():
            m.clear_caches()
            m.chat(first_turn(image), max_new_tokens=1)
        return _torch_profile(fn)
    m.clear_caches()
    prompt = second_turn(image, m.chat(first_turn(image), max_new_tokens=24))
    entries = list(m.prefix_cache._entries)

    def fn():
        m.chat(prompt, max_new_tokens=1)
        m.prefix_cache._entries = list(entries)
    return _torch_profile(fn)


def memory_breakdown(folder) -> str:
    import vlmkit

    lines = []
    for mode in ("float32", "int4"):
        m = vlmkit.load(folder, quantize=quantize_arg(mode))
        sizes = {}
        for name, module in m.model.named_modules():
            own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
            key = type(module).__name__ + (" (vision)" if name.startswith(("vision", "connector")) else "")
            sizes[key] = sizes.get(key, 0) + sum(t.numel() * t.element_size() for t in own)
        top = sorted(sizes.items(), key=lambda kv: -kv[1])[:8]
        lines.append(f"{mode}: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in top if v))
    return "\n".join(lines)


def preprocessing_profile() -> str:
    from vlmkit.processing.image_processors import image_processor_for

    images = [test_image((1960, 1470), seed=i) for i in range(8)]
    proc = image_processor_for("idefics2", {"do_image_splitting": True,
                                            "size": {"shortest_edge": 378, "longest_edge": 980}})
    prof = cProfile.Profile()
    prof.runcall(lambda: proc([[im] for im in images]))
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    return out.getvalue()[-4000:]


def for_misses(results: dict, folders: dict, log=print) -> dict:
    from report import targets

    out = {}
    for t in targets(results):
        if t["passed"] is not False:
            continue
        name = t["target"]
        try:
            if name.startswith("decode, batch 1, int4"):
                out["int4 decode, batch 1, eager (32 steps)"] = decode_profile("int4")
            elif name.startswith("decode, float32"):
                out.setdefault("float32 decode, batch 1, eager (32 steps)", decode_profile("float32"))
            elif name.startswith("time to first token"):
                out["first turn, float32 (image + question, one token)"] = vlm_profile(folders["adapter"], False)
            elif name.startswith("second-turn"):
                out.setdefault("second turn, float32 (one token)", vlm_profile(folders["adapter"], True))
            elif name.startswith("peak memory"):
                out["weights by module kind"] = memory_breakdown(folders["adapter"])
            elif name.startswith("preprocessing"):
                out["vlmkit preprocessing (cProfile, by own time)"] = preprocessing_profile()
        except Exception as e:  # noqa: BLE001 -- a profile that fails must not lose the results
            out[name] = f"profile failed: {type(e).__name__}: {e}"
        log(f"profiled the miss: {name}")
    return out
