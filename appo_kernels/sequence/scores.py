"""APPO's branching score (docs/ops.md): where the policy is both uncertain (high entropy) and
about to move (high future value Ω), relative to the rest of its own sequence."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from appo_kernels import _backend
from appo_kernels.sequence import reference
from appo_kernels.sequence.scan import _check_tokens

Z_EPS = 1e-6  # docs/ops.md, sequence ops: z(x) = (x − mean) / (std + 1e-6)


class BranchScores(NamedTuple):
    score: Tensor  # float32 [N]: z(entropy)·z(omega) (see branching_score); 0 where mask is False
    strict: Tensor  # bool [N]: mask & z(entropy) > 0 & z(omega) > 0


@torch.library.custom_op("appo::branching_score", mutates_args=())
def _branching_score_op(entropy: Tensor, omega: Tensor, cu_seqlens: Tensor,
                        mask: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    if _backend.select(entropy.device, has_cuda_kernel=False) == "triton":
        from appo_kernels.sequence import triton as impl
    else:
        impl = reference
    return impl.branching_score(entropy, omega, cu_seqlens, mask, eps)


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
