"""Shared fixtures: the session's Ray head as this process's cluster, a temporary MLflow store,
tiny specs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def ray_local(ray_head):
    """This process as a Ray driver on the session's Ray head (2 CPUs, ``tests/conftest.py``):
    sweeps run in-process on it, as ``l0sweep run`` runs them on a cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_head.gcs_address, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real MLflow SQLite store (artifacts next to it) for the session."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root / 'mlflow.db'}"


@pytest.fixture
def storage_path(tmp_path: Path) -> Path:
    return tmp_path / "ray_results"


def tiny_spec(**overrides: Any) -> dict[str, Any]:
    """A digits sweep that trains in about a second per trial."""
    spec: dict[str, Any] = {
        "name": "tiny",
        "experiment": "tests",
        "model": {"name": "mlp", "params": {"hidden": [32]}},
        "dataset": {"name": "digits"},
        "regularizer": {"kind": "l0", "lam": 0.1},
        "train": {"epochs": 2, "lr": 3e-3, "batch_size": 64},
        # One trial at a time: the next trial reuses the last one's Ray worker (Tune's
        # reuse_actors) and skips its start-up, about 5 s of CPU (torch, MLflow and Ray Tune's
        # imports) on a machine the suite keeps busy.
        "resources": {"max_concurrent_trials": 1},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


@pytest.fixture
def tiny() -> Any:
    return tiny_spec


def write_broken_plugin(directory: Path) -> None:
    """An installed distribution (``l0sweep-bad-plugin``) in ``directory``, for PYTHONPATH,
    whose ``l0sweep.models`` entry point raises ImportError when loaded."""
    (directory / "l0sweep_bad_plugin.py").write_text("raise ImportError('needs libfoo 2')\n")
    info = directory / "l0sweep_bad_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: l0sweep-bad-plugin\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text("[l0sweep.models]\nbad-net = l0sweep_bad_plugin\n")
