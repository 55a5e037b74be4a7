# One entry point for running, testing and measuring the stack without Docker.
#   make up     HAProxy on 127.0.0.1:9999 + two instances (+ simulators on 8001/8002)
#   make down   stop exactly what `make up` started
#   make test   install what is missing, then run the whole test suite
#   make bench  the Rinha-style k6 run against the stack and against the HAProxy floor
SHELL := /bin/bash
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup up down test bench profile microbench clean

$(STAMP): requirements.txt requirements-dev.txt
	@missing=$$(for tool in haproxy chromium; do command -v $$tool >/dev/null || echo $$tool; done); \
	  [ -z "$$missing" ] || { echo "installing" $$missing "(Debian packages)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	@touch $(STAMP)

setup: $(STAMP)

up: $(STAMP)
	@scripts/up.sh

down:
	@scripts/down.sh

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

profile: $(STAMP)
	$(PY) bench/run.py --profile $(BENCH_ARGS)

microbench: $(STAMP)
	$(PY) bench/micro.py

clean: down
	rm -rf $(VENV) run results

# The fault, fuzz and slow-client experiments at full length (docs/RELIABILITY.md), ~7 min.
chaos: $(STAMP)
	$(PY) scripts/chaos.py $(CHAOS_ARGS)
