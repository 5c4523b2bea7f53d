"""Describing `[..., V]` tensors to kernels as rows without copying them."""

from __future__ import annotations

from typing import NamedTuple

import torch


class RowView(NamedTuple):
    """Row r of the tensor starts at `base + (r // inner) * stride_outer + (r % inner) * stride_inner`."""

    tensor: torch.Tensor
    n_rows: int
    inner: int
    stride_outer: int
    stride_inner: int


def row_view(x: torch.Tensor) -> RowView:
    """Collapse the leading dims of `x` (last dim stride 1) into at most two strided levels.

    `logits[:, :-1]` of a `[B, L, V]` tensor needs two levels; layouts that need more (rare) are
    copied once.
    """
    dims = []
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if dims and dims[-1][1] == size * stride:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    if len(dims) > 2:
        return row_view(x.contiguous())
    while len(dims) < 2:
        dims.insert(0, (1, 0))
    (outer, stride_outer), (inner, stride_inner) = dims
    return RowView(x, outer * inner, inner, stride_outer, stride_inner)
