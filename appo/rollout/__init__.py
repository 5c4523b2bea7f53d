"""Rollouts: the engine interface (`base`), the tool-call protocols (`protocol`: appo's tags and
chat models' own format; `format` holds the tags), tools, the tool loop the engines share
(`toolloop`), the engines (`hf`, `vllm`) and their registry (`engines`). Importing this package
imports neither torch nor transformers."""
