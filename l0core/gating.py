"""One forward's gating: gated tensors swapped in for parameters, unit gates applied by hooks, and
the replay of both when activation checkpointing recomputes part of that forward during backward.

The wrapped module holds gated tensors only while a forward runs. Activation checkpointing
(``torch.utils.checkpoint``, reentrant or not) runs parts of the forward again during backward,
after the swap is undone: the recomputation would see the ungated weights and no unit gates, and
the gradients would be those of another model. So every forward that records a graph arms its
outputs: once backward reaches them, the first forward of one of the wrapped model's modules that
runs inside that backward (a recomputation) re-enters the forward's gating, rebuilt from the same
gate values (differentiable again: reentrant checkpointing backpropagates through the
recomputation on its own), and it stays in place until the backward ends.

Per-sample gates (one gate set per example) are drawn once per forward and site, on the dim that
indexes examples, and reused by every call of the layer in that forward.
"""

from __future__ import annotations

import itertools
import threading
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .functional import sample_gates
from .gates import GateSite, Masked

if TYPE_CHECKING:
    from .regularizer import L0Regularizer

# Keys of the hooks put straight into a module's hook dicts for one forward (what
# ``register_forward_hook`` and its handle would do, for a few microseconds less per layer and
# step): negative, so never the id of a ``RemovableHandle`` (those count up from 0).
_HOOK_IDS = itertools.count(-1, -1)

__all__ = [
    "ForwardGating",
    "Running",
    "arm_replay",
    "release_replays",
    "site_batch_dims",
    "unit_masks",
]


def unit_masks(site: GateSite) -> list[Masked]:
    """The tensors to multiply by an activation site's gates to apply them on the weights
    instead: the layer's weight rows and bias (or the BatchNorm's affine pair after it) for
    output gates, its weight columns for input gates. Exact: the same product the hook makes."""
    mod, prefix = site.hook_module, site.hook_name
    name = f"{prefix}.weight" if prefix else "weight"
    w = mod._parameters["weight"]
    if site.granularity == "input":
        view = tuple(w.shape[1] if d == 1 else 1 for d in range(w.dim()))
        return [Masked(name, mod, "weight", (), view)]
    view = tuple(w.shape[0] if d == 0 else 1 for d in range(w.dim()))
    masks = [Masked(name, mod, "weight", (), view)]
    if mod._parameters.get("bias") is not None:
        bias_name = f"{prefix}.bias" if prefix else "bias"
        masks.append(Masked(bias_name, mod, "bias", (), (w.shape[0],)))
    return masks


def site_batch_dims(model: nn.Module, sites: list[GateSite], batch_dim: int) -> list[int]:
    """The dim of each activation site's activations that indexes examples.

    Conv and BatchNorm activations are ``(B, C, ...)``. A Linear follows the nearest
    ``batch_first`` flag (``False``: sequence first, ``(T, B, C)``) of the modules that hold it,
    or of their direct children (``nn.Transformer*Layer`` keeps the flag on its ``self_attn``);
    without one, it takes ``batch_dim``.
    """
    modules = dict(model.named_modules())
    dims = []
    for site in sites:
        dim, name = (0 if site.unit_dim == 1 else None), site.hook_name
        while dim is None:
            flag = _batch_first(modules[name])
            if flag is not None:
                dim = 0 if flag else 1
            elif not name:
                dim = batch_dim
            name = name.rpartition(".")[0]
        dims.append(dim)
    return dims


def _batch_first(module: nn.Module) -> bool | None:
    for mod in (module, *module.children()):
        flag = getattr(mod, "batch_first", None)
        if isinstance(flag, bool):
            return flag
    return None


class ForwardGating:
    """The gating of one forward: ``with gating: module(...)`` runs the module gated.

    Attributes:
        swaps: ``(tensor to replace, gated tensor)`` pairs.
        unit_gates: per activation site, its gates, or ``None`` for per-sample gates.
        per_sample: per activation site index, the ``(B, n)`` gates drawn in this forward.
        values: what rebuilds this gating for a replay (see ``L0Regularizer._replayed``).
    """

    __slots__ = (
        "_hooks", "_undo", "hooked", "per_sample", "reg", "replay_values", "swaps",
        "unit_gates", "values",
    )  # fmt: skip

    def __init__(
        self,
        reg: L0Regularizer,
        swaps: list[tuple[Masked, Tensor]],
        unit_gates: list[Tensor | None],
        hooked: list[bool],
        values: Any,
        replay_values: dict[int, Tensor] | None = None,
    ) -> None:
        self.reg, self.swaps, self.unit_gates, self.values = reg, swaps, unit_gates, values
        self.hooked = hooked
        self.per_sample: dict[int, Tensor] = {}
        self.replay_values = replay_values or {}
        self._undo: list[tuple[nn.Module, str, Any]] = []
        self._hooks: list[tuple[dict, int]] = []

    def __enter__(self) -> ForwardGating:
        try:
            for m, t in self.swaps:
                for mod, attr in ((m.module, m.attr), *m.aliases):
                    self._undo.append((mod, attr, mod._parameters[attr]))
                    mod._parameters[attr] = t
            for i, (site, z) in enumerate(zip(self.reg._asites, self.unit_gates, strict=True)):
                if not self.hooked[i]:
                    continue
                module = site.hook_module
                hooks = module._forward_hooks if site.granularity == "output" else (
                    module._forward_pre_hooks
                )  # fmt: skip
                key = next(_HOOK_IDS)
                hooks[key] = _UnitGate(self, i, site, z)
                self._hooks.append((hooks, key))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for hooks, key in self._hooks:
            hooks.pop(key, None)
        for mod, attr, p in reversed(self._undo):
            mod._parameters[attr] = p
        self._hooks, self._undo = [], []


class Running:
    """Sets ``_in_forward`` for the block (in ``__dict__``: ``nn.Module.__setattr__`` and
    generator-based context managers cost microseconds per step)."""

    __slots__ = ("state",)

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def __enter__(self) -> None:
        self.state["_in_forward"] = True

    def __exit__(self, *exc: object) -> None:
        self.state["_in_forward"] = False


class _UnitGate:
    """A forward (pre-)hook that scales a layer's units by their gates for one forward."""

    __slots__ = ("gating", "index", "site", "z")

    def __init__(self, gating: ForwardGating, index: int, site: GateSite, z: Tensor | None) -> None:
        self.gating, self.index, self.site, self.z = gating, index, site, z

    def _per_sample(self, x: Tensor) -> Tensor:
        """This forward's ``(B, n)`` gates of the site, drawn at its first call."""
        site, reg = self.site, self.gating.reg
        bd = reg._batch_dims[self.index]
        units = x.dim() - 1 if site.unit_dim == -1 else site.unit_dim
        if bd >= units:
            where = "is its units" if bd == units else "does not exist"
            raise ValueError(
                f"per_sample gates of {site.name}: {site.hook_name or 'the layer'} gives "
                f"activations of shape {tuple(x.shape)}, where batch_dim={bd} {where}, not its "
                "examples; pass batch_dim, the dim of the examples"
            )
        z = self.gating.per_sample.get(self.index)
        if z is None:  # drawn, or for a replay the same values again (saved like a draw)
            la = reg._compute(reg.unit_log_alpha)[site.slice]
            again = self.gating.replay_values.get(self.index)
            z = sample_gates(la, reg.hc, batch_size=x.shape[bd], gates=again)
            self.gating.per_sample[self.index] = z
        elif z.shape[0] != x.shape[bd]:
            raise ValueError(
                f"per_sample gates of {site.name}: a second call in one forward has "
                f"{x.shape[bd]} examples on dim {bd}, the first had {z.shape[0]}"
            )
        shape = [1] * x.dim()
        shape[bd], shape[units] = z.shape
        return z.view(shape)

    def _scale(self, x: Tensor) -> Tensor:
        z = self.z
        if z is None:
            z = self._per_sample(x)
        elif self.site.unit_dim == 1 and x.dim() > 2:
            z = z.view(-1, *([1] * (x.dim() - 2)))
        return x * (z if z.dtype == x.dtype else z.to(x.dtype))

    def __call__(self, module: nn.Module, inputs: Any, output: Any = None) -> Any:
        if self.site.granularity == "output":
            return self._scale(output)
        x, *rest = inputs
        return (self._scale(x), *rest)


# ---- replay under activation checkpointing ----------------------------------------------------


class _Armed:
    """One forward's gating, waiting for a recomputation in its backward."""

    __slots__ = ("entered", "gating", "node", "reg")

    def __init__(self, reg: L0Regularizer, gating: ForwardGating) -> None:
        self.reg, self.gating = reg, gating
        self.entered: ForwardGating | None = None
        self.node: Any = None  # the backward node whose recomputation ``entered`` serves

    def enter(self, node: Any) -> None:
        """Put a fresh replay of the gating in place for the recomputation run by ``node``:
        fresh, since reentrant checkpointing backpropagates through each recomputation."""
        self.exit()
        with torch.autograd.graph.saved_tensors_hooks(_same, _same):
            replay = self.reg._replayed(self.gating)  # not part of the checkpointed region
        self.entered, self.node = replay.__enter__(), node

    def exit(self) -> None:
        if self.entered is not None:
            self.entered.__exit__(None, None, None)
        self.entered, self.node = None, None

    def __call__(self, grads: Any) -> None:  # a pre-hook on an output's node: backward reached it
        _REPLAYS.arm(self)


class _Replays:
    """The forwards armed in the backward that is running, and the module pre-hook (registered
    only while one is armed) that re-enters a forward's gating for a recomputation."""

    def __init__(self) -> None:
        self.armed: list[_Armed] = []
        self.watching = False  # the pre-hook is in place
        self.lock = threading.Lock()

    def arm(self, armed: _Armed) -> None:
        with self.lock:
            if any(a is armed for a in self.armed):
                return
            first = not self.armed
            self.armed.append(armed)
            if not self.watching:
                _GLOBAL_PRE_HOOKS[_REPLAY_HOOK] = self._pre_hook
                self.watching = True
        if first:
            torch.autograd.Variable._execution_engine.queue_callback(self.finish)

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        if torch._C._current_graph_task_id() == -1:
            return  # not inside a backward: not a recomputation
        node = torch._C._current_autograd_node()
        for armed in list(self.armed):
            reg = armed.reg
            if armed.node is node or reg._in_forward or id(module) not in reg._module_ids:
                continue
            if any(a is not armed and a.reg is reg for a in self.armed):
                raise RuntimeError(
                    "l0core: activation checkpointing recomputes a forward of the wrapped model "
                    "in a backward that spans several of its forwards; the gates of each "
                    "forward can be replayed only when it is followed by its own backward"
                )
            if armed.gating.values is None:
                raise RuntimeError(
                    "l0core: activation checkpointing recomputes a forward whose gates were "
                    "released after its first backward; run the forward again"
                )
            armed.enter(node)

    def finish(self) -> None:
        """End of the backward: undo the replayed gatings and stop watching module calls."""
        with self.lock:
            armed, self.armed = self.armed, []
            watching, self.watching = self.watching, False
        for a in reversed(armed):
            a.exit()
            a.gating.values = None  # the gate values may be large: free them with the backward
            a.gating.per_sample = {}
        if watching:
            _GLOBAL_PRE_HOOKS.pop(_REPLAY_HOOK, None)

    def release(self, reg: L0Regularizer) -> None:
        """Undo what a backward that failed before its end left in place for ``reg``."""
        if any(a.reg is reg for a in self.armed) and torch._C._current_graph_task_id() == -1:
            self.finish()


_GLOBAL_PRE_HOOKS = nn.modules.module._global_forward_pre_hooks
_REPLAY_HOOK = next(_HOOK_IDS)
_REPLAYS = _Replays()


def _same(t: Tensor) -> Tensor:
    return t


def arm_replay(reg: L0Regularizer, gating: ForwardGating, output: Any) -> None:
    """Arm the outputs of a forward that recorded a graph (see the module docstring)."""
    gating.swaps, gating.unit_gates = [], []  # the graph keeps what it needs
    if isinstance(output, Tensor):  # a pre-hook on the node: cheaper than a tensor hook
        if output.grad_fn is not None:
            output.grad_fn.register_prehook(_Armed(reg, gating))
        return
    hook: _Armed | None = None
    for t in pytree.tree_leaves(output):
        if isinstance(t, Tensor) and t.grad_fn is not None:
            hook = hook or _Armed(reg, gating)
            t.grad_fn.register_prehook(hook)


def release_replays(reg: L0Regularizer) -> None:
    """Called at each forward: a backward that raised leaves no gated tensors behind."""
    if _REPLAYS.armed:
        _REPLAYS.release(reg)
