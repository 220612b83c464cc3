# make demo   - create .venv, install, run `dist-secvec demo` on the embedded tiny world
# make test   - create .venv, install with test extras, run the test suite
# Torch: the CPU build where no NVIDIA GPU is present (set TORCH_CPU_INDEX to fetch it from the
# PyTorch CPU index elsewhere), the default CUDA build otherwise. TORCH_VERSION pins it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?=
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_INDEX_ARG := $(if $(HAS_GPU),,$(if $(TORCH_CPU_INDEX),--index-url $(TORCH_CPU_INDEX),))
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)" $(TORCH_INDEX_ARG)
	# name torch again so no dependency can swap it for another (CUDA) build
	$(BIN)/pip install -q -e ".[test]" "torch==$(TORCH_VERSION)"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/dist-secvec demo $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
