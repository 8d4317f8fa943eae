"""The sparsity-method protocol: what every method answers, so that a training loop, a sweep or
a report never asks which method it holds.

``SparsityMethod`` is the interface: run the wrapped model (``method(*args)``), the penalty to
add to the loss (``regularization``), the parameters for the optimizer (``weight_parameters``,
and ``gate_parameters`` with their own learning rate), how sparse it is (``count_l0``,
``expected_density``, ``sparsity``), one typed row per parameter (``summary`` ->
:class:`SummaryRow`), multiply-adds (``expected_flops``, ``export_cost``) and the export
(``prune`` -> :class:`Pruned`, the plain model and what shrinking removed). Every method is an
``nn.Module`` (``to``, ``train``, ``state_dict`` ... come from torch). ``group_plan`` and
``example_rows`` are what a fine-tuning phase after the method needs to export through the same
coupled groups (:meth:`l0core.magnitude.FixedMask.after`).

Implementations: ``L0Regularizer`` (hard-concrete gates), ``L1Regularizer`` and ``Dense``
(:mod:`l0core.baselines`), ``MagnitudePruner`` and ``FixedMask`` (:mod:`l0core.magnitude`),
``ChannelNormPruner`` (:mod:`l0core.channel_norm`). They share :class:`MethodBase`: one
``expected_flops`` over one description of the layers (``kept_weights``: per Linear/ConvNd
layer, its expected non-zero weights; :func:`l0core.flops.kept_macs` counts them), and
:class:`CountedMethod` for the methods without gate logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .cost import export_cost
from .flops import kept_macs, record_shapes

if TYPE_CHECKING:
    from .export import ShrinkReport
    from .graph_export import GraphShrinkReport
    from .groups import GroupPlan

__all__ = [
    "CountedMethod",
    "MethodBase",
    "Pruned",
    "SparsityMethod",
    "SummaryRow",
    "elementwise_rows",
]


@dataclass(frozen=True)
class SummaryRow:
    """One parameter of the wrapped model in a method's ``summary()``: the same fields for every
    method.

    Attributes:
        name: the parameter's name in the plain model (the one ``prune()`` returns).
        shape: its shape.
        numel: its number of elements.
        gated: whether the method acts on it (and counts it in ``sparsity()``).
        granularity: what one gate or mask entry covers: ``"weight"``, ``"output"``,
            ``"input"`` or ``"head"``; None when not gated.
        applied: how the method acts on it: ``"weight"``, ``"activation:<module>"``,
            ``"group:<group>"`` (L0, channel-norm), ``"threshold"`` (L1), ``"mask"`` (magnitude
            pruning, fixed masks); None when not gated.
        n_gates: the gates (or mask entries) on it; 0 when it has none of its own.
        expected_density: the expected fraction of it kept (the kept fraction where nothing is
            random).
        eval_density: the fraction of it kept in eval (what ``prune()`` keeps).
    """

    name: str
    shape: tuple[int, ...]
    numel: int
    gated: bool
    granularity: str | None
    applied: str | None
    n_gates: int
    expected_density: float
    eval_density: float

    @classmethod
    def gated_row(
        cls,
        name: str,
        param: Tensor,
        *,
        granularity: str,
        applied: str,
        n_gates: int,
        expected_density: float,
        eval_density: float | None = None,
    ) -> SummaryRow:
        """The row of a parameter the method acts on (``eval_density``: the expected one when
        nothing is random)."""
        if eval_density is None:
            eval_density = expected_density
        shape, numel = tuple(param.shape), param.numel()
        args = (granularity, applied, n_gates, expected_density, eval_density)
        return cls(name, shape, numel, True, *args)

    @classmethod
    def ungated_row(cls, name: str, param: Tensor, density: float = 1.0) -> SummaryRow:
        """The row of a parameter the method does not act on (``density``: the fraction of it
        kept, 1 unless it was pruned before, as under a fixed mask)."""
        return cls(name, tuple(param.shape), param.numel(), False, None, None, 0, density, density)


def elementwise_rows(
    params: Iterable[tuple[str, Tensor]],
    counted: set[str],
    kept: Mapping[str, float],
    applied: str,
) -> list[SummaryRow]:
    """The summary of a method that keeps or drops single weights (a threshold, a mask).

    Args:
        params: the plain model's parameters, ``(name, tensor)``.
        counted: the names the method counts: gated, one entry per element.
        kept: per name, the fraction of it kept (absent: all of it).
        applied: how the method acts (``"threshold"``, ``"mask"``).
    """
    rows = []
    for name, p in params:
        density = kept.get(name, 1.0)
        if name not in counted:
            rows.append(SummaryRow.ungated_row(name, p, density))
            continue
        rows.append(
            SummaryRow.gated_row(
                name,
                p,
                granularity="weight",
                applied=applied,
                n_gates=p.numel(),
                expected_density=density,
            )
        )
    return rows


class Pruned(NamedTuple):
    """What ``prune()`` returns: the plain model and, when it was shrunk, what shrinking
    removed (``ShrinkReport`` for chains, ``GraphShrinkReport`` for coupled groups)."""

    model: nn.Module
    report: ShrinkReport | GraphShrinkReport | None


@runtime_checkable
class SparsityMethod(Protocol):
    """A sparsity method around a model: what the training loop, the sweep and the reports ask.

    Attributes:
        module: the wrapped model, used in place.
        n_gated: the number of parameters the method counts (the denominator of ``sparsity``).
    """

    module: nn.Module
    n_gated: int

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward, as the method runs it (gated, masked, or plain)."""
        ...

    def regularization(self) -> Tensor:
        """The penalty to add to the task loss (0 for methods that prune by masks)."""
        ...

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        """The wrapped model's parameters: the optimizer's main group."""
        ...

    def gate_parameters(self) -> Iterator[nn.Parameter]:
        """The method's own trainable parameters (gate logits), for their own group (none
        for most)."""
        ...

    def count_l0(self) -> Tensor:
        """The (expected) number of counted parameters kept."""
        ...

    def expected_density(self) -> Tensor:
        """``count_l0() / n_gated``."""
        ...

    def sparsity(self) -> float:
        """The fraction of counted parameters that are exactly zero in eval."""
        ...

    def summary(self) -> list[SummaryRow]:
        """One row per parameter of the wrapped model."""
        ...

    def expected_flops(self, *example_args: Any, **example_kwargs: Any) -> float:
        """(Expected) multiply-adds per example of the Linear and ConvNd layers, from the shapes
        of the first forward, or of a forward on the example inputs if given."""
        ...

    def export_cost(self) -> dict[str, float]:
        """The exact ``params``, ``nonzero_params`` and ``macs`` of the exported model."""
        ...

    def prune(self, shrink: bool = False) -> Pruned:
        """A plain copy of the model with the method's zeros (dead units removed with
        ``shrink``), in eval mode."""
        ...

    @property
    def group_plan(self) -> GroupPlan | None:
        """The coupled groups the method acts on (None: not a structured method)."""
        ...

    @property
    def example_rows(self) -> tuple[tuple, dict] | None:
        """A few rows of a forward's inputs that a shrunk export is checked on (None: none)."""
        ...

    # torch.nn.Module's, which every method is
    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any: ...


class MethodBase(nn.Module):
    """What every method shares: the parameter groups, the density, the export's groups and
    inputs (``_group_plan``, ``_example``: None unless the method sets them), and one
    ``expected_flops`` over ``kept_weights()`` and the output shapes of the first forward
    (``_shapes``)."""

    module: nn.Module
    n_gated: int
    _shapes: dict[str, tuple[int, ...]] | None
    _group_plan: GroupPlan | None = None
    _example: tuple[tuple, dict] | None = None

    def count_l0(self) -> Tensor:
        raise NotImplementedError

    def kept_weights(self) -> dict[str, float]:
        """Per Linear/ConvNd layer name, its (expected) non-zero weights; a layer absent keeps
        all of them. The one description of the layers that ``expected_flops`` counts."""
        raise NotImplementedError

    def expected_density(self) -> Tensor:
        """``count_l0() / n_gated``: the (expected) fraction of the counted parameters kept."""
        return self.count_l0() / self.n_gated

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        """The wrapped module's own parameters."""
        yield from self.module.parameters()

    def gate_parameters(self) -> Iterator[nn.Parameter]:
        """None here: only gates have parameters of their own."""
        yield from ()

    @property
    def group_plan(self) -> GroupPlan | None:
        """The coupled groups the method acts on and exports through (None: not a structured
        method; its export is the chain's)."""
        return self._group_plan

    @property
    def example_rows(self) -> tuple[tuple, dict] | None:
        """A few rows of a forward's inputs, ``(args, kwargs)``, that a shrunk export is checked
        on (None: none kept)."""
        return self._example

    def _shape_recorder(self) -> contextlib.AbstractContextManager:
        """Records the layers' output shapes during the first forward (after a reset)."""
        if self._shapes is not None:
            return contextlib.nullcontext()
        self._shapes = {}
        return record_shapes(self.module, self._shapes)

    def expected_flops(self, *example_args: Any, **example_kwargs: Any) -> float:
        """(Expected) multiply-adds per example of the Linear and ConvNd layers: each layer's
        output positions times its expected non-zero weights (``kept_weights``; for L0 a closed
        output also removes the next layers' inputs, :mod:`l0core.cost`).

        Output positions come from the real output shapes, recorded at the first forward, or
        from a forward in eval mode on the example inputs if given (the method's schedule does
        not move). ``export_cost()`` gives the exact cost of the exported model.

        Raises:
            RuntimeError: no forward yet and no example input.
        """
        if example_args or example_kwargs:
            self._shapes = None
            was = self.training
            self.eval()
            with torch.no_grad():
                self(*example_args, **example_kwargs)
            self.train(was)
        if not self._shapes:
            raise RuntimeError("expected_flops() needs one forward first, or an example input")
        return kept_macs(self.module, self._shapes, self.kept_weights())

    def export_cost(self) -> dict[str, float]:
        """The exact cost of the model ``prune(shrink=True)`` produces (``prune()`` where it
        cannot shrink): ``params`` (its parameters), ``nonzero_params`` and ``macs`` (multiply-
        adds per example over its non-zero weights, from the shapes of the first forward)."""
        return export_cost(self)


class CountedMethod(MethodBase):
    """What the methods without gate logits share (L1, magnitude and channel-norm pruning, the
    dense model): the plain forward, and densities that follow from ``count_l0()``, the
    parameters counted as zero or kept, over the ``n_gated`` selected ones."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the module; the first call records layer output shapes for ``expected_flops``."""
        with self._shape_recorder():
            return self.module(*args, **kwargs)

    def sparsity(self) -> float:
        """Fraction of the selected parameters that are zero (or count as zero)."""
        return 1.0 - float(self.count_l0()) / self.n_gated
