"""Where a fine-tuning trial's starting weights come from (``train.init_from``).

The references prune a trained dense model: first a dense sweep, then a sparse sweep whose trials
start from its weights with gates open. ``init_from`` names either one trial run, or a sweep
(``{sweep: <id or name>}``). A sweep reference picks, per trial, the dense trial trained with the
same seed (the best on val_accuracy if several), so seeds vary the pretrained model as well, and
a name lets a benchmark's spec files stay fixed: it means the latest FINISHED sweep of that name
in the same MLflow experiment.
"""

from __future__ import annotations

import re
import tempfile
from typing import TYPE_CHECKING

import torch

from . import tracking
from .vocabulary import NEWEST_FIRST, SweepStatus, TrialStatus, sweeps_filter

if TYPE_CHECKING:
    from .spec import InitFromSweep

__all__ = ["InitFromError", "load_init_weights", "resolve_init_run"]

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class InitFromError(ValueError):
    """``train.init_from`` names no usable run."""


def _sweep_by_name(name: str, experiment_id: str, tracking_uri: str | None) -> str:
    c = tracking.client(tracking_uri)
    query = sweeps_filter(status=SweepStatus.FINISHED, name=name)
    runs = c.search_runs([experiment_id], query, order_by=[NEWEST_FIRST])
    if not runs:
        exp = c.get_experiment(experiment_id).name
        raise InitFromError(
            f"init_from: no FINISHED sweep named {name!r} in experiment {exp!r}; run it first "
            "(or give a sweep id or a trial's run id)"
        )
    return runs[0].info.run_id


def resolve_init_run(
    init_from: str | InitFromSweep | None, seed: int, sweep_id: str, tracking_uri: str | None
) -> str | None:
    """The run whose weights a trial of ``sweep_id`` with ``seed`` starts from (None: none).

    Raises:
        InitFromError: the sweep named does not exist, is not finished or has no finished trial.
    """
    if init_from is None or isinstance(init_from, str):
        return init_from
    ref = init_from.sweep
    c = tracking.client(tracking_uri)
    if not _RUN_ID.match(ref):
        ref = _sweep_by_name(ref, c.get_run(sweep_id).info.experiment_id, tracking_uri)
    trials = [
        t
        for t in tracking.sweep_trials(ref, tracking_uri)
        if t.status == TrialStatus.FINISHED and "val_accuracy" in t.metrics
    ]
    if not trials:
        raise InitFromError(f"init_from: sweep {ref} has no finished trial to start from")
    same_seed = [t for t in trials if t.config.get("seed") == str(seed)]
    return max(same_seed or trials, key=lambda t: t.metrics["val_accuracy"]).run_id


def load_init_weights(run_id: str, tracking_uri: str | None) -> dict[str, torch.Tensor]:
    """The exported model's state dict of a trial run (``model/state_dict.pt``)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = tracking.client(tracking_uri).download_artifacts(
                run_id, "model/state_dict.pt", tmp
            )
        except Exception as err:
            raise InitFromError(
                f"init_from: run {run_id} has no model/state_dict.pt artifact ({err})"
            ) from err
        return torch.load(path, map_location="cpu", weights_only=True)
