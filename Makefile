# sftray: `make help` lists every target. The first use of any target that needs Python creates .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
OUTPUT_DIR ?= $(abspath $(or $(SFTRAY_OUTPUT),outputs))
MLFLOW_URI ?= sqlite:///$(OUTPUT_DIR)/mlflow.db
SWEEP ?= demo
BENCH_SIZE ?= small
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help venv prep preview train sweep submit mlflow-ui report bench pretrain config test test-fast lint clean

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

submit: $(STAMP) ## run the sweep on a Ray cluster as a job (SUBMIT='--address http://HEAD:8265 --output-dir /shared/x' ARGS=...)
	$(PY) jobs/submit.py $(SUBMIT) -- $(ARGS)

mlflow-ui: $(STAMP) ## browse runs: MLflow UI on 127.0.0.1:5000 over the default store (outputs/mlflow.db, artifacts in outputs/mlartifacts; MLFLOW_URI=...)
	$(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_URI) --host 127.0.0.1 --port 5000 \
		--artifacts-destination $(dir $(patsubst sqlite:///%,%,$(MLFLOW_URI)))mlartifacts

report: $(STAMP) ## render analysis/sweep_report.ipynb for one sweep to outputs/sweep_report-SWEEP.html (SWEEP=demo MLFLOW_URI=...)
	@$(PY) -m sftray.tracking.sweep_report '$(MLFLOW_URI)' '$(SWEEP)'
	SFTRAY_SWEEP=$(SWEEP) SFTRAY_MLFLOW_URI=$(MLFLOW_URI) $(VENV)/bin/jupyter nbconvert --to html --execute \
		--no-input analysis/sweep_report.ipynb --output-dir $(OUTPUT_DIR) --output sweep_report-$(SWEEP)
	@echo "report: $(OUTPUT_DIR)/sweep_report-$(SWEEP).html"

bench: $(STAMP) ## sftray vs TRL SFTTrainer and the limits -> outputs/bench/bench.{json,md} (BENCH_SIZE=smoke|small|full, ARGS='--repeats 5')
	$(PY) -m sftray.bench --size $(BENCH_SIZE) --out $(OUTPUT_DIR)/bench $(ARGS)

pretrain: $(STAMP) ## build the builtin tiny-llama base model once (cached in paths.cache_dir; --force via ARGS)
	$(VENV)/bin/sftray pretrain $(ARGS)

config: $(STAMP) ## print the composed configuration (ARGS='overrides')
	$(VENV)/bin/sftray config $(ARGS)

test: $(STAMP) ## every test, end-to-end included (~25 min on 2 CPUs)
	$(PY) -m pytest $(ARGS)

test-fast: $(STAMP) ## unit tests only: no Ray, no end-to-end runs (inner loop)
	$(PY) -m pytest -m "not ray and not slow" $(ARGS)

lint: $(STAMP) ## ruff check + format check
	$(VENV)/bin/ruff check sftray tests
	$(VENV)/bin/ruff format --check sftray tests

clean: ## remove the outputs (SFTRAY_OUTPUT, default outputs/) and test caches (keeps .venv)
	rm -rf $(OUTPUT_DIR) .pytest_cache .ruff_cache
