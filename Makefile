# mp-ssh-bridge — set-up, tests and demo.
#   make demo    set up .venv, then run 4 concurrent MCP sessions through one broker
#   make test    set up .venv + test fixtures (model, sshd), lint (ruff, mypy), then run pytest
#   make reliability  the reliability suite in full mode, then docs/RELIABILITY.md from its figures
#   make bench   every path (direct, broker, container daemon, hub) in one benchmark run: docs/BENCHMARKS.md
# Variables: PYTEST_ARGS="-k shim -x"   PYTEST_WORKERS=2 (pytest-xdist workers, one test file each at a time;
#            0 = in this process)   DEMO_ARGS="--raw --keep"   BENCH_ARGS="--calls 100 --spawns 4" (or --smoke)

SHELL   := /bin/bash
VENV    := .venv
PY      := $(VENV)/bin/python
PYTEST_ARGS ?=
PYTEST_WORKERS ?= 2
DEMO_ARGS   ?=
BENCH_ARGS  ?=

.PHONY: help setup setup-tests test reliability bench lint demo demo-raw clean

help:
	@echo "make demo         set up and run the demo (4 sessions -> mp-shim -> one broker)"
	@echo "make demo-raw     the same demo with raw socket clients instead of mp-shim"
	@echo "make test         set up test fixtures, lint (ruff, mypy), then run pytest (PYTEST_ARGS=...)"
	@echo "make reliability  the reliability suite in full mode (long), then write docs/RELIABILITY.md"
	@echo "make bench        every path in one benchmark run (long), then docs/BENCHMARKS.md (BENCH_ARGS=...)"
	@echo "make lint         only ruff and mypy"
	@echo "make setup        only create .venv and install (model into .demo/home)"
	@echo "make setup-tests  only prepare tests (.venv, .test-home model, sshd)"
	@echo "make clean        remove .demo/ and .test-home/ (keeps .venv)"

setup:
	bash scripts/setup.sh

setup-tests:
	bash scripts/setup-tests.sh

test: setup-tests
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile tests $(PYTEST_ARGS)

# Full mode: the issue's counts (RELIABILITY=full, tests/reliability.py); the records of this run only
# (.reliability/), then docs/RELIABILITY.md from them, written even when a case failed.
reliability: setup-tests
	rm -rf .reliability
	RELIABILITY=full $(PY) -m pytest -q -m reliability tests $(PYTEST_ARGS); status=$$?; \
	$(PY) scripts/reliability_report.py; exit $$status

# One run of every path (benchmarks/bench_all.py): docs/BENCHMARKS.md and its plots (docs/bench-*.png).
bench: setup-tests
	$(PY) benchmarks/bench_all.py $(BENCH_ARGS)

lint:
	$(VENV)/bin/ruff check .
	mkdir -p .mypy-path && ln -sfn ../broker .mypy-path/mp_ssh_bridge_broker
	$(VENV)/bin/mypy

demo: setup
	$(PY) scripts/demo.py $(DEMO_ARGS)

demo-raw: setup
	$(PY) scripts/demo.py --raw $(DEMO_ARGS)

clean:
	rm -rf .demo .test-home .pytest_cache
