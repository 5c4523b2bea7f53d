"""Deprecated import path (kept for one release): `appo_kernels.advantages`."""

from appo_kernels.advantages import group_advantages, procedure_advantages  # noqa: F401
