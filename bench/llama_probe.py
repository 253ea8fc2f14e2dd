"""Child process of the benchmark: llama.cpp (llama-cpp-python) decoding the GGUF, isolated so that a crash of the
native library cannot take the benchmark down (and its OpenMP runtime never meets torch's).

    python bench/llama_probe.py '{"threads": 2, "new_tokens": 128, "repeat": 3, "row": [token ids]}'

Prints one JSON line. This platform's llama-cpp-python (0.3.36, built from source: no wheel) segfaults in its
repacked-weight CPU buffers (AMX / "extra buffer types"), so they are turned off (`use_extra_bufts = False`): the
plain ggml Q4_1 kernels run, which is slower than llama.cpp at its best on this CPU -- stated next to the row."""

from __future__ import annotations

import json
import sys
import time

import llama_cpp

from common import gguf_path


def main() -> None:
    opts = json.loads(sys.argv[1])
    default_params = llama_cpp.llama_model_default_params

    def params():
        p = default_params()
        p.use_extra_bufts = False  # the repack buffers crash here (SIGSEGV at the first eval)
        return p

    llama_cpp.llama.llama_cpp.llama_model_default_params = params
    llm = llama_cpp.Llama(model_path=gguf_path(), n_ctx=1024, n_batch=512, n_threads=opts["threads"],
                          n_threads_batch=opts["threads"], verbose=False)
    results = []
    for _ in range(opts["repeat"] + 1):  # the first run warms up
        t0 = time.perf_counter()
        steps = llm.generate(opts["row"], top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True)
        next(steps)
        t1 = time.perf_counter()
        for _ in range(opts["new_tokens"] - 1):
            next(steps)
        t2 = time.perf_counter()
        steps.close()
        results.append((t1 - t0, (opts["new_tokens"] - 1) / (t2 - t1)))
    results = results[1:]
    ttfts = sorted(r[0] for r in results)
    print(json.dumps({"ttft_b1": ttfts[len(ttfts) // 2], "b1": max(r[1] for r in results), "b8": None,
                      "note": "use_extra_bufts=False (repack buffers crash in this build)"}))


if __name__ == "__main__":
    main()
