# make install: idempotent; creates .venv with pip, installs torch==2.13.0 first (the local CPU build: any
#               other version pulls gigabytes of CUDA wheels), then ovseg with everything the app and tests need.
# make app:     install, then start ovseg-app on 127.0.0.1 (PORT=7860 by default).
# make test:    install, then run the whole test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 7860
STAMP := $(VENV)/.ovseg-installed

.PHONY: install app test eval clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
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
