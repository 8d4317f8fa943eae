"""One settings source, passed down: the data directory a dataset is read from is the one passed
in (and part of the dataset cache's key); importing the engine sets nothing and loads no plugin;
building the app writes nothing into the environment; a setting has one type everywhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sweeps.config import SweepSettings, get_settings
from sweeps.data import load_dataset
from tests.sweeps.conftest import write_broken_plugin


def _npz_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """Two data directories with a ``d.npz`` each, of different sizes."""
    rng = np.random.default_rng(0)
    dirs = []
    for name, n in (("one", 40), ("two", 60)):
        root = tmp_path / name
        root.mkdir()
        np.savez(root / "d.npz", x=rng.normal(size=(n, 3)), y=np.arange(n) % 2)
        dirs.append(root)
    return dirs[0], dirs[1]


@pytest.mark.fast
def test_the_dataset_cache_is_keyed_by_the_data_directory(tmp_path, monkeypatch):
    one, two = _npz_dirs(tmp_path)
    monkeypatch.setenv("L0SWEEP_DATA_DIR", str(one))
    first = load_dataset("npz", {"path": "d.npz"}, 0.25, 0.25, 0)
    monkeypatch.setenv("L0SWEEP_DATA_DIR", str(two))
    second = load_dataset("npz", {"path": "d.npz"}, 0.25, 0.25, 0)
    sizes = [sum(len(s[0]) for s in (d.train, d.val, d.test)) for d in (first, second)]
    assert sizes == [40, 60], sizes


@pytest.mark.fast
def test_a_dataset_reads_the_directory_passed_in_not_the_environment(tmp_path, monkeypatch):
    one, two = _npz_dirs(tmp_path)
    monkeypatch.setenv("L0SWEEP_DATA_DIR", str(one))
    dirs = SweepSettings(data_dir=two).data_dirs()
    data = load_dataset("npz", {"path": "d.npz"}, 0.25, 0.25, 0, dirs)
    assert sum(len(s[0]) for s in (data.train, data.val, data.test)) == 60


@pytest.mark.fast
def test_a_setting_has_one_type_for_the_engine_and_the_service(tmp_path, monkeypatch):
    from service.settings import Settings

    monkeypatch.setenv("L0SWEEP_STORAGE_PATH", str(tmp_path / "shared"))
    monkeypatch.setenv("L0SWEEP_TRACKING_URI", "http://127.0.0.1:5999")
    service, engine = Settings(), SweepSettings()
    assert service.storage_path == engine.storage_path == tmp_path / "shared"
    assert service.tracking_uri == engine.tracking_uri == "http://127.0.0.1:5999"
    for name, field in SweepSettings.model_fields.items():  # declared once, in the engine
        assert Settings.model_fields[name].annotation == field.annotation, name


@pytest.mark.fast
def test_building_the_app_writes_nothing_into_the_environment(monkeypatch):
    from service.app import create_app
    from service.settings import Settings

    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    before = dict(os.environ)
    create_app(Settings(ray_address="http://127.0.0.1:9", tracking_uri="http://127.0.0.1:9"))
    assert dict(os.environ) == before


@pytest.mark.fast
def test_importing_the_engine_sets_nothing_and_loads_no_plugin(tmp_path):
    """A broken plugin installed: importing the spec still works (plugins load at start-up,
    explicitly), and the environment is left as it was."""
    write_broken_plugin(tmp_path)
    code = (
        "import os, sys; before = dict(os.environ)\n"
        "import sweeps, sweeps.spec\n"
        "assert dict(os.environ) == before, set(os.environ) ^ set(before)\n"
        "assert 'l0sweep_bad_plugin' not in sys.modules\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.fast
def test_the_service_validates_a_spec_against_its_own_settings(monkeypatch):
    """`l0sweep serve --home X` (a field, not the environment) and any other setting given to the
    app govern the specs it accepts: the limits here."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings
    from tests.sweeps.conftest import tiny_spec

    monkeypatch.delenv("L0SWEEP_MAX_EPOCHS", raising=False)
    dead = "http://127.0.0.1:9"
    app = create_app(Settings(ray_address=dead, tracking_uri=dead, max_epochs=3))
    answer = TestClient(app).post("/sweeps", json=tiny_spec(train={"epochs": 5}))
    assert answer.status_code == 422 and "exceeds the limit 3" in answer.text, answer.text


def _read_twice(monkeypatch, seen: list):
    """Stands in for a process's work: reads the settings, the environment changes, reads again."""

    def work(*args) -> int:
        first = get_settings()
        monkeypatch.setenv("L0SWEEP_MLFLOW_RETRY_WINDOW_S", "9")
        monkeypatch.setenv("L0SWEEP_MAX_TRIALS", "2")
        seen.append((first, get_settings()))
        return 0

    return work


@pytest.mark.fast
@pytest.mark.parametrize("entry", ["trial", "driver"])
def test_a_process_reads_its_settings_once_at_its_start(entry, monkeypatch):
    """A trial and a sweep's driver read their settings when they start and keep them in force:
    the MLflow retry window, the tracking URI's default, the spec limits and the data directories
    read later in the process are those, not a fresh read of the environment."""
    from sweeps import driver, trainable

    monkeypatch.setenv("L0SWEEP_MLFLOW_RETRY_WINDOW_S", "7")
    monkeypatch.delenv("L0SWEEP_MAX_TRIALS", raising=False)
    seen: list = []
    if entry == "trial":
        monkeypatch.setattr(trainable, "_train_trial", _read_twice(monkeypatch, seen))
        trainable.train_trial({}, None)
    else:
        monkeypatch.setattr(driver.raycompat, "check_ray_version", lambda: None)
        monkeypatch.setattr(driver, "configure_mlflow_client", lambda window: None)
        monkeypatch.setattr(driver, "_drive", _read_twice(monkeypatch, seen))
        assert driver.main(["--sweep-id", "0" * 32]) == 0
    first, later = seen[0]
    assert later is first
    assert later.mlflow_retry_window_s == 7 and later.max_trials == 512
    assert get_settings().mlflow_retry_window_s == 9  # outside the process's work: the env again
