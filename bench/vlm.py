"""VLM rows on the default model's architecture (Idefics3 layout: SigLIP-style ViT + pixel shuffle on SmolLM2):
image preprocessing, time to first token for image + question, the second turn of the same chat. vlmkit loads the
adapter folder (GGUF text model, as the default model ships); transformers the full folder `vlmkit.save` writes
from it (Idefics3ForConditionalGeneration) -- the same weights."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from common import quantize_arg
from vlmkit.benchmark import test_image, timed

QUESTION = "What colour is the big circle?"
FOLLOW_UP = "And how many shapes are there?"
ROOT = Path(__file__).resolve().parents[1]  # the checkout: the default model's recipe is in recipes/ there


def model_folders(work: Path, model: str | None, log=print) -> dict:
    """{"adapter": folder vlmkit loads, "full": the same model as a full HF folder, "trained": bool}."""
    import vlmkit
    from vlmkit.api import default_model_path
    from vlmkit.checkpoints.adapter import is_adapter_folder

    candidates = [Path(model)] if model and model != "default" else [default_model_path(), Path("runs/default")]
    source = next((c for c in candidates if (c / "config.json").is_file() and
                   (is_adapter_folder(c) or (c / "model.safetensors").is_file())), None)
    trained = source is not None
    if source is None:  # not trained yet: the same architecture with random vision weights (timing only)
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from recipes.default_model.config import RecipeConfig
        from recipes.default_model.model_folder import export_adapter, prepare_folder

        log("no trained default model found: timing the default architecture with random vision weights")
        net, _ = prepare_folder(work / "prepared", RecipeConfig())
        export_adapter(net, work / "prepared", work / "adapter")
        source = work / "adapter"
    full = work / "full"
    if not (full / "config.json").is_file():
        vlmkit.save(vlmkit.load(source, caches=False), full)
    return {"adapter": source, "full": full, "trained": trained}


def first_turn(image):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]


def second_turn(image, answer: str):
    return first_turn(image) + [{"role": "assistant", "content": [{"type": "text", "text": answer}]},
                                {"role": "user", "content": [{"type": "text", "text": FOLLOW_UP}]}]


def preprocessing(n_images: int = 8, repeat: int = 3) -> dict:
    """Idefics2 preprocessing with image splitting at 980 px (4 crops + the whole image, each up to 980 px):
    images/s of vlmkit and of transformers' Idefics2 PIL processor, on the same photos."""
    from vlmkit.processing.image_processors import image_processor_for

    images = [test_image((1960, 1470), seed=i) for i in range(n_images)]
    settings = {"do_image_splitting": True, "size": {"shortest_edge": 378, "longest_edge": 980}}
    ours = image_processor_for("idefics2", settings)
    out = {"images": n_images, "size": "1960x1470"}
    out["vlmkit"] = n_images / timed(lambda: ours([[im] for im in images]), repeat)
    try:
        import transformers

        theirs = transformers.Idefics2ImageProcessorPil(**settings)
        a = ours([[im] for im in images[:2]])["pixel_values"]
        b = theirs([[im] for im in images[:2]], return_tensors="pt")["pixel_values"]
        out["equal_output"] = bool(torch.equal(a, b))
        out["transformers"] = n_images / timed(lambda: theirs([[im] for im in images], return_tensors="pt"), repeat)
    except Exception as e:  # noqa: BLE001
        out["transformers_error"] = f"{type(e).__name__}: {e}"
    return out


def vlmkit_rows(folder: Path, mode: str, repeat: int, log=print) -> dict:
    import vlmkit

    image = test_image()
    m = vlmkit.load(folder, quantize=quantize_arg(mode))

    def cold():
        m.clear_caches()
        return m.chat(first_turn(image), max_new_tokens=1)

    ttft = timed(cold, repeat)
    m.clear_caches()
    answer = m.chat(first_turn(image), max_new_tokens=24)
    second_prompt = second_turn(image, answer)

    def warm():  # the chat state after turn 1: drop what turn 2 itself adds, keep turn 1's entry
        entries = list(m.prefix_cache._entries)
        m.chat(second_prompt, max_new_tokens=1)
        m.prefix_cache._entries = entries

    second = timed(warm, repeat)
    m.clear_caches()
    t0 = time.perf_counter()
    m.chat(second_prompt, max_new_tokens=1)  # the same second turn without caches, for reference
    second_cold = time.perf_counter() - t0
    log(f"vlmkit {mode}: time to first token {ttft * 1e3:.0f} ms, second turn {second * 1e3:.0f} ms "
        f"(uncached {second_cold * 1e3:.0f} ms)")
    return {"ttft": ttft, "second": second, "second_uncached": second_cold, "answer": answer}


def transformers_rows(folder: Path, repeat: int, log=print) -> dict:
    import transformers

    model = transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    proc = transformers.AutoProcessor.from_pretrained(folder)
    image = test_image()

    def answer(messages, new_tokens):
        text = proc.apply_chat_template(messages, add_generation_prompt=True)
        inputs = proc(text=text, images=[[image]], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        return proc.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def strip_images(messages):  # the processor takes images separately
        return [{**msg, "content": [{k: v for k, v in p.items() if k != "image"} for p in msg["content"]]}
                for msg in messages]

    ttft = timed(lambda: answer(strip_images(first_turn(image)), 1), repeat)
    first = answer(strip_images(first_turn(image)), 24)
    second = timed(lambda: answer(strip_images(second_turn(image, first)), 1), repeat)
    log(f"transformers float32: time to first token {ttft * 1e3:.0f} ms, second turn {second * 1e3:.0f} ms")
    return {"ttft": ttft, "second": second, "answer": first}


def measure(folders: dict, modes, repeat: int = 5, log=print) -> dict:
    results = {"folders": {k: str(v) for k, v in folders.items()}, "preprocessing": preprocessing()}
    log(f"preprocessing: {results['preprocessing']}")
    for mode in modes:
        try:
            results[f"vlmkit {mode}"] = vlmkit_rows(folders["adapter"], mode, repeat, log)
        except Exception as e:  # noqa: BLE001
            results[f"vlmkit {mode}"] = {"error": f"{type(e).__name__}: {e}"}
            log(f"vlmkit {mode}: failed: {e}")
    try:
        results["transformers float32"] = transformers_rows(folders["full"], repeat, log)
    except Exception as e:  # noqa: BLE001
        results["transformers float32"] = {"error": f"{type(e).__name__}: {e}"}
        log(f"transformers: failed: {e}")
    return results
