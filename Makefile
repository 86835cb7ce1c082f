# The two commands (README): `make run` (main job, embedded default, no broker) and `make test` (everything,
# a real Kafka broker included). Both build the cached virtualenv on first use (deploy/venv.sh).
SHELL := /bin/bash
VENV = $(shell bash deploy/venv.sh)
export PYTHONHASHSEED = 0

.PHONY: run test lint venv lock

venv:
	@bash deploy/venv.sh

run:
	@$(VENV)/bin/sparc demo

lint:
	@$(VENV)/bin/ruff check .

# requirements.lock from pyproject.toml's ranges: every package pinned with its hashes (deploy/lock.sh; uv in a
# throwaway virtualenv). LOCK_ARGS=--upgrade moves to the newest versions within the ranges.
lock:
	@bash deploy/lock.sh $(LOCK_ARGS)

# Unit tests, then the Kafka-marked tests against a broker this target starts (and always stops).
# The broker is deploy/kafka/broker.sh's (Java + Maven; see deploy/kafka/README.md) in its secured mode: the
# PLAINTEXT listener most tests use, plus SASL_SSL and SSL listeners for the secured end-to-end test; its address
# is the last line start prints. The target fails if the broker cannot start, and exits with pytest's status
# otherwise.
test:
	@set -euo pipefail; venv="$(VENV)"; export SPARC_KAFKA_SECURITY=sasl_ssl; \
	$$venv/bin/ruff check .; \
	$$venv/bin/python -m pytest -m "not kafka" $(PYTEST_ARGS); \
	trap 'bash deploy/kafka/broker.sh stop' EXIT; \
	bootstrap="$$(bash deploy/kafka/broker.sh start | tail -n 1)"; \
	KAFKA_BOOTSTRAP_SERVERS="$$bootstrap" $$venv/bin/python -m pytest -m kafka $(PYTEST_ARGS)
