# The two entry points of the README. Both run the idempotent set-up first.
SHELL := /bin/bash

.PHONY: setup quickstart test lint

setup:
	@scripts/setup.sh

quickstart: setup
	@scripts/quickstart.sh

test: setup
	@scripts/test.sh

lint: setup
	@.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy && .venv/bin/lint-imports --no-cache
