import json

import pytest
from pydantic import ValidationError

from sweeps.spec import SweepSpec, json_schema
from tests.sweeps.conftest import tiny_spec


def _errors(data: dict) -> dict[str, str]:
    with pytest.raises(ValidationError) as info:
        SweepSpec.model_validate(data)
    return {".".join(map(str, e["loc"])): e["msg"] for e in info.value.errors()}


def test_defaults_and_count():
    spec = SweepSpec.model_validate(tiny_spec())
    assert spec.num_trials() == 1
    assert [o.metric for o in spec.objectives] == ["val_accuracy", "sparsity"]
    assert spec.model.params.hidden == [32]


def test_count_is_grid_times_samples_times_seeds():
    spec = SweepSpec.model_validate(
        tiny_spec(
            regularizer={
                "lam": {"loguniform": [1e-3, 1.0]},
                "granularity": {"grid": ["weight", "output"]},
            },
            train={"lr": {"choice": [1e-3, 3e-3]}},
            search={"num_samples": 3, "seeds": [0, 1]},
        )
    )
    assert spec.num_trials() == 2 * 3 * 2
    assert set(spec.searched_fields()) == {"regularizer.lam", "regularizer.granularity", "train.lr"}


def test_round_trip_through_json_and_yaml(tmp_path):
    spec = SweepSpec.model_validate(tiny_spec(regularizer={"lam": {"uniform": [0.1, 0.5]}}))
    dumped = spec.model_dump(mode="json")
    assert SweepSpec.model_validate(dumped) == spec
    (tmp_path / "s.json").write_text(json.dumps(dumped))
    assert SweepSpec.from_file(tmp_path / "s.json") == spec
    (tmp_path / "s.yaml").write_text("name: y\nmodel: {name: mlp}\ndataset: {name: digits}\n")
    assert SweepSpec.from_file(tmp_path / "s.yaml").model.params.hidden == [300, 100]


def test_all_errors_at_once_with_field_paths():
    errors = _errors(
        tiny_spec(
            modle={"name": "mlp"},
            model={"name": "mlpp"},
            dataset={"name": "digits", "params": {"oops": 1}},
            regularizer={"lam": {"logunifrom": [1e-5, 1e-2]}, "granularity": {"grid": ["weigh"]},
                         "droprate_init": {"uniform": [0.5, 0.2]}},
            train={"lr": {"loguniform": [0, 1]}},
            objectives=[{"metric": "val_acc"}],
        )
    )  # fmt: skip
    assert "modle" in errors
    assert "cnn" in errors["model"] and "mlp" in errors["model"]  # known names listed
    assert "dataset.digits.params.oops" in errors
    assert "grid, choice" in errors["regularizer.lam"]
    assert any(k.startswith("regularizer.granularity.grid") for k in errors)
    assert any(k.startswith("regularizer.droprate_init.uniform") for k in errors)
    assert any(k.startswith("train.lr.loguniform") for k in errors)
    assert "val_accuracy" in errors["objectives.0"]


def test_test_metrics_cannot_be_objectives():
    errors = _errors(tiny_spec(objectives=[{"metric": "test_accuracy"}]))
    assert "validation" in errors["objectives.0"]


def test_limits_come_from_settings(monkeypatch):
    monkeypatch.setenv("L0SWEEP_MAX_TRIALS", "3")
    monkeypatch.setenv("L0SWEEP_MAX_EPOCHS", "5")
    errors = _errors(tiny_spec(train={"epochs": 6}, search={"seeds": [0, 1, 2, 3]}))
    assert "L0SWEEP_MAX_EPOCHS" in errors[""] and "L0SWEEP_MAX_TRIALS" in errors[""]


def test_optuna_rejects_grid_and_many_seeds():
    errors = _errors(
        tiny_spec(
            regularizer={"lam": {"grid": [0.1, 1.0]}},
            search={"algorithm": "optuna", "seeds": [0, 1]},
        )
    )
    assert "choice" in errors[""] and "one seed" in errors[""]


def test_asha_grace_period_within_epochs():
    errors = _errors(tiny_spec(scheduler={"kind": "asha", "grace_period": 5}))
    assert "grace_period" in errors[""]


def test_schema_lists_models_and_domains():
    text = json.dumps(json_schema())
    for word in ("lenet5", "sparse-teacher", "loguniform", "granularity"):
        assert word in text


def test_examples_validate():
    from pathlib import Path

    files = sorted(Path(__file__).parents[2].joinpath("examples").glob("*.*"))
    assert len(files) >= 3
    for path in files:
        assert SweepSpec.from_file(path).num_trials() >= 1, path


def test_magnitude_needs_a_target_sparsity_it_can_search():
    spec = SweepSpec.model_validate(
        tiny_spec(regularizer={"kind": "magnitude", "target_sparsity": {"grid": [0.5, 0.9]}})
    )
    assert spec.num_trials() == 2
    assert spec.regularizer.prune_scope == "global" and spec.regularizer.prune_end == 0.5
    errors = _errors(tiny_spec(regularizer={"kind": "magnitude"}))
    assert "kind 'magnitude' needs target_sparsity" in errors["regularizer"]
    errors = _errors(
        tiny_spec(
            regularizer={
                "kind": {"grid": ["l0", "magnitude"]},
                "target_sparsity": {"choice": [None, 0.9]},
            }
        )
    )
    assert "needs target_sparsity" in errors["regularizer"]
    errors = _errors(
        tiny_spec(
            regularizer={"kind": "magnitude", "target_sparsity": 0.9, "prune_scope": "row",
                         "prune_begin": 0.6, "prune_end": 0.4}
        )
    )  # fmt: skip
    assert "'global' or 'layer'" in errors["regularizer.prune_scope.value"]


def test_prune_window_is_ordered():
    errors = _errors(
        tiny_spec(
            regularizer={"kind": "magnitude", "target_sparsity": 0.9,
                         "prune_begin": 0.6, "prune_end": {"grid": [0.4, 0.8]}}
        )
    )  # fmt: skip
    assert "prune_begin (0.6) must not be after prune_end" in errors["regularizer"]


def test_init_from_takes_a_run_id_or_a_sweep_and_finetune_fits_in_the_epochs():
    run = "0123456789abcdef0123456789abcdef"
    assert SweepSpec.model_validate(tiny_spec(train={"init_from": run})).train.init_from == run
    by_name = SweepSpec.model_validate(tiny_spec(train={"init_from": {"sweep": "fashion-dense"}}))
    assert by_name.train.init_from.sweep == "fashion-dense"
    errors = _errors(tiny_spec(train={"init_from": "not-a-run-id"}))
    assert any(k.startswith("train.init_from") for k in errors)
    errors = _errors(tiny_spec(train={"init_from": {"sweep": "x' or '1'='1"}}))
    assert any(k.startswith("train.init_from") for k in errors)
    errors = _errors(tiny_spec(train={"epochs": 3, "finetune_epochs": 3}))
    assert "finetune_epochs (3) must be below epochs (3)" in errors["train"]


def test_benchmark_specs_are_two_stage_sets_with_two_seeds():
    from pathlib import Path

    root = Path(__file__).parents[2] / "benchmarks" / "specs"
    # the chain-model sets; the zoo's sets are checked in test_zoo_benchmark_specs.py
    benches = [root / name for name in ("digits", "fashion-mlp", "fashion-lenet5")]
    for bench in benches:
        specs = {p.stem: SweepSpec.from_file(p) for p in sorted(bench.glob("*.yaml"))}
        dense = specs.pop("dense")
        assert dense.regularizer.kind == "none" and dense.train.init_from is None, bench
        kinds = {(s.regularizer.kind, s.regularizer.granularity) for s in specs.values()}
        assert kinds >= {("l0", "weight"), ("l0", "output"), ("l1", "weight"),
                         ("magnitude", "weight")}, bench  # fmt: skip
        for name, spec in specs.items():
            where = f"{bench.name}/{name}"
            assert spec.train.init_from.sweep == dense.name, where
            assert (spec.experiment, spec.model, spec.dataset) == (
                dense.experiment,
                dense.model,
                dense.dataset,
            ), where
            assert len(spec.search.seeds) >= 2 and spec.train.epochs <= 20, where
        targets = specs["l0-target"].regularizer.target_sparsity.grid
        assert {0.5, 0.8, 0.9, 0.95} <= set(targets), bench
        matched = set(specs["magnitude"].regularizer.target_sparsity.grid)
        assert set(targets) <= matched, bench  # magnitude at the L0 targets


def test_measured_speed_metrics_can_be_objectives_of_a_random_search():
    spec = SweepSpec.model_validate(
        tiny_spec(
            objectives=[
                {"metric": "val_accuracy"},
                {"metric": "latency_ms_b1", "mode": "min"},
                {"metric": "throughput", "mode": "max"},
                {"metric": "speedup_vs_dense", "mode": "max"},
            ]
        )
    )
    assert [o.metric for o in spec.objectives][1:] == [
        "latency_ms_b1", "throughput", "speedup_vs_dense"
    ]  # fmt: skip


def test_a_misspelt_speed_metric_names_the_field_and_the_metrics_allowed():
    errors = _errors(tiny_spec(objectives=[{"metric": "latency_ms", "mode": "min"}]))
    message = errors["objectives.0"]
    assert "'latency_ms'" in message
    assert "latency_ms_b1" in message and "speedup_vs_dense" in message
    assert "val_accuracy" in message


def test_speed_objectives_are_refused_where_the_search_or_scheduler_would_need_them_early():
    errors = _errors(
        tiny_spec(
            search={"algorithm": "optuna", "num_samples": 2},
            regularizer={"lam": {"loguniform": [1e-3, 1.0]}},
            objectives=[{"metric": "val_accuracy"}, {"metric": "latency_ms_b1", "mode": "min"}],
        )
    )
    assert "optuna never sees them" in errors[""] and "latency_ms_b1" in errors[""]
    errors = _errors(tiny_spec(scheduler={"kind": "asha"}, objectives=[{"metric": "throughput"}]))
    assert "scheduler.metric 'throughput' is not reported" in errors[""]
