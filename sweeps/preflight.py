"""Fail fast: before any trial trains, build the spec's model once and ask l0core whether its
export can shrink it at the spec's granularity.

A structured sweep (``l0`` with ``output``/``input``/``head`` gates, ``channel-norm``) exports by
removing units; a model whose graph l0core cannot shrink would otherwise train for its whole
budget and fail in ``prune(shrink=True)``. :func:`preflight` answers in seconds with the reason
l0core gives (``L0Regularizer.check_export``: the parameter, the node and the op), which the
driver writes as the sweep's status message.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

from torch import nn

from l0core import L0Regularizer
from l0core.channel_norm import ChannelNormPruner

from .augment import augmenter
from .config import DataDirs
from .domains import _possible
from .methods import channel_norm_granularity
from .spec import SweepSpec, granularity_label, granularity_units
from .training import build_model

__all__ = ["export_granularities", "preflight"]

_STRUCTURED_L0 = ("output", "input", "head")
_SHOWN = 5  # blocker lines quoted in the status message


def export_granularities(spec: SweepSpec, kind: str | None = None) -> list[str | list[str]]:
    """The granularities at which some trial of ``spec`` (of ``kind``, or any) will shrink its
    model on export, each once (``"output"``, ``["head", "output"]``)."""
    reg = spec.regularizer
    kinds = [k for k in _possible(reg.kind) or [] if kind in (None, k)]
    granularities = _possible(reg.granularity) or []
    out: list[str | list[str]] = []
    if "l0" in kinds:
        out += [g for g in granularities if set(granularity_units(g)) <= set(_STRUCTURED_L0)]
    if "channel-norm" in kinds:
        out += [channel_norm_granularity(g) for g in granularities]
    unique = {granularity_label(g): g for g in out}
    return list(unique.values())


def preflight(spec: SweepSpec, dirs: DataDirs | None = None) -> str | None:
    """Why ``spec``'s trials cannot train and export, or None when they can (the dataset read
    from ``dirs``, default: the settings read now).

    Loads the dataset and builds the model for its input shape (a missing dataset, a model
    that rejects its inputs, a ViT patch that does not divide the image fail here) and, for each
    granularity some trial exports at, wraps it as the trial would and runs ``check_export()``.
    """
    ds = spec.dataset
    try:  # every trial would fail the same way: the sweep fails once, with the reason
        data = ds.load(dirs)
    except Exception as err:
        return f"dataset {ds.name!r} cannot be loaded: {type(err).__name__}: {err}"
    try:
        augmenter(ds.augment, data.input_shape, ds.name)
    except ValueError as err:
        return str(err)
    try:
        model = build_model(spec.model, data)
    except Exception as err:  # a lab's factory may raise anything
        return (
            f"model {spec.model.name!r} cannot be built for inputs {data.input_shape}: "
            f"{type(err).__name__}: {err}"
        )
    reg = spec.regularizer
    granularities = export_granularities(spec)
    for granularity in export_granularities(spec, "channel-norm"):
        try:  # its own plan on a copy (the pruner masks the model it is given)
            ChannelNormPruner(copy.deepcopy(model), 0.5, 1, granularity=granularity,
                              include=reg.include, exclude=reg.exclude)  # fmt: skip
        except Exception as err:
            return f"kind 'channel-norm' cannot prune model {spec.model.name!r}: {type(err).__name__}: {err}"
    for granularity in granularities:
        blockers = _blockers(model, granularity, reg.include, reg.exclude)
        if blockers:
            more = len(blockers) - _SHOWN
            return (
                f"model {spec.model.name!r} cannot be shrunk at granularity "
                f"{granularity_label(granularity)!r} "
                f"(checked before training): {'; '.join(blockers[:_SHOWN])}"
                + (f"; and {more} more" if more > 0 else "")
            )
    return None


def _blockers(
    model: nn.Module, granularity: str | list[str], include: Any, exclude: Any
) -> list[str]:
    """``check_export()`` of the L0 wrapper the trial would build (channel-norm pruning removes
    the same groups through the same export), or the reason it cannot be built."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reg = L0Regularizer(model, 0.0, granularity=granularity, include=include,
                                exclude=exclude)  # fmt: skip
        lines = reg.check_export()
    except (ValueError, TypeError, RuntimeError) as err:
        return [f"{type(err).__name__}: {err}"]
    if lines:
        lines = [*(str(w.message) for w in caught), *lines]
    return lines
