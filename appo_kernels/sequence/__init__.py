"""Deprecated import path (kept for one release): the sequence ops moved into the rooms of
docs/architecture.md: `appo_kernels.scan` (discounted_suffix_sum, future_value, future_kl_scale,
branching_score), `appo_kernels.advantages`, `appo_kernels.selection`, `appo_kernels.vocab` and
`appo_kernels.packing`. Import them from `appo_kernels`."""

import warnings

from appo_kernels.advantages import group_advantages, procedure_advantages
from appo_kernels.packing import pack, unpack
from appo_kernels.scan import (BranchScores, branching_score, discounted_suffix_sum,
                               future_kl_scale, future_value)
from appo_kernels.selection import select_branch_points
from appo_kernels.vocab import VocabFlags, vocab_flags

warnings.warn("appo_kernels.sequence is deprecated: import these ops from appo_kernels "
              "(docs/architecture.md)", DeprecationWarning, stacklevel=2)

__all__ = [
    "BranchScores", "VocabFlags", "branching_score", "discounted_suffix_sum", "future_kl_scale",
    "future_value", "group_advantages", "pack", "procedure_advantages", "select_branch_points",
    "unpack", "vocab_flags",
]
