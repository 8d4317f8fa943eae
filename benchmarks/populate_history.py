"""Write a lab's history into a running MLflow: N finished sweeps of M trials, shaped like real ones.

    python benchmarks/populate_history.py 1000 50 --tracking-uri http://127.0.0.1:5000

Each sweep is what `sweeps.tracking` and the service write for a real one: a parent run with the
spec (the ``l0sweep.spec`` tag, the ``spec.json`` artifact and the flattened spec as params), the
service's tags (job id, attempt, request id, ``managed``), the report's summary metrics
(hypervolume, Pareto size, trial counts) and, unless ``--no-summary`` (a history written before
the service kept summaries), the ``l0sweep.summary`` tag of `service.summary`; M child runs with
the trial tags, the trial's concrete config as params, ``--epochs`` epochs of the metrics a trial
logs (`sweeps.spec.EPOCH_METRICS`, step = epoch) and the final test metrics, a few of them on the
Pareto front. The parent is created by `sweeps.tracking.create_sweep_run` itself; runs are
FINISHED, at the time they are written.
Everything goes through `MlflowClient.log_batch` (one request per run for params, metrics and
tags), from ``--workers`` threads. Through the server that is about 3 requests a trial; with
``--direct-store`` (the server's own backend store URI, e.g. ``sqlite:///.../mlflow.db``) the runs
are written into that store in-process, several times faster (the artifacts still go through the
server).
"""

from __future__ import annotations

import argparse
import os
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from service.record import spec_digest
from service.summary import summarize
from sweeps import tracking
from sweeps.records import TrialRecord
from sweeps.spec import EPOCH_METRICS, SweepSpec
from sweeps.tracking import flatten
from sweeps.vocabulary import MANAGED_BY_SERVICE, TRUE, RunStatus, SweepStatus, Tag, TrialStatus

SPEC = {
    "experiment": "l0sweep-history",
    "model": {"name": "mlp", "params": {"hidden": [300, 100]}},
    "dataset": {"name": "fashion-mnist", "val_fraction": 0.1},
    "regularizer": {"kind": "l0", "lam": {"loguniform": [0.01, 1.0]}, "droprate_init": 0.2},
    "train": {"epochs": 15, "batch_size": 128, "lr": 0.001, "gate_lr": 0.01},
    "objectives": [
        {"metric": "val_accuracy", "mode": "max"},
        {"metric": "sparsity", "mode": "max"},
    ],
    "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 2},
}


def write_sweep(
    c: MlflowClient, w: MlflowClient, experiment_id: str, index: int, trials: int, epochs: int,
    summary: bool,
) -> str:  # fmt: skip
    """One finished sweep with its ``trials`` child runs; returns its id."""
    rng = random.Random(index)
    spec = SweepSpec.model_validate(
        SPEC | {"name": f"history-{index:05d}", "search": {"num_samples": trials, "seeds": [0]}}
    )
    extra = {Tag.SPEC_SHA256: spec_digest(spec), Tag.JOB_ATTEMPT: "0",
             Tag.REQUEST_ID: uuid.uuid4().hex, Tag.MANAGED: MANAGED_BY_SERVICE}  # fmt: skip
    sweep_id = tracking.create_sweep_run(spec, c.tracking_uri, extra)
    start_ms = int(time.time() * 1000)
    made = [_write_trial(w, experiment_id, sweep_id, spec, n, epochs, rng, start_ms)
            for n in range(trials)]  # fmt: skip
    front = sorted(made, key=lambda t: -t.metrics["val_accuracy"])[:5]
    for t in front:
        w.set_tag(t.run_id, Tag.PARETO, TRUE)
    made = [replace(t, pareto=True) if t in front else t for t in made]
    end_ms = int(time.time() * 1000)
    counts = {TrialStatus.FINISHED.value: trials}
    metrics = {"hypervolume": rng.uniform(0.5, 0.9), "pareto_size": len(front),
               **{f"trials_{s.lower()}": n for s, n in counts.items()}}  # fmt: skip
    tags = [
        RunTag(Tag.JOB_ID, f"l0sweep-{sweep_id}-0"),
        RunTag(Tag.STATUS, SweepStatus.FINISHED.value),
        RunTag(Tag.STATUS_MESSAGE, f"{trials} trials, 0 failed"),
    ]
    w.log_batch(sweep_id, metrics=[Metric(k, float(v), end_ms, 0) for k, v in metrics.items()],
                tags=tags)  # fmt: skip
    w.set_terminated(sweep_id, RunStatus.FINISHED.value, end_time=end_ms)
    if summary:
        record = summarize(made, spec.num_trials(), [o.model_dump() for o in spec.objectives],
                           end_ms)  # fmt: skip
        w.set_tag(sweep_id, Tag.SUMMARY, record.to_tag())
    return sweep_id


def _write_trial(
    c: MlflowClient, experiment_id: str, sweep_id: str, spec: SweepSpec, n: int, epochs: int,
    rng: random.Random, sweep_start_ms: int,
) -> TrialRecord:  # fmt: skip
    trial_id = f"{sweep_id[:5]}_{n:05d}"
    start = sweep_start_ms + n
    tags = tracking.trial_run_tags(sweep_id, trial_id)
    run = c.create_run(experiment_id, start_time=start, tags=tags, run_name=trial_id)
    config = spec.model_dump(mode="json")
    config["regularizer"]["lam"] = 10 ** rng.uniform(-2, 0)
    config["seed"] = 0
    params = [Param(k, v) for k, v in list(flatten(config).items())[:100]]
    history: list[Metric] = []
    final: dict[str, float] = {}
    for epoch in range(1, epochs + 1):
        values = {name: rng.random() for name in EPOCH_METRICS}
        values["epoch"] = float(epoch)
        history += [Metric(k, v, start + epoch * 1000, epoch) for k, v in values.items()]
        final = values
    final = {**final, "test_accuracy": rng.uniform(0.8, 0.9), "shrunk_params": 1e5 * rng.random()}
    history += [Metric(k, final[k], start + epochs * 1000, epochs)
                for k in ("test_accuracy", "shrunk_params")]  # fmt: skip
    end_tags = [RunTag(Tag.TRIAL_STATUS, TrialStatus.FINISHED.value),
                RunTag(Tag.ARCHITECTURE, "784-212-71-10")]  # fmt: skip
    c.log_batch(run.info.run_id, metrics=history, params=params, tags=end_tags)
    c.set_terminated(run.info.run_id, RunStatus.FINISHED.value)
    return TrialRecord(run.info.run_id, trial_id, status=TrialStatus.FINISHED.value, metrics=final)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", type=int, help="finished sweeps to write")
    parser.add_argument("trials", type=int, help="trials per sweep")
    parser.add_argument("--tracking-uri", required=True, help="the running MLflow server")
    parser.add_argument("--first", type=int, default=0,
                        help="index of the first sweep (to add to a history in several goes)")  # fmt: skip
    parser.add_argument("--direct-store", help="write the runs into this backend store URI")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of metrics per trial")
    parser.add_argument("--workers", type=int, default=4, help="threads writing sweeps")
    parser.add_argument("--no-summary", action="store_true",
                        help="leave out the l0sweep.summary tag (history from before it)")  # fmt: skip
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    c = MlflowClient(args.tracking_uri)
    w = MlflowClient(args.direct_store) if args.direct_store else c
    experiment = c.get_experiment_by_name(SPEC["experiment"])
    experiment_id = (
        experiment.experiment_id if experiment else c.create_experiment(SPEC["experiment"])
    )
    started = time.perf_counter()

    def one(i: int) -> str:
        return write_sweep(c, w, experiment_id, i, args.trials, args.epochs, not args.no_summary)

    indices = range(args.first, args.first + args.sweeps)
    with ThreadPoolExecutor(args.workers) as pool:
        for done, _ in enumerate(pool.map(one, indices), 1):
            if done % 10 == 0 or done == args.sweeps:
                rate = done / (time.perf_counter() - started)
                print(f"{done}/{args.sweeps} sweeps written ({rate:.2f}/s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
