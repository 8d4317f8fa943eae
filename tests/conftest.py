"""The suite's tiers: modules of pure logic whose tests are all in the fast tier (``make
test-fast``, marker ``fast``) are listed here, so that the tier is chosen in one place; newer fast
tests carry the marker themselves."""

from __future__ import annotations

import pytest

# Whole modules of pure logic: no Ray or MLflow process, seconds in all.
_FAST_MODULES = frozenset(
    {
        "tests/sweeps/test_pareto.py",
        "tests/sweeps/test_results.py",
        "tests/sweeps/test_spec.py",
        "tests/sweeps/test_variants.py",
        "tests/service/test_summary.py",
    }
)


def pytest_configure(config: pytest.Config) -> None:
    """The test process starts up as the service, the CLI and the driver do: MLflow's client
    settings in its environment (inherited by the local Ray workers it starts)."""
    from sweeps.config import configure_mlflow_client

    configure_mlflow_client(0.0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = config.rootpath
    for item in items:
        if item.path.relative_to(root).as_posix() in _FAST_MODULES:
            item.add_marker(pytest.mark.fast)
