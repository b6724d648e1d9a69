# Quick start: `make run` (train on Fashion-MNIST through Airflow), `make test` (the test suite).
# Every target sets up what it needs and is safe to run again.

SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The embedded stores: PIPELINE_HOME when set (the pipeline reads it too), else .runtime/.
RUNTIME := $(or $(PIPELINE_HOME),$(CURDIR)/.runtime)
MLFLOW_URI := $(or $(MLFLOW_TRACKING_URI),sqlite:///$(RUNTIME)/mlflow.db)

# The embedded mode: Airflow on SQLite under $(RUNTIME)/airflow, this checkout's DAGs and plugins.
export AIRFLOW_HOME := $(RUNTIME)/airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export GX_ANALYTICS_ENABLED := False

.DEFAULT_GOAL := help
# A recipe that fails leaves no target behind (a failed airflow-init runs again next time).
.DELETE_ON_ERROR:
.PHONY: help run test test-fast test-slow lint docs venv dataset browser airflow-init airflow-ui mlflow-ui lock clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[test]'
# litdata without its declared deps, which it imports only for what the pipeline does not use:
# torchvision (PyPI's does not load beside the CPU torch), obstore (its optional S3 path, which
# cannot reach an http:// endpoint such as MinIO's or moto's) and tifffile (docs/data.md).
	$(BIN)/pip install -q -c requirements.lock --no-deps litdata
	@touch $@

venv: $(BIN)/.installed ## create .venv with the pinned packages (requirements.lock)

dataset: ## make sure the Fashion-MNIST files are on disk (Debian package, else download)
	@scripts/get_dataset.sh >/dev/null

browser: ## make sure Debian's chromium is on disk for the browser tests (tests/e2e/)
	@scripts/get_chromium.sh >/dev/null

# The same script the compose stack's airflow-init service runs (migrations, the promotions pool);
# it is safe to run again, so a changed script or a reinstalled venv (new migrations) runs it again.
$(AIRFLOW_HOME)/init.done: scripts/airflow-init.sh $(BIN)/.installed
	@install -d -m 700 $(RUNTIME) && mkdir -p $(AIRFLOW_HOME)
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/airflow-init.sh > $(AIRFLOW_HOME)/init.log 2>&1 \
	  || { tail -20 $(AIRFLOW_HOME)/init.log; exit 1; }
	@touch $@

airflow-init: $(AIRFLOW_HOME)/init.done ## create or upgrade the Airflow metadata DB (SQLite) and its pools

run: venv airflow-init ## train on the full dataset through Airflow, then print the model version
	@install -d -m 700 $(RUNTIME) && source_uri=$${PIPELINE_SOURCE_URI:-$$(scripts/get_dataset.sh)} && \
	  echo "running DAG training_pipeline on $$source_uri (log: $(RUNTIME)/last-run.log)" && \
	  PIPELINE_SOURCE_URI=$$source_uri $(BIN)/airflow dags test training_pipeline > $(RUNTIME)/last-run.log 2>&1 \
	  || { grep -E "error|Error" $(RUNTIME)/last-run.log | tail -5; echo "DAG run failed; see $(RUNTIME)/last-run.log"; exit 1; }
	@$(BIN)/pipeline summary --alias staging

test: venv dataset browser ## the whole test suite: the fast tier, then the slow tier (each step timed)
	@$(MAKE) --no-print-directory test-fast test-slow

test-fast: venv dataset ## the tests not marked slow or integration (a few minutes)
	@t0=$$SECONDS; $(BIN)/pytest -m "not slow and not integration and not e2e"; rc=$$?; \
	  echo "== fast tier: $$((SECONDS - t0)) s"; exit $$rc

test-slow: venv dataset browser ## the slow tier: trainings, whole DAG runs, real service processes, the browser
	@t0=$$SECONDS; $(BIN)/pytest -m "slow or integration or e2e"; rc=$$?; \
	  echo "== slow tier: $$((SECONDS - t0)) s"; exit $$rc

docs: venv ## regenerate the Params table in docs/configuration.md from the config fields
	$(BIN)/python -m pipeline.entrypoints.flags docs/configuration.md

lint: venv ## ruff (Airflow's AIR rules on dags/), ruff format, the layer contract, mypy on pipeline/
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

airflow-ui: venv airflow-init ## Airflow UI on this checkout's stores at http://127.0.0.1:8080 (loopback only, no login)
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/airflow-ui.sh

mlflow-ui: venv ## MLflow UI on this checkout's store at http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_URI) --host 127.0.0.1 --port 5000

lock: ## re-pin requirements.lock from the current .venv
	{ head -2 requirements.lock; $(BIN)/pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean: ## remove everything the pipeline wrote (.runtime/); keeps .venv
	rm -rf $(RUNTIME)
