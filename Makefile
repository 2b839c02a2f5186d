# The two commands a user needs: `make dev` and `make test`.
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")

.PHONY: help install test unit integration lint format bench clean

help:
	@echo "make test   run linters and the whole test suite (needs Redis, PostgreSQL, RabbitMQ)"
	@echo "make bench  run the benchmarks (see bench/README.md)"

# uv is the only tool we install outside the project's environment.
install:
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) sync --frozen

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
