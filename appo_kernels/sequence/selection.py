"""Deprecated import path (kept for one release): `appo_kernels.selection`."""

from appo_kernels.selection import select_branch_points  # noqa: F401

from appo_kernels.vocab import VocabFlags, vocab_flags  # noqa: F401
