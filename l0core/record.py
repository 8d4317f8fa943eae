"""The real call graph of one forward, for models ``torch.fx`` cannot trace.

fx traces with proxies, so Python control flow that depends on data (``if x.sum() > 0:``) stops
it. Running the model once on example inputs instead, every torch function and tensor method
called (a ``TorchFunctionMode``) and every leaf module called (forward hooks on the modules fx
would keep whole) becomes a node of an ``fx.Graph`` that the channel walk of
:mod:`l0core.trace` reads like a traced one. The graph is that of the path the example took;
values used only to decide Python control flow (they do not reach the output) are left out, and
``prune(shrink=True)`` checks the shrunk model against the gated one on an input like the first.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

__all__ = ["record_graph"]


class _Recorder(TorchFunctionMode):
    """Records tensor ops outside leaf modules, and leaf module calls, into ``self.graph``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.graph = fx.Graph(owning_module=model)
        self.nodes: dict[int, fx.Node] = {}
        self.alive: list[Tensor] = []  # keeps recorded tensors alive: their ids stay unique
        self.depth = 0  # > 0 inside a leaf module
        self.stack: list[tuple[str, type]] = []
        self.attrs = {id(t): n for n, t in (*model.named_parameters(), *model.named_buffers())}
        leaf = fx.Tracer().is_leaf_module
        self.leaves = {id(m) for n, m in model.named_modules() if n and leaf(m, n)}
        self.names = {id(m): n for n, m in model.named_modules()}
        self.pending: list[tuple[tuple, dict]] = []

    # ---- tensors to nodes -----------------------------------------------------------------
    def arg(self, a: Any) -> Any:
        if not isinstance(a, Tensor):
            return a
        node = self.nodes.get(id(a))
        if node is None:  # a parameter read directly, or a tensor made outside the recording
            name = self.attrs.get(id(a))
            node = (
                self.graph.get_attr(name) if name else self.graph.placeholder(f"t{len(self.alive)}")
            )
            self.bind(a, node)
        return node

    def bind(self, out: Any, node: fx.Node) -> None:
        if isinstance(out, Tensor):
            self.nodes[id(out)] = node
            self.alive.append(out)
        elif isinstance(out, (tuple, list)):
            for i, item in enumerate(out):
                if isinstance(item, (Tensor, tuple, list)):
                    self.bind(item, self.graph.call_function(operator.getitem, (node, i)))

    def _meta(self, node: fx.Node) -> None:
        node.meta["nn_module_stack"] = {n: (n, t) for n, t in self.stack}

    # ---- functions ------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth or not any(isinstance(t, Tensor) for t in pytree.tree_leaves(out)):
            return out  # inside a leaf module, or no tensor made (shapes, bools)
        owner = getattr(func, "__objclass__", None)
        name = getattr(func, "__name__", "")
        a, k = pytree.tree_map(self.arg, args), pytree.tree_map(self.arg, kwargs)
        if owner is torch._C.TensorBase and name == "__getitem__":
            node = self.graph.call_function(operator.getitem, a, k)
        elif owner is torch._C.TensorBase:
            node = self.graph.call_method(name, a, k)
        else:  # torch.* and F.* functions; an unknown callable the walk treats as unknown
            node = self.graph.call_function(func, a, k)
        self._meta(node)
        self.bind(out, node)
        return out

    # ---- modules --------------------------------------------------------------------------
    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.stack.append((self.names.get(id(module), ""), type(module)))
        if id(module) in self.leaves:
            if self.depth == 0:
                self.pending.append(
                    (pytree.tree_map(self.arg, args), pytree.tree_map(self.arg, kwargs))
                )
            self.depth += 1

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if id(module) in self.leaves:
            self.depth -= 1
            if self.depth == 0:
                a, k = self.pending.pop()
                node = self.graph.call_module(self.names[id(module)], a, k)
                self._meta(node)
                self.bind(out, node)
        self.stack.pop()


@torch.no_grad()
def record_graph(model: nn.Module, example: tuple[tuple, dict]) -> fx.Graph:
    """The graph of one forward of a copy of ``model`` on ``example`` (``(args, kwargs)``), in
    its current mode; the global random state is left as it was."""
    copied = copy.deepcopy(model)
    rec = _Recorder(copied)
    handles = []
    for m in copied.modules():
        handles.append(m.register_forward_pre_hook(rec.pre_hook, with_kwargs=True))
        handles.append(m.register_forward_hook(rec.post_hook, with_kwargs=True, always_call=True))
    args, kwargs = example
    try:
        with torch.random.fork_rng(devices=[]):
            for t in pytree.tree_leaves((args, kwargs)):
                if isinstance(t, Tensor):
                    rec.bind(t, rec.graph.placeholder(f"input{len(rec.alive)}"))
            with rec:
                out = copied(*args, **kwargs)
            rec.graph.output(pytree.tree_map(rec.arg, out))
    finally:
        for h in handles:
            h.remove()
    rec.graph.eliminate_dead_code()  # values that only steered Python control flow
    return rec.graph
