"""Hugging Face transformers: packed rollout trees through any `AttentionInterface` model.

Importing this module registers the attention function `"appo_tree"`. A model switched to it runs
one packed tree (docs/ops.md, tree attention) per forward, every shared prefix computed once:

    model = enable_tree_attention(model)              # or attn_implementation="appo_tree" at load
    layout, token_ids, paths = TreeLayout.from_sequences(seqs)
    logits = model(input_ids=token_ids[None], position_ids=layout.depth[None], appo_tree=layout,
                   use_cache=False).logits[0]
    stats = tree_token_stats(logits, layout, token_ids)    # appo_kernels.tree_token_stats

The layout travels as a keyword argument of the model call: transformers forwards unknown keyword
arguments of `forward` (its `TransformersKwargs`) down every decoder layer into the attention
function. `position_ids` must be `layout.depth`, so that rotary embeddings see each token at its
position in its own sequence. Models whose attention modules do not call
`ALL_ATTENTION_FUNCTIONS.get_interface` cannot use it (transformers refuses to switch them).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import torch
from torch import Tensor

from appo_kernels._checks import check_values
from appo_kernels.tree import TreeLayout, tree_attention, tree_token_stats  # noqa: F401

ATTN_IMPLEMENTATION = "appo_tree"
# tree attention on calls that pass the layout, sdpa on every other call (`enable_tree_or_sdpa`)
TREE_OR_SDPA = "appo_tree_or_sdpa"
_TREE_CALL = contextvars.ContextVar("appo_tree_call", default=False)
LAYOUT_KWARG = "appo_tree"
# attention variants of other model families that tree attention does not implement
UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux")

__all__ = ["ATTN_IMPLEMENTATION", "LAYOUT_KWARG", "TREE_OR_SDPA", "attention",
           "enable_tree_attention", "enable_tree_or_sdpa", "register", "tree_attention_forward",
           "tree_call", "tree_padding_mask", "tree_token_stats"]


def tree_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Optional[Tensor], scaling: Optional[float] = None,
                           dropout: float = 0.0, **kwargs) -> tuple[Tensor, None]:
    """The `"appo_tree"` attention function: query [1, Hq, N, D], key/value [1, Hkv, N, D] in the
    layout's order, the `TreeLayout` in `kwargs["appo_tree"]`; returns ([1, N, Hq, D], None).

    The tree is the mask: `attention_mask` must be None (`tree_padding_mask` has already refused
    a 2-D mask; a prepared 4-D one comes here). GQA is left to `tree_attention` (no repeated
    key/value heads).
    """
    layout = kwargs.get(LAYOUT_KWARG)
    if layout is None:
        raise ValueError(
            f'attn_implementation="{ATTN_IMPLEMENTATION}" needs the tree: call the model with '
            f"{LAYOUT_KWARG}=layout (a TreeLayout) and position_ids=layout.depth[None]")
    if not isinstance(layout, TreeLayout):
        raise TypeError(f"{LAYOUT_KWARG} must be a TreeLayout, got {type(layout).__name__}")
    if query.dim() != 4 or query.shape[0] != 1:
        raise ValueError(f"tree attention runs one packed tree: input_ids must have batch size 1 "
                         f"([1, N]), got query of shape {tuple(query.shape)}")
    if query.shape[2] != layout.n_tokens or key.shape[2] != layout.n_tokens:
        raise ValueError(
            f"the input has {query.shape[2]} tokens ({key.shape[2]} keys) but {LAYOUT_KWARG} has "
            f"{layout.n_tokens}: pass input_ids of the layout's tokens and use_cache=False")
    if attention_mask is not None:
        raise ValueError("tree attention takes its mask from the layout: pass attention_mask=None")
    if dropout > 0:
        raise ValueError(f"tree attention has no dropout, got dropout={dropout}: set "
                         f"config.attention_dropout = 0 (or call model.eval())")
    unsupported = [name for name in UNSUPPORTED_KWARGS if kwargs.get(name) is not None]
    if unsupported:
        raise NotImplementedError(f"tree attention does not support {unsupported} "
                                  f"({type(module).__name__})")
    position_ids = kwargs.get("position_ids")
    # a forgotten position_ids silently gives rotary positions 0..N-1: check once per forward
    if (position_ids is not None and getattr(module, "layer_idx", 0) == 0
            and check_values(position_ids)
            and not torch.equal(position_ids.reshape(-1), layout.depth.to(position_ids))):
        raise ValueError("position_ids must be layout.depth[None] (each token's position in its "
                         "own sequence)")
    device = query.device.type
    if torch.is_autocast_enabled(device):  # as sdpa under autocast: q, k, v in its dtype (rotary
        # embeddings can leave q and k in float32 next to a bfloat16 v)
        dtype = torch.get_autocast_dtype(device)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    # [1, H, N, D] -> [N, H, D]: a view (transformers keeps the projections' [N, H, D] memory)
    out = tree_attention(query[0].transpose(0, 1), key[0].transpose(0, 1),
                         value[0].transpose(0, 1), layout, scale=scaling)
    return out[None], None


def tree_padding_mask(*, attention_mask: Optional[Tensor] = None, **kwargs) -> None:
    """The `"appo_tree"` mask function, called once per forward: the layout is the mask, so it
    builds none, and refuses a padding mask rather than let it be dropped unseen."""
    if attention_mask is not None:
        raise ValueError("tree attention takes its mask from the layout: pass attention_mask=None")
    return None


def register() -> None:
    """Register `"appo_tree"` with transformers' `AttentionInterface` and
    `AttentionMaskInterface` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    # Never route trees through flash_attention_2: it infers packed sequences from position ids
    # (a reset to 0 starts a sequence), so branches would not see their shared prefix.
    AttentionInterface.register(ATTN_IMPLEMENTATION, tree_attention_forward)
    # without a mask function transformers would silently drop a 2-D attention_mask
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, tree_padding_mask)
    AttentionInterface.register(TREE_OR_SDPA, _tree_or_sdpa_attention)
    AttentionMaskInterface.register(TREE_OR_SDPA, _tree_or_sdpa_mask)


def _tree_or_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """Tree attention when the call carries the layout, else sdpa. Decided per call from the
    call's own arguments, so that gradient checkpointing's recomputation (which replays them)
    takes the same path as the forward."""
    if kwargs.get(LAYOUT_KWARG) is not None:
        return tree_attention_forward(module, query, key, value, attention_mask, **kwargs)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


def _tree_or_sdpa_mask(*args, **kwargs):
    """The tree's (no mask) inside `tree_call()`, else sdpa's."""
    if _TREE_CALL.get():
        return tree_padding_mask(*args, **kwargs)
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)


@contextlib.contextmanager
def tree_call():
    """Mark the model calls inside as tree calls for `TREE_OR_SDPA` models (the mask function
    runs before any layer sees the layout)."""
    token = _TREE_CALL.set(True)
    try:
        yield
    finally:
        _TREE_CALL.reset(token)


def enable_tree_or_sdpa(model) -> bool:
    """Switch a model that runs sdpa to `TREE_OR_SDPA`, for good: calls with `appo_tree=layout`
    (inside `tree_call()`) run tree attention, every other call sdpa as before. Unlike switching
    to "appo_tree" for a call and back, this survives gradient checkpointing, whose recomputation
    runs after the call has returned. Returns whether the model runs `TREE_OR_SDPA` (False for
    other attention implementations, or a model that cannot switch)."""
    name = model.config._attn_implementation
    if name == TREE_OR_SDPA:
        return True
    if name != "sdpa":
        return False
    register()
    try:
        model.set_attn_implementation(TREE_OR_SDPA)
    except (ValueError, NotImplementedError, AttributeError):
        return False
    if model.config._attn_implementation != TREE_OR_SDPA:
        model.set_attn_implementation(name)
        return False
    return True


def enable_tree_attention(model):
    """Switch a loaded `PreTrainedModel` (and its sub-models) to `"appo_tree"`; returns it.

    At load time `from_pretrained(path, attn_implementation="appo_tree")` does the same. The model
    then needs `appo_tree=layout` on every call; switch back with
    `model.set_attn_implementation("sdpa")` for generation.
    """
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise ValueError(f"{type(model).__name__} cannot switch its attention implementation "
                         f"(its attention does not use transformers' AttentionInterface)")
    return model


@contextlib.contextmanager
def attention(model, name: str):
    """Run `model` with attention implementation `name`, restoring the previous one after."""
    before = model.config._attn_implementation
    if name == ATTN_IMPLEMENTATION:
        register()
    if before != name:
        model.set_attn_implementation(name)
    try:
        yield model
    finally:
        if before != name:
            model.set_attn_implementation(before)


register()
