"""Deprecated import path (kept for one release): `appo_kernels.scan`."""

from appo_kernels.scan import discounted_suffix_sum, future_kl_scale, future_value  # noqa: F401
