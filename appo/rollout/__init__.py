"""Rollouts: the engine interface (`base`), the tool-call text protocol (`format`), tools, and the
engines (`hf`). Importing this package imports neither torch nor transformers."""
