# layercard — two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: venv dev demo demo-tiny fetch test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first (the CPU wheel on the machine), then everything else constrained to it.
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

venv: $(VENV)/.installed
dev: $(VENV)/.installed-dev

# The whole product on SmolLM2-135M and the sentiment task: fetch (once, cached) → profile on Ray →
# card + report → select (max-quality k=5, min-cost 0.95) → LoRA on each and on all layers → table.
# `make demo-tiny` runs the same path on a tiny random model in ~2 minutes (what CI smoke-tests).
demo: fetch
	rm -rf $(OUT)
	$(BIN)/python -m pipelines.demo --config configs/demo-smollm2.yaml --out $(OUT)
	$(BIN)/layercard show $(OUT)/card

demo-tiny: $(VENV)/.installed
	rm -rf $(OUT)-tiny
	$(BIN)/python -m pipelines.demo --config configs/demo-tiny.yaml --out $(OUT)-tiny
	$(BIN)/layercard show $(OUT)-tiny/card

fetch: $(VENV)/.installed
	$(BIN)/layercard fetch --prepare sentiment,headline

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q --durations=15 tests

clean:
	rm -rf $(VENV) runs
