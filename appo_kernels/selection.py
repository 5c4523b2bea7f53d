"""Choosing where to branch (docs/ops.md; docs/algorithm.md): `select_branch_points`. The
candidates usually leave out whitespace-only tokens (`appo_kernels.vocab.vocab_flags`).

Selection is sorting: candidates are ordered by the composite key (group, tier, −score, packed
index) with two stable sorts, each group's candidates then sit in one contiguous run, and the k-th
pick of a group is entry `k mod count` of its run. No loop over tokens or groups.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from appo_kernels._checks import FLOAT_DTYPES, INDEX_DTYPES, cu_seqlens_arg, int_arg, tensor_arg
from appo_kernels._groups import dense_group_ids
from appo_kernels.packing import token_segments

PER_MODES = ("group", "sequence")
TIERS = 2  # tier 0: strict and eligible; tier 1: the other eligible positions


def _check_selection_args(score, strict, eligible, cu_seqlens, seq_group, budget, per,
                          validate) -> int:
    tensor_arg("score", score, dtypes=FLOAT_DTYPES, ndim=1)
    tensor_arg("strict", strict, dtypes=(torch.bool,), shape=score.shape, like=score)
    tensor_arg("eligible", eligible, dtypes=(torch.bool,), shape=score.shape, like=score)
    n_seqs = cu_seqlens_arg(cu_seqlens, score.shape[0], like=score, validate=validate)
    if per not in PER_MODES:
        raise ValueError(f"per must be one of {PER_MODES}, got {per!r}")
    tensor_arg("seq_group", seq_group, dtypes=INDEX_DTYPES, shape=(n_seqs,), like=score,
               optional=per == "sequence")
    int_arg("budget", budget, low=0)
    return n_seqs


def select_branch_points(
    score: Tensor,
    strict: Tensor,
    eligible: Tensor,
    cu_seqlens: Tensor,
    seq_group: Optional[Tensor],
    budget: int,
    *,
    per: str = "group",
    validate: bool = False,
) -> tuple[Tensor, Tensor]:
    """Pick `budget` branch points per group of sequences (APPO's branching step).

    Within each group the positions are ranked: first those that are `strict` and `eligible`, by
    descending `score`; then the other `eligible` positions, by descending `score`; ties break by
    (sequence, position) ascending, and a NaN score ranks as −inf. The group takes the first
    `budget` of that ranking; when it has fewer candidates than `budget` the ranking is repeated
    cyclically (a position may be chosen several times). A group with no eligible position yields
    nothing.

    Args:
        score: float `[N]` packed branching scores (`branching_score(...).score`).
        strict: bool `[N]`, positions preferred first (`branching_score(...).strict`).
        eligible: bool `[N]`, the candidates, typically `mask & ~is_whitespace[token_ids]`.
        cu_seqlens: int32/int64 `[S+1]` offsets of the S packed sequences.
        seq_group: int32/int64 `[S]`, the group (prompt id) of every sequence: any integers, not
            necessarily contiguous or sorted. Ignored (may be None) with `per="sequence"`.
        budget: branch points per group, a Python int >= 0.
        per: "group", or "sequence" to make every sequence its own group (the APPO paper's
            variant, B points per rollout).
        validate: check `cu_seqlens` values on the GPU too (a device sync).

    Returns:
        `(seq_index, position)`, int64 `[M]` with M = budget × (groups with a candidate): the
        sequence of each pick and its position relative to the sequence start. Ordered by group
        (ascending `seq_group` id, or sequence index with `per="sequence"`), then by rank.

    The output size depends on the data, so this op syncs with the device (twice: to gather the
    candidates and to size the output). Not traceable by torch.compile.
    """
    n_seqs = _check_selection_args(score, strict, eligible, cu_seqlens, seq_group, budget, per,
                                   validate)
    device = score.device
    if per == "sequence":
        group_of_seq = torch.arange(n_seqs, device=device)
    else:
        group_of_seq = dense_group_ids(seq_group)
    seq_of_token = token_segments(cu_seqlens, score.shape[0])

    candidates = eligible.nonzero().squeeze(1)  # host sync: the number of candidates
    cand_seq = seq_of_token[candidates]
    cand_group = group_of_seq[cand_seq]
    cand_score = score[candidates]
    cand_score = torch.where(cand_score.isnan(), -torch.inf, cand_score)
    cand_key = cand_group * TIERS + (~strict[candidates]).long()

    # Stable sorts, least significant key first: candidates start in packed order, which is the
    # (sequence, position) tie-break; then descending score; then (group, tier).
    order = torch.sort(cand_score, descending=True, stable=True).indices
    order = order[torch.sort(cand_key[order], stable=True).indices]

    # Every group's candidates are one contiguous run of `order`: its start and length.
    count = torch.zeros(n_seqs, dtype=torch.long, device=device)
    count.index_add_(0, cand_group, torch.ones_like(cand_group))
    run_start = count.cumsum(0) - count
    with_candidates = (count > 0).nonzero().squeeze(1)  # host sync: the output size

    pick_group = with_candidates.repeat_interleave(budget)
    rank = torch.arange(budget, device=device).repeat(with_candidates.numel())
    # cycling through the run repeats the chosen positions until the budget is spent
    picks = order[run_start[pick_group] + rank % count[pick_group]]
    seq_index = cand_seq[picks]
    position = candidates[picks] - cu_seqlens.long()[seq_index]
    return seq_index, position
