"""Does the default model still answer plain text questions as SmolLM2 does? Prints a table: question, SmolLM2's
greedy answer (from its GGUF), the default model's, whether they are identical, and for how many tokens they agree
before they part (greedy answers that part at one token go their own ways after it).

    python -m recipes.default_model.probes.text_answers [--model default] [--max-new-tokens 40]
"""

from __future__ import annotations

import argparse

import torch

import vlmkit
from vlmkit.checkpoints.adapter import resolve_gguf
from vlmkit.checkpoints.gguf import load_gguf_text
from vlmkit.generation.loop import GenerationConfig, generate
from vlmkit.models.text import TextDecoder
from vlmkit.processing.gguf_tokenizer import tokenizer_from_gguf

from ..config import Architecture

QUESTIONS = [
    "What is the capital of France?", "What is 12 times 7?", "Name three primary colors.",
    "Who wrote Romeo and Juliet?", "What is the boiling point of water in Celsius?",
    "Translate 'good morning' into French.", "What is the largest planet in our solar system?",
    "Give me a synonym for happy.", "How many legs does a spider have?", "What is photosynthesis?",
    "Write a haiku about the sea.", "What is the square root of 81?", "Which ocean is the largest?",
    "What language is spoken in Brazil?", "What is the chemical symbol for gold?",
    "How many days are in a leap year?", "Who painted the Mona Lisa?", "What is the opposite of cold?",
    "What do bees make?", "Name a mammal that can fly.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="default")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    args = ap.parse_args()

    m = vlmkit.load(args.model)
    text_cfg, state = load_gguf_text(resolve_gguf(Architecture().base_gguf))
    tok = tokenizer_from_gguf(resolve_gguf(Architecture().base_gguf))
    base = TextDecoder(text_cfg)
    base.load_state_dict(state)
    base.eval()
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, eos_token_ids=tok.eos_token_ids)
    same, agreed, total = 0, 0, 0
    print("| question | SmolLM2 | default model | same | tokens agreed |\n|---|---|---|---|---:|")
    for q in QUESTIONS:
        messages = [{"role": "user", "content": q}]
        ids = torch.tensor([tok.encode(tok.render_chat(messages), add_special_tokens=False)])
        with torch.no_grad():
            ref = generate(base, tok, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, cfg)[0]
        ours = m.chat(messages, max_new_tokens=args.max_new_tokens)
        a, b = (tok.encode(x, add_special_tokens=False) for x in (ref, ours))
        prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same, agreed, total = same + (ref == ours), agreed + prefix, total + len(a)
        cell = lambda s: s.replace("\n", " ").replace("|", "/")[:80]  # noqa: E731
        print(f"| {q} | {cell(ref)} | {cell(ours)} | {'yes' if ref == ours else 'no'} | {prefix}/{len(a)} |")
    print(f"\nidentical greedy answers: {same}/{len(QUESTIONS)}; tokens agreed before parting: {agreed}/{total} "
          f"of SmolLM2's ({100 * agreed / max(1, total):.0f} %)")


if __name__ == "__main__":
    main()
