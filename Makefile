# The two commands a user needs: `make dev` and `make test`.
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")

.PHONY: help install dev test unit integration lint format bench clean

help:
	@echo "make dev    run DLM on this machine: Dagster UI, API, S3, Redis, mock events (Ctrl-C stops)"
	@echo "make test   run linters and the whole test suite (needs Redis, PostgreSQL, RabbitMQ)"
	@echo "make bench  run the benchmarks (see bench/README.md)"

# uv is the only tool we install outside the project's environment.
# Bytecode compiled at install, the project's own too: each Dagster run starts a fresh
# interpreter, which would otherwise compile Dagster and the DLM from source (on every
# run where PYTHONDONTWRITEBYTECODE is set, or the source folder is not writable).
install:
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) sync --frozen --compile-bytecode
	$(UV) run --frozen python -m compileall -q dlm_pipelines dlm_api

# Everything on loopback, state under .dlm/ (kept between runs). Options, e.g.:
#   make dev DEV_ARGS="--ui-port 3001 --api-port 8001 --malformed 0.1"
dev: install
	$(UV) run --frozen dlm dev $(DEV_ARGS)

lint: install
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run mypy

format: install
	$(UV) run ruff check --fix .
	$(UV) run ruff format .

test: lint
	$(UV) run pytest -ra

unit: install
	$(UV) run pytest -ra tests/unit

integration: install
	$(UV) run pytest -ra tests/integration

bench: install
	$(UV) run python -m bench

clean:
	rm -rf .dlm .pytest_cache .mypy_cache .ruff_cache
