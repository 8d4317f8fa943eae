"""The spec as Ray Tune sees it: search space, search algorithm and scheduler.

A random/grid search hands Tune the spec's distinct trials (`sweeps.variants.expand`) as one grid
over whole configs, ``{"trial": grid_search([...])}``: Tune runs each once, and never a duplicate.
An optuna search hands Tune the spec's trial sections (``model``, ``dataset``, ``regularizer``,
``train``) with every search domain replaced by a Tune domain, plus ``seed``, for Optuna to
propose from. :func:`trial_config` reads a trial's config out of either.
"""

from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, SearchAlgorithm, Searcher

from .domains import _domain_tag, _is_domain
from .spec import SweepSpec

__all__ = [
    "TRIAL_SECTIONS",
    "param_space",
    "scheduler",
    "search_algorithm",
    "trial_config",
    "tune_num_samples",
]

TRIAL_SECTIONS = ("model", "dataset", "regularizer", "train")


def _tune_domain(domain: Any) -> Any:
    kind = _domain_tag(domain)
    value = getattr(domain, kind)
    if kind == "grid":
        return tune.grid_search(list(value))
    if kind == "choice":
        return tune.choice(list(value))
    if kind == "uniform":
        return tune.uniform(*value)
    if kind == "loguniform":
        return tune.loguniform(*value)
    return tune.randint(value[0], value[1] + 1)  # randint: both ends included


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's ``param_space`` for ``spec``."""
    if spec.search.algorithm != "optuna":
        return {"trial": tune.grid_search(spec.expansion().trials)}
    dumped = spec.model_dump(mode="json")
    space: dict[str, Any] = {s: dumped[s] for s in TRIAL_SECTIONS}
    for section in ("regularizer", "train"):
        for key, value in getattr(spec, section):
            if _is_domain(value):
                space[section][key] = _tune_domain(value)
    seeds = spec.search.seeds
    space["seed"] = tune.grid_search(seeds) if len(seeds) > 1 else seeds[0]
    return space


def tune_num_samples(spec: SweepSpec) -> int:
    """Tune's ``num_samples``: the expansion already holds every sample of a random search."""
    return spec.search.num_samples if spec.search.algorithm == "optuna" else 1


def trial_config(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's own config (sections, ``seed``, and ``name`` when the expansion named it) out of
    the config Tune gives the trial."""
    return config.get("trial", config)


def search_algorithm(spec: SweepSpec) -> Searcher | SearchAlgorithm:
    """Random/grid sampling, or Optuna's multi-objective sampler over the objectives."""
    if spec.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(
            metric=[o.metric for o in spec.objectives],
            mode=[o.mode for o in spec.objectives],
            seed=spec.search.random_state,
        )
    # The generator limits concurrency itself (Tune ignores max_concurrent_trials for it).
    return BasicVariantGenerator(
        random_state=spec.search.random_state,
        max_concurrent=spec.resources.max_concurrent_trials or 0,
    )


def scheduler(spec: SweepSpec) -> TrialScheduler:
    """FIFO, or ASHA on one metric (the scheduler's, or the first objective's)."""
    if spec.scheduler.kind == "fifo":
        return FIFOScheduler()
    metric = spec.scheduler.metric or spec.objectives[0].metric
    mode = next((o.mode for o in spec.objectives if o.metric == metric), "max")
    return ASHAScheduler(
        time_attr="training_iteration",
        metric=metric,
        mode=mode,
        max_t=spec.train.epochs,
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
    )
