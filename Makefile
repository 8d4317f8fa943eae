# The README's two commands: `make serve` (the main job) and `make test`. Both set up .venv first.
PY := .venv/bin/python

.PHONY: setup serve demo test test-fast lint bench

setup:
	@./scripts/setup.sh

serve: setup
	.venv/bin/l0sweep serve

demo: setup
	$(PY) -m sweeps.demo

# ruff, then the import-linter contracts in pyproject.toml (the floors, and MLflow and Ray only in
# their adapters).
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	.venv/bin/lint-imports

# Two pytest-xdist workers, each a session with its own Ray, MLflow and PostgreSQL; a module's
# tests stay together in one worker unless tests/conftest.py splits it (--dist loadgroup), and
# the groups go out slow ones first, in the order tests/conftest.py gives them. The schema fuzz
# runs after them in one process: Schemathesis gives the test of every API operation one node id,
# and xdist, which tells tests apart by node id, would run one operation's of twelve (its tally
# test fails when that happens).
SERIAL := tests/service/test_schema_fuzz.py
test: lint
	$(PY) -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder --ignore=$(SERIAL)
	$(PY) -m pytest -q $(SERIAL)

# The fast tier: pure logic and the control plane's decisions against in-memory fakes (marker
# `fast`), no Ray or MLflow processes; under a minute.
test-fast: setup
	$(PY) -m pytest -q -m fast

bench: setup
	$(PY) benchmarks/step_overhead.py
