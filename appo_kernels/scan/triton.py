"""Triton kernel for the segmented reverse discounted scan, fused with what Ω and the future-KL
factor compute before and after it (docs/ops.md, sequence ops).

One program per sequence walks it from the end in chunks of BLOCK tokens. Lane j of a chunk holds
token hi − 1 − j, so a forward `associative_scan` over lanes is the reverse scan over tokens; it
composes the affine maps y ↦ v + γ·y, and the chunk's result is B + A·carry, carry being the value
at the first token after the chunk. O(N) work; a token's result depends only on its sequence.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from appo_kernels._backend import new_output
from appo_kernels.scan.reference import (FUTURE_KL, FUTURE_VALUE, LOG_RATIO_CLAMP,
                                             SAFETY_CLAMP, SUM)

BLOCK_TOKENS = 1024


@triton.jit
def _compose(a_first, b_first, a_next, b_next):
    # apply (a_first, b_first) then (a_next, b_next): y ↦ b_next + a_next·(b_first + a_first·y)
    return a_first * a_next, b_next + a_next * b_first


@triton.jit
def _suffix_scan_kernel(
    x_ptr, old_ptr, mask_ptr, adv_ptr, cu_ptr, out_ptr,
    gamma, lo, hi, log_clip_c, log_safety,
    MODE: tl.constexpr, HAS_MASK: tl.constexpr, RATIO_CLAMP: tl.constexpr,
    SAFE_LO: tl.constexpr, SAFE_HI: tl.constexpr, BLOCK: tl.constexpr,
):
    seq = tl.program_id(0)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    end = tl.load(cu_ptr + seq + 1).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    carry = tl.zeros([], tl.float32)
    for done in range(0, end - start, BLOCK):
        tok = end - 1 - done - lanes
        inside = tok >= start
        x = tl.load(x_ptr + tok, mask=inside, other=0.0).to(tl.float32)
        keep = inside
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + tok, mask=inside, other=0) != 0)
        if MODE == 0:
            v = x
        else:
            d = x - tl.load(old_ptr + tok, mask=inside, other=0.0).to(tl.float32)
            if MODE == 2:
                d = tl.minimum(tl.maximum(d, -RATIO_CLAMP), RATIO_CLAMP)
                keep = keep & (d <= log_clip_c)
            v = d
        v = tl.where(keep, v, 0.0)
        a = tl.where(inside, gamma, 1.0)  # lanes past the sequence start are the identity map
        acc_a, acc_b = tl.associative_scan((a, v), 0, _compose)
        y = acc_b + acc_a * carry
        carry = tl.sum(tl.where(lanes == BLOCK - 1, y, 0.0), 0)
        if MODE == 1:
            y = tl.exp(tl.minimum(tl.maximum(y, -RATIO_CLAMP), RATIO_CLAMP))
            y = tl.minimum(tl.maximum(y, lo), hi)
        if MODE == 2:
            y = tl.minimum(tl.maximum(tl.exp(y), lo), hi)
            adv = tl.load(adv_ptr + tok, mask=inside, other=0.0).to(tl.float32)
            risky = (adv < 0) & (d > log_safety)
            y = tl.where(risky, tl.minimum(tl.maximum(y, SAFE_LO), SAFE_HI), y)
        tl.store(out_ptr + tok, y, mask=inside)


def scan_op(x, old, mask, adv, cu_seqlens, mode, gamma, lo, hi, log_clip_c, log_safety):
    out = new_output(x.shape, torch.float32, x.device)
    n_seqs = cu_seqlens.numel() - 1
    if n_seqs == 0 or x.numel() == 0:
        return out
    keep = None if mask is None else mask.contiguous().view(torch.uint8)
    _suffix_scan_kernel[(n_seqs,)](
        x.contiguous(), None if old is None else old.contiguous(), keep,
        None if adv is None else adv.contiguous(), cu_seqlens.contiguous(), out,
        float(gamma), float(lo), float(hi), float(log_clip_c), float(log_safety),
        MODE=mode, HAS_MASK=keep is not None, RATIO_CLAMP=LOG_RATIO_CLAMP,
        SAFE_LO=SAFETY_CLAMP[0], SAFE_HI=SAFETY_CLAMP[1], BLOCK=BLOCK_TOKENS, num_warps=4,
    )
    return out


assert (SUM, FUTURE_VALUE, FUTURE_KL) == (0, 1, 2)  # the kernel branches on these literals


@triton.jit
def _load_tokens(x_ptr, mask_ptr, tok, end, HAS_MASK: tl.constexpr):
    """x at tokens `tok` (float32, 0 outside [.., end) and where the mask is off), and the mask."""
    keep = tok < end
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + tok, mask=tok < end, other=0) != 0)
    return tl.load(x_ptr + tok, mask=keep, other=0.0).to(tl.float32), keep


@triton.jit
def _masked_moments(x_ptr, mask_ptr, start, end, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """Population mean and std of x over the masked tokens of [start, end) (two passes), and
    whether those values are all equal (no masked token counts as all equal)."""
    lanes = tl.arange(0, BLOCK)
    count = tl.zeros([], tl.float32)
    total = tl.zeros([], tl.float32)
    high = tl.full([], float("-inf"), tl.float32)
    low = tl.full([], float("inf"), tl.float32)
    for first in range(start, end, BLOCK):
        x, keep = _load_tokens(x_ptr, mask_ptr, first + lanes, end, HAS_MASK)
        count += tl.sum(keep.to(tl.float32), 0)
        total += tl.sum(x, 0)
        high = tl.maximum(high, tl.max(tl.where(keep, x, float("-inf")), 0))
        low = tl.minimum(low, tl.min(tl.where(keep, x, float("inf")), 0))
    mean = total / tl.maximum(count, 1.0)
    sq = tl.zeros([], tl.float32)
    for first in range(start, end, BLOCK):
        x, keep = _load_tokens(x_ptr, mask_ptr, first + lanes, end, HAS_MASK)
        centred = tl.where(keep, x - mean, 0.0)
        sq += tl.sum(centred * centred, 0)
    return mean, tl.sqrt(sq / tl.maximum(count, 1.0)), high <= low


@triton.jit
def _branching_score_kernel(
    entropy_ptr, omega_ptr, mask_ptr, cu_ptr, score_ptr, strict_ptr, eps,
    HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    seq = tl.program_id(0)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    end = tl.load(cu_ptr + seq + 1).to(tl.int64)
    mean_e, std_e, flat_e = _masked_moments(entropy_ptr, mask_ptr, start, end, HAS_MASK, BLOCK)
    mean_o, std_o, flat_o = _masked_moments(omega_ptr, mask_ptr, start, end, HAS_MASK, BLOCK)
    # a flat factor becomes 1 (the score falls back to the other), both flat become 0
    fill_e = tl.where(flat_o, 0.0, 1.0)
    fill_o = tl.where(flat_e, 0.0, 1.0)
    lanes = tl.arange(0, BLOCK)
    for first in range(start, end, BLOCK):
        tok = first + lanes
        entropy, keep = _load_tokens(entropy_ptr, mask_ptr, tok, end, HAS_MASK)
        omega, _ = _load_tokens(omega_ptr, mask_ptr, tok, end, HAS_MASK)
        z_e = tl.where(flat_e, fill_e, (entropy - mean_e) / (std_e + eps))
        z_o = tl.where(flat_o, fill_o, (omega - mean_o) / (std_o + eps))
        tl.store(score_ptr + tok, tl.where(keep, z_e * z_o, 0.0), mask=tok < end)
        tl.store(strict_ptr + tok, (keep & (z_e > 0) & (z_o > 0)).to(tl.uint8), mask=tok < end)


def branching_score(entropy, omega, cu_seqlens, mask, eps):
    n = entropy.numel()
    score = new_output((n,), torch.float32, entropy.device)
    strict = torch.empty(n, dtype=torch.uint8, device=entropy.device)
    n_seqs = cu_seqlens.numel() - 1
    if n_seqs and n:
        keep = None if mask is None else mask.contiguous().view(torch.uint8)
        _branching_score_kernel[(n_seqs,)](
            entropy.contiguous(), omega.contiguous(), keep, cu_seqlens.contiguous(), score,
            strict, float(eps), HAS_MASK=keep is not None, BLOCK=BLOCK_TOKENS, num_warps=4,
        )
    return score, strict.view(torch.bool)
