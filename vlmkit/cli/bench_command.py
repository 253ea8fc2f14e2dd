"""`vlmkit bench`: how fast a model runs on this machine (vlmkit.benchmark). The comparison with transformers and
llama.cpp that writes bench/results.md is `python -m bench`, from a source checkout."""

from __future__ import annotations

import json
import sys

from .common import (MODEL, PROG, REMOTE_IMAGES, arg, command, load_images, load_model, positive_int,
                     remote_images_allowed, status)


@command("bench", "time a model on this machine: load, first token, prefill and decode tokens/s, peak memory",
         *MODEL, REMOTE_IMAGES,
         arg("--image", "-i", default=None, metavar="PATH",
             help="the image (file or http(s) URL) to ask about (default: a generated one)"),
         arg("--prompt", default="Describe this image.", metavar="TEXT", help="the question (default: %(default)s)"),
         arg("--new-tokens", type=positive_int, default=128, metavar="N",
             help="tokens generated per run, end of sequence ignored (default 128)"),
         arg("--repeat", type=positive_int, default=3, metavar="R", help="timed runs, after one warm-up (default 3)"),
         arg("--threads", type=positive_int, default=None, help="torch threads (default: torch's, all cores)"),
         arg("--json", action="store_true", help="print the measurements as JSON"),
         description="Time a model on this machine, as llama-bench does: load, image preprocessing, time to first "
                     "token, prefill and decode tokens/s, peak memory. The comparison with transformers and "
                     "llama.cpp (bench/results.md) is `python -m bench`, in a source checkout.")
def cmd_bench(args) -> int:
    images = load_images([args.image] if args.image else [], remote_images_allowed(args))
    from ..benchmark import bench_model, render

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    log = (lambda message: None) if args.json else (lambda message: status(f"{PROG} bench: {message}"))
    results = bench_model(lambda: load_model(args), images[0] if images else None, args.prompt, args.new_tokens,
                          args.repeat, log)
    results["model"] = args.model
    sys.stdout.write(json.dumps(results, indent=2) + "\n" if args.json else render(results))
    return 0
