"""What the latency pass adds to a sweep's wall time (goal: at most 10% on the 2-core machine).

Runs real sweeps (local Ray, an MLflow SQLite store in a temporary directory) and reads back
what each part of the pass measured about itself: every finished trial's
``speed_record_seconds`` (timing its exported model, the ONNX export and check, the MLflow
logged model) and the parent's ``speed_pass_seconds`` (the driver timing the front against the
dense model). Trials run ``max_concurrent`` at a time, so their share of the wall time is their
sum divided by the concurrency; the driver's pass runs alone after them.

``python benchmarks/latency_overhead.py [SPEC ...]`` (default: ``examples/digits_quick.yaml``,
the worst case: trials of a few seconds, and a Fashion-MNIST MLP sweep of 3-epoch trials).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import ray

from sweeps import tracking
from sweeps.driver import run_sweep
from sweeps.model_log import RECORD_SECONDS
from sweeps.spec import SweepSpec

_FASHION = {
    "name": "overhead-fashion-mlp",
    "experiment": "latency-overhead",
    "model": {"name": "mlp", "params": {"hidden": [300, 100]}},
    "dataset": {"name": "fashion-mnist", "val_fraction": 0.1},
    "regularizer": {"kind": {"grid": ["l0", "none"]}, "granularity": {"grid": ["output", "weight"]},
                    "lam": 0.5},
    "train": {"epochs": 3, "batch_size": 128, "lr": 0.001},
    "resources": {"cpus_per_trial": 1},
}  # fmt: skip


def measure(spec: SweepSpec, root: Path) -> str:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    result = run_sweep(spec, uri, root / "ray_results")
    c = tracking.client(uri)
    parent = c.get_run(result.sweep_id)
    wall = (parent.info.end_time - parent.info.start_time) / 1000
    records = [t.metrics.get(RECORD_SECONDS, 0.0) for t in result.trials]
    concurrency = min(2, len(records)) or 1
    driver = parent.data.metrics.get("speed_pass_seconds", 0.0)
    added = sum(records) / concurrency + driver
    timed = sum("speedup_vs_dense" in t.metrics for t in result.trials)
    return (
        f"| {spec.name} | {len(result.trials)} | {wall:.1f} s | {sum(records):.1f} s "
        f"({sum(records) / max(len(records), 1):.2f} s/trial) | {driver:.1f} s ({timed} models) "
        f"| {added:.1f} s | {100 * added / wall:.1f}% |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*", help="spec files (default: digits quick + fashion)")
    args = parser.parse_args()
    specs = [SweepSpec.from_file(p) for p in args.specs] or [
        SweepSpec.from_file(Path(__file__).parents[1] / "examples" / "digits_quick.yaml"),
        SweepSpec.model_validate(_FASHION),
    ]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = [
        "| sweep | trials | wall time | trials' speed records (sum) | driver's pass | added "
        "(records / 2 + pass) | share of wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in specs:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(measure(spec, Path(tmp)))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
