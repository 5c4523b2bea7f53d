"""appo: the thin APPO trainer (SPEC §4) on top of `appo_kernels`."""

__version__ = "0.1.0"
