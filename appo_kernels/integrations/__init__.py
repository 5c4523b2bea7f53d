"""Adapters that plug appo_kernels into other libraries (docs/ops.md, transformers).

Each adapter lives in its own module and imports its library only there, so that
`import appo_kernels` never needs transformers, verl, TRL or OpenRLHF:

    from appo_kernels.integrations.transformers import enable_tree_attention
    from appo_kernels import tree_token_stats
"""
