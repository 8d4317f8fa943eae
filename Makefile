# The README's two commands: `make demo` (the main job) and `make test`. Both set up .venv first.
PY := .venv/bin/python

.PHONY: setup demo test lint bench

setup:
	@./scripts/setup.sh

demo: setup
	$(PY) -m l0core.demo

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/step_overhead.py
