"""Advantages (docs/ops.md; docs/algorithm.md): group-normalised sequence advantages (GRPO, and
APPO's
dual groups) and APPO's procedure credit, which gives every token of a rollout the mean advantage
of the branches that split from it at or after that token.

Both are per-group / per-sequence reductions done with index_add over dense ids and one segmented
suffix scan (`discounted_suffix_sum` with gamma = 1): O(S) and O(N + branches), no Python loops.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from appo_kernels._checks import (FLOAT_DTYPES, INDEX_DTYPES, check_values, cu_seqlens_arg,
                                  float_arg, int_arg, tensor_arg)
from appo_kernels._groups import dense_group_ids
from appo_kernels.packing import token_segments
from appo_kernels.scan import discounted_suffix_sum

GROUP_EPS = 1e-6  # verl's / TRL's epsilon in (R − mean) / (std + eps)


def group_advantages(rewards: Tensor, group_ids: Tensor, *, eps: float = GROUP_EPS,
                     normalize_std: bool = True, unbiased: bool = False) -> Tensor:
    """GRPO advantages: `(R − mean_g R) / (std_g R + eps)` within each group, float32 `[S]`.

    Args:
        rewards: float `[S]`, one scalar reward per sequence.
        group_ids: int32/int64 `[S]`, any integers (not necessarily contiguous or sorted);
            sequences with equal ids form a group.
        eps: added to the std, > 0 (a uniform group has std 0 and gets 0).
        normalize_std: divide by `std + eps` (GRPO); False gives `R − mean` (Dr. GRPO).
        unbiased: the std divides by n − 1 (verl's `torch.std`, TRL's) instead of n (the default,
            the population std: √(n/(n − 1)) smaller, ×1.22 at n = 3).

    A singleton group gets 0. Means and deviations are taken in float64 (rewards of 1e8 and 1e8 + 8
    differ exactly), the result is float32 (float64 for float64 rewards, for gradcheck). No
    device sync.
    """
    tensor_arg("rewards", rewards, dtypes=FLOAT_DTYPES, ndim=1)
    tensor_arg("group_ids", group_ids, dtypes=INDEX_DTYPES, shape=rewards.shape, like=rewards)
    float_arg("eps", eps, low=0.0, low_open=True)
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.double()
    group = dense_group_ids(group_ids)
    buffer = torch.zeros(r.shape[0], dtype=torch.float64, device=r.device)  # a slot per group
    count = buffer.index_add(0, group, torch.ones_like(r))
    mean = buffer.index_add(0, group, r) / count.clamp_min(1)
    centred = r - mean[group]
    if not isinstance(unbiased, bool):
        raise TypeError(f"unbiased must be a bool, got {type(unbiased).__name__}")
    if normalize_std:
        # two passes (mean, then squared deviations): no cancellation for large rewards
        var = buffer.index_add(0, group, centred * centred) / (count - int(unbiased)).clamp_min(1)
        centred = centred / (var.sqrt()[group] + eps)
    return torch.where(count[group] > 1, centred, 0.0).to(dtype)


def _check_branches(seq_adv, cu_seqlens, branch_parent, branch_position, branch_adv, n_tokens,
                    validate) -> int:
    tensor_arg("seq_adv", seq_adv, dtypes=FLOAT_DTYPES, ndim=1)
    n_seqs = seq_adv.shape[0]
    tensor_arg("cu_seqlens", cu_seqlens, dtypes=INDEX_DTYPES, ndim=1, like=seq_adv)
    if cu_seqlens.shape[0] != n_seqs + 1:
        raise ValueError(f"cu_seqlens must have S+1 = {n_seqs + 1} entries for the S = {n_seqs} "
                         f"sequences of seq_adv, got {cu_seqlens.shape[0]}")
    if n_tokens is None:
        n_tokens = int(cu_seqlens[-1])  # host sync: the output size
    else:
        int_arg("n_tokens", n_tokens, low=0)
    cu_seqlens_arg(cu_seqlens, n_tokens, like=seq_adv, validate=validate)
    tensor_arg("branch_parent", branch_parent, dtypes=INDEX_DTYPES, ndim=1, like=seq_adv)
    tensor_arg("branch_position", branch_position, dtypes=INDEX_DTYPES,
               shape=branch_parent.shape, like=seq_adv)
    tensor_arg("branch_adv", branch_adv, dtypes=FLOAT_DTYPES, shape=branch_parent.shape,
               like=seq_adv)
    if branch_parent.numel() and check_values(branch_parent, validate):
        parent = branch_parent.detach().cpu().long()
        bad = (parent < 0) | (parent >= n_seqs)
        if bad.any():
            b = int(bad.nonzero()[0])
            raise ValueError(f"branch_parent[{b}] = {int(parent[b])} is not a sequence index in "
                             f"[0, {n_seqs})")
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).detach().cpu().long()[parent]
        position = branch_position.detach().cpu().long()
        bad = (position < 0) | (position >= lengths)
        if bad.any():
            b = int(bad.nonzero()[0])
            raise ValueError(f"branch_position[{b}] = {int(position[b])} is outside its parent "
                             f"sequence {int(parent[b])}, of length {int(lengths[b])}")
    return n_tokens


def procedure_advantages(seq_adv: Tensor, cu_seqlens: Tensor, branch_parent: Tensor,
                         branch_position: Tensor, branch_adv: Tensor, *,
                         n_tokens: Optional[int] = None, validate: bool = False) -> Tensor:
    """APPO's procedure credit: per-token advantages of the packed rollouts, float32 `[N]`.

    For token t of sequence r:
        adv_tok[t] = seq_adv[r] + mean{ branch_adv[b] : branch_parent[b] = r,
                                                        branch_position[b] ≥ t }
    where the mean over an empty set adds nothing. Branch sums and counts are scattered to the
    packed index `cu_seqlens[r] + position` and suffix-summed within each sequence: O(N + B).

    Args:
        seq_adv: float `[S]`, each rollout's own advantage (e.g. `group_advantages` of the init
            group).
        cu_seqlens: int32/int64 `[S+1]` offsets of the packed rollouts.
        branch_parent: int32/int64 `[B]`, the rollout each branch split from, in [0, S).
        branch_position: int32/int64 `[B]`, the split position relative to the parent's start,
            in [0, len(parent)) (the token kept in the branch's prefix).
        branch_adv: float `[B]`, each branch's advantage.
        n_tokens: N, the number of packed tokens; when None it is read from `cu_seqlens[-1]`,
            a device sync on GPU.
        validate: check `cu_seqlens`, parents and positions on the GPU too (a device sync); on
            CPU they are always checked.

    Not differentiable (advantages are targets). Within a sequence, branches at the same
    position are summed in an unspecified order on GPU (atomics).
    """
    n_tokens = _check_branches(seq_adv, cu_seqlens, branch_parent, branch_position, branch_adv,
                               n_tokens, validate)
    device = seq_adv.device
    packed_index = cu_seqlens.long()[branch_parent.long()] + branch_position.long()
    # branch sums in slots [0, N), branch counts in [N, 2N): one scan over 2S sequences
    slots = torch.zeros(2 * n_tokens, dtype=torch.float32, device=device)
    slots.index_add_(0, packed_index, branch_adv.detach().float())
    slots.index_add_(0, packed_index + n_tokens,
                     torch.ones(packed_index.shape, dtype=torch.float32, device=device))
    both = torch.cat([cu_seqlens, cu_seqlens[1:] + n_tokens])
    # totals over the branches at positions >= t of t's own sequence
    later = discounted_suffix_sum(slots, both, 1.0, validate=validate)
    later_sum, later_count = later[:n_tokens], later[n_tokens:]
    branch_mean = torch.where(later_count > 0, later_sum / later_count.clamp_min(1), 0.0)
    return seq_adv.detach().float()[token_segments(cu_seqlens, n_tokens)] + branch_mean
