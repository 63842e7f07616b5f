# sftray: `make help` lists every target. The first use of any target that needs Python creates .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help venv prep preview train sweep mlflow-ui pretrain config test test-fast lint clean

help: ## show this help
	@echo "usage: make TARGET [ARGS='hydra overrides'] [TORCH_SPEC='torch==X']"
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP) ## create/refresh .venv (torch from TORCH_SPEC, then sftray with its dev extra)

prep: $(STAMP) ## run the data pipeline: Parquet rows + data report (ARGS='data=files ...')
	$(VENV)/bin/sftray prep $(ARGS)

preview: $(STAMP) ## print the first examples with trained tokens marked (ARGS='n=3 ...')
	$(VENV)/bin/sftray preview $(ARGS)

train: $(STAMP) ## one training run (ARGS='train=full train.epochs=3 ...'; resume_from=CHECKPOINT resumes)
	$(VENV)/bin/sftray train $(ARGS) $(if $(resume_from),train.resume_from=$(resume_from))

sweep: $(STAMP) ## the Ray Tune sweep (conf/sweep), every trial in MLflow (ARGS='sweep.epochs=[1,2,3] train=full')
	$(VENV)/bin/sftray sweep $(ARGS)

mlflow-ui: $(STAMP) ## browse runs: MLflow UI on 127.0.0.1:5000 over the default store (outputs/mlflow.db)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(abspath $(or $(SFTRAY_OUTPUT),outputs))/mlflow.db --host 127.0.0.1 --port 5000

pretrain: $(STAMP) ## build the builtin tiny-llama base model once (cached in paths.cache_dir; --force via ARGS)
	$(VENV)/bin/sftray pretrain $(ARGS)

config: $(STAMP) ## print the composed configuration (ARGS='overrides')
	$(VENV)/bin/sftray config $(ARGS)

test: $(STAMP) ## every test, end-to-end included (~15 min on 2 CPUs)
	$(PY) -m pytest $(ARGS)

test-fast: $(STAMP) ## unit tests only: no Ray, no end-to-end runs (inner loop)
	$(PY) -m pytest -m "not ray and not slow" $(ARGS)

lint: $(STAMP) ## ruff check + format check
	$(VENV)/bin/ruff check sftray tests
	$(VENV)/bin/ruff format --check sftray tests

clean: ## remove outputs and caches (keeps .venv)
	rm -rf outputs .pytest_cache .ruff_cache
