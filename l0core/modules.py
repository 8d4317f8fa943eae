"""Plain modules that the graph export puts where a torch module cannot take the shrunk shape.

* :class:`NarrowLayerNorm`: a LayerNorm whose output lost features. LayerNorm normalizes over all
  its input features, so a gate can only close features of its *output* (the affine entries); the
  input keeps its width and the statistics stay those of every feature.
* :class:`HeadAttention`: ``nn.MultiheadAttention`` with fewer heads. ``nn.MultiheadAttention``
  ties its inner width (heads x head_dim) to ``embed_dim``, its input and output width, so it
  cannot lose a head; this module takes the same call and returns the same results, with any
  number of heads and input/output widths of their own.

Both hold plain parameters and buffers: ``torch.save``/``torch.load`` and ``torch.export`` take
them like the modules they replace.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HeadAttention", "NarrowLayerNorm"]


class NarrowLayerNorm(nn.Module):
    """LayerNorm over ``width`` features that returns only the features ``keep``.

    Args:
        width: the normalized (input) width.
        keep: indices of the output features kept, ascending.
        weight, bias: the affine entries of the kept features (``None``: none).
        eps: as in ``nn.LayerNorm``.
    """

    def __init__(
        self, width: int, keep: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> None:
        super().__init__()
        self.width, self.eps = width, eps
        self.register_buffer("keep", keep.to(torch.long))
        self.weight = None if weight is None else nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x, (self.width,), None, None, self.eps).index_select(-1, self.keep)
        if self.weight is not None:
            y = y * self.weight
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{self.width} -> {self.keep.numel()}, eps={self.eps}"


class HeadAttention(nn.Module):
    """``nn.MultiheadAttention``'s self- or cross-attention with ``num_heads`` of its
    ``total_heads`` heads left (the others are closed: their q, k and v are exactly zero).

    The call and the results are those of ``nn.MultiheadAttention.forward`` (batch-first or
    sequence-first, unbatched inputs, boolean or additive masks, a per-head ``attn_mask`` of
    ``batch * total_heads`` rows, the attention weights averaged over heads or per head). A
    closed head attends uniformly over the keys its mask allows (zero scores), so the weights it
    would return are rebuilt from the mask alone: the results equal the original module's.

    Attributes:
        in_proj_weight: ``(3 * num_heads * head_dim, in_features)``, q, k, v rows.
        in_proj_bias: their bias, or ``None``.
        out_proj: ``Linear(num_heads * head_dim, out_features)``.
        kept: the original indices of the heads left, ascending.
    """

    _qkv_same_embed_dim = False  # no fused fast path of nn.Transformer*Layer reads this module

    def __init__(
        self,
        in_proj_weight: Tensor,
        in_proj_bias: Tensor | None,
        out_proj: nn.Linear,
        head_dim: int,
        kept: Tensor,
        total_heads: int,
        batch_first: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.in_proj_weight = nn.Parameter(in_proj_weight)
        self.in_proj_bias = None if in_proj_bias is None else nn.Parameter(in_proj_bias)
        self.out_proj = out_proj
        self.register_buffer("kept", kept.to(torch.long))
        self.head_dim, self.total_heads = head_dim, total_heads
        self.batch_first, self.dropout = batch_first, dropout

    @property
    def num_heads(self) -> int:
        return self.kept.numel()

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:  # (L, E): a batch of one
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal needs attn_mask, as in nn.MultiheadAttention")
        mask = self._merged_mask(attn_mask, key_padding_mask, query)  # (B, H or 1, L, S) or None
        tgt, bsz, _ = query.shape
        h, d = self.num_heads, self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)

        def heads(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # (B, h, T, d)
            return F.linear(x, w, b).view(x.shape[0], bsz, h, d).permute(1, 2, 0, 3)

        q, k, v = heads(query, w_q, b_q), heads(key, w_k, b_k), heads(value, w_v, b_v)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        if mask is not None:
            scores = scores + (mask if mask.shape[1] == 1 else mask.index_select(1, self.kept))
        weights = scores.softmax(-1)
        dropped = F.dropout(weights, self.dropout) if self.training and self.dropout else weights
        out = (dropped @ v).permute(2, 0, 1, 3).reshape(tgt, bsz, h * d)  # (L, B, h * d)
        out = self.out_proj(out)
        out = out.squeeze(1) if unbatched else out.transpose(0, 1) if self.batch_first else out
        if not need_weights:
            return out, None
        weights = self._all_heads(weights, mask, key.shape[0])
        if average_attn_weights:
            weights = weights.mean(1)
        return out, weights.squeeze(0) if unbatched else weights

    def _merged_mask(
        self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, query: Tensor
    ) -> Tensor | None:
        """``attn_mask`` and ``key_padding_mask`` as one additive ``(B, H or 1, L, S)`` mask
        (``H``: the original heads, for a per-head mask)."""
        bsz = query.shape[1]
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, query.dtype)
            if mask.dim() == 2:
                mask = mask.view(1, 1, *mask.shape)
            else:  # (B * total_heads, L, S)
                mask = mask.view(bsz, self.total_heads, *mask.shape[-2:])
        if key_padding_mask is not None:
            pad = _additive(key_padding_mask, query.dtype).view(bsz, 1, 1, -1)
            mask = pad if mask is None else mask + pad
        return mask

    def _all_heads(self, weights: Tensor, mask: Tensor | None, src_len: int) -> Tensor:
        """The ``(B, total_heads, L, S)`` weights: the kept heads', and for each closed head
        the softmax of the mask alone (its scores are exactly zero)."""
        if self.num_heads == self.total_heads:
            return weights
        b, _, tgt, _ = weights.shape
        closed = torch.zeros(b, self.total_heads, tgt, src_len, dtype=weights.dtype,
                             device=weights.device)  # fmt: skip
        if mask is not None:
            closed = closed + mask
        full = closed.softmax(-1)
        return full.index_copy(1, self.kept, weights)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}/{self.total_heads}, head_dim={self.head_dim}, "
                f"batch_first={self.batch_first}")  # fmt: skip


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (``True``: not attended) as ``-inf``/0; an additive one as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf")
        )
    return mask.to(dtype)
