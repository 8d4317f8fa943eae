"""Is the pruned model really faster? Train, export, and time against the dense model, side by side.

Two benchmarks of the issue "measured speed in the trade-off", both on CPU, timed with
``sweeps.latency.compare`` (interleaved rounds, medians, one process, so every speedup is a ratio
taken in one run) and with ONNX Runtime (``sweeps.onnx_export``):

* ``mlp``: Fashion-MNIST, the L0 paper's MLP 784-300-100. A dense model (10 epochs), then
  structured L0 (one gate per unit, driven to ``--mlp-target`` sparsity, fine-tuned from the
  dense model as ``benchmarks/specs/fashion-mlp/l0-output.yaml`` does) and, for comparison,
  unstructured gradual magnitude pruning to 90% (its zeros stay inside full-size tensors).
  Goals: structured L0 at >= 87.5% test accuracy with batch-256 throughput >= 4x the dense
  model's and batch-1 latency >= 2x better.
* ``resnet``: ResNet-20 (``sweeps.zoo.cifar_resnet``) on Fashion-MNIST padded to 32x32 (on a
  training subset of ``--resnet-train`` images, to fit the 2-core machine), dense, then
  structured L0 over channels fine-tuned from it (coupled groups, one gate per channel set,
  shared by the batch: per-example gates do not export through a residual graph). Goal: <= 1
  point below dense with >= 1.8x.

``python benchmarks/latency.py [mlp] [resnet] [--threads 1]`` prints a Markdown table per
benchmark. Speedups are measured with other work running on the machine; only ratios are
meaningful.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, PositiveInt

from sweeps.data import RawData, fashion_mnist, load_dataset
from sweeps.latency import compare, model_bytes, speedups
from sweeps.model_log import exported_model
from sweeps.onnx_export import export_onnx
from sweeps.registry import register_dataset, register_model
from sweeps.sparse_export import CsrLinear, to_csr
from sweeps.spec import RegularizerSpec, TrainSpec
from sweeps.training import TrainResult, build_model, train
from sweeps.zoo import cifar_resnet


class _Padded(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limit: PositiveInt | None = None


@register_dataset("bench-fashion-mnist-32", params=_Padded)
def _fashion_32(params: _Padded) -> RawData:
    """Fashion-MNIST zero-padded to 32x32 (CIFAR's size), first ``limit`` training images."""
    from sweeps.data import IdxParams

    raw = fashion_mnist(IdxParams(limit=params.limit))
    pad = ((0, 0), (0, 0), (2, 2), (2, 2))
    return RawData(np.pad(raw.x, pad), raw.y, np.pad(raw.x_test, pad), raw.y_test, raw.info)


class _Width(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: float = 1.0


@register_model("bench-resnet20", params=_Width)
def _resnet20(params: _Width, input_shape: tuple[int, ...], num_classes: int) -> Any:
    """CIFAR ResNet-20 (He et al., 2016); ``width`` scales every stage's channels."""
    return cifar_resnet(20, input_shape, num_classes, params.width)


def _cfg(model: dict, dataset: dict, regularizer: dict, train_: dict) -> dict[str, Any]:
    """A concrete trial config; the sections are validated by the spec's own models (the model
    and dataset registered here are not in the spec's union, built when sweeps.spec loads)."""
    return {
        "model": {"params": {}, **model},
        "dataset": {"params": {}, "val_fraction": 0.1, "test_fraction": 0.2, "split_seed": 0,
                    **dataset},
        "regularizer": RegularizerSpec.model_validate(regularizer).model_dump(mode="json"),
        "train": TrainSpec.model_validate(train_).model_dump(mode="json"),
        "seed": 0,
    }  # fmt: skip


def _train(name: str, cfg: dict[str, Any], init: TrainResult | None = None) -> TrainResult:
    t0 = time.perf_counter()
    weights = init.pruned.state_dict() if init is not None else None
    result = train(cfg, "cpu", init_weights=weights)
    acc = result.metrics["test_accuracy"]
    print(f"  trained {name}: test accuracy {100 * acc:.2f}% ({time.perf_counter() - t0:.0f} s)",
          flush=True)  # fmt: skip
    return result


def _params(model: torch.nn.Module) -> int:
    """Parameters, a CSR layer's stored weights (nonzeros) and bias included."""
    csr = [b for m in model.modules() if isinstance(m, CsrLinear) for b in m.buffers()]
    stored = sum(b._nnz() if b.layout == torch.sparse_csr else b.numel() for b in csr)
    return stored + sum(p.numel() for p in model.parameters())


def _table(
    title: str,
    results: dict[str, tuple[TrainResult, dict[str, Any]]],
    example: torch.Tensor,
    threads: int,
    rounds: int,
    floor: torch.nn.Module | None = None,
) -> str:
    """The models' table; ``floor``, the same layers one unit wide, is timed with them to show
    the fixed per-call cost that no pruning removes."""
    models = {n: exported_model(r, c) for n, (r, c) in results.items()}
    for n, (r, c) in list(results.items()):
        model, kind = models[n]
        if kind == "dense tensors":  # the same weights, stored sparse: is that faster?
            models[f"{n} (CSR)"] = (to_csr(model)[0], "csr")
            results[f"{n} (CSR)"] = (r, c)
    t0 = time.perf_counter()
    timed = {n: m for n, (m, _) in models.items()}
    if floor is not None:
        timed["floor"] = floor
    speeds = compare(timed, example, "cpu", threads, rounds)
    ratios = speedups(speeds, "dense")
    onnx = {}
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        for n, (m, _) in models.items():
            onnx[n] = export_onnx(m, example, Path(tmp) / f"{n}.onnx", threads, rounds=rounds)
    seconds = time.perf_counter() - t0
    ort_dense = onnx["dense"]
    lines = [
        f"### {title}",
        "",
        f"CPU, {threads} thread(s), batch-1 latency and batch-256 throughput, medians of "
        f"{rounds} interleaved rounds ({seconds:.0f} s for the timings).",
        "",
        "| model | export | architecture | params | bytes | test acc | latency b1 (ms) | "
        "throughput b256 (ex/s) | speedup b256 | speedup b1 | ONNX Runtime speedup b256 / b1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, (r, _) in results.items():
        m, kind = models[n]
        s, q, o = speeds[n], ratios[n], onnx[n]
        ort = (
            "-"
            if o.throughput is None or ort_dense.throughput is None
            else f"{o.throughput / ort_dense.throughput:.2f}x / "
            f"{ort_dense.latency_ms_b1 / o.latency_ms_b1:.2f}x"
        )
        lines.append(
            f"| {n} | {kind} | {r.architecture} | {_params(m):,} | "
            f"{model_bytes(m):,} | {100 * r.metrics['test_accuracy']:.2f}% | "
            f"{s.latency_ms_b1:.3f} | {s.throughput:,.0f} | {q['speedup_vs_dense']:.2f}x | "
            f"{q['latency_speedup_b1']:.2f}x | {ort} |"
        )
    if floor is not None:
        f, d = speeds["floor"], speeds["dense"]
        lines += ["", f"Floor: the same layers one unit wide take {f.latency_ms_b1:.3f} ms at "
                  f"batch 1 (throughput {f.throughput:,.0f} ex/s): no pruning of this model can "
                  f"be faster than {d.latency_ms_b1 / f.latency_ms_b1:.2f}x at batch 1 in eager "
                  "PyTorch."]  # fmt: skip
    return "\n".join(lines)


def mlp(threads: int, rounds: int, target: float) -> str:
    model = {"name": "mlp", "params": {"hidden": [300, 100]}}
    data = {"name": "fashion-mnist", "val_fraction": 0.1, "split_seed": 0}
    base = {"batch_size": 128, "lr": 0.001}
    dense_cfg = _cfg(model, data, {"kind": "none"}, {**base, "epochs": 10})
    dense = _train("dense", dense_cfg)
    l0_cfg = _cfg(
        model,
        data,
        {"kind": "l0", "granularity": "output", "per_sample": True, "lam": 0.0,
         "target_sparsity": target, "gate_init": "magnitude", "droprate_init": 0.2},
        {**base, "epochs": 18, "finetune_epochs": 3, "gate_lr": 0.1},
    )  # fmt: skip
    l0 = _train(f"L0 output, target {target}", l0_cfg, dense)
    mag_cfg = _cfg(
        model,
        data,
        {"kind": "magnitude", "target_sparsity": 0.9, "prune_scope": "global"},
        {**base, "epochs": 8, "finetune_epochs": 2},
    )
    magnitude = _train("magnitude 0.9", mag_cfg, dense)
    example = load_dataset("fashion-mnist", {}, 0.1, 0.2, 0).val[0][:64]
    results = {"dense": (dense, dense_cfg), f"L0 output {target}": (l0, l0_cfg),
               "magnitude 0.9": (magnitude, mag_cfg)}  # fmt: skip
    floor = build_model(_cfg({**model, "params": {"hidden": [1, 1]}}, data, {}, {}),
                        load_dataset("fashion-mnist", {}, 0.1, 0.2, 0))  # fmt: skip
    return _table("Fashion-MNIST MLP 784-300-100", results, example, threads, rounds, floor)


def resnet(threads: int, rounds: int, n_train: int, target: float, epochs: int, lr: float) -> str:
    model = {"name": "bench-resnet20", "params": {}}
    data = {"name": "bench-fashion-mnist-32", "params": {"limit": n_train}, "val_fraction": 0.1}
    base = {"batch_size": 128, "lr": lr}
    dense_cfg = _cfg(model, data, {"kind": "none"}, {**base, "epochs": epochs})
    dense = _train("ResNet-20 dense", dense_cfg)
    l0_cfg = _cfg(
        model,
        data,
        {"kind": "l0", "granularity": "output", "lam": 0.0,
         "target_sparsity": target, "gate_init": "magnitude", "droprate_init": 0.2},
        # No fixed-zeros fine-tuning phase: FixedMask's export shrinks chains only.
        {**base, "epochs": epochs, "gate_lr": 0.1},
    )  # fmt: skip
    l0 = _train(f"ResNet-20 L0 output, target {target}", l0_cfg, dense)
    example = load_dataset("bench-fashion-mnist-32", {"limit": n_train}, 0.1, 0.2, 0).val[0][:64]
    results = {"dense": (dense, dense_cfg), f"L0 output {target}": (l0, l0_cfg)}
    title = f"ResNet-20, Fashion-MNIST 32x32 ({n_train} training images, {epochs} epochs each)"
    floor = build_model(
        _cfg({**model, "params": {"width": 1 / 16}}, data, {}, {}),
        load_dataset("bench-fashion-mnist-32", {"limit": n_train}, 0.1, 0.2, 0),
    )
    return _table(title, results, example, threads, rounds, floor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="*", default=["mlp", "resnet"], choices=["mlp", "resnet"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--mlp-target", type=float, default=0.85)
    parser.add_argument("--resnet-train", type=int, default=8000)
    parser.add_argument("--resnet-target", type=float, default=0.5)
    parser.add_argument("--resnet-epochs", type=int, default=4)
    parser.add_argument("--resnet-lr", type=float, default=0.001)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if "mlp" in args.which:
        print(mlp(args.threads, args.rounds, args.mlp_target), flush=True)
    if "resnet" in args.which:
        print(resnet(args.threads, args.rounds, args.resnet_train, args.resnet_target,
                     args.resnet_epochs, args.resnet_lr), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
