# The README's two commands: `make serve` (the main job) and `make test`. Both set up .venv first.
PY := .venv/bin/python

.PHONY: setup serve demo test lint bench

setup:
	@./scripts/setup.sh

serve: setup
	.venv/bin/l0sweep serve

demo: setup
	$(PY) -m sweeps.demo

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/step_overhead.py
