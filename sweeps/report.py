"""A sweep's results: the Pareto front as JSON, a plot (PNG and hoverable HTML), a text table,
the ``pareto=true`` tags on the winning child runs, and summary metrics on the parent run.
"""

from __future__ import annotations

import html
import io
import json
import tempfile
from pathlib import Path
from typing import Any

from . import tracking
from .pareto import best_at_sparsity, eligible, hypervolume, pareto_front
from .records import TrialRecord
from .spec import SweepSpec
from .vocabulary import FALSE, TRUE, Tag

__all__ = ["SPARSITY_LEVELS", "finalize_sweep", "format_pareto_table", "pareto_report", "plot_png"]

SPARSITY_LEVELS = (0.5, 0.8, 0.9, 0.95, 0.98)
_COLUMNS = ("val_accuracy", "test_accuracy", "sparsity", "nonzero_params", "expected_flops",
            "latency_ms_b1", "throughput", "speedup_vs_dense")  # fmt: skip


def pareto_report(spec: SweepSpec, trials: list[TrialRecord]) -> dict[str, Any]:
    """The content of ``pareto.json``: objectives, front, hypervolume, lookups, counts."""
    objectives = [(o.metric, o.mode) for o in spec.objectives]
    front = pareto_front(trials, objectives)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    best = {}
    for level in SPARSITY_LEVELS:
        t = best_at_sparsity(trials, level)
        best[str(level)] = (
            None if t is None else {"trial_id": t.trial_id, "run_id": t.run_id, **t.metrics}
        )
    return {
        "objectives": [{"metric": m, "mode": mode} for m, mode in objectives],
        "front": [
            {
                "trial_id": t.trial_id,
                "run_id": t.run_id,
                "status": t.status,
                "metrics": t.metrics,
                "config": t.config,
            }
            for t in front
        ],
        "hypervolume": hypervolume(front, objectives),
        "best_at_sparsity": best,
        "counts": counts,
        "eligible": len(eligible(trials, objectives)),
    }


def format_pareto_table(report: dict[str, Any]) -> str:
    """The front as a fixed-width text table (for ``l0sweep run`` and ``l0sweep pareto``)."""
    header = ("trial", *_COLUMNS)
    rows = [header]
    for t in report["front"]:
        m = t["metrics"]
        rows.append((str(t["trial_id"]), *(_fmt(m.get(c)) for c in _COLUMNS)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(report["counts"].items()))
    lines.append(f"Pareto front: {len(report['front'])} of {report['eligible']} finished trials ({counts}); "
                 f"hypervolume {report['hypervolume']:.4f}")  # fmt: skip
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not float(v).is_integer():
        return f"{v:.4f}"
    return str(int(v)) if isinstance(v, float) else str(v)


def _xy(spec: SweepSpec) -> tuple[str, str]:
    names = [o.metric for o in spec.objectives]
    x = "sparsity" if "sparsity" in names else names[-1]
    y = next((n for n in names if n != x), "val_accuracy")
    return x, y


def plot_png(spec: SweepSpec, trials: list[TrialRecord], front: list[TrialRecord]) -> bytes:
    """All finished trials, the front highlighted and joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = _xy(spec)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    pts = [(t.metrics[x], t.metrics[y]) for t in trials if x in t.metrics and y in t.metrics]
    if pts:
        ax.scatter(*zip(*pts, strict=True), c="0.6", s=18, label="trials")
    fpts = sorted((t.metrics[x], t.metrics[y]) for t in front)
    if fpts:
        ax.plot(*zip(*fpts, strict=True), "o-", c="C3", label="Pareto front")
    ax.set(xlabel=x, ylabel=y, title=spec.name)
    ax.grid(alpha=0.3)
    if pts:  # a sweep with no reported trial yet has nothing to label
        ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _plot_html(spec: SweepSpec, trials: list[TrialRecord], front: list[TrialRecord]) -> str:
    """A self-contained SVG scatter; hovering a point shows the trial's id, metrics and config."""
    x, y = _xy(spec)
    pts = [t for t in trials if x in t.metrics and y in t.metrics]
    on_front = {t.run_id for t in front}
    xs = [t.metrics[x] for t in pts] or [0.0, 1.0]
    ys = [t.metrics[y] for t in pts] or [0.0, 1.0]
    x0, x1, y0, y1 = min(xs), max(xs) or 1.0, min(ys), max(ys) or 1.0
    sx = lambda v: 60 + 500 * (v - x0) / ((x1 - x0) or 1)  # noqa: E731
    sy = lambda v: 340 - 300 * (v - y0) / ((y1 - y0) or 1)  # noqa: E731
    dots = []
    for t in pts:
        tip = html.escape(json.dumps({"trial": t.trial_id, **t.metrics, **t.config}, indent=1))
        color = "#d62728" if t.run_id in on_front else "#999"
        dots.append(f'<circle cx="{sx(t.metrics[x]):.1f}" cy="{sy(t.metrics[y]):.1f}" r="5" '
                    f'fill="{color}"><title>{tip}</title></circle>')  # fmt: skip
    return (
        f"<!doctype html><html><body><h3>{html.escape(spec.name)}: {y} vs {x}</h3>"
        f'<svg width="600" height="380" style="font:12px sans-serif">'
        f'<line x1="60" y1="340" x2="560" y2="340" stroke="#000"/><line x1="60" y1="40" x2="60" y2="340" stroke="#000"/>'
        f'<text x="300" y="370">{x} [{x0:.3g}, {x1:.3g}]</text>'
        f'<text x="0" y="30">{y} [{y0:.3g}, {y1:.3g}]</text>{"".join(dots)}</svg>'
        "<p>Red: Pareto front. Hover a point for its trial.</p></body></html>"
    )


def finalize_sweep(
    spec: SweepSpec, sweep_id: str, tracking_uri: str | None = None
) -> dict[str, Any]:
    """Write the parent artifacts and the trials' Pareto tags; returns the Pareto report."""
    c = tracking.client(tracking_uri)
    trials = tracking.sweep_trials(sweep_id, tracking_uri)
    report = pareto_report(spec, trials)
    winners = {t["run_id"] for t in report["front"]}
    front = [t for t in trials if t.run_id in winners]
    for t in trials:
        on_front = TRUE if t.run_id in winners else FALSE
        c.set_tag(t.run_id, Tag.PARETO, on_front)
        if (t.model_uri or "").startswith("models:/"):
            model_id = t.model_uri.removeprefix("models:/")
            c.set_logged_model_tags(model_id, {Tag.PARETO: on_front})
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "pareto.json").write_text(json.dumps(report, indent=2))
        (d / "pareto.png").write_bytes(plot_png(spec, trials, front))
        (d / "pareto.html").write_text(_plot_html(spec, trials, front))
        (d / "summary.txt").write_text(format_pareto_table(report) + "\n")
        c.log_artifacts(sweep_id, tmp)
    c.log_table(
        sweep_id,
        {"trial_id": [t.trial_id for t in trials], "status": [t.status for t in trials],
         "pareto": [t.run_id in winners for t in trials],
         **{m: [t.metrics.get(m) for t in trials] for m in _COLUMNS}},
        "summary.json",
    )  # fmt: skip
    c.log_batch(sweep_id, metrics=_summary_metrics(report))
    return report


def _summary_metrics(report: dict[str, Any]) -> list[Any]:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = {"hypervolume": report["hypervolume"], "pareto_size": len(report["front"])}
    values.update({f"trials_{s.lower()}": n for s, n in report["counts"].items()})
    return [Metric(k, float(v), now, 0) for k, v in values.items()]
