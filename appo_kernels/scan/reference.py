"""Torch references for the sequence scans: the CPU implementation, in float64.

The segmented suffix scan is a log-step (Hillis–Steele) scan: after the step with offset d every
token holds the discounted sum of the next 2d tokens of its own sequence. ⌈log2 L⌉ vectorised
steps for the longest sequence L (one host sync to find it), no loop over tokens, and each token's
result depends only on its own sequence.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from appo_kernels.packing import token_segments

# modes of the fused scan (docs/ops.md, sequence ops)
SUM, FUTURE_VALUE, FUTURE_KL = 0, 1, 2
LOG_RATIO_CLAMP = 20.0  # docs/ops.md, sequence ops: log-ratios and Ω's exponent are clamped to ±20
SAFETY_CLAMP = (0.8, 1.0)  # future-KL factor where adv < 0 and the ratio exceeds safety_ratio


def suffix_scan(values: Tensor, cu_seqlens: Tensor, gamma: float) -> Tensor:
    """y_t = Σ_{k ≥ t, k in seq(t)} gamma^(k−t) · values_k, in the dtype of `values`."""
    n = values.numel()
    if n == 0:
        return values.clone()
    end = cu_seqlens[1:].long()[token_segments(cu_seqlens, n)]  # exclusive end of seq(t)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # ⌈log2 L⌉ steps, not ⌈log2 N⌉
    index = torch.arange(n, device=values.device)
    y = values
    step = 1
    while step < longest:
        source = index + step
        inside = source < end
        y = y + torch.where(inside, (gamma ** step) * y[source.clamp(max=n - 1)], 0.0)
        step *= 2
    return y


def scan_op(x, old, mask, adv, cu_seqlens, mode, gamma, lo, hi, log_clip_c, log_safety):
    """The fused op of `appo_kernels.scan` in float64; returns float32 `[N]`."""
    x64 = x.double()
    keep = torch.ones_like(x64, dtype=torch.bool) if mask is None else mask
    if mode == SUM:
        values = torch.where(keep, x64, 0.0)
    else:
        log_ratio = x64 - old.double()
        if mode == FUTURE_KL:
            log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
            keep = keep & (log_ratio <= log_clip_c)
        values = torch.where(keep, log_ratio, 0.0)
    y = suffix_scan(values, cu_seqlens, gamma)
    if mode == FUTURE_VALUE:
        y = y.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp().clamp(lo, hi)
    elif mode == FUTURE_KL:
        y = y.exp().clamp(lo, hi)
        risky = (adv < 0) & (log_ratio > log_safety)
        y = torch.where(risky, y.clamp(*SAFETY_CLAMP), y)
    return y.float()


def log_or_inf(value: float) -> float:
    return math.log(value) if value > 0 else -math.inf


def branching_score(entropy, omega, cu_seqlens, mask, eps):
    """z(entropy)·z(omega) with per-sequence population mean/std over the masked tokens; a factor
    whose masked values are all equal in a sequence is replaced by 1 there (the score falls back
    to the other factor), and both by 0 when both are flat."""
    n = entropy.numel()
    seg = token_segments(cu_seqlens, n)
    n_seqs = cu_seqlens.numel() - 1
    keep = torch.ones(n, dtype=torch.bool, device=entropy.device) if mask is None else mask
    count = torch.zeros(n_seqs, dtype=torch.float64, device=entropy.device)
    count.index_add_(0, seg, keep.double())

    def zscore(x):
        x = x.double()
        total = torch.zeros_like(count).index_add_(0, seg, torch.where(keep, x, 0.0))
        mean = (total / count.clamp_min(1))[seg]
        centred = torch.where(keep, x - mean, 0.0)
        var = torch.zeros_like(count).index_add_(0, seg, centred * centred) / count.clamp_min(1)
        high = torch.full_like(count, -math.inf).scatter_reduce(
            0, seg, torch.where(keep, x, -math.inf), "amax")
        low = torch.full_like(count, math.inf).scatter_reduce(
            0, seg, torch.where(keep, x, math.inf), "amin")
        return (x - mean) / (var.sqrt()[seg] + eps), (~(high > low))[seg]

    (z_entropy, flat_entropy), (z_omega, flat_omega) = zscore(entropy), zscore(omega)
    one = torch.ones_like(z_entropy)
    z_entropy = torch.where(flat_entropy, torch.where(flat_omega, 0.0, one), z_entropy)
    z_omega = torch.where(flat_omega, torch.where(flat_entropy, 0.0, one), z_omega)
    score = torch.where(keep, z_entropy * z_omega, 0.0).float()
    strict = keep & (z_entropy > 0) & (z_omega > 0)
    return score, strict
