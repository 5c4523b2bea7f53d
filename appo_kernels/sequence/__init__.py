"""Sequence ops over packed varlen sequences (docs/ops.md): scans, scores, selection, advantages."""

from appo_kernels.sequence.advantages import group_advantages, procedure_advantages
from appo_kernels.sequence.packing import pack, unpack
from appo_kernels.sequence.scan import discounted_suffix_sum, future_kl_scale, future_value
from appo_kernels.sequence.scores import BranchScores, branching_score
from appo_kernels.sequence.selection import VocabFlags, select_branch_points, vocab_flags

__all__ = [
    "BranchScores", "VocabFlags", "branching_score", "discounted_suffix_sum", "future_kl_scale",
    "future_value", "group_advantages", "pack", "procedure_advantages", "select_branch_points",
    "unpack", "vocab_flags",
]
