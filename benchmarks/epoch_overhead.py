"""Cost per epoch of a ResNet-20 trial with L0 output gates against a plain training loop of the
same model, as ratios from one run.

Fashion-MNIST at 32x32 (a training subset), batch 128, Adam, one torch thread (a trial with
``cpus_per_trial: 1``). Three ways to train the same model for the same epochs, interleaved
round by round so that machine noise hits them alike (medians of the rounds):

- ``plain loop``: what a user writes by hand: the batches in a random order, forward,
  cross-entropy, backward, Adam step; the validation split evaluated after every epoch and the
  test split at the end;
- ``trial, dense``: the trial's own training function (:func:`sweeps.training.train`, which the
  Ray trial calls) with ``kind: none``: the loop's own costs (per-epoch metrics, the export and the
  final test);
- ``trial, L0 output``: the same function with coupled output gates (the penalty, the gates'
  optimizer group, the per-epoch sparsity figures and the shrinking export). Its lambda is small
  enough that no channel closes in the run, so all three test a model of the same size: with a
  lambda that closes channels (10 did, in the first epoch), the L0 trial's final test ran on a
  shrunk model and the epoch looked 0.56x as long as the plain one.

The data are loaded once before the rounds (the trial caches them), so the times are training,
evaluation and export only.

    .venv/bin/python benchmarks/epoch_overhead.py [--rounds 3] [--epochs 2] [--limit 4000]
                                                  [--width 1.0]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sweeps.spec import SweepSpec, TrialConfig
from sweeps.training import build_model, seed_everything, train


def _config(kind: str, epochs: int, limit: int, width: float) -> dict:
    regularizer = {"kind": "none"} if kind == "none" else {
        "kind": "l0", "granularity": "output", "lam": 1e-4, "droprate_init": 0.2
    }  # fmt: skip
    spec = SweepSpec.model_validate(
        {
            "name": "epoch-overhead",
            "model": {"name": "resnet", "params": {"layout": "cifar", "depth": 20, "width": width}},
            "dataset": {
                "name": "fashion-mnist",
                "params": {"size": 32, "channels": 1, "limit": limit},
            },
            "regularizer": regularizer,
            "train": {"epochs": epochs, "batch_size": 128, "lr": 1e-3},
        }
    ).model_dump(mode="json")
    return TrialConfig.of(
        {**{k: spec[k] for k in ("model", "dataset", "regularizer", "train")}, "seed": 0}
    )


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(
        int((model(x[i : i + 2048]).argmax(1) == y[i : i + 2048]).sum())
        for i in range(0, len(x), 2048)
    )
    return correct / len(x)


def plain_loop(cfg: TrialConfig) -> float:
    """A hand-written loop over the same model and data; returns the test accuracy."""
    data = cfg.dataset.load()
    seed_everything(cfg.seed)
    model = build_model(cfg.model, data)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    x, y = data.train
    batch = cfg.train.batch_size
    for _ in range(cfg.train.epochs):
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _accuracy(model, *data.val)
    return _accuracy(model, *data.test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--limit", type=int, default=4000, help="training images used")
    parser.add_argument("--width", type=float, default=1.0, help="ResNet-20 width multiplier")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = {
        "plain loop": lambda: plain_loop(_config("none", args.epochs, args.limit, args.width)),
        "trial, dense": lambda: train(_config("none", args.epochs, args.limit, args.width)).metrics[
            "test_accuracy"
        ],
        "trial, L0 output": lambda: train(
            _config("l0", args.epochs, args.limit, args.width)
        ).metrics["test_accuracy"],
    }
    plain_loop(_config("none", 1, args.limit, args.width))  # loads and caches the data, warms up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t0) / args.epochs)
    base = statistics.median(times["plain loop"])
    print(
        f"ResNet-20 width {args.width}, Fashion-MNIST 32x32, {args.limit} training images, "
        f"batch 128, {args.epochs} epochs per run, {args.rounds} rounds, "
        f"{args.threads} thread(s), torch {torch.__version__}\n"
    )
    print("| training | s per epoch (median) | per round | ratio to plain |")
    print("|---|---:|---|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        rounds = " ".join(f"{t:.2f}" for t in ts)
        print(f"| {name} | {med:.2f} | {rounds} | {med / base:.3f}x |")
    ratios = [t / p for t, p in zip(times["trial, L0 output"], times["plain loop"], strict=True)]
    print(
        f"\nL0 trial / plain loop per round: {', '.join(f'{r:.3f}' for r in ratios)} "
        "(target <= 1.10)"
    )


if __name__ == "__main__":
    main()
