"""The L0 library on its own: an MLP 784-300-100 with L0 gates on Fashion-MNIST, on the CPU.

``make demo`` (or ``python -m sweeps.demo``) trains for a few epochs and prints, per epoch, the
validation accuracy, the expected L0 count, the eval sparsity and the architecture that
``prune(shrink=True)`` leaves (e.g. ``784-300-100-10 -> 412-97-41-10``). It is the smallest
complete use of ``l0core``: wrap, add ``regularization()`` to the loss, give the gate logits their
own learning rate, export. Sweeps do the same through :mod:`sweeps.training`.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from l0core import L0Regularizer
from l0core.cpu import tune_allocator

from .data import load_dataset
from .models import MlpParams, mlp
from .training import architecture


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeps.demo", description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lam", type=float, default=0.3, help="penalty per gate x N_train")
    parser.add_argument("--granularity", default="output", choices=("weight", "output", "input"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    tune_allocator()
    torch.manual_seed(args.seed)
    data = load_dataset("fashion-mnist", {}, 0.1, 0.2, 0)
    (x, y), (xv, yv), (xt, yt) = data.train, data.val, data.test
    model = mlp(MlpParams(hidden=[300, 100]), data.input_shape, data.num_classes)
    dense = architecture(model)
    # As in the paper, the penalty per retained parameter is lam / N_train.
    reg = L0Regularizer(model, args.lam / len(x), granularity=args.granularity, droprate_init=0.2)
    opt = torch.optim.Adam(
        [
            {"params": list(reg.weight_parameters()), "lr": 1e-3},
            {"params": list(reg.gate_parameters()), "lr": 1e-2},
        ]
    )
    print(f"Fashion-MNIST {len(x)}/{len(xv)}/{len(xt)}, MLP {dense}, {args.granularity} gates")
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        reg.train()
        for idx in torch.randperm(len(x)).split(128):
            loss = F.cross_entropy(reg(x[idx]), y[idx]) + reg.regularization()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        reg.eval()
        shrunk = reg.prune(shrink=True).model
        print(
            f"epoch {epoch}: val acc {_accuracy(reg, xv, yv):.4f}  "
            f"expected L0 {float(reg.count_l0().detach()):,.0f}/{reg.n_gated:,}  "
            f"sparsity {reg.sparsity():.3f}  {dense} -> {architecture(shrunk)}  "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    params = sum(p.numel() for p in shrunk.parameters())
    dense_params = sum(p.numel() for p in model.parameters())
    print(
        f"test accuracy of the shrunk model: {_accuracy(shrunk, xt, yt):.4f} with "
        f"{params:,} of {dense_params:,} parameters ({params / dense_params:.1%})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
