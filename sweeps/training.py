"""One trial's training, free of Ray and MLflow: build, train, evaluate, export.

The Tune trainable (:mod:`sweeps.trainable`) and the overhead benchmark's plain loop call the
same :func:`train`; everything a trial reports comes from here. Seeded and reproducible on CPU:
the batch order of epoch ``e`` comes from a generator seeded with ``(seed, e)`` and the global
RNG state travels in the checkpoint, so a resumed trial continues the same sequence. Augmentation
(``dataset.augment``, :mod:`sweeps.augment`) transforms each training batch on the device with its
own generator, seeded with ``(seed, e)`` too; evaluation batches are never augmented.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from l0core import FixedMask, SparsityMethod, SummaryRow
from l0core.flops import model_macs

from .augment import augmenter
from .config import DataDirs
from .data import DataSplits
from .methods import build_method, is_structured
from .registry import MODELS
from .spec import RegularizerSpec, TrainSpec, TrialConfig

__all__ = [
    "TrainResult",
    "TrialDiverged",
    "architecture",
    "build_model",
    "seed_everything",
    "train",
]


class TrialDiverged(RuntimeError):
    """The training loss became NaN or infinite; retrying from a checkpoint would diverge again."""


@dataclass
class TrainResult:
    """What a finished trial leaves: last metrics, exported model, layer table (the method's
    ``summary()``), final state."""

    metrics: dict[str, float]
    pruned: nn.Module
    shrunk: nn.Module | None
    architecture: str
    layers: list[SummaryRow] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(model: Any, data: DataSplits) -> nn.Module:
    """The registry's model for a spec's (or trial's) ``model`` section, sized for ``data``."""
    return MODELS.get(model.name).factory(model.params, data.input_shape, data.num_classes)


def architecture(model: nn.Module) -> str:
    """Layer widths of a chain, e.g. ``784-300-100-10`` or ``1-conv20-conv50-800-500-10``."""
    widths: list[str] = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            widths += [] if widths else [str(m.in_features)]
            widths.append(str(m.out_features))
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            widths += [] if widths else [str(m.in_channels)]
            widths.append(f"conv{m.out_channels}")
    return "-".join(widths)


_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_DATA_SHARE = 0.25  # the data may take this share of the device's free memory


def data_fits_on_device(nbytes: int, device: torch.device, free_bytes: int | None) -> bool:
    """Whether a trial moves its whole dataset (``nbytes``) to ``device`` once, so batches are
    slices on the device instead of copies from host memory: on an accelerator, when the data
    take at most a quarter of its free memory (``free_bytes``); never on the CPU (already there).
    """
    return device.type != "cpu" and free_bytes is not None and nbytes <= _DATA_SHARE * free_bytes


def _free_bytes(device: torch.device) -> int | None:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward's autocast for ``train.precision`` (the penalty is computed outside it).

    Raises:
        ValueError: fp16 off CUDA (its gradient scaler is CUDA's).
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"train.precision 'fp16' needs CUDA (its gradient scaler), and this trial runs on "
            f"device {device.type}; use 'bf16' or 'fp32'"
        )
    return torch.autocast(device.type, dtype=_AUTOCAST[precision])


def _optimizer(
    method: SparsityMethod, train: TrainSpec, finetuning: bool = False
) -> torch.optim.Optimizer:
    lr = (train.finetune_lr or train.lr) if finetuning else train.lr
    groups = [{"params": list(method.weight_parameters()), "weight_decay": train.weight_decay}]
    gates = list(method.gate_parameters())
    if gates:  # gate logits get their own lr and no weight decay
        groups.append({"params": gates, "lr": train.gate_lr or lr, "weight_decay": 0})
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=train.momentum)
    return torch.optim.Adam(groups, lr=lr)


def _fixed_zeros(method: SparsityMethod, reg: RegularizerSpec) -> FixedMask:
    """The fine-tuning phase's model: the method's pruned copy, its zeros kept at zero (and a
    structured method's coupled groups, so the export shrinks any graph the method gated)."""
    return FixedMask.after(method, include=reg.include, exclude=reg.exclude)


@torch.no_grad()
def _evaluate(
    model: nn.Module | SparsityMethod, x: torch.Tensor, y: torch.Tensor, device: torch.device
) -> tuple[float, float]:
    """(mean loss, accuracy) in eval mode, batched so large splits fit in memory."""
    model.eval()
    loss, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    for i in range(0, len(x), 2048):
        xb, yb = x[i : i + 2048].to(device), y[i : i + 2048].to(device)
        out = model(xb)
        loss += F.cross_entropy(out, yb, reduction="sum")
        correct += (out.argmax(1) == yb).sum()
    return float(loss) / len(x), float(correct) / len(x)


def _nonzero(model: nn.Module) -> int:
    return int(sum(int(torch.count_nonzero(p)) for p in model.parameters()))


def train(
    cfg: TrialConfig,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[dict[str, float], Callable[[], dict[str, Any]]], None] | None = None,
    state: dict[str, Any] | None = None,
    init_weights: dict[str, torch.Tensor] | None = None,
    dirs: DataDirs | None = None,
) -> TrainResult:
    """Train one trial.

    Args:
        cfg: the trial's config (:class:`sweeps.spec.TrialConfig`).
        device: where to train.
        on_epoch: called after every epoch but the last with the epoch's metrics and a function
            that returns the checkpoint state; the last epoch's metrics (with the test metrics)
            and state come back in the result, so the caller can record the model before it
            reports (a scheduler may stop the trial at its last report).
        state: a checkpoint state from an earlier run of this trial, to resume from.
        init_weights: a dense state dict to start from (gates then start from droprate_init).
        dirs: where the dataset's files are; default: the settings read now.

    The last ``train.finetune_epochs`` epochs train the method's pruned model with its zeros
    fixed (:class:`l0core.FixedMask`, a fresh optimizer at ``finetune_lr``): gates frozen at
    their eval values, thresholds and masks applied, no penalty.

    Raises:
        TrialDiverged: the loss became NaN or infinite.
    """
    device = torch.device(device)
    seed_everything(cfg.seed)
    data = cfg.dataset.load(dirs)
    model = build_model(cfg.model, data)
    if init_weights is not None:
        try:
            model.load_state_dict(init_weights)
        except RuntimeError as err:
            raise ValueError(f"train.init_from: the weights do not fit this model: {err}") from err
    x_train, y_train = data.train
    precision = cfg.train.precision
    _autocast(precision, device)  # refuses fp16 off CUDA before any work
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if data_fits_on_device(x_train.nbytes + y_train.nbytes, device, _free_bytes(device)):
        x_train, y_train = x_train.to(device), y_train.to(device)
    augment = augmenter(cfg.dataset.augment, data.input_shape, cfg.dataset.name)  # train batches
    batch, epochs = cfg.train.batch_size, cfg.train.epochs
    sparse_epochs = epochs - cfg.train.finetune_epochs  # then the fine-tuning phase
    steps = math.ceil(len(x_train) / batch) * sparse_epochs
    method = build_method(
        model, cfg.regularizer, len(x_train), steps, pretrained=init_weights is not None
    ).to(device)
    # A checkpoint of epoch ``sparse_epochs`` still holds the sparse method: the fine-tuning
    # model is made at the start of the next epoch.
    finetuning = state is not None and state["epoch"] > sparse_epochs
    if finetuning:
        method = _fixed_zeros(method, cfg.regularizer).to(device)
    opt = _optimizer(method, cfg.train, finetuning)
    start = 0
    if state is not None:
        method.load_state_dict(state["method"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start = state["epoch"]
    total_params = sum(p.numel() for p in model.parameters())
    metrics: dict[str, float] = {}
    for epoch in range(start + 1, epochs + 1):
        if epoch > sparse_epochs and not finetuning:
            method = _fixed_zeros(method, cfg.regularizer).to(device)
            opt, finetuning = _optimizer(method, cfg.train, finetuning=True), True
        t0 = time.perf_counter()
        method.train()
        order = torch.randperm(
            len(x_train), generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        ).to(x_train.device)
        loss_sum = torch.zeros((), device=device)
        # Augmentation's own stream, seeded per epoch like the batch order.
        aug_rng = torch.Generator(device).manual_seed(cfg.seed * 100003 + epoch + 2**40)
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            xb, yb = (
                x_train[idx].to(device, non_blocking=True),
                y_train[idx].to(device, non_blocking=True),
            )
            xb = augment(xb, aug_rng)
            with _autocast(precision, device):
                task = F.cross_entropy(method(xb), yb)
            loss = task.float() + method.regularization()
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            loss_sum += task.detach() * len(idx)
        train_loss = float(loss_sum) / len(order)  # one host sync per epoch
        if not math.isfinite(train_loss):
            raise TrialDiverged(f"training loss became {train_loss} in epoch {epoch}")
        seconds = time.perf_counter() - t0
        val_loss, val_acc = _evaluate(method, *data.val, device)
        with torch.no_grad():
            metrics = _epoch_metrics(method, epoch, total_params)
        metrics.update(
            train_loss=train_loss, val_loss=val_loss, val_accuracy=val_acc, epoch_seconds=seconds
        )
        if epoch == epochs:
            break  # the caller reports the last epoch with the test metrics
        if on_epoch is not None:
            on_epoch(metrics, lambda m=method, o=opt, e=epoch: _state(m, o, e))
    pruned = method.prune().model
    shrunk = method.prune(shrink=True).model if is_structured(cfg.regularizer) else None
    final_model = shrunk if shrunk is not None else pruned
    metrics["test_accuracy"] = _evaluate(final_model, *data.test, device)[1]
    metrics["shrunk_params"] = sum(p.numel() for p in final_model.parameters())
    metrics["shrunk_flops"] = model_macs(final_model, data.test[0][:1].to(device))
    return TrainResult(
        metrics,
        pruned.cpu(),
        shrunk.cpu() if shrunk is not None else None,
        architecture(final_model),
        method.summary(),
        _state(method, opt, epochs),
    )


def _state(method: SparsityMethod, opt: torch.optim.Optimizer, epoch: int) -> dict[str, Any]:
    """A snapshot (copied: state dicts alias the live tensors) to resume from."""
    return copy.deepcopy(
        {"method": method.state_dict(), "optimizer": opt.state_dict(),
         "rng": torch.get_rng_state(), "epoch": epoch}
    )  # fmt: skip


def _epoch_metrics(method: SparsityMethod, epoch: int, total_params: int) -> dict[str, float]:
    """The method's sparsity figures, in the order of ``EPOCH_METRICS``."""
    return {
        "epoch": epoch,
        "penalty": float(method.regularization()),
        "expected_l0": float(method.count_l0()),
        "expected_density": float(method.expected_density()),
        "sparsity": float(method.sparsity()),
        "expected_flops": float(method.expected_flops()),
        "nonzero_params": _nonzero(method.prune().model),
        "total_params": total_params,
    }
