"""appo: the thin APPO trainer (docs/training.md) on top of `appo_kernels`."""

__version__ = "0.1.0"
