# The two commands (README): `make run` (main job, embedded default, no broker) and `make test` (everything,
# a real Kafka broker included). Both build the cached virtualenv on first use (deploy/venv.sh).
SHELL := /bin/bash
VENV = $(shell bash deploy/venv.sh)
export PYTHONHASHSEED = 0

.PHONY: run test lint venv

venv:
	@bash deploy/venv.sh

run:
	@$(VENV)/bin/sparc demo

lint:
	@$(VENV)/bin/ruff check .

# Unit tests, then the Kafka-marked tests against a broker this target starts (and always stops).
test:
	@set -e; venv="$(VENV)"; \
	$$venv/bin/ruff check .; \
	$$venv/bin/python -m pytest -m "not kafka" $(PYTEST_ARGS)
