import math

import pytest

from sweeps.pareto import (
    best_at_sparsity,
    dominates,
    hypervolume,
    pareto_front,
    speed_candidates,
)
from sweeps.records import TrialRecord

OBJ = [("acc", "max"), ("sparsity", "max")]


def t(name, acc, sp, status="FINISHED", **extra):
    metrics = {"acc": acc, "sparsity": sp, **extra}
    return TrialRecord(f"run-{name}", name, status=status, metrics=metrics)


def test_front_drops_dominated_and_keeps_ties():
    trials = [t("a", 0.9, 0.5), t("b", 0.8, 0.9), t("c", 0.85, 0.4), t("d", 0.9, 0.5)]
    assert [x.trial_id for x in pareto_front(trials, OBJ)] == ["a", "d", "b"]


def test_nan_failed_and_stopped_trials_do_not_compete():
    trials = [t("a", 0.7, 0.5), t("nan", math.nan, 0.99), t("f", 0.99, 0.99, "FAILED"),
              t("s", 0.99, 0.99, "STOPPED")]  # fmt: skip
    assert [x.trial_id for x in pareto_front(trials, OBJ)] == ["a"]
    assert [x.trial_id for x in pareto_front(trials, OBJ, statuses=("FINISHED", "STOPPED"))] == [
        "s"
    ]


def test_min_objective():
    trials = [t("a", 0.9, 0.5, flops=10.0), t("b", 0.9, 0.5, flops=5.0)]
    assert [x.trial_id for x in pareto_front(trials, [("acc", "max"), ("flops", "min")])] == ["b"]


def test_hypervolume_2d_exact():
    trials = [t("a", 0.9, 0.5), t("b", 0.5, 0.9)]
    # union of [0,.9]x[0,.5] and [0,.5]x[0,.9] = .45 + .45 - .25
    assert hypervolume(trials, OBJ) == pytest.approx(0.65)
    assert hypervolume([], OBJ) == 0.0
    assert hypervolume(
        trials, [("acc", "max"), ("sparsity", "max")], reference=[0.4, 0.4]
    ) == pytest.approx(0.09)


def test_dominates():
    assert dominates((1, 1), (1, 0)) and not dominates((1, 1), (1, 1))


def test_best_at_sparsity_chooses_on_validation():
    trials = [
        TrialRecord("ra", "a", status="FINISHED",
                    metrics={"sparsity": 0.95, "val_accuracy": 0.8, "test_accuracy": 0.9}),
        TrialRecord("rb", "b", status="FINISHED",
                    metrics={"sparsity": 0.96, "val_accuracy": 0.85, "test_accuracy": 0.7}),
        TrialRecord("rc", "c", status="FINISHED",
                    metrics={"sparsity": 0.5, "val_accuracy": 0.99, "test_accuracy": 0.99}),
    ]  # fmt: skip
    assert best_at_sparsity(trials, 0.9).trial_id == "b"
    assert best_at_sparsity(trials, 0.99) is None


def test_speed_candidates_unite_the_fronts_a_speed_comparison_needs():
    def trial(run_id, val, sparsity, throughput, status="FINISHED"):
        metrics = {"val_accuracy": val, "sparsity": sparsity, "throughput": throughput}
        config = {"regularizer.lam": run_id}  # one configuration each
        return TrialRecord(run_id, status=status, config=config, metrics=metrics)

    trials = [
        trial("accurate", 0.95, 0.1, 100.0),
        trial("sparse", 0.80, 0.9, 150.0),  # on the accuracy/sparsity front
        trial("fast", 0.85, 0.5, 900.0),  # on the accuracy/throughput front
        trial("worse", 0.70, 0.4, 90.0),  # dominated everywhere
        trial("failed", 0.99, 0.99, 9999.0, status="FAILED"),
    ]
    # speedup_vs_dense is not measured yet: the trial's own throughput stands in for it
    own = [("val_accuracy", "max"), ("speedup_vs_dense", "max")]
    chosen = [t.run_id for t in speed_candidates(trials, own)]
    assert chosen == ["accurate", "fast", "sparse"]
    assert [t.run_id for t in speed_candidates(trials, own, limit=2)] == ["accurate", "fast"]
    assert speed_candidates([], own) == []


def test_speed_candidates_take_every_seed_of_a_chosen_configuration():
    """A report row averages a configuration's seeds and shows ``speedup_vs_dense`` only when
    every seed was timed: a seed that another seed of its configuration dominates on every
    front (more accurate and faster: a coin flip between equal dense models) was left out, and
    the row lost its measured speed (the benchmark report's speed plot then went missing)."""

    def trial(run_id, seed, lam, val, sparsity, throughput, status="FINISHED"):
        metrics = {"val_accuracy": val, "sparsity": sparsity, "throughput": throughput}
        config = {"seed": str(seed), "regularizer.lam": lam}
        return TrialRecord(run_id, status=status, config=config, metrics=metrics)

    trials = [
        trial("a0", 0, "0.1", 0.95, 0.5, 200.0),
        trial("a1", 1, "0.1", 0.90, 0.4, 100.0),  # dominated by a0 everywhere
        trial("b0", 0, "1.0", 0.70, 0.3, 90.0),  # b: dominated everywhere, not chosen
        trial("b1", 1, "1.0", 0.71, 0.2, 95.0),
        trial("a2", 2, "0.1", 0.10, 0.1, 1.0, status="FAILED"),  # not a finished seed
    ]
    own = [("val_accuracy", "max"), ("sparsity", "max")]
    assert [t.run_id for t in speed_candidates(trials, own)] == ["a0", "a1"]
    # The limit keeps whole configurations (a row with half its seeds timed shows no speed)...
    assert [t.run_id for t in speed_candidates(trials, own, limit=3)] == ["a0", "a1"]
    # ...except the first, cut at the limit rather than dropped.
    assert [t.run_id for t in speed_candidates(trials, own, limit=1)] == ["a0"]
