"""The sweep's description in the MLflow UI: a Markdown note on the parent run.

MLflow shows a run's ``mlflow.note.content`` tag as its description, at the top of the run's
overview. The sweep's note says its status, the spec's name and objectives, and once the sweep
has ended its Pareto front as a table (each point: the trial's config in words, sparsity,
accuracy, parameters after export, a link to the trial's run), so the answer is on the first
screen a user opens instead of three clicks down in the artifacts.
"""

from __future__ import annotations

from typing import Any

from . import tracking
from .pareto import pareto_front
from .records import TrialRecord
from .spec import SweepSpec
from .vocabulary import ACTIVE_SWEEP, Tag

__all__ = ["NOTE_TAG", "sweep_note", "write_sweep_note"]

NOTE_TAG = Tag.NOTE
_ACCURACY = ("val_accuracy", "test_accuracy")


def _number(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    return f"{value:,.0f}" if value.is_integer() and abs(value) >= 10 else f"{value:.4f}"


def _params(metrics: dict[str, Any]) -> str:
    """``1,234 of 5,130 (shrunk 1,300)``: the exported model's nonzero parameters."""
    nonzero, total = metrics.get("nonzero_params"), metrics.get("total_params")
    if nonzero is None:
        return "-"
    text = f"{nonzero:,.0f}" + (f" of {total:,.0f}" if total else "")
    shrunk = metrics.get("shrunk_params")
    return text + (f" (shrunk {shrunk:,.0f})" if shrunk is not None else "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def sweep_note(
    spec: SweepSpec,
    status: str,
    message: str | None,
    trials: list[TrialRecord],
    experiment_id: str,
) -> str:
    """The Markdown description of a sweep's parent run.

    Args:
        trials: the sweep's trials as :func:`sweeps.tracking.sweep_trials` reads them.
        experiment_id: the sweep's experiment (the links to trial runs are relative to the UI).
    """
    objectives = [(o.metric, o.mode) for o in spec.objectives]
    duplicates = spec.duplicate_trials()
    lines = [
        f"**{status}**" + (f": {_cell(message[:500])}" if message else ""),
        "",
        f"Sweep **{_cell(spec.name)}**: {spec.model.name} on {spec.dataset.name}, "
        f"{spec.num_trials()} trials"
        + (f" ({duplicates} duplicates removed)" if duplicates else "")
        + f"; objectives: {', '.join(f'{m} ({mode})' for m, mode in objectives)}.",
        "",
    ]
    if status in ACTIVE_SWEEP:
        lines.append("The Pareto front is shown here when the sweep ends.")
        return "\n".join(lines)
    front = pareto_front(trials, objectives)
    if not front:
        lines.append("No trial finished with all its objectives: there is no Pareto front.")
        return "\n".join(lines)
    columns = list(dict.fromkeys([*(m for m, _ in objectives), "sparsity", *_ACCURACY]))
    lines += [
        f"### Pareto front: {len(front)} of {len(trials)} trials",
        "",
        "| trial | " + " | ".join(columns) + " | parameters after export | run |",
        "|---|" + "---:|" * len(columns) + "---:|---|",
    ]
    rows = []
    for t in sorted(front, key=lambda t: t.metrics.get("sparsity") or 0.0):
        m = t.metrics
        link = f"[{t.run_id[:8]}](#/experiments/{experiment_id}/runs/{t.run_id})"
        cells = [_cell(t.name or str(t.trial_id)), *(_number(m.get(c)) for c in columns)]
        rows.append("| " + " | ".join([*cells, _params(m), link]) + " |")
    # A tag holds MAX_TAG_VAL_LENGTH characters: a front too long for it is cut at a whole row.
    shown = len(rows)
    while len("\n".join(lines + rows[:shown])) > tracking.MAX_TAG_VAL_LENGTH - 200:
        shown -= 1
    lines += rows[:shown]
    if shown < len(rows):
        lines += ["", f"... and {len(rows) - shown} more points: see the artifact pareto.json."]
    return "\n".join(lines)


def write_sweep_note(
    spec: SweepSpec,
    sweep_id: str,
    status: str,
    message: str | None = None,
    tracking_uri: str | None = None,
) -> None:
    """Write (or rewrite) the description of the sweep's parent run from what MLflow holds."""
    c = tracking.client(tracking_uri)
    experiment_id = c.get_run(sweep_id).info.experiment_id
    trials = tracking.sweep_trials(sweep_id, tracking_uri) if status not in ACTIVE_SWEEP else []
    c.set_tag(sweep_id, NOTE_TAG, sweep_note(spec, status, message, trials, experiment_id))
