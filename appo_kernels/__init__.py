"""appo_kernels: trainer-agnostic GPU ops for agentic RL with branched rollouts (see SPEC §2)."""

from appo_kernels._backend import backend_info
from appo_kernels.token_stats import TokenStats, token_stats

__all__ = ["TokenStats", "backend_info", "token_stats"]
__version__ = "0.1.0"
