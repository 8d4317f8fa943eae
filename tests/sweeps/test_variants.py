"""The trials a spec expands to: duplicates removed, names, and the claim behind them (a method
really ignores the fields it is said to ignore: trained twice, the metrics are the same)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sweeps.space import param_space
from sweeps.spec import SweepSpec, TrialConfig
from sweeps.training import train
from sweeps.variants import ignored_fields
from tests.sweeps.conftest import tiny_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_the_quick_example_trains_the_dense_model_once_per_seed() -> None:
    spec = SweepSpec.from_file(EXAMPLES / "digits_quick.yaml")
    expansion = spec.expansion()
    assert spec.num_trials() == 6 and spec.duplicate_trials() == 2
    assert [t["name"] for t in expansion.trials] == [
        "l0 weight lam=0.05 seed=0",
        "l0 weight lam=0.5 seed=0",
        "dense seed=0",
        "l0 weight lam=0.05 seed=1",
        "l0 weight lam=0.5 seed=1",
        "dense seed=1",
    ]
    # Tune gets exactly these, as one grid over whole configs
    assert param_space(spec)["trial"] == {"grid_search": expansion.trials}


def test_random_draws_of_an_ignored_field_are_one_trial_and_seeds_share_the_draws() -> None:
    spec = SweepSpec.model_validate(
        tiny_spec(
            regularizer={"kind": {"grid": ["l1", "none"]}, "lam": {"loguniform": [0.01, 1.0]}},
            search={"num_samples": 3, "seeds": [0, 1]},
        )
    )
    trials = spec.expansion().trials
    assert spec.num_trials() == 8 and spec.duplicate_trials() == 4  # 3 l1 + 1 dense, per seed
    lams = {s: [t["regularizer"]["lam"] for t in trials if t["seed"] == s and
                t["regularizer"]["kind"] == "l1"] for s in (0, 1)}  # fmt: skip
    assert lams[0] == lams[1] and len(set(lams[0])) == 3  # every draw runs once per seed
    assert sorted(t["name"] for t in trials if t["regularizer"]["kind"] == "none") == [
        "dense seed=0",
        "dense seed=1",
    ]
    again = SweepSpec.model_validate(spec.model_dump(mode="json")).expansion().trials
    assert again == trials  # drawn from search.random_state: the same on every validation


def test_names_are_unique_even_when_values_print_alike() -> None:
    spec = SweepSpec.model_validate(tiny_spec(train={"lr": {"grid": [0.00100001, 0.00100002]}}))
    assert [t["name"] for t in spec.expansion().trials] == [
        "l0 weight lr=0.001 seed=0",
        "l0 weight lr=0.001 seed=0 #2",
    ]


def test_names_say_the_method_its_target_and_the_searched_fields_it_uses() -> None:
    spec = SweepSpec.model_validate(
        tiny_spec(
            regularizer={"kind": {"grid": ["magnitude", "l1"]}, "target_sparsity": 0.9,
                         "l1_threshold": {"grid": [0.001, 0.01]}},
            train={"gate_lr": {"grid": [0.1, 0.2]}},
        )
    )  # fmt: skip
    names = [t["name"] for t in spec.expansion().trials]
    assert names == [
        "magnitude target=0.9 seed=0",
        "l1 l1_threshold=0.001 seed=0",
        "l1 l1_threshold=0.01 seed=0",
    ]
    assert spec.duplicate_trials() == 8 - 3


def test_the_trial_limit_counts_distinct_trials_and_says_what_was_removed(monkeypatch) -> None:
    monkeypatch.setenv("L0SWEEP_MAX_TRIALS", "4")
    lams = {"grid": [0.01 * i for i in range(1, 11)]}
    # 10 lam values x 2 seeds for dense alone: 2 distinct trials, within the limit
    dense = SweepSpec.model_validate(
        tiny_spec(regularizer={"kind": "none", "lam": lams}, search={"seeds": [0, 1]})
    )
    assert dense.num_trials() == 2 and dense.duplicate_trials() == 18
    with pytest.raises(ValidationError, match=r"expands to 20 trials .*0 duplicates removed"):
        SweepSpec.model_validate(tiny_spec(regularizer={"lam": lams}, search={"seeds": [0, 1]}))
    # the expansion itself is bounded: 64 x the limit, duplicates included
    with pytest.raises(ValidationError, match=r"expands to 300 configurations .* 64 x the trial"):
        SweepSpec.model_validate(
            tiny_spec(
                regularizer={"kind": "none", "lam": {"grid": [0.001 * i for i in range(1, 301)]}}
            )
        )


def _trained(regularizer: dict, train_section: dict | None = None) -> dict[str, float]:
    dumped = SweepSpec.model_validate(
        tiny_spec(regularizer=regularizer, train={"epochs": 1, **(train_section or {})})
    ).model_dump(mode="json")
    cfg = TrialConfig.of({**{k: dumped[k] for k in ("model", "dataset", "regularizer", "train")},
                           "seed": 0})  # fmt: skip
    return train(cfg).metrics


@pytest.mark.parametrize(
    ("regularizer", "changed_reg", "changed_train"),
    [
        ({"kind": "none"}, {"lam": 7.0, "granularity": "output", "target_sparsity": 0.5},
         {"gate_lr": 0.9, "momentum": 0.1, "finetune_lr": 0.5}),
        ({"kind": "l1", "lam": 1.0}, {"granularity": "output", "droprate_init": 0.7},
         {"gate_lr": 0.9}),
        ({"kind": "magnitude", "target_sparsity": 0.5}, {"lam": 7.0, "l2": 0.1},
         {"gate_lr": 0.9}),
        ({"kind": "l0", "lam": 0.5}, {"prune_begin": 0.3, "l1_threshold": 0.5, "dual_lr": 0.3},
         {"momentum": 0.1}),
    ],
)  # fmt: skip
def test_a_method_trains_alike_whatever_its_ignored_fields_say(
    regularizer: dict, changed_reg: dict, changed_train: dict
) -> None:
    base = _trained(regularizer)
    changed = _trained({**regularizer, **changed_reg}, changed_train)
    cfg = {"regularizer": {**regularizer, **changed_reg}, "train": {"optimizer": "adam",
           "finetune_epochs": 0, **changed_train}}  # fmt: skip
    said = {f"regularizer.{k}" for k in changed_reg} | {f"train.{k}" for k in changed_train}
    assert said <= ignored_fields(cfg)
    timing = {"epoch_seconds"}
    assert {k: v for k, v in changed.items() if k not in timing} == {
        k: v for k, v in base.items() if k not in timing
    }
