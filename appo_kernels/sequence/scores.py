"""Deprecated import path (kept for one release): `appo_kernels.scan`."""

from appo_kernels.scan import BranchScores, branching_score  # noqa: F401
