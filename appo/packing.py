"""Deprecated import path (kept for one release): the training pass over packed trees is
`appo.forward`."""

import warnings

from appo.forward import *  # noqa: F401,F403
from appo.forward import micro_batches, response_token_stats, tree_size  # noqa: F401

warnings.warn("appo.packing is deprecated: use appo.forward", DeprecationWarning, stacklevel=2)
