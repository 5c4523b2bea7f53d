"""appo_kernels: trainer-agnostic GPU ops for agentic RL with branched rollouts (see
docs/ops.md)."""

from appo_kernels._backend import backend_info
from appo_kernels.advantages import group_advantages, procedure_advantages
from appo_kernels.losses import kl_penalty, policy_loss
from appo_kernels.packing import pack, unpack
from appo_kernels.scan import (BranchScores, branching_score, discounted_suffix_sum,
                               future_kl_scale, future_value)
from appo_kernels.selection import select_branch_points
from appo_kernels.token_stats import TokenStats, token_stats
from appo_kernels.token_stats.linear import linear_token_stats
from appo_kernels.tree import (TreeLayout, flex_tree_attention, tree_attention,
                               tree_linear_token_stats, tree_token_stats)
from appo_kernels.vocab import VocabFlags, vocab_flags

__all__ = [
    "BranchScores", "TokenStats", "TreeLayout", "VocabFlags", "backend_info", "branching_score",
    "discounted_suffix_sum", "flex_tree_attention", "future_kl_scale", "future_value",
    "group_advantages", "kl_penalty", "linear_token_stats", "pack", "policy_loss",
    "procedure_advantages", "select_branch_points", "token_stats", "tree_attention",
    "tree_linear_token_stats", "tree_token_stats", "unpack", "vocab_flags",
]
__version__ = "0.1.0"
