# ComfySwap: thin targets. `make run` runs the service; `make test` passes the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
export PATH := $(CURDIR)/$(BIN):$(PATH)

.DEFAULT_GOAL := help
.PHONY: help install lock peers run demo test test-fast lint fmt mypy bench bundle run-emulated smoke deploy clean

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The install runs again only when one of its inputs changed (the stamp is older), so a
# second `make run` or `make test` starts at once and prints no install output.
STAMP := $(VENV)/.installed
INSTALL_INPUTS := pyproject.toml $(wildcard requirements/*.txt) scripts/fetch_models.py \
	scripts/install_tools.sh $(wildcard scripts/install_*.sh)

$(STAMP): $(INSTALL_INPUTS) | $(PY)
	$(PY) -m pip install --quiet --require-hashes -r requirements/dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) scripts/fetch_models.py
	bash scripts/install_tools.sh
	touch $@

install: $(STAMP) ## Install the project from the hashed lock, face models and emulator tools (when inputs change)

lock: ## Regenerate the hashed locks (requirements/*.txt, functions/*/requirements.txt) from pyproject.toml
	$(PY) scripts/lock.py

peers: ## Install the real ComfyUI (and FaceFusion) into .tools/ for the real-peer tier (COMFYUI_SOURCE=...)
	bash scripts/peers/install_comfyui.sh
	bash scripts/peers/install_facefusion.sh

run: $(STAMP) ## Run the API (three functions) and the runner on embedded defaults
	$(BIN)/comfyswap run

demo: ## Swap the sample faces against the running service (after `make run`)
	$(BIN)/comfyswap demo

test: $(STAMP) ## Run the whole test suite (starts the emulators it needs)
	$(BIN)/pytest -q

test-fast: ## Unit tests only, no install step
	$(BIN)/pytest -q tests/unit

lint: ## ruff and mypy (strict)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy shared gpu_runner comfyswap
	for main in functions/*/main.py; do $(BIN)/mypy $$main || exit 1; done

fmt: ## Format the code
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

mypy: ## Type-check
	$(BIN)/mypy shared gpu_runner comfyswap
	for main in functions/*/main.py; do $(BIN)/mypy $$main || exit 1; done

bench: $(STAMP) ## Print the performance figures (docs: README, Performance)
	$(PY) -m benchmarks.run

bundle: $(PY) ## Build each function's deployable folder under build/functions/
	$(PY) scripts/bundle_functions.py

run-emulated: $(STAMP) ## The cloud code path on one machine: Firestore/Cloud Tasks emulators, fake GCS
	$(PY) scripts/run_emulated.py

smoke: ## System test against a deployed API: make smoke BASE_URL=https://...
	BASE_URL=$(BASE_URL) $(BIN)/pytest -q tests/system

deploy: bundle ## terraform apply (see docs/deploy.md)
	terraform -chdir=infra/terraform init
	terraform -chdir=infra/terraform apply

clean: ## Remove local state and build output
	rm -rf build .comfyswap .pytest_cache .mypy_cache .ruff_cache
