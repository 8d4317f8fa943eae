"""``l0sweep report``: docs-ready Markdown tables and PNG plots of sweeps, generated from MLflow.

The report is never typed by hand: every number comes from the sweeps' MLflow runs through
:func:`sweeps.results.collect`, and the files are written again from scratch on every call.
``report.md`` holds the sweeps (status, wall time, trial time), a summary row per method (dense
accuracy, best sparsity within 1 point of dense, the front's sparsest point) and, per method,
its Pareto front table (test accuracy vs sparsity, nonzero and shrunk parameters, expected
FLOPs, measured speedup, export format, pruned architecture, MLflow run ids) with a plot;
``fronts.png`` overlays all fronts. "Measured speed" holds each method's front of accuracy against
the speedup over the dense model that the sweeps' drivers measured (``speed.png``), saying of an
unstructured export that its dense tensors are not faster.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .results import (
    Point,
    ReportData,
    aggregate,
    best_within,
    collect,
    cost_front,
    dense_reference,
    find_sweeps,
    method_front,
    speed_front,
    varying_keys,
)
from .vocabulary import ExportFormat, TrialStatus

__all__ = [
    "COSTS",
    "cost_metrics",
    "plot_cost",
    "plot_fronts",
    "plot_speed",
    "render_markdown",
    "slug",
    "write_report",
]


def slug(method: str) -> str:
    """A file-name form of a method label: ``L0 output + target`` -> ``l0-output-target``."""
    return re.sub(r"[^a-z0-9]+", "-", method.lower()).strip("-")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _acc(p: Point) -> str:
    return f"{_pct(p.metrics.get('test_accuracy'))} ± {100 * p.test_std:.2f}"


def _int(v: float | None) -> str:
    return "-" if v is None else f"{round(v):,}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "(running)"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s:02d} s" if minutes else f"{s} s"


def _runs(p: Point, tracking_uri: str | None) -> str:
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        base = tracking_uri.rstrip("/")
        return ", ".join(
            f"[{r}]({base}/#/experiments/{p.experiment_id}/runs/{r})" for r in p.run_ids
        )
    return ", ".join(f"`{r}`" for r in p.run_ids)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


_EXPORT_WORDS = {
    ExportFormat.SHRUNK: "structured: shrunk",
    ExportFormat.DENSE: "unstructured: dense tensors, no speedup",
    ExportFormat.CSR: "unstructured: CSR sparse weights (measured faster)",
    ExportFormat.UNPRUNED: "dense model",
}


def _export_text(p: Point) -> str:
    return " / ".join(_EXPORT_WORDS.get(f, f) for f in p.export_formats) or "-"


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _speed_section(points: list[Point], methods: list[str], plots: dict[str, str]) -> list[str]:
    """Accuracy against measured speedup: each method's front on (speedup_vs_dense, val acc)."""
    timed = [p for p in points if "speedup_vs_dense" in p.metrics]
    out = ["", "## Measured speed", ""]
    if not timed:
        return [*out, "No trial was timed against the dense model (no `speedup_vs_dense`)."]
    out.append(
        "Each sweep's driver timed its front's exported models and a dense model of the same "
        "architecture side by side, interleaved, in one process: speedup is the dense model's "
        "time over the model's (throughput on batches of 256, and latency on one example). "
        "Unstructured methods export full-size tensors holding zeros, which run at dense speed."
    )
    if "speed" in plots:
        out += ["", f"![test accuracy vs measured speedup]({plots['speed']})"]
    rows = []
    for method in methods:
        for p in speed_front([q for q in timed if q.method == method]):
            rows.append([
                method, _ratio(p.metrics.get("speedup_vs_dense")),
                _ratio(p.metrics.get("latency_speedup_b1")), _acc(p),
                _pct(p.metrics.get("sparsity")),
                "-" if "latency_ms_b1" not in p.metrics else f"{p.metrics['latency_ms_b1']:.3f}",
                _int(p.metrics.get("throughput")), _int(p.metrics.get("model_bytes")),
                _export_text(p), " / ".join(p.architectures) or "-",
            ])  # fmt: skip
    return [*out, "", *_table(
        ["method", "speedup vs dense (batch 256)", "speedup batch 1", "test acc", "sparsity",
         "latency batch 1 (ms)", "throughput (ex/s)", "model bytes", "export", "architecture"],
        rows,
    )]  # fmt: skip


def _config_text(p: Point, keys: list[str]) -> str:
    return ", ".join(f"{k.split('.', 1)[-1]}={p.config.get(k)}" for k in keys) or "-"


def render_markdown(data: ReportData, plots: dict[str, str]) -> str:
    """The report's Markdown; ``plots`` maps a method (and ``""`` for all) to its PNG file."""
    points = aggregate(data.trials())
    methods = sorted({p.method for p in points}, key=lambda m: (m != "dense", m))
    dense = dense_reference(points)
    names = ", ".join(s.name for s in data.sweeps)
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        f"# Sparsity report: {names}",
        "",
        f"Generated by `l0sweep report` from MLflow (`{data.tracking_uri or 'default store'}`) "
        f"on {now}. Each configuration is averaged over its seeds; a method's Pareto front is "
        "chosen on validation (mean sparsity and mean val accuracy), and its test accuracy is "
        "reported as mean ± standard deviation over seeds. Sparsity is the fraction of the "
        "method's selected weights that are exactly zero; FLOPs are multiply-adds per example.",
        "",
        "## Sweeps",
        "",
    ]
    rows = []
    for s in data.sweeps:
        done = sum(t.status == TrialStatus.FINISHED for t in s.trials)
        trial_s = sum(
            (t.end_time - t.start_time) / 1000
            for t in s.trials
            if t.start_time is not None and t.end_time is not None
        )
        rows.append([s.name, f"`{s.sweep_id}`", s.status, f"{done}/{len(s.trials)}",
                     _duration(s.seconds), _duration(trial_s)])  # fmt: skip
    out += _table(["sweep", "MLflow run", "status", "trials finished", "wall time",
                   "trial time (sum)"], rows)  # fmt: skip
    out += ["", "## Methods", ""]
    if dense is not None:
        out.append(f"Dense reference: test accuracy {_acc(dense)} (val "
                   f"{_pct(dense.metrics['val_accuracy'])}), runs {_runs(dense, data.tracking_uri)}.")  # fmt: skip
    else:
        out.append("No dense trials in these sweeps: no dense reference.")
    out.append("")
    rows = []
    for method in methods:
        group = [p for p in points if p.method == method]
        front = method_front(group)
        within = best_within(group, dense) if dense is not None else None
        top = front[-1]
        rows.append([
            method, str(len(group)), str(sum(len(p.run_ids) for p in group)),
            f"{_pct(within.metrics.get('sparsity'))} ({_acc(within)})" if within else "-",
            f"{_pct(top.metrics.get('sparsity'))} ({_acc(top)})",
            _duration(sum(p.trial_seconds for p in group)),
        ])  # fmt: skip
    out += _table(["method", "configs", "trials", "best sparsity within 1 pt of dense val "
                   "(test acc)", "sparsest front point (test acc)", "trial time (sum)"], rows)  # fmt: skip
    if "" in plots:
        out += ["", f"![Pareto fronts of all methods]({plots['']})"]
    out += _cost_section(points, methods, plots)
    out += _speed_section(points, methods, plots)
    for method in methods:
        group = [p for p in points if p.method == method]
        front = method_front(group)
        keys = varying_keys(group)
        out += ["", f"### {method}", ""]
        if dense is not None:
            within = best_within(group, dense)
            out.append(f"Dense test accuracy {_acc(dense)}. Best sparsity within 1 point of "
                       "dense val accuracy: " + (f"{_pct(within.metrics.get('sparsity'))}, test "
                       f"accuracy {_acc(within)}." if within else "none."))  # fmt: skip
        out.append(f"Pareto front: {len(front)} of {len(group)} configurations.")
        if method in plots:
            out += ["", f"![{method}]({plots[method]})"]
        out.append("")
        rows = [
            [_pct(p.metrics.get("sparsity")), _acc(p), _pct(p.metrics.get("val_accuracy")),
             _int(p.metrics.get("nonzero_params")), _int(p.metrics.get("shrunk_params")),
             f"{p.metrics['expected_flops'] / 1e6:.3f}" if "expected_flops" in p.metrics else "-",
             _ratio(p.metrics.get("speedup_vs_dense")), _export_text(p),
             " / ".join(p.architectures) or "-", _config_text(p, keys), str(len(p.run_ids)),
             _runs(p, data.tracking_uri)]
            for p in front
        ]  # fmt: skip
        out += _table(["sparsity", "test acc", "val acc", "nonzero params", "params after "
                       "shrink", "expected MFLOPs", "measured speedup", "export", "architecture",
                       "config", "seeds", "MLflow runs"], rows)  # fmt: skip
    return "\n".join(out) + "\n"


def plot_fronts(points: list[Point], methods: list[str], title: str) -> bytes:
    """Test accuracy vs sparsity: each method's front (error bars: std over seeds), its other
    configurations faint, the dense reference dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    dense = dense_reference(points)
    if dense is not None:
        ax.axhline(dense.metrics["test_accuracy"], ls="--", c="0.4", label="dense")
    for i, method in enumerate(m for m in methods if m != "dense"):
        group = [p for p in points if p.method == method]
        front = method_front(group)
        color = f"C{i % 10}"
        if len(methods) <= 2:
            ax.scatter([p.metrics["sparsity"] for p in group],
                       [p.metrics["test_accuracy"] for p in group], c="0.75", s=14)  # fmt: skip
        ax.errorbar([p.metrics["sparsity"] for p in front],
                    [p.metrics["test_accuracy"] for p in front],
                    yerr=[p.test_std for p in front], fmt="o-", c=color, ms=4, capsize=2,
                    label=method)  # fmt: skip
    ax.set(xlabel="sparsity (fraction of weights at zero)", ylabel="test accuracy", title=title)
    return _png(fig, ax)


def _png(fig: Any, ax: Any) -> bytes:
    """The figure as PNG bytes, with a grid and the legend (when anything is labelled); closed."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _plot_against(
    points: list[Point],
    methods: list[str],
    metric: str,
    front: Callable[[list[Point]], list[Point]],
    labels: tuple[str, str],
    reference: tuple[float, str] | None = None,
) -> bytes:
    """Test accuracy against ``metric``: each method's front (``front`` of its points that
    logged ``metric``), its other points faint, and an optional dashed vertical reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    if reference is not None:
        ax.axvline(reference[0], ls="--", c="0.4", label=reference[1])
    for i, method in enumerate(methods):
        group = [p for p in points if p.method == method and metric in p.metrics]
        if not group:
            continue
        color = f"C{i % 10}"
        ax.scatter([p.metrics[metric] for p in group],
                   [p.metrics["test_accuracy"] for p in group], c=color, s=10, alpha=0.35)  # fmt: skip
        best = front(group)
        ax.plot([p.metrics[metric] for p in best], [p.metrics["test_accuracy"] for p in best],
                "o-", c=color, ms=4, label=method)  # fmt: skip
    ax.set(xlabel=labels[0], ylabel="test accuracy", title=labels[1])
    return _png(fig, ax)


def plot_speed(points: list[Point], methods: list[str], title: str) -> bytes:
    """Test accuracy vs measured speedup over the dense model: each method's speed front, its
    other timed points faint, 1x (dense speed) dashed."""
    return _plot_against(
        points, methods, "speedup_vs_dense", speed_front,
        ("measured speedup over dense (throughput, batch 256)", title), (1.0, "dense speed"),
    )  # fmt: skip


COSTS = {
    "shrunk_params": ("params", "parameters of the exported model"),
    "shrunk_flops": ("flops", "multiply-adds per example of the exported model"),
    "expected_flops": ("flops", "expected multiply-adds per example (last epoch)"),
}
"""The cost fronts of the report: metric -> (plot name, axis label)."""


def cost_metrics(points: list[Point]) -> list[str]:
    """The costs to front on: the exported model's parameters and its multiply-adds, or, for
    sweeps recorded before trials logged ``shrunk_flops``, the last epoch's expected ones."""
    logged = {m for p in points for m in p.metrics}
    flops = "shrunk_flops" if "shrunk_flops" in logged else "expected_flops"
    return [m for m in ("shrunk_params", flops) if m in logged]


def plot_cost(points: list[Point], methods: list[str], metric: str, title: str) -> bytes:
    """Test accuracy vs a cost of the exported model (``COSTS``): each method's front on
    (cost, val accuracy); the dense model is one point of its own."""
    return _plot_against(
        points, methods, metric, lambda group: cost_front(group, metric),
        (f"{COSTS[metric][1]} (fewer is better)", title),
    )  # fmt: skip


def _cost_section(points: list[Point], methods: list[str], plots: dict[str, str]) -> list[str]:
    """Accuracy against the exported model's parameters and multiply-adds."""
    out = ["", "## Accuracy against parameters and FLOPs", ""]
    costs = cost_metrics(points)
    if "shrunk_params" not in costs:
        return [*out, "No trial logged the exported model's cost (`shrunk_params`)."]
    costed = [p for p in points if "shrunk_params" in p.metrics]
    flops = costs[-1] if len(costs) > 1 else None
    out.append(
        "Each method's front on (cost of the exported model, val accuracy): parameters after "
        "the export (a structured export removes units; an unstructured one keeps full-size "
        "tensors) and "
        + ("multiply-adds per example of the exported model, zero weights skipped."
           if flops == "shrunk_flops" else "the expected multiply-adds per example of the last "
           "epoch (these sweeps predate the exported model's `shrunk_flops`).")
    )  # fmt: skip
    for metric in costs:
        name, label = COSTS[metric]
        if name in plots:
            out += ["", f"![test accuracy vs {label}]({plots[name]})"]
    rows = []
    for method in methods:
        for p in cost_front([q for q in costed if q.method == method], "shrunk_params"):
            value = p.metrics.get(flops) if flops else None
            rows.append([
                method, _int(p.metrics.get("shrunk_params")),
                "-" if value is None else f"{value / 1e6:.3f}", _acc(p),
                _pct(p.metrics.get("sparsity")), _export_text(p),
                " / ".join(p.architectures) or "-",
            ])  # fmt: skip
    flops_header = "MFLOPs after export" if flops != "expected_flops" else "expected MFLOPs"
    return [*out, "", *_table(
        ["method", "params after export", flops_header, "test acc", "sparsity",
         "export", "architecture"], rows)]  # fmt: skip


def write_report(
    sweep_ids: list[str],
    out_dir: str | Path,
    tracking_uri: str | None = None,
    name_contains: str | None = None,
) -> Path:
    """Read the sweeps from MLflow and write ``report.md`` and its PNGs into ``out_dir``.

    Args:
        sweep_ids: the sweeps to compare.
        out_dir: created if missing; the report's files in it are overwritten.
        tracking_uri: the MLflow store.
        name_contains: also every FINISHED sweep whose name contains this (see
            :func:`sweeps.results.find_sweeps`).

    Returns:
        The path of ``report.md``.

    Raises:
        ValueError: no sweep named, or a run that is not a sweep.
    """
    ids = list(sweep_ids)
    if name_contains:
        ids += [i for i in find_sweeps(name_contains, tracking_uri) if i not in ids]
    if not ids:
        raise ValueError("no sweeps to report: give sweep ids or a name to search for")
    data = collect(ids, tracking_uri)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = aggregate(data.trials())
    methods = sorted({p.method for p in points}, key=lambda m: (m != "dense", m))
    plots: dict[str, str] = {}
    if points:
        names = [s.name for s in data.sweeps]
        common = os.path.commonprefix(names).strip(" -_.")  # noqa: RUF071 (names, not paths)
        title = f"{common or 'all methods'}: test accuracy vs sparsity"
        (out / "fronts.png").write_bytes(plot_fronts(points, methods, title))
        plots[""] = "fronts.png"
        if any("speedup_vs_dense" in p.metrics for p in points):
            speed_title = f"{common or 'all methods'}: test accuracy vs measured speedup"
            (out / "speed.png").write_bytes(plot_speed(points, methods, speed_title))
            plots["speed"] = "speed.png"
        for metric in cost_metrics(points):
            name = COSTS[metric][0]
            cost_title = f"{common or 'all methods'}: test accuracy vs {name}"
            (out / f"{name}.png").write_bytes(plot_cost(points, methods, metric, cost_title))
            plots[name] = f"{name}.png"
    for method in methods:
        if method == "dense":
            continue
        name = f"front-{slug(method)}.png"
        chosen = [p for p in points if p.method in (method, "dense")]
        (out / name).write_bytes(plot_fronts(chosen, ["dense", method], method))
        plots[method] = name
    path = out / "report.md"
    path.write_text(render_markdown(data, plots))
    return path
