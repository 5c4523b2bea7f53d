"""Grouping by arbitrary integer ids (prompt ids, seeds, hashes) without `torch.unique`, whose
data-dependent output size would sync with the device."""

from __future__ import annotations

import torch
from torch import Tensor


def dense_group_ids(ids: Tensor) -> Tensor:
    """Renumber integer ids `[S]` as 0, 1, ... in ascending id order, int64 `[S]`.

    Equal ids get equal numbers; the largest number is (number of distinct ids) − 1 < S, so
    per-group buffers of size S always fit. No device sync.
    """
    if ids.numel() == 0:
        return ids.long()
    sorted_ids, order = torch.sort(ids, stable=True)
    starts_group = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts_group[1:] = sorted_ids[1:] != sorted_ids[:-1]
    dense = torch.empty_like(order)
    dense[order] = starts_group.long().cumsum(0) - 1
    return dense
