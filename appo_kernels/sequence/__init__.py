"""Sequence ops over packed varlen sequences (SPEC §2.3): scans, scores, selection, advantages."""

from appo_kernels.sequence.packing import pack, unpack
from appo_kernels.sequence.scan import discounted_suffix_sum, future_kl_scale, future_value
from appo_kernels.sequence.scores import BranchScores, branching_score

__all__ = ["BranchScores", "branching_score", "discounted_suffix_sum", "future_kl_scale", "future_value", "pack", "unpack"]
