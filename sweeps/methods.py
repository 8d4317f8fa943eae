"""The sparsity method a trial trains with: l0core's L0, L1, magnitude or channel-norm pruning
wrapper, or the dense model.

Each implements :class:`l0core.SparsityMethod` (``regularization``, the parameter groups,
``count_l0``, ``sparsity``, ``expected_flops``, typed ``summary`` rows, ``prune`` returning the
model and its report), so the trial's training loop has no branch per method.
"""

from __future__ import annotations

from torch import nn

from l0core import (
    ChannelNormPruner,
    Dense,
    L0Regularizer,
    L1Regularizer,
    MagnitudePruner,
    SparsityMethod,
)

from .spec import RegularizerSpec, granularity_units

__all__ = ["build_method", "channel_norm_granularity", "is_structured"]

_MASK_UPDATES = 50  # a gradual magnitude schedule updates its masks about this often


def is_structured(reg: RegularizerSpec) -> bool:
    """Whether the export can remove whole units (structured L0 gates, channel-norm pruning)."""
    if reg.kind == "channel-norm":
        return True
    units = granularity_units(reg.granularity)
    return reg.kind == "l0" and all(u in ("output", "input", "head") for u in units)


def channel_norm_granularity(granularity: str | list[str]) -> str | list[str]:
    """The units channel-norm pruning removes: heads, channels or both as asked (the spec's
    default ``weight`` granularity means nothing to it: channels)."""
    return "output" if granularity == "weight" else granularity


def _gate_init(choice: str, pretrained: bool) -> str:
    if choice == "auto":
        return "magnitude" if pretrained else "random"
    return choice


FINETUNE_DUAL_LR = 0.5
"""The controller's dual step when fine-tuning a dense model (``dual_lr: None``). Measured on
Fashion-MNIST (docs/benchmarks.md): from a dense model the gates start open and the task holds
them there, so l0core's default step (tuned from scratch) reaches 91.5% of a 0.98 target in 15
epochs, and 0.5 reaches 98.06%; from scratch 0.5 overshoots a 0.9 target to 0.99 for good."""


def _dual_lr(choice: float | None, pretrained: bool) -> dict[str, float]:
    if choice is not None:
        return {"dual_lr": choice}
    return {"dual_lr": FINETUNE_DUAL_LR} if pretrained else {}


def build_method(
    model: nn.Module,
    reg: RegularizerSpec,
    num_train: int,
    total_steps: int | None = None,
    pretrained: bool = False,
) -> SparsityMethod:
    """Wrap ``model`` as the trial's regularizer section says.

    Args:
        model: the registry's model.
        reg: the trial's regularizer section (no search domains left).
        num_train: training examples; as in the L0 paper, the penalty is
            ``lam / num_train * count``, so one lam suits datasets of any size.
        total_steps: optimizer steps before the fine-tuning epochs; magnitude and channel-norm
            pruning place their schedule (``prune_begin``, ``prune_end``) in them.
        pretrained: the model holds trained weights (``train.init_from``): ``gate_init: auto``
            then opens the gates of the largest weights most, and ``dual_lr: None`` takes
            :data:`FINETUNE_DUAL_LR`.

    Raises:
        ValueError: magnitude or channel-norm pruning without ``total_steps``.
    """
    lam = reg.lam / num_train
    if reg.kind == "l0":
        return L0Regularizer(
            model,
            lam,
            weight_decay=reg.l2,
            droprate_init=reg.droprate_init,
            temperature=reg.temperature,
            granularity=reg.granularity,
            include=reg.include,
            exclude=reg.exclude,
            per_sample=reg.per_sample,
            test_gate=reg.test_gate,
            target_sparsity=reg.target_sparsity,
            **_dual_lr(reg.dual_lr, pretrained),
            init=_gate_init(reg.gate_init, pretrained),
        )
    if reg.kind in ("magnitude", "channel-norm"):
        if total_steps is None:
            raise ValueError(f"{reg.kind} pruning needs total_steps to place its schedule")
        begin = round(reg.prune_begin * total_steps)
        end = max(begin, round(reg.prune_end * total_steps))
    if reg.kind == "channel-norm":
        return ChannelNormPruner(
            model, reg.target_sparsity, end, begin_step=begin,
            frequency=max(1, (end - begin) // _MASK_UPDATES),
            granularity=channel_norm_granularity(reg.granularity), include=reg.include,
            exclude=reg.exclude,
        )  # fmt: skip
    if reg.kind == "magnitude":
        return MagnitudePruner(
            model, reg.target_sparsity, end, begin_step=begin,
            frequency=max(1, (end - begin) // _MASK_UPDATES), scope=reg.prune_scope,
            include=reg.include, exclude=reg.exclude,
        )  # fmt: skip
    if reg.kind == "l1":
        return L1Regularizer(
            model, lam, include=reg.include, exclude=reg.exclude,
            threshold=reg.l1_threshold,
        )  # fmt: skip
    return Dense(model)
