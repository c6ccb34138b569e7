# layercard — two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: venv dev demo fetch test clean

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

# The whole product on a tiny random model (profile → report → select → train ×3 → table).
# The SmolLM2 demo of issue 8 will replace it; `make fetch` already prepares its model and data.
demo: $(VENV)/.installed
	rm -rf $(OUT)
	$(BIN)/python -m pipelines.demo --config configs/demo-tiny.yaml --out $(OUT)
	$(BIN)/layercard show $(OUT)/card

fetch: $(VENV)/.installed
	$(BIN)/layercard fetch --prepare sentiment,headline

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
