"""A new user's first hour, as they meet it: ``l0sweep run`` on a fresh machine with nothing in the
environment, from a directory that is not the repository, then the sweep in the MLflow UI that
``l0sweep serve`` would show, opened in a real browser (headless Chromium)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from service.stack import free_port, start_mlflow
from sweeps.vocabulary import is_pareto

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The quick example, smaller: L0 at two lambdas against the dense model, two seeds.
QUICK = {
    "name": "first-hour",
    "experiment": "l0sweep-examples",
    "model": {"name": "mlp", "params": {"hidden": [16]}},
    "dataset": {"name": "digits", "val_fraction": 0.1, "split_seed": 0},
    "regularizer": {"kind": {"grid": ["l0", "none"]}, "lam": {"grid": [0.05, 0.5]}},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.003, "gate_lr": 0.03},
    "search": {"seeds": [0, 1]},
    "resources": {"cpus_per_trial": 1},
}
NAMES = [
    "dense seed=0", "dense seed=1", "l0 weight lam=0.05 seed=0", "l0 weight lam=0.05 seed=1",
    "l0 weight lam=0.5 seed=0", "l0 weight lam=0.5 seed=1",
]  # fmt: skip


@dataclass
class FreshRun:
    home: Path
    work: Path
    output: str
    store: Path
    log: str  # what the run wrote to stderr (Ray's and the driver's logs)

    def client(self) -> MlflowClient:
        return MlflowClient(f"sqlite:///{self.store / 'mlflow.db'}")


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory: pytest.TempPathFactory) -> FreshRun:
    """``l0sweep run`` with an empty environment (PATH and an empty HOME only)."""
    home, work = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("work")
    (work / "quick.yaml").write_text(yaml.safe_dump(QUICK))
    l0sweep = Path(sys.executable).parent / "l0sweep"
    done = subprocess.run(
        [str(l0sweep), "run", "quick.yaml"],
        cwd=work,
        env={"PATH": os.environ["PATH"], "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    return FreshRun(home, work, done.stdout, home / ".l0sweep" / "mlflow", done.stderr)


def test_the_local_ray_of_a_run_starts_no_dashboard(fresh_run) -> None:
    """A run's local Ray would take port 8265 (or the next free one) for a dashboard nobody
    looks at: the port an ``l0sweep serve`` started beside it wants for its Ray head, whose
    start then waited on the run's dashboard and failed once the run ended ("the Ray dashboard
    at http://127.0.0.1:8265 gave no session name (... Connection refused)")."""
    (started,) = [line for line in fresh_run.log.splitlines() if "Started a local Ray" in line]
    assert "dashboard" not in started, started


def test_a_fresh_machine_runs_the_quick_example_into_the_embedded_store(fresh_run) -> None:
    assert "first-hour: 6 trials (2 duplicates removed" in fresh_run.output
    assert "FINISHED" in fresh_run.output and "`l0sweep serve` shows it" in fresh_run.output
    client = fresh_run.client()
    experiment = client.get_experiment_by_name("l0sweep-examples")
    sweeps = client.search_runs([experiment.experiment_id], "tags.`l0sweep.kind` = 'sweep'")
    assert len(sweeps) == 1
    sweep = sweeps[0]
    assert sweep.data.tags["l0sweep.status"] == "FINISHED", sweep.data.tags
    assert sweep.data.tags["l0sweep.num_trials"] == "6"
    assert sweep.data.tags["l0sweep.duplicate_trials"] == "2"
    trials = client.search_runs(
        [experiment.experiment_id], f"tags.`l0sweep.sweep_id` = '{sweep.info.run_id}'"
    )
    assert sorted(t.info.run_name for t in trials) == NAMES
    assert all(t.info.status == "FINISHED" for t in trials)
    assert all(t.data.metrics.get("epoch") == 2 for t in trials)
    # artifacts went through the server into the store, and nothing into the working directory
    assert any((fresh_run.store / "artifacts").rglob("spec.json"))
    assert sorted(p.name for p in fresh_run.work.iterdir()) == ["quick.yaml"]
    assert (fresh_run.home / ".l0sweep" / "ray_results" / sweep.info.run_id).is_dir()


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("headless Chromium is not installed (scripts/setup.sh installs Debian's)")
    return found


def _dom(chromium: str, url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran (and their requests answered) in virtual time."""
    argv = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=30000",
        "--dump-dom", url,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=240, check=True).stdout


def test_the_mlflow_ui_shows_the_front_on_the_parent_run(fresh_run, tmp_path) -> None:
    chromium = _chromium()
    client = fresh_run.client()
    experiment = client.get_experiment_by_name("l0sweep-examples")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    sweep = client.search_runs([experiment.experiment_id], "tags.`l0sweep.kind` = 'sweep'")[0]
    trials = client.search_runs(
        [experiment.experiment_id], f"tags.`l0sweep.sweep_id` = '{sweep.info.run_id}'"
    )
    front = [t for t in trials if is_pareto(t.data.tags)]
    assert front
    # the store as `l0sweep serve` serves it
    process, uri = start_mlflow(fresh_run.store, port=free_port())
    try:
        url = f"{uri}/#/experiments/{experiment.experiment_id}/runs/{sweep.info.run_id}"
        dom = _dom(chromium, url, tmp_path / "profile")
    finally:
        process.stop()
    assert "Pareto front" in dom and "<table" in dom, dom[-3000:]
    for trial in front:  # each point of the front, by name, linked to its run
        assert trial.info.run_name in dom
        assert f"runs/{trial.info.run_id}" in dom
