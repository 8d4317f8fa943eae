"""The quick digits benchmark at toy scale through the service (real Ray head, MLflow server and
`l0sweep serve`), then `l0sweep report`: its tables and plots must come from MLflow."""

from __future__ import annotations

import copy
import re
import statistics
from pathlib import Path

import pytest
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from service.cli import main as cli
from service.client import Client
from tests.service.conftest import ApiProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BENCH = Path(__file__).parents[2] / "benchmarks" / "specs" / "digits"
# Three of the set's five stage-2 sweeps: structured L0 with a target (the measured-speed rows),
# and the two unstructured baselines (the "no speedup" rows); the two L0 weight-gate sweeps add
# nothing the report reads differently, and a third of the test's trials.
STAGE_2 = ("l0-output", "l1", "magnitude")
METHODS = {
    "L0 output + target, from dense", "L1 + threshold, from dense",
    "magnitude gradual (global), from dense",
}  # fmt: skip
_RUN = re.compile(r"\[([0-9a-f]{32})\]")


def _toy(name: str) -> dict:
    """The benchmark spec with 3 epochs (1 fine-tuning) and the first value of each grid (two
    seeds: every front row averages two runs)."""
    spec = yaml.safe_load((BENCH / f"{name}.yaml").read_text())
    spec = copy.deepcopy(spec)
    spec["train"]["epochs"] = 3
    if spec["train"].get("finetune_epochs"):
        spec["train"]["finetune_epochs"] = 1
    for section in ("regularizer", "train"):
        for value in spec[section].values():
            if isinstance(value, dict) and "grid" in value:
                value["grid"] = value["grid"][:1]
    # A sweep's second seed reuses its first one's warm Ray worker (about 5 s of CPU of start-up
    # saved a trial); the three stage-2 sweeps still run side by side.
    spec["resources"]["max_concurrent_trials"] = 1
    return spec


def _sections(text: str) -> dict[str, list[list[str]]]:
    """Method -> the rows of its front table, as cells."""
    out: dict[str, list[list[str]]] = {}
    method = None
    for line in text.splitlines():
        if line.startswith("### "):
            method = line[4:]
            out[method] = []
        elif method and line.startswith("| ") and not line.startswith("| sparsity"):
            out[method].append([c.strip() for c in line.strip().strip("|").split("|")])
    return out


def _pct(cell: str) -> float:
    return float(cell.split("%")[0]) / 100


def test_digits_benchmark_report_comes_from_mlflow(
    ray_address, mlflow_uri, storage_path, tmp_path, monkeypatch, capsys
) -> None:
    server = ApiProcess(ray_address, mlflow_uri, storage_path, tmp_path / "api.log")
    server.env["L0SWEEP_MAX_CONCURRENT_SWEEPS"] = str(len(STAGE_2))
    server.start()
    try:
        with Client(server.url) as api:
            # The dense stage first: the others start from it; then the stage-2 sweeps side by
            # side, as a lab runs them (their drivers' start-up overlaps the others' trials).
            dense = api.wait(api.submit(_toy("dense")).id, poll_s=1, timeout_s=300)
            assert dense.status == "FINISHED", ("dense", dense)
            stage_2 = [api.submit(_toy(name)).id for name in STAGE_2]
            for name, sweep_id in zip(STAGE_2, stage_2, strict=True):
                done = api.wait(sweep_id, poll_s=1, timeout_s=600)
                assert done.status == "FINISHED", (name, done)
            ids = [dense.id, *stage_2]
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        monkeypatch.delenv("L0SWEEP_TRACKING_URI", raising=False)
        out = tmp_path / "report"
        # no --tracking-uri: the CLI asks the service where its MLflow is
        assert cli(["--url", server.url, "report", *ids, "--out", str(out)]) == 0
        assert f"from MLflow at {mlflow_uri}" in capsys.readouterr().out
    finally:
        server.kill()

    text = (out / "report.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    # the fronts, one per method, and accuracy against measured speedup
    overview = {"fronts.png", "speed.png", "params.png", "flops.png"}
    assert len(pngs) == len(overview) + len(METHODS) and overview <= set(pngs), (pngs, text)
    assert "## Measured speed" in text and "unstructured: dense tensors, no speedup" in text
    assert all((out / p).read_bytes().startswith(b"\x89PNG") for p in pngs)
    for png in pngs:
        assert f"]({png})" in text
    for sweep_id in ids:
        assert re.search(rf"\| `{sweep_id}` \| FINISHED \| (\d+)/\1 \| \d+", text), sweep_id

    client = MlflowClient(mlflow_uri)
    sections = _sections(text)
    assert set(sections) == METHODS | {"dense"}
    for method, rows in sections.items():
        assert rows, method
        for row in rows:
            runs = [client.get_run(r) for r in _RUN.findall(row[-1])]
            assert len(runs) == 2 and int(row[-2]) == 2  # both seeds of the configuration
            for metric, cell in (("sparsity", row[0]), ("test_accuracy", row[1]),
                                 ("val_accuracy", row[2])):  # fmt: skip
                mean = statistics.fmean(r.data.metrics[metric] for r in runs)
                assert _pct(cell) == pytest.approx(mean, abs=5e-5), (method, metric)
            archs = sorted({r.data.tags["l0sweep.architecture"] for r in runs})
            assert row[8] == " / ".join(archs)
            mean_params = statistics.fmean(r.data.metrics["shrunk_params"] for r in runs)
            assert int(row[4].replace(",", "")) == round(mean_params)
    # Accuracy against the exported model's size and FLOPs: each point is a trial's logged cost.
    costs = text.split("## Accuracy against parameters and FLOPs")[1].split("\n## ")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in costs.splitlines()
            if line.startswith("| ")]  # fmt: skip
    structured = [r for r in rows if r[0] == "L0 output + target, from dense"]
    assert structured
    for row in structured:
        assert row[5] == "structured: shrunk" and float(row[2]) > 0
    for row in sections["L0 output + target, from dense"]:
        assert all(re.fullmatch(r"64-\d+-\d+-10", a) for a in row[8].split(" / "))
        assert row[7] == "structured: shrunk"

    # Change what MLflow holds: the regenerated report follows.
    dense_runs = _RUN.findall(sections["dense"][0][-1])
    for run_id in dense_runs:
        client.log_batch(run_id, metrics=[Metric("test_accuracy", 0.5, 0, 10_000)])
    # this time found by name: the latest finished sweep of each name, oldest first
    assert (
        cli(["report", "--name", "digits-", "--out", str(out), "--tracking-uri", mlflow_uri]) == 0
    )
    again = (out / "report.md").read_text()
    assert re.findall(r"^\| digits-[\w-]+ \| `(\w+)`", again, re.M) == ids
    assert "Dense reference: test accuracy 50.00% ± 0.00" in again
    assert "Dense reference: test accuracy 50.00%" not in text
