"""Unstructured sparsity stored sparse: Linear weights as ``torch.sparse_csr`` tensors.

An unstructured export keeps its zeros inside full-size dense tensors, which run at dense speed.
Storing a Linear layer's weight in compressed sparse rows (CSR) makes the multiply skip them;
whether that is faster depends on the sparsity, the shapes and the batch, so it is measured
(:func:`sweeps.latency.compare`), never assumed. Free of Ray and MLflow.
"""

from __future__ import annotations

import copy
import warnings

from torch import Tensor, nn

__all__ = ["CsrLinear", "to_csr"]


class CsrLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` in CSR: ``(W @ x^T)^T``, a sparse-dense product."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            weight = linear.weight.detach().to_sparse_csr()
        self.register_buffer("weight", weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)  # (N, in)
        out = (self.weight @ flat.T).T  # (N, out)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def to_csr(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``model`` with every Linear layer's weight stored as CSR.

    Returns:
        The copy and the number of layers converted (0: nothing to convert, the copy is plain).
    """
    model = copy.deepcopy(model).eval()
    converted = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, CsrLinear(child))
                converted += 1
    return model, converted
