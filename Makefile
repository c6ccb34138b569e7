# layercard — two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= runs/demo
LOCK := requirements.lock
# Where torch's CPU wheel comes from when locking: pip's configured find-links (a local wheel
# mirror), else PyTorch's CPU index.
TORCH_CPU_LINKS ?= $(or $(shell $(PY) -m pip config get global.find-links 2>/dev/null),https://download.pytorch.org/whl/cpu/torch/)
UV_COMPILE = uv pip compile pyproject.toml -c constraints.txt --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock"

.PHONY: venv dev demo demo-tiny fetch test lock clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first (the CPU wheel on the machine), then exactly the versions and files of requirements.lock
# (every archive checked against its sha256; torch is left out of it because its CPU wheel has other
# hashes on every mirror), then layercard itself without resolving anything.
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt $(LOCK)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --require-hashes -r $(LOCK)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

# The lock holds the dev tools (pytest) too.
$(VENV)/.installed-dev: $(VENV)/.installed
	touch $@

# Regenerate the locks after changing pyproject.toml or constraints.txt:
#   requirements.lock      CPU (make test / make demo): torch's CPU build resolved, torch itself left out
#   requirements-gpu.lock  the cluster image and runtime env: PyPI's CUDA torch and its nvidia-* wheels;
#                          ray itself left out (the rayproject/ray image and cluster nodes bring it)
lock: $(BIN)/python
	$(BIN)/pip install -q uv
	$(BIN)/$(UV_COMPILE) -q --extra dev --no-emit-package torch --find-links $(TORCH_CPU_LINKS) -o $(LOCK)
	$(BIN)/$(UV_COMPILE) -q --no-emit-package ray -o requirements-gpu.lock

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
