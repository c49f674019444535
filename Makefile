# Two commands from a fresh clone:  `make train` (the embedded default job), `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: train test ui clean

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

ui: $(VENV)/.installed
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db

clean:
	rm -rf ray_results mlartifacts mlflow.db
