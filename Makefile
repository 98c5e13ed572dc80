# Fleet: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run test test-fast lint format bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install Fleet with its dev tools

run: install ## Run Fleet on the embedded default (SQLite, no broker server, local host, demo agent)
	$(BIN)/fleet up

test: install ## Run the whole test suite (services it needs are used for real)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install ## ruff (lint + format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install ## Apply ruff's formatting and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install ## Run the benchmarks under ops/bench (PostgreSQL and Redis required)
	for script in ops/bench/*.py; do $(BIN)/python $$script || exit 1; done

clean: ## Remove the virtualenv, caches and the embedded default's state (./.fleet)
	rm -rf $(VENV) .fleet .pytest_cache .mypy_cache .ruff_cache
