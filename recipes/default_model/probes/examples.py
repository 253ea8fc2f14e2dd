"""Ask a model the example questions of `examples/README.md` (its table: image, question, expected answer) and
print what it answers, scored by the benchmark's exact match (`vlmkit.eval.metrics.exact_match`).

    python -m recipes.default_model.probes.examples [MODEL]   # default: the shipped default model
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from PIL import Image

import vlmkit
from vlmkit.eval.metrics import exact_match

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def example_questions(readme: Path = EXAMPLES / "README.md") -> list[tuple[str, str, str]]:
    """(image file, question, answer) rows of the README's table; a row with no image uses the one above."""
    rows, image = [], None
    for line in readme.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 3 or cells[1] in ("question", "---"):
            continue
        named = re.search(r"`([^`]+\.png)`", cells[0])
        image = named.group(1) if named else image
        rows.append((image, cells[1], cells[2]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="default")
    args = ap.parse_args()
    model = vlmkit.load(args.model)
    rows, right = example_questions(), 0
    print("| image | question | answer | expected | |\n|---|---|---|---|---|")
    for image, question, expected in rows:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        answer = model.generate(messages, images=[Image.open(EXAMPLES / image)], max_new_tokens=12).strip()
        ok = bool(exact_match(answer, expected))
        right += ok
        print(f"| {image} | {question} | {answer} | {expected} | {'right' if ok else 'wrong'} |")
    print(f"\n{right}/{len(rows)} right")


if __name__ == "__main__":
    main()
