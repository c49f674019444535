# Two commands from a fresh clone:  `make train` (the embedded default job), `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: train test test-fast check ui clean device-wheels device-check

# checkov (the IaC scan in tests/test_cluster_configs.py) pins boto3, packaging and others below this
# project's versions: it gets a venv of its own.
CHECKOV_VENV ?= .venv-checkov

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

train: $(VENV)/.installed
	$(PY) jobs/train.py $(ARGS)

$(CHECKOV_VENV)/.installed:
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet checkov==3.3.30
	touch $@

test: $(VENV)/.installed $(CHECKOV_VENV)/.installed
	CHECKOV=$(CHECKOV_VENV)/bin/checkov $(PY) -m pytest $(PYTEST_ARGS)

# The inner loop: no Ray, no server, no training run, no job (tests/conftest.py marks the rest slow); ~40 s.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

# Style and types, kept by tools: ruff (lint, format) and mypy over pipeline/. CI runs this first.
check: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

ui: $(VENV)/.installed
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db

clean:
	rm -rf ray_results mlartifacts mlflow.db

# The device check (BENCHMARKS.md, "The device check"). On this machine: the wheels a lent GPU machine lacks
# (Python 3.12, no network there). There: no venv, only its own torch; OUT is the folder that comes back.
DEVICE_WHEELS := .device/wheels
device-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $(DEVICE_WHEELS) simplejpeg

device-check:
	python3 -m pip install --quiet --no-index --no-deps --target .device/site $(DEVICE_WHEELS)/*.whl
	PYTHONPATH=.device/site timeout 480 python3 jobs/gpu_check.py --out $(OUT)/gpu_check.json
