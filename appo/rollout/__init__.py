"""Rollouts: the engine interface (`base`), the tool-call text protocol (`format`), tools, the tool
loop the engines share (`toolloop`), and the engines (`hf`, `vllm`). Importing this package imports
neither torch nor transformers."""
