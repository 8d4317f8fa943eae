"""A model's forward as a chain of steps, and what each step does to a constant unit.

``torch.fx.symbolic_trace`` turns the forward into a graph; a model ``shrink`` supports is one
whose graph is a single path from the input to the output (shape queries such as
``x.size(0)`` feeding the next step are allowed). Each step is classified by what it does to the
units (features or channels) flowing through it, and knows how a unit whose value is a known
constant comes out of it. Used by ``l0core.export``.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["UNSUPPORTED_HINT", "ShrinkError", "Step", "trace_chain"]

UNSUPPORTED_HINT = (
    "shrink supports a chain of Linear, Conv1d/2d/3d (groups=1), BatchNorm, elementwise "
    "activations, pooling, Dropout and Flatten; prune() without shrink still gives an exact "
    "same-shape model"
)

WEIGHT, BATCHNORM, ELEMENTWISE, POOL, FLATTEN, OTHER = (
    "weight", "batchnorm", "elementwise", "pool", "flatten", "other"
)  # fmt: skip

_WEIGHT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ACT_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.CELU,
    nn.SELU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.LogSigmoid, nn.Tanhshrink,
)  # fmt: skip
_IDENTITY_MODULES = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)  # fmt: skip
# pools whose output on a constant channel is that constant
_CONST_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)  # fmt: skip
_AVG_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ACT_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu,
    torch.selu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus,
    F.softsign, F.logsigmoid, F.tanh, torch.tanh, F.sigmoid, torch.sigmoid,
}  # fmt: skip
_ACT_METHODS = {"relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_", "contiguous"}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
# the same as functions -> position of their return_indices argument (None: they have none)
_CONST_POOL_FUNCTIONS = {
    F.max_pool1d: 6,
    F.max_pool2d: 6,
    F.max_pool3d: 6,
    F.adaptive_max_pool1d: 2,
    F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 2,
    F.adaptive_avg_pool1d: None,
    F.adaptive_avg_pool2d: None,
    F.adaptive_avg_pool3d: None,
}
_AVG_POOL_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d}


class ShrinkError(ValueError):
    """The model's topology is not one ``shrink`` can restructure exactly."""


@dataclass
class Step:
    """One node of the chain and what it does to the units flowing through it.

    Attributes:
        node: the fx node.
        kind: ``"weight"``, ``"batchnorm"``, ``"elementwise"``, ``"pool"``, ``"flatten"`` or
            ``"other"``.
        name: for messages and reports: the module's qualified name, or the node's name.
        module: the called module (``None`` for functions and methods).
        fn: for elementwise steps, the op applied to a vector of unit values.
        keeps_constant: for pools, whether a constant channel stays the same constant.
        resize: for ``view``/``reshape`` to a hard-coded feature count: rewrites that count
            in the graph when channels are removed.
    """

    node: fx.Node
    kind: str
    name: str
    module: nn.Module | None = None
    fn: Callable[[Tensor], Tensor] | None = None
    keeps_constant: bool = True
    resize: Callable[[int], None] | None = None

    def describe(self) -> str:
        """The step for messages: its name and what it calls."""
        if self.module is not None:
            return f"{self.name} ({type(self.module).__name__})"
        target = self.node.target
        return f"{self.name} ({target if isinstance(target, str) else target.__name__})"

    def propagate(self, value: Tensor, const: Tensor) -> tuple[Tensor, Tensor]:
        """Carry per-unit constants through this step (eval mode).

        Args:
            value: ``(units,)`` the value of each constant unit (anything elsewhere).
            const: ``(units,)`` bool, which units are constant.

        Returns:
            The same pair after the step.
        """
        value = torch.where(const, value, torch.zeros_like(value))
        if self.kind == ELEMENTWISE:
            return self.fn(value.clone()), const
        if self.kind == BATCHNORM:
            return _batchnorm_constants(self.module, value, const)
        if self.kind == POOL and not self.keeps_constant:
            return value, const & (value == 0)
        return value, const


def _batchnorm_constants(bn: nn.Module, value: Tensor, const: Tensor) -> tuple[Tensor, Tensor]:
    zero_scale = bn.weight == 0 if bn.affine else torch.zeros_like(const)
    bias = bn.bias if bn.affine else torch.zeros_like(value)
    if bn.running_mean is None:
        # Batch statistics even in eval: only a zero scale gives a known constant (the bias).
        return bias.clone(), zero_scale
    out = F.batch_norm(
        value[None],
        bn.running_mean,
        bn.running_var,
        bn.weight,
        bn.bias,
        training=False,
        momentum=0.0,
        eps=bn.eps,
    )[0]
    return torch.where(zero_scale, bias, out), const | zero_scale


def _unsupported(node: fx.Node, what: str, why: str = "") -> ShrinkError:
    detail = f": {why}" if why else ""
    return ShrinkError(f"cannot shrink at node {node.name!r} ({what}){detail}; {UNSUPPORTED_HINT}")


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_zero(padding: Any) -> bool:
    return all(p == 0 for p in padding) if isinstance(padding, (tuple, list)) else padding == 0


def _substitute(obj: Any, node: fx.Node, value: Tensor) -> Any:
    return fx.node.map_arg(obj, lambda n: value if n is node else n)


def _is_batch_size(node: Any, src: fx.Node) -> bool:
    """Whether ``node`` is ``src.size(0)``, ``src.size()[0]`` or ``src.shape[0]``."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method" and node.target == "size":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return node.args[0] is src and dim == 0
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        base = node.args[0]
        return isinstance(base, fx.Node) and base.args[0] is src and (
            (base.op == "call_method" and base.target == "size" and len(base.args) == 1)
            or (base.op == "call_function" and base.target is getattr and base.args[1] == "shape")
        )  # fmt: skip
    return False


def _shape_queries(src: fx.Node) -> set[fx.Node]:
    """The nodes that only read ``src``'s shape: ``src.size(...)``, ``src.shape[...]``."""
    found = set()
    for user in src.users:
        is_size = user.op == "call_method" and user.target == "size"
        is_shape = (
            user.op == "call_function" and user.target is getattr and user.args[1:] == ("shape",)
        )
        if is_size or is_shape:
            found.add(user)
            found |= {
                u for u in user.users if u.op == "call_function" and u.target is operator.getitem
            }
    return found


def _reshape_step(node: fx.Node, src: fx.Node) -> Step:
    if node.op == "call_method":
        shape, where = node.args[1:], "args"
    else:  # torch.reshape(x, shape)
        shape, where = (
            (node.args[1], "args1") if len(node.args) > 1 else (node.kwargs.get("shape"), "kwargs")
        )
    if where == "args" and len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape, where = shape[0], "args1"
    if not isinstance(shape, (tuple, list)) or len(shape) != 2:
        raise _unsupported(
            node, str(node.target), f"shape {shape}: only (batch, features) is supported"
        )
    batch, features = shape
    if not (batch == -1 or _is_batch_size(batch, src)) or not isinstance(features, int):
        raise _unsupported(
            node, str(node.target), "only view/reshape to (batch, features) is supported"
        )
    if batch == -1 and features == -1:
        raise _unsupported(node, str(node.target), "(-1, -1) is not a valid shape")
    if features == -1:
        return Step(node, FLATTEN, node.name)

    def resize(n: int) -> None:
        if where == "args":
            node.args = (node.args[0], batch, n)
        elif where == "args1":
            node.args = (node.args[0], (batch, n), *node.args[2:])
        else:
            node.kwargs = {**node.kwargs, "shape": (batch, n)}

    return Step(node, FLATTEN, node.name, resize=resize)


def _classify_module(node: fx.Node, module: nn.Module) -> Step:
    name, kind = str(node.target), OTHER
    what = f"{name} ({type(module).__name__})"
    if type(module) in _WEIGHT_TYPES:
        if getattr(module, "groups", 1) != 1:
            raise _unsupported(node, what, f"grouped convolution (groups={module.groups})")
        kind = WEIGHT
    elif type(module) in _BN_TYPES:
        kind = BATCHNORM
    elif type(module) in _ACT_MODULES or (type(module) is nn.PReLU and module.num_parameters == 1):
        return Step(node, ELEMENTWISE, name, module, fn=module)
    elif type(module) in _IDENTITY_MODULES:
        return Step(node, ELEMENTWISE, name, module, fn=lambda v: v)
    elif type(module) in _CONST_POOL_MODULES:
        if getattr(module, "return_indices", False):
            raise _unsupported(node, what, "pooling that returns indices")
        kind = POOL
    elif type(module) in _AVG_POOL_MODULES:
        keeps = _is_zero(module.padding) or not module.count_include_pad
        keeps = keeps and getattr(module, "divisor_override", None) is None
        return Step(node, POOL, name, module, keeps_constant=keeps)
    elif type(module) is nn.Flatten and module.start_dim == 1 and module.end_dim == -1:
        kind = FLATTEN
    return Step(node, kind, name, module)


def _classify_call(node: fx.Node, src: fx.Node) -> Step:
    target, name = node.target, node.name
    fn = None
    if node.op == "call_function" and target in _ACT_FUNCTIONS:
        fn = lambda v: target(*_substitute(node.args, src, v), **node.kwargs)  # noqa: E731
    elif node.op == "call_method" and target in _ACT_METHODS:
        fn = lambda v: getattr(v, target)(*node.args[1:], **node.kwargs)  # noqa: E731
    elif node.op == "call_function" and target in _DROPOUT_FUNCTIONS:
        if _arg(node, 2, "training", True):
            raise _unsupported(node, name, "dropout with training=True is random even in eval")
        fn = lambda v: v  # noqa: E731
    if fn is not None:
        return Step(node, ELEMENTWISE, name, fn=fn)
    if node.op == "call_function" and target in _CONST_POOL_FUNCTIONS:
        index = _CONST_POOL_FUNCTIONS[target]
        if index is not None and _arg(node, index, "return_indices", False):
            raise _unsupported(node, name, "pooling that returns indices")
        return Step(node, POOL, name)
    if node.op == "call_function" and target in _AVG_POOL_FUNCTIONS:
        keeps = _is_zero(_arg(node, 3, "padding", 0)) or not _arg(
            node, 5, "count_include_pad", True
        )
        keeps = keeps and _arg(node, 6, "divisor_override", None) is None
        return Step(node, POOL, name, keeps_constant=keeps)
    is_flatten = (node.op == "call_method" and target == "flatten") or target is torch.flatten
    if is_flatten and _arg(node, 1, "start_dim", 0) == 1 and _arg(node, 2, "end_dim", -1) == -1:
        return Step(node, FLATTEN, name)
    if (node.op == "call_method" and target in ("view", "reshape")) or target is torch.reshape:
        return _reshape_step(node, src)
    return Step(node, OTHER, name)


def trace_chain(model: nn.Module) -> tuple[nn.Module, fx.GraphModule, list[Step]]:
    """Trace a private eval-mode copy of ``model`` and return it, its graph and its chain.

    The graph module shares its submodules with the copy. Functional
    ``training=self.training`` switches are frozen at eval by the trace.

    Raises:
        ShrinkError: the model cannot be traced, or its graph is not a single chain.
    """
    work = copy.deepcopy(model).eval()
    try:
        gm = fx.symbolic_trace(work)
    except Exception as exc:
        raise ShrinkError(
            f"cannot trace {type(model).__name__} with torch.fx ({exc}); {UNSUPPORTED_HINT}"
        ) from exc
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise ShrinkError(
            f"forward takes {len(inputs)} inputs, shrink needs exactly one; {UNSUPPORTED_HINT}"
        )
    steps, seen_modules, src = [], set(), inputs[0]
    while True:
        side = _shape_queries(src)
        users = [u for u in src.users if u not in side]
        if len(users) != 1:
            names = ", ".join(u.name for u in users) or "nothing"
            raise _unsupported(
                src, f"used by {names}", "a value consumed by several nodes is not a chain"
            )
        node = users[0]
        if any(set(s.users) - side - {node} for s in side):
            raise _unsupported(node, "shape query", "the shape of a value is used further on")
        if node.op == "output":
            if node.args[0] is not src:
                raise _unsupported(node, "output", "the output must be the last value itself")
            return work, gm, steps
        extra = [n.name for n in node.all_input_nodes if n is not src and n not in side]
        if node.op == "call_module":
            step = _classify_module(node, gm.get_submodule(node.target))
            if node.target in seen_modules:
                raise _unsupported(node, step.name, "the module is called more than once")
            seen_modules.add(node.target)
        elif node.op in ("call_function", "call_method"):
            step = _classify_call(node, src)
        else:
            raise _unsupported(node, node.op)
        if extra and step.kind != OTHER:
            raise _unsupported(node, step.name, f"it also reads {', '.join(extra)}")
        steps.append(step)
        src = node
