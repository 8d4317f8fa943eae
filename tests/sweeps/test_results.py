"""The comparison report's grouping, seed averaging, fronts and Markdown, on trial records as
:func:`sweeps.tracking.sweep_trials` reads them (the MLflow path is tested through the service)."""

import itertools
import json
from dataclasses import replace

import pytest

from sweeps.records import TrialRecord
from sweeps.results import (
    ReportData,
    SweepInfo,
    aggregate,
    best_within,
    dense_reference,
    method_front,
    method_label,
)
from sweeps.results_report import cost_metrics, plot_cost, render_markdown, slug

_ids = itertools.count()


def _config(kind: str, seed: int = 0, **reg) -> dict[str, str]:
    values = {"regularizer.kind": kind, "regularizer.granularity": "weight",
              "regularizer.target_sparsity": None, "regularizer.prune_scope": "global",
              "regularizer.prune_begin": 0.0, "regularizer.prune_end": 0.5,
              "train.init_from": None, "seed": seed}  # fmt: skip
    values.update({f"regularizer.{k}": v for k, v in reg.items()})
    # as tracking.flatten logs them: strings bare, everything else as JSON
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


def _trial(config, val, test, sparsity, status="FINISHED", seconds=2.0, **metrics):
    n = next(_ids)
    return TrialRecord(
        trial_id=f"t{n}", run_id=f"{n:032x}", status=status, config=config,
        metrics={"val_accuracy": val, "test_accuracy": test, "sparsity": sparsity,
                 "nonzero_params": 1000 * (1 - sparsity), "expected_flops": 2e6, **metrics},
        architecture="64-32-10", start_time=0, end_time=int(seconds * 1000),
    )  # fmt: skip


def test_method_labels_come_from_the_logged_params():
    assert method_label(_config("none")) == "dense"
    assert method_label(_config("l0")) == "L0 weight"
    assert method_label(_config("l0", granularity="output", target_sparsity=0.9)) == (
        "L0 output + target"
    )
    assert method_label(_config("l1")) == "L1 + threshold"
    assert method_label(_config("magnitude", prune_end=0.0)) == "magnitude one-shot (global)"
    tuned = {**_config("magnitude", prune_scope="layer"), "train.init_from.sweep": "d"}
    del tuned["train.init_from"]
    assert method_label(tuned) == "magnitude gradual (layer), from dense"
    assert slug("L0 output + target, from dense") == "l0-output-target-from-dense"


def test_seeds_are_averaged_and_unfinished_trials_left_out():
    trials = [
        _trial(_config("l0", 0, lam=0.1), 0.90, 0.88, 0.80),
        _trial(_config("l0", 1, lam=0.1), 0.92, 0.90, 0.90),
        _trial(_config("l0", 2, lam=0.1), 0.10, 0.10, 0.99, status="FAILED"),
        _trial(_config("l0", 0, lam=1.0), 0.85, 0.84, 0.95),
    ]
    points = aggregate(trials)
    assert [len(p.run_ids) for p in points] == [2, 1]
    two = points[0]
    assert two.metrics["test_accuracy"] == pytest.approx(0.89)
    assert two.metrics["sparsity"] == pytest.approx(0.85)
    assert two.test_std == pytest.approx(0.01 * 2**0.5)
    assert two.seeds == ["0", "1"] and two.trial_seconds == pytest.approx(4.0)


def test_fronts_are_chosen_on_validation_and_compared_with_dense():
    trials = [
        _trial(_config("none", 0), 0.95, 0.94, 0.0),
        _trial(_config("none", 0, lam=5.0), 0.93, 0.96, 0.0),  # better test, worse val
        _trial(_config("magnitude", 0, target_sparsity=0.5), 0.945, 0.93, 0.5),
        _trial(_config("magnitude", 0, target_sparsity=0.8), 0.942, 0.90, 0.8),
        _trial(_config("magnitude", 0, target_sparsity=0.9), 0.90, 0.97, 0.9),
        _trial(_config("magnitude", 0, target_sparsity=0.95), 0.80, 0.80, 0.9),  # dominated
    ]
    points = aggregate(trials)
    dense = dense_reference(points)
    assert dense.metrics["test_accuracy"] == 0.94  # chosen on val, not on test
    magnitude = [p for p in points if p.method != "dense"]
    front = method_front(magnitude)
    assert [p.metrics["sparsity"] for p in front] == [0.5, 0.8, 0.9]
    within = best_within(magnitude, dense)
    assert within.metrics["sparsity"] == 0.8  # val 0.942 >= 0.95 - 0.01; 0.9 is not


def test_markdown_tables_show_the_numbers_and_run_ids():
    trials = [
        _trial(_config("none", 0), 0.95, 0.9412, 0.0),
        _trial(_config("l0", 0, granularity="output", target_sparsity=0.8), 0.945, 0.9321, 0.8,
               shrunk_params=420.0),
        _trial(_config("l0", 0, granularity="output", target_sparsity=0.5), 0.947, 0.9350, 0.5,
               shrunk_params=900.0),
    ]  # fmt: skip
    trials[1] = replace(trials[1], architecture="64-7-10")
    sweep = SweepInfo("a" * 32, "bench", "FINISHED", "1", 1000, 66000, trials)
    text = render_markdown(ReportData("http://mlflow:5000", [sweep]), {"": "fronts.png"})
    assert "| bench | `" + "a" * 32 + "` | FINISHED | 3/3 | 1 min 05 s | 6 s |" in text
    assert "Dense reference: test accuracy 94.12% ± 0.00" in text
    assert (
        "### L0 output + target" in text and "![Pareto fronts of all methods](fronts.png)" in text
    )
    row = next(line for line in text.splitlines() if line.startswith("| 80.00% |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:10] == ["80.00%", "93.21% ± 0.00", "94.50%", "200", "420", "2.000", "-", "-",
                          "64-7-10", "target_sparsity=0.8"]  # fmt: skip
    run_id = trials[1].run_id
    assert cells[11] == f"[{run_id}](http://mlflow:5000/#/experiments/1/runs/{run_id})"
    assert "No trial was timed against the dense model" in text


def test_the_report_shows_accuracy_against_measured_speedup_and_says_unstructured_is_not_faster():
    trials = [
        _trial(_config("none", 0), 0.95, 0.94, 0.0, speedup_vs_dense=1.0,
               latency_speedup_b1=1.0, latency_ms_b1=0.2, throughput=50000.0),
        _trial(_config("l0", 0, granularity="output", lam=0.1), 0.945, 0.93, 0.8,
               speedup_vs_dense=4.5, latency_speedup_b1=2.2, latency_ms_b1=0.09,
               throughput=225000.0, model_bytes=1234.0),
        _trial(_config("l0", 0, granularity="output", lam=1.0), 0.90, 0.89, 0.9,
               speedup_vs_dense=4.0, latency_speedup_b1=2.0),  # slower and worse: off the front
        _trial(_config("magnitude", 0, target_sparsity=0.9), 0.94, 0.93, 0.9,
               speedup_vs_dense=1.02, latency_speedup_b1=0.99),
    ]  # fmt: skip
    formats = ("unpruned", "shrunk", "shrunk", "dense tensors")
    trials = [replace(t, export_format=f) for t, f in zip(trials, formats, strict=True)]
    sweep = SweepInfo("b" * 32, "speed", "FINISHED", "1", 0, 1000, trials)
    text = render_markdown(ReportData(None, [sweep]), {"speed": "speed.png"})
    assert "## Measured speed" in text and "![test accuracy vs measured speedup](speed.png)" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()
            if line.startswith("| ") and "x |" in line}  # fmt: skip
    structured = [c.strip() for c in rows["L0 output"].strip("|").split("|")]
    assert structured[:4] == ["L0 output", "4.50x", "2.20x", "93.00% ± 0.00"]
    assert structured[5:9] == ["0.090", "225,000", "1,234", "structured: shrunk"]
    magnitude = rows[next(k for k in rows if k.startswith("magnitude"))]
    assert "1.02x" in magnitude and "unstructured: dense tensors, no speedup" in magnitude
    assert "| L0 output | 4.00x" not in text  # dominated on (speedup, val accuracy)
    assert "Best sparsity within 1 point of dense val accuracy: 80.00%" in text


def test_the_report_fronts_accuracy_against_the_exported_models_parameters_and_flops():
    trials = [
        _trial(_config("none", 0), 0.95, 0.94, 0.0, shrunk_params=2000.0, shrunk_flops=4e6),
        _trial(_config("l0", 0, granularity="output", lam=10.0), 0.945, 0.93, 0.8,
               shrunk_params=420.0, shrunk_flops=0.9e6),
        _trial(_config("l0", 0, granularity="output", lam=1.0), 0.947, 0.935, 0.5,
               shrunk_params=900.0, shrunk_flops=1.8e6),
        _trial(_config("l0", 0, granularity="output", lam=0.1), 0.94, 0.92, 0.3,
               shrunk_params=1500.0, shrunk_flops=3e6),  # bigger and worse: off the front
        _trial(_config("channel-norm", 0, target_sparsity=0.5, prune_begin=0.0, prune_end=0.0),
               0.93, 0.925, 0.5, shrunk_params=1000.0, shrunk_flops=2e6),
    ]  # fmt: skip
    sweep = SweepInfo("c" * 32, "cost", "FINISHED", "1", 0, 1000, trials)
    text = render_markdown(
        ReportData(None, [sweep]), {"params": "params.png", "flops": "flops.png"}
    )
    assert "## Accuracy against parameters and FLOPs" in text
    assert "![test accuracy vs parameters of the exported model](params.png)" in text
    assert "![test accuracy vs multiply-adds per example of the exported model](flops.png)" in text
    section = text.split("## Accuracy against parameters and FLOPs")[1].split("\n## ")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| L0 output | ") or line.startswith("| channel-norm")]  # fmt: skip
    assert [r[:4] for r in rows] == [
        ["L0 output", "420", "0.900", "93.00% ± 0.00"],
        ["L0 output", "900", "1.800", "93.50% ± 0.00"],
        ["channel-norm one-shot", "1,000", "2.000", "92.50% ± 0.00"],
    ]
    points = aggregate(trials)
    png = plot_cost(points, ["dense", "L0 output", "channel-norm one-shot"], "shrunk_flops", "t")
    assert png.startswith(b"\x89PNG")


def test_sweeps_without_the_exported_flops_front_on_the_expected_ones():
    trials = [
        _trial(_config("none", 0), 0.95, 0.94, 0.0, shrunk_params=2000.0),
        _trial(_config("l0", 0, granularity="output", lam=10.0), 0.945, 0.93, 0.8,
               shrunk_params=420.0, expected_flops=0.5e6),
    ]  # fmt: skip
    points = aggregate(trials)
    assert cost_metrics(points) == ["shrunk_params", "expected_flops"]
    sweep = SweepInfo("d" * 32, "old", "FINISHED", "1", 0, 1000, trials)
    text = render_markdown(ReportData(None, [sweep]), {"flops": "flops.png"})
    assert "(last epoch)](flops.png)" in text and "| expected MFLOPs |" in text
    assert "| L0 output | 420 | 0.500 |" in text
