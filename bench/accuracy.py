"""Accuracy rows: the default model's own benchmark (`vlmkit eval --task synthetic`, the first N items, greedy)
in float32, int8 and int4 -- the share of items whose int8 / int4 answer equals the float32 one, and each mode's
exact-match accuracy."""

from __future__ import annotations

from pathlib import Path

from common import quantize_arg


def measure(folder: Path, work: Path, modes, limit: int = 450, batch_size: int = 8, log=print) -> dict:
    import vlmkit
    from vlmkit.eval.runner import evaluate, load_predictions

    out = {"limit": limit, "folder": str(folder)}
    preds = {}
    for mode in modes:
        results = evaluate(lambda: vlmkit.load(folder, quantize=quantize_arg(mode)), "synthetic", limit=limit,
                           batch_size=batch_size, output_dir=work / f"eval-{mode}", overwrite=True, progress=False,
                           model_name=f"default-{mode}", log=lambda msg: None)
        preds[mode] = {k: v["prediction"] for k, v in load_predictions(work / f"eval-{mode}" / "predictions.jsonl").items()}
        out[mode] = {"exact_match": results["metrics"].get("exact_match"), "failed": results["failed"]}
        log(f"accuracy {mode}: exact match {out[mode]['exact_match']}")
    if "float32" in preds:
        ref = preds["float32"]
        for mode in modes:
            if mode != "float32":
                same = sum(preds[mode].get(k) == v for k, v in ref.items())
                out[mode]["same_as_float32"] = same / max(1, len(ref))
    return out
