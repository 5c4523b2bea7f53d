"""Deprecated import path (kept for one release): `appo_kernels.packing`."""

from appo_kernels.packing import pack, token_segments, unpack  # noqa: F401
