"""A comparison of sparsity methods across one or more sweeps, read from MLflow.

Trials are grouped by method (:func:`method_label`: kind, granularity, target-sparsity control,
pruning scope, whether they start from a dense run), and each configuration is averaged over its
seeds. A method's Pareto front is chosen on validation (mean sparsity and mean val_accuracy, both
maximised); its test accuracy is reported, as mean and standard deviation over the seeds. Pure
functions over the trial records of :func:`sweeps.tracking.sweep_trials`; the MLflow reads are
in :func:`collect`. :mod:`sweeps.results_report` writes the Markdown and the plots.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field, replace
from typing import Any

from . import tracking
from .pareto import pareto_front
from .records import TrialRecord
from .spec import granularity_label
from .vocabulary import KIND_SWEEP, SweepStatus, Tag, TrialStatus, sweeps_filter

__all__ = [
    "MEAN_METRICS",
    "Point",
    "ReportData",
    "SweepInfo",
    "aggregate",
    "best_within",
    "collect",
    "cost_front",
    "dense_reference",
    "find_sweeps",
    "method_front",
    "method_label",
    "speed_front",
]

MEAN_METRICS = ("sparsity", "val_accuracy", "test_accuracy", "nonzero_params", "total_params",
                "shrunk_params", "shrunk_flops", "expected_flops", "latency_ms_b1", "throughput", "model_bytes",
                "speedup_vs_dense", "latency_speedup_b1")  # fmt: skip


@dataclass
class Point:
    """One configuration of one method, over its seeds."""

    method: str
    config: dict[str, str]
    metrics: dict[str, float]
    test_std: float
    run_ids: list[str]
    seeds: list[str]
    architectures: list[str]
    trial_seconds: float
    experiment_id: str = ""
    export_formats: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        """A point competes in the fronts (`sweeps.pareto.Scored`) as a finished trial."""
        return TrialStatus.FINISHED.value


@dataclass
class SweepInfo:
    """A sweep's parent run: what the report says about it."""

    sweep_id: str
    name: str
    status: str
    experiment_id: str
    start_ms: int | None
    end_ms: int | None
    trials: list[TrialRecord] = field(default_factory=list)

    @property
    def seconds(self) -> float | None:
        if self.start_ms is None or self.end_ms is None:
            return None
        return (self.end_ms - self.start_ms) / 1000


@dataclass
class ReportData:
    """Everything the report shows, as read from MLflow."""

    tracking_uri: str | None
    sweeps: list[SweepInfo]

    def trials(self) -> list[TrialRecord]:
        return [replace(t, experiment_id=s.experiment_id) for s in self.sweeps for t in s.trials]


def _value(config: dict[str, str], key: str) -> Any:
    raw = config.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw  # strings are logged bare


def method_label(config: dict[str, str]) -> str:
    """A trial's method from its logged params, e.g. ``L0 output + target, from dense``."""
    kind = _value(config, "regularizer.kind")
    if kind == "none":
        return "dense"
    if kind == "l0":
        label = f"L0 {granularity_label(_value(config, 'regularizer.granularity'))}"
        if _value(config, "regularizer.target_sparsity") is not None:
            label += " + target"
    elif kind == "l1":
        label = "L1 + threshold"
    elif kind in ("magnitude", "channel-norm"):
        one_shot = _value(config, "regularizer.prune_begin") == _value(
            config, "regularizer.prune_end"
        )
        label = f"{kind} {'one-shot' if one_shot else 'gradual'}"
        if kind == "magnitude":
            label += f" ({_value(config, 'regularizer.prune_scope')})"
    else:
        label = str(kind)
    fine_tuned = _value(config, "train.init_from") is not None or any(
        k.startswith("train.init_from.") for k in config
    )
    return label + (", from dense" if fine_tuned else "")


def _seconds(trial: TrialRecord) -> float:
    start, end = trial.start_time, trial.end_time
    return (end - start) / 1000 if start is not None and end is not None else 0.0


def aggregate(trials: list[TrialRecord]) -> list[Point]:
    """Finished trials with a test accuracy, one :class:`Point` per method and configuration."""
    groups: dict[str, list[TrialRecord]] = {}
    for t in trials:
        if t.status != TrialStatus.FINISHED or "test_accuracy" not in t.metrics:
            continue
        groups.setdefault(t.configuration, []).append(t)
    points = []
    for key, members in groups.items():
        metrics = {
            m: statistics.fmean(t.metrics[m] for t in members)
            for m in MEAN_METRICS
            if all(m in t.metrics for t in members)
        }
        tests = [t.metrics["test_accuracy"] for t in members]
        points.append(
            Point(
                method=method_label(json.loads(key)),
                config=json.loads(key),
                metrics=metrics,
                test_std=statistics.stdev(tests) if len(tests) > 1 else 0.0,
                run_ids=[t.run_id for t in members],
                seeds=[str(t.config.get("seed", "")) for t in members],
                architectures=sorted({t.architecture or "" for t in members} - {""}),
                trial_seconds=sum(_seconds(t) for t in members),
                experiment_id=members[0].experiment_id,
                export_formats=sorted({t.export_format or "" for t in members} - {""}),
            )
        )
    return sorted(points, key=lambda p: (p.method, p.metrics.get("sparsity", 0.0)))


def method_front(points: list[Point]) -> list[Point]:
    """The non-dominated points on (mean sparsity, mean val_accuracy), by rising sparsity."""
    objectives = [("sparsity", "max"), ("val_accuracy", "max")]
    front = pareto_front(points, objectives)
    return sorted(front, key=lambda p: p.metrics["sparsity"])


def speed_front(points: list[Point]) -> list[Point]:
    """The non-dominated points on (mean measured ``speedup_vs_dense``, mean val_accuracy), by
    rising speedup; only points the driver timed against the dense model take part."""
    objectives = [("speedup_vs_dense", "max"), ("val_accuracy", "max")]
    front = pareto_front(points, objectives)
    return sorted(front, key=lambda p: p.metrics["speedup_vs_dense"])


def cost_front(points: list[Point], metric: str) -> list[Point]:
    """The non-dominated points on (mean ``metric``, a cost such as ``shrunk_params``, mean
    val_accuracy), by rising cost; only points that logged ``metric`` take part."""
    objectives = [(metric, "min"), ("val_accuracy", "max")]
    front = pareto_front(points, objectives)
    return sorted(front, key=lambda p: p.metrics[metric])


def dense_reference(points: list[Point]) -> Point | None:
    """The dense configuration with the best mean val_accuracy (None without dense trials)."""
    dense = [p for p in points if p.method == "dense" and "val_accuracy" in p.metrics]
    return max(dense, key=lambda p: p.metrics["val_accuracy"], default=None)


def best_within(points: list[Point], dense: Point, points_below: float = 0.01) -> Point | None:
    """The sparsest point whose mean val_accuracy is within ``points_below`` of the dense one."""
    floor = dense.metrics["val_accuracy"] - points_below
    ok = [p for p in points if p.metrics.get("val_accuracy", -1.0) >= floor]
    return max(ok, key=lambda p: (p.metrics.get("sparsity", 0.0), p.metrics["val_accuracy"]),
               default=None)  # fmt: skip


def varying_keys(points: list[Point]) -> list[str]:
    """The config keys whose values differ between the points (what a table should show)."""
    keys = sorted({k for p in points for k in p.config})
    return [k for k in keys if len({p.config.get(k) for p in points}) > 1]


def collect(sweep_ids: list[str], tracking_uri: str | None = None) -> ReportData:
    """Read the sweeps' parent runs and trials from MLflow.

    Raises:
        ValueError: a run id is not an l0sweep sweep.
    """
    c = tracking.client(tracking_uri)
    sweeps = []
    for sweep_id in sweep_ids:
        try:
            run = c.get_run(sweep_id)
        except tracking.MlflowException as err:
            raise ValueError(f"no sweep {sweep_id!r} in MLflow: {err.message}") from err
        tags = run.data.tags
        if tags.get(Tag.KIND) != KIND_SWEEP:
            raise ValueError(
                f"run {sweep_id} is not an l0sweep sweep (no {Tag.KIND}={KIND_SWEEP} tag)"
            )
        sweeps.append(
            SweepInfo(
                sweep_id=sweep_id,
                name=tags.get(Tag.NAME, run.info.run_name or sweep_id),
                status=tags.get(Tag.STATUS, SweepStatus.PENDING.value),
                experiment_id=run.info.experiment_id,
                start_ms=run.info.start_time,
                end_ms=run.info.end_time,
                trials=tracking.sweep_trials(sweep_id, tracking_uri),
            )
        )
    return ReportData(tracking_uri, sweeps)


def find_sweeps(name_contains: str, tracking_uri: str | None = None) -> list[str]:
    """The ids of FINISHED sweeps whose name contains ``name_contains``, in any experiment: the
    latest of each name, oldest first (a benchmark's dense stage before the rest).

    Raises:
        ValueError: no finished sweep matches.
    """
    c = tracking.client(tracking_uri)
    pattern = name_contains.replace("'", "")
    query = sweeps_filter(status=SweepStatus.FINISHED, name_like=pattern)
    experiments = [e.experiment_id for e in c.search_experiments()]
    latest: dict[str, Any] = {}
    token = None
    while True:
        page = c.search_runs(experiments, query, max_results=1000, page_token=token)
        for run in page:
            name = run.data.tags[Tag.NAME]
            if name not in latest or run.info.start_time > latest[name].info.start_time:
                latest[name] = run
        token = page.token
        if not token:
            break
    if not latest:
        raise ValueError(f"no FINISHED sweep whose name contains {name_contains!r}")
    return [r.info.run_id for r in sorted(latest.values(), key=lambda r: r.info.start_time)]
