"""Child process of the benchmark: peak memory of loading one model and answering one question.

    python bench/memory_probe.py vlmkit '{"folder": "...", "mode": "int4"}'
    python bench/memory_probe.py transformers '{"folder": "..."}'

Prints one JSON line: peak RSS, RSS after the imports, and their difference (what the model costs)."""

from __future__ import annotations

import json
import sys

import torch  # noqa: F401  (imported before the baseline is read)

from common import quantize_arg
from vlm import QUESTION, first_turn
from vlmkit.benchmark import peak_rss_bytes, rss_bytes, test_image


def main() -> None:
    kind, options = sys.argv[1], json.loads(sys.argv[2])
    if kind == "vlmkit":
        import vlmkit
        import vlmkit.models.quant  # noqa: F401
        import vlmkit.processing.processor  # noqa: F401
    else:
        import transformers

        transformers.AutoModelForImageTextToText  # noqa: B018  (resolve the lazy import now)
    image = test_image()
    base = rss_bytes()
    if kind == "vlmkit":
        m = vlmkit.load(options["folder"], quantize=quantize_arg(options["mode"]))
        m.chat(first_turn(image), max_new_tokens=16)
    else:
        model = transformers.AutoModelForImageTextToText.from_pretrained(options["folder"], dtype=torch.float32)
        proc = transformers.AutoProcessor.from_pretrained(options["folder"])
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        inputs = proc(text=proc.apply_chat_template(messages, add_generation_prompt=True), images=[[image]],
                      return_tensors="pt")
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=16, do_sample=False)
    peak = peak_rss_bytes()
    print(json.dumps({"peak": peak, "base": base, "delta": peak - base}))


if __name__ == "__main__":
    main()
