# The two commands of the README. Both set up everything they need on a fresh machine.
.PHONY: serve test lint docs bootstrap demo-model

bootstrap:
	@scripts/bootstrap.sh

## Start Triton + the gateway on http://127.0.0.1:8080 (exports the tiny demo pipelines on first run).
serve: bootstrap
	.venv/bin/python -m gateway --allow-anonymous $(ARGS)

## Run lint, the docs build and the whole test suite (unit + integration against a real Triton).
test: bootstrap
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/python -m mypy
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir site
	.venv/bin/python -m pytest $(ARGS)

## Static checks only: ruff (lint + format) and mypy --strict over gateway/ and export/ (see pyproject.toml).
lint: bootstrap
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/python -m mypy

## The manual (docs/) as a site in site/; --strict: a broken link or anchor between pages is an error.
docs: bootstrap
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir site
