"""Suffix scans over packed sequences (docs/ops.md): `discounted_suffix_sum`, the future value Ω
and the future-KL advantage scaling, in O(N) instead of the reference code's O(L²) decay matrix.

All three are one custom op (`appo::suffix_scan`) whose kernel fuses the per-token work before the
scan (log-ratio, clamps, masks) and after it (exp and clips).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from appo_kernels import _backend
from appo_kernels._checks import FLOAT_DTYPES, bool_arg, cu_seqlens_arg, float_arg, tensor_arg
from appo_kernels.scan.reference import FUTURE_KL, FUTURE_VALUE, SUM, log_or_inf

FUTURE_KL_GAMMA = 2 ** (-1 / 64)  # APPO's default discount of the future-KL scan


def _impl(device: torch.device):
    if _backend.family_backend(device) == "triton":
        from appo_kernels.scan import triton as impl
    else:
        from appo_kernels.scan import reference as impl
    return impl


@torch.library.custom_op("appo::suffix_scan", mutates_args=())
def _suffix_scan_op(
    x: Tensor, old: Optional[Tensor], mask: Optional[Tensor], adv: Optional[Tensor],
    cu_seqlens: Tensor, mode: int, gamma: float, lo: float, hi: float, log_clip_c: float,
    log_safety: float,
) -> Tensor:
    return _impl(x.device).scan_op(x, old, mask, adv, cu_seqlens, mode, gamma, lo, hi,
                                   log_clip_c, log_safety)


@_suffix_scan_op.register_fake
def _(x, old, mask, adv, cu_seqlens, mode, gamma, lo, hi, log_clip_c, log_safety):
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


def _reverse_segments(cu_seqlens: Tensor, n_tokens: int) -> Tensor:
    # offsets of the same sequences once the packed array is flipped end to end
    return (n_tokens - cu_seqlens).flip(0)


def _setup_context(ctx, inputs, output):
    _, _, mask, _, cu_seqlens, mode, gamma, *_ = inputs
    ctx.save_for_backward(mask, cu_seqlens)
    ctx.mode, ctx.gamma = mode, gamma


def _backward(ctx, grad_y):
    # y = S·(m ⊙ x) with S the segmented suffix sum, so ∂L/∂x = m ⊙ Sᵀ g, and Sᵀ (a discounted
    # prefix sum) is the suffix sum of the flipped array.
    if ctx.mode != SUM:
        raise RuntimeError("future_value and future_kl_scale are not differentiable")
    mask, cu_seqlens = ctx.saved_tensors
    n = grad_y.numel()
    flipped = _suffix_scan_op(grad_y.flip(0).float(), None, None, None,
                              _reverse_segments(cu_seqlens, n), SUM, ctx.gamma,
                              -math.inf, math.inf, math.inf, math.inf)
    grad_x = flipped.flip(0)
    if mask is not None:
        grad_x = torch.where(mask, grad_x, 0.0)
    return grad_x, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("appo::suffix_scan", _backward, setup_context=_setup_context)


def _check_gamma(gamma) -> float:
    return float_arg("gamma", gamma, low=0.0, high=1.0)


def _check_tokens(cu_seqlens, validate, **tensors) -> Tensor:
    """The named per-token tensors are `[N]` float (bool for `mask`) on one device."""
    first_name, first = next(iter(tensors.items()))
    tensor_arg(first_name, first, dtypes=FLOAT_DTYPES, ndim=1)
    for name, t in tensors.items():
        dtypes = (torch.bool,) if name == "mask" else FLOAT_DTYPES
        tensor_arg(name, t, dtypes=dtypes, shape=first.shape, like=first,
                   optional=name == "mask")
    cu_seqlens_arg(cu_seqlens, first.shape[0], like=first, validate=validate)
    return first


def _check_clip(name: str, clip) -> tuple[float, float]:
    if clip is None:
        return -math.inf, math.inf
    if not isinstance(clip, (tuple, list)) or len(clip) != 2:
        raise TypeError(f"{name} must be a (low, high) pair of floats or None, got {clip!r}")
    lo, hi = (float_arg(f"{name}[{i}]", c, finite=False) for i, c in enumerate(clip))
    if not lo <= hi:
        raise ValueError(f"{name} must have low <= high, got {clip!r}")
    return lo, hi


def discounted_suffix_sum(x: Tensor, cu_seqlens: Tensor, gamma: float,
                          mask: Optional[Tensor] = None, *, validate: bool = False) -> Tensor:
    """y_t = Σ_{k ≥ t, k in seq(t)} gamma^(k−t) · m_k · x_k, float32 `[N]`.

    `x [N]` float, `cu_seqlens [S+1]`, `mask [N]` bool or None (all ones); any gamma in [0, 1].
    Differentiable with respect to `x`.
    """
    _check_tokens(cu_seqlens, validate, x=x, mask=mask)
    gamma = _check_gamma(gamma)
    return _suffix_scan_op(x, None, mask, None, cu_seqlens, SUM, gamma, -math.inf, math.inf,
                           math.inf, math.inf)


def future_value(logprob: Tensor, old_logprob: Tensor, cu_seqlens: Tensor, *, gamma: float = 1.0,
                 mask: Optional[Tensor] = None, clip=(0.8, 1.2),
                 validate: bool = False) -> Tensor:
    """APPO's future value Ω, float32 `[N]` (not differentiable):
    Ω_t = clamp(exp(clamp(S_t, −20, 20)), *clip), S = discounted_suffix_sum(logprob − old_logprob).
    `clip=None` leaves exp(S) unclipped."""
    _check_tokens(cu_seqlens, validate, logprob=logprob, old_logprob=old_logprob, mask=mask)
    gamma = _check_gamma(gamma)
    lo, hi = _check_clip("clip", clip)
    return _suffix_scan_op(logprob.detach(), old_logprob.detach(), mask, None, cu_seqlens,
                           FUTURE_VALUE, gamma, lo, hi, math.inf, math.inf)


def future_kl_scale(adv_tok: Tensor, logprob: Tensor, old_logprob: Tensor, cu_seqlens: Tensor,
                    mask: Tensor, *, gamma: float = FUTURE_KL_GAMMA, weight: float = 1.0,
                    clip: float = 0.2, high_only: bool = True, clip_c: float = 3.0,
                    safety_ratio: float = 6.0, validate: bool = False) -> Tensor:
    """APPO's future-aware advantage scaling: `adv_tok · (1 + weight · f)` (docs/ops.md).

    d_k = clamp(logprob_k − old_k, −20, 20); keep_k = mask_k & (d_k ≤ log clip_c);
    F_t = Σ_{k≥t} gamma^(k−t) keep_k d_k; f_t = clamp(exp(F_t), 1 if high_only else 1 − clip,
    1 + clip), and f_t = clamp(f_t, 0.8, 1.0) where adv_t < 0 and exp(d_t) > safety_ratio.
    f carries no gradient; the result is differentiable with respect to `adv_tok`.
    """
    # logprob first: it is the reference shape, so a wrong adv_tok is named as such
    _check_tokens(cu_seqlens, validate, logprob=logprob, old_logprob=old_logprob,
                  adv_tok=adv_tok, mask=mask)
    tensor_arg("mask", mask, dtypes=(torch.bool,))
    gamma = _check_gamma(gamma)
    weight = float_arg("weight", weight)
    high_only = bool_arg("high_only", high_only)
    clip = float_arg("clip", clip, low=0.0)
    clip_c = float_arg("clip_c", clip_c, low=0.0, finite=False)
    safety_ratio = float_arg("safety_ratio", safety_ratio, low=0.0, finite=False)
    lo = 1.0 if high_only else 1.0 - clip
    factor = _suffix_scan_op(logprob.detach(), old_logprob.detach(), mask, adv_tok.detach(),
                             cu_seqlens, FUTURE_KL, gamma, lo, 1.0 + clip, log_or_inf(clip_c),
                             log_or_inf(safety_ratio))
    return adv_tok * (1.0 + weight * factor)


# ----------------------------------------------------------------------------------------------
# the branching score

Z_EPS = 1e-6  # docs/ops.md, sequence ops: z(x) = (x − mean) / (std + 1e-6)


class BranchScores(NamedTuple):
    score: Tensor  # float32 [N]: z(entropy)·z(omega) (see branching_score); 0 where mask is False
    strict: Tensor  # bool [N]: mask & z(entropy) > 0 & z(omega) > 0


@torch.library.custom_op("appo::branching_score", mutates_args=())
def _branching_score_op(entropy: Tensor, omega: Tensor, cu_seqlens: Tensor,
                        mask: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    return _impl(entropy.device).branching_score(entropy, omega, cu_seqlens, mask, eps)


@_branching_score_op.register_fake
def _(entropy, omega, cu_seqlens, mask, eps):
    return (torch.empty(entropy.shape, dtype=torch.float32, device=entropy.device),
            torch.empty(entropy.shape, dtype=torch.bool, device=entropy.device))


def branching_score(entropy: Tensor, omega: Tensor, cu_seqlens: Tensor,
                    mask: Optional[Tensor] = None, *, validate: bool = False) -> BranchScores:
    """score = z(entropy)·z(omega), strict = mask & (z(entropy) > 0) & (z(omega) > 0).

    z(x)_t = (x_t − mean_s x) / (std_s x + 1e-6), with the population mean and std over the
    masked tokens of sequence s. Where one factor's masked values are all equal in a sequence
    (Ω clipped at a bound, a one-token turn) it says nothing about where to branch: it is
    replaced by 1 there, so the score falls back to the other factor (score = z of the other,
    strict = its z > 0); where both are flat, both are 0. Tokens outside the mask get score 0
    and strict False. Not differentiable (a selection criterion).
    """
    _check_tokens(cu_seqlens, validate, entropy=entropy, omega=omega, mask=mask)
    score, strict = _branching_score_op(entropy.detach(), omega.detach(), cu_seqlens, mask, Z_EPS)
    return BranchScores(score, strict)
