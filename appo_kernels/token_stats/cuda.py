"""CUDA backend of `token_stats`: glue between the custom op and the kernels in csrc/token_stats.cu.

Same signatures and return conventions as `reference.forward` / `reference.backward`. The logits are
passed to the kernels as strided rows (no copy for `logits[:, :-1]`); the small per-row tensors are
made contiguous with the dtypes the kernels read.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from appo_kernels._backend import _C
from appo_kernels._strides import row_view


def _flat(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.reshape(-1).to(dtype).contiguous()


def forward(logits, target, mask, inv_temperature, want_varentropy, want_top2):
    """Returns (logprob, entropy, lse, varentropy, top2_margin, row_max, log_norm) over rows;
    unrequested outputs are empty tensors."""
    view = row_view(logits)
    outs = _C.token_stats_fwd(
        view.tensor, _flat(target, torch.int64), _flat(mask, torch.bool), view.n_rows, view.inner,
        view.stride_outer, view.stride_inner, float(inv_temperature), bool(want_varentropy),
        bool(want_top2))
    wanted = (target is not None, True, True, want_varentropy, want_top2, True, True)
    lead = logits.shape[:-1]
    return tuple(out.reshape(lead) if w else out for out, w in zip(outs, wanted))


def backward(logits, target, mask, row_max, log_norm, entropy, g_logprob, g_entropy, g_lse,
             inv_temperature):
    """Gradient with respect to `logits` from upstream gradients of logprob, entropy and lse."""
    view = row_view(logits)
    grad = _C.token_stats_bwd(
        view.tensor, _flat(target, torch.int64), _flat(mask, torch.bool), view.n_rows, view.inner,
        view.stride_outer, view.stride_inner, _flat(row_max, torch.float32),
        _flat(log_norm, torch.float32), _flat(entropy, torch.float32),
        _flat(g_logprob, torch.float32), _flat(g_entropy, torch.float32),
        _flat(g_lse, torch.float32), float(inv_temperature))
    return grad.reshape(logits.shape)
