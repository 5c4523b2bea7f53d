"""Packed varlen layout: per-token values of S sequences in one `[N]` tensor plus `cu_seqlens [S+1]`
(the FlashAttention varlen convention), and conversion from/to padded `[B, L]` tensors."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from appo_kernels._checks import cu_seqlens_arg, tensor_arg


def pack(x: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """`x [B, L, ...]`, `attention_mask [B, L]` (bool or 0/1; left or right padding) ->
    `(flat [N, ...], cu_seqlens int32 [B+1])`, tokens kept in order.

    The output size depends on the mask: this syncs with the device once.
    """
    tensor_arg("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have shape [B, L, ...], got {tuple(x.shape)}")
    tensor_arg("attention_mask", attention_mask, shape=x.shape[:2], like=x)
    keep = attention_mask.bool()
    lengths = keep.sum(dim=1)
    cu_seqlens = torch.zeros(x.shape[0] + 1, dtype=torch.int32, device=x.device)
    cu_seqlens[1:] = lengths.cumsum(0)
    return x[keep], cu_seqlens


def unpack(flat: Tensor, cu_seqlens: Tensor, pad: float = 0.0, *,
           attention_mask: Optional[Tensor] = None) -> Tensor:
    """Inverse of `pack`. With `attention_mask` the tokens go back to exactly where `pack` took
    them from (any padding side); without it the result is right-padded `[S, max_len, ...]`
    (finding max_len syncs with the device)."""
    tensor_arg("flat", flat)
    if flat.dim() < 1:
        raise ValueError(f"flat must have shape [N, ...], got {tuple(flat.shape)}")
    n_seqs = cu_seqlens_arg(cu_seqlens, flat.shape[0], like=flat)
    if attention_mask is not None:
        tensor_arg("attention_mask", attention_mask, ndim=2, like=flat)
        keep = attention_mask.bool()
        if keep.shape[0] != n_seqs:
            raise ValueError(f"attention_mask has {keep.shape[0]} rows but cu_seqlens describes "
                             f"{n_seqs} sequences")
        out = flat.new_full((*keep.shape, *flat.shape[1:]), pad)
        out[keep] = flat
        return out
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    max_len = int(lengths.max()) if n_seqs else 0
    positions = torch.arange(max_len, device=flat.device)
    keep = positions[None, :] < lengths[:, None]
    out = flat.new_full((n_seqs, max_len, *flat.shape[1:]), pad)
    out[keep] = flat
    return out


def token_segments(cu_seqlens: Tensor, n_tokens: int) -> Tensor:
    """Sequence index of every packed token, int64 `[N]`, without a device sync."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seqs = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(seqs, lengths, output_size=n_tokens)
