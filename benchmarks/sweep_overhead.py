"""Overhead of the Ray Tune + MLflow path against a plain loop, at equal parallelism.

Runs the same N short trials (Fashion-MNIST MLP, about 10-20 s each) twice: through
``sweeps.driver.run_sweep`` (Ray Tune, per-epoch checkpoints, MLflow child runs, artifacts, Pareto
report) and through a process pool of the same width calling the same ``sweeps.training.train``.
Rounds alternate the two paths so that machine noise hits both alike; prints each round's wall
times and ratio and the median ratio (target <= 1.10). Ray's own start-up is not counted.

    .venv/bin/python benchmarks/sweep_overhead.py [--trials 4] [--parallel 2] [--epochs 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import ray
import torch

from sweeps.driver import run_sweep
from sweeps.spec import SweepSpec, TrialConfig
from sweeps.training import train


def _spec(trials: int, parallel: int, epochs: int, limit: int) -> SweepSpec:
    return SweepSpec.model_validate(
        {
            "name": "overhead",
            "experiment": "benchmark",
            "model": {"name": "mlp", "params": {"hidden": [300, 100]}},
            "dataset": {"name": "fashion-mnist", "params": {"limit": limit}},
            "regularizer": {"kind": "l0", "lam": {"grid": [0.05 * 2**i for i in range(trials)]}},
            "train": {"epochs": epochs, "batch_size": 128, "lr": 1e-3},
            "resources": {"cpus_per_trial": 1, "max_concurrent_trials": parallel},
        }
    )


def _configs(spec: SweepSpec) -> list[dict]:
    """The trials the sweep runs, for the plain loop (as dicts: the pool's processes validate
    them, since a validated config holds classes made at run time, which do not pickle)."""
    return spec.expansion().trials


def _plain(cfg: dict) -> float:
    torch.set_num_threads(1)
    return train(TrialConfig.of(cfg)).metrics["val_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--limit", type=int, default=20000, help="training images used")
    parser.add_argument(
        "--rounds", type=int, default=2, help="plain/Ray pairs, interleaved against machine noise"
    )
    args = parser.parse_args()
    spec = _spec(args.trials, args.parallel, args.epochs, args.limit)

    ray.init(num_cpus=args.parallel, include_dashboard=False, log_to_driver=False)
    rows = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        with get_context("spawn").Pool(args.parallel) as pool:
            accs = pool.map(_plain, _configs(spec), chunksize=1)
        plain = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            result = run_sweep(spec, f"sqlite:///{Path(tmp) / 'mlflow.db'}", Path(tmp) / "ray")
            tuned = time.perf_counter() - t0
        rows.append((plain, tuned, min(accs), max(accs), result.status))
    ray.shutdown()
    per_trial = statistics.median(r[0] for r in rows) * args.parallel / args.trials
    print(f"trials={args.trials} parallel={args.parallel} epochs={args.epochs} "
          f"(~{per_trial:.1f} s per trial)\n")  # fmt: skip
    print("| round | plain loop (s) | Ray Tune + MLflow (s) | ratio | val_accuracy | status |")
    print("|---:|---:|---:|---:|---|---|")
    for i, (plain, tuned, lo, hi, status) in enumerate(rows, 1):
        print(
            f"| {i} | {plain:.2f} | {tuned:.2f} | {tuned / plain:.3f} | {lo:.3f}..{hi:.3f} | {status} |"
        )
    ratio = statistics.median(t / p for p, t, *_ in rows)
    print(f"\nmedian ratio {ratio:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
