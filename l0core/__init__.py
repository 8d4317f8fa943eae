"""l0core: L0 regularization (hard-concrete gates) for any ``torch.nn.Module``.

Louizos, Welling & Kingma (2017), "Learning Sparse Neural Networks through L0 Regularization".
Depends on torch only.
"""

from .baselines import Dense, L1Regularizer
from .channel_norm import ChannelNormPruner
from .controller import SparsityController
from .functional import HardConcrete, eval_gate, log_alpha_from_droprate, prob_nonzero, sample_gates
from .magnitude import FixedMask, MagnitudePruner, cubic_sparsity
from .method import Pruned, SparsityMethod, SummaryRow
from .regularizer import L0Regularizer

__all__ = [
    "ChannelNormPruner",
    "Dense",
    "FixedMask",
    "HardConcrete",
    "L0Regularizer",
    "L1Regularizer",
    "MagnitudePruner",
    "Pruned",
    "SparsityController",
    "SparsityMethod",
    "SummaryRow",
    "cubic_sparsity",
    "eval_gate",
    "log_alpha_from_droprate",
    "prob_nonzero",
    "sample_gates",
]
