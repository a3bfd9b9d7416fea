# make install: idempotent; creates .venv with pip, installs torch==2.13.0 first (the local CPU build: any
#               other version pulls gigabytes of CUDA wheels), then ovseg with everything the app and tests need.
#               Elsewhere torch==2.13.0 resolves to the CUDA build: `make install CPU=1` takes the CPU build from
#               PyTorch's CPU index instead (TORCH_INDEX=URL names another index).
# make app:     install, then start ovseg-app on 127.0.0.1 (PORT=7860 by default).
# make test:    install, then run the whole test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 7860
STAMP := $(VENV)/.ovseg-installed
# CPU=1 (or yes, true): torch's CPU build from PyTorch's CPU wheel index; TORCH_INDEX=URL: any index. Unset:
# pip's own configuration, as before (this workplace's local CPU wheel).
CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= $(if $(filter 1 yes true,$(CPU)),$(CPU_INDEX),)
TORCH_PIP_ARGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.PHONY: install app test eval clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIP_ARGS) torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip check
	@touch $(STAMP)

app: install
	$(VENV)/bin/ovseg-app --host 127.0.0.1 --port $(PORT)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

eval: install
	$(VENV)/bin/ovseg eval ../shared/data/coco_dev --methods cam --out runs/eval

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache tests/artifacts
