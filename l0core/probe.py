"""Which layers' weights are read outside their own forward: there, a hook on the layer never acts.

``nn.MultiheadAttention`` hands ``out_proj.weight`` to ``F.multi_head_attention_forward`` without
calling ``out_proj``; a model may call ``F.linear(x, self.fc.weight)``; a layer may be called and
its weight also read directly. A gate applied by a forward hook on such a layer would be counted by
``sparsity()`` and baked in by ``prune()`` while the gated model never used it. The wrapper runs
its first forward with every gate on the weights (exact wherever they are read), counting, per
hooked layer, the calls of its forward and the reads of its parameters from outside that forward;
layers found read outside (or never called) keep their gates on the weights.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from .gates import GateSite, Masked

__all__ = ["Usage", "count_reads", "settle_hooks"]


@dataclass
class Usage:
    """What one forward did with a module: calls of its forward, and reads of its parameters
    made while that forward was not running."""

    calls: int = 0
    outside_reads: int = 0
    active: int = 0

    @property
    def hookable(self) -> bool:
        """A hook on the module sees every use of its parameters."""
        return self.calls > 0 and self.outside_reads == 0


class _CountingParams(dict):
    """A module's ``_parameters`` that counts the reads ``Module.__getattr__`` makes."""

    __slots__ = ("usage",)

    def __getitem__(self, key: str):
        if not self.usage.active:
            self.usage.outside_reads += 1
        return dict.__getitem__(self, key)


@contextlib.contextmanager
def count_reads(modules: list[nn.Module]) -> Iterator[dict[int, Usage]]:
    """Count, during the block, how each module's parameters are used (keyed by ``id``)."""
    usages: dict[int, Usage] = {}
    originals, handles = [], []
    try:
        for mod in modules:
            if id(mod) in usages:
                continue
            usage = usages[id(mod)] = Usage()
            counting = _CountingParams(mod._parameters)
            counting.usage = usage
            originals.append((mod, mod.__dict__["_parameters"], counting))
            mod.__dict__["_parameters"] = counting
            handles.append(mod.register_forward_pre_hook(_enter(usage)))
            handles.append(mod.register_forward_hook(_leave(usage), always_call=True))
        yield usages
    finally:
        for h in handles:
            h.remove()
        for mod, original, counting in reversed(originals):
            original.update(counting)  # anything the forward (re)assigned
            mod.__dict__["_parameters"] = original


def _enter(usage: Usage):
    def hook(module: nn.Module, args: tuple) -> None:
        usage.calls += 1
        usage.active += 1

    return hook


def _leave(usage: Usage):
    def hook(module: nn.Module, args: tuple, output: object) -> None:
        usage.active -= 1

    return hook


def settle_hooks(
    sites: list[GateSite], masks: list[list[Masked]], usage: dict[int, Usage], per_sample: bool
) -> list[bool]:
    """Which activation sites may act by hooks; the others are switched, in place, to gates on
    their weights (``masks``). Per-sample gates cannot act on weights: such a site falls back to
    one sample per forward, with a warning."""
    hooked = []
    for site, site_masks in zip(sites, masks, strict=True):
        hookable = usage[id(site.hook_module)].hookable
        if not hookable:
            if per_sample:
                warnings.warn(
                    f"l0core: {site.name}: the forward of {site.hook_name or 'its layer'} is not "
                    "called (its weights are read by another module or through the functional "
                    "API), so per-sample gates cannot act on its activations; from the next "
                    "forward on it gets one gate sample per forward, on the weights (this first "
                    "forward did not gate every use of them)",
                    UserWarning,
                    stacklevel=5,
                )
            site.applied, site.masked = "weight", site_masks
        hooked.append(hookable)
    return hooked
