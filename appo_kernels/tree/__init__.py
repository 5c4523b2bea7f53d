"""Tree attention over packed rollout trees (docs/ops.md): every shared prefix computed once."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from appo_kernels import _backend
from appo_kernels._checks import float_arg, tensor_arg
from appo_kernels.tree.flex import flex_tree_attention
from appo_kernels.tree.layout import TreeLayout
from appo_kernels.tree.stats import (tree_linear_token_stats,  # noqa: F401 (public)
                                     tree_token_stats)

ATTN_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

__all__ = ["TreeLayout", "flex_tree_attention", "tree_attention"]


def _impl(backend: str):
    """The module of `backend`: forward, backward and metadata(layout) (cached in layout.cache)."""
    if backend == "triton":
        from appo_kernels.tree import triton as impl
    else:
        from appo_kernels.tree import reference as impl
    return impl


def _select_backend(dtype: Optional[torch.dtype], device: torch.device) -> str:
    return _backend.family_backend(device, dtype)


@torch.library.custom_op("appo::tree_attention", mutates_args=())
def _tree_attention_op(q: Tensor, k: Tensor, v: Tensor, subtree_end: Tensor, meta: list[Tensor],
                       scale: float, deterministic: bool, backend: str) -> tuple[Tensor, Tensor]:
    return _impl(backend).forward(q, k, v, subtree_end, meta, scale)


@_tree_attention_op.register_fake
def _(q, k, v, subtree_end, meta, scale, deterministic, backend):
    out = q.new_empty(q.shape[:2] + v.shape[2:])
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out, q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype)


@torch.library.custom_op("appo::tree_attention_backward", mutates_args=())
def _tree_attention_backward_op(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor,
    grad_lse: Optional[Tensor], subtree_end: Tensor, meta: list[Tensor], scale: float,
    deterministic: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _impl(backend).backward(q, k, v, out, lse, grad_out, grad_lse, subtree_end, meta,
                                   scale, deterministic)


@_tree_attention_backward_op.register_fake
def _(q, k, v, out, lse, grad_out, grad_lse, subtree_end, meta, scale, deterministic, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, subtree_end, meta, scale, deterministic, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, subtree_end, *meta)
    ctx.scale, ctx.deterministic, ctx.backend = scale, deterministic, backend
    ctx.set_materialize_grads(False)  # an lse nobody used arrives as None, not as zeros


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, subtree_end, *meta = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
    dq, dk, dv = _tree_attention_backward_op(
        q, k, v, out, lse, grad_out, grad_lse, subtree_end, list(meta), ctx.scale,
        ctx.deterministic, ctx.backend)
    return dq, dk, dv, None, [None] * len(meta), None, None, None


torch.library.register_autograd("appo::tree_attention", _backward, setup_context=_setup_context)


def _check_attention_args(q, k, v, layout, scale):
    if not isinstance(layout, TreeLayout):
        raise TypeError(f"layout must be a TreeLayout, got {type(layout).__name__}")
    tensor_arg("q", q, dtypes=ATTN_DTYPES, ndim=3)
    tensor_arg("k", k, dtypes=(q.dtype,), ndim=3, like=q)
    tensor_arg("v", v, dtypes=(q.dtype,), ndim=3, like=q)
    n, n_heads, head_dim = q.shape
    if head_dim == 0 or n_heads == 0:
        raise ValueError(f"q must have at least one head of dimension >= 1, got shape "
                         f"{tuple(q.shape)} [N, Hq, D]")
    if k.shape != (n, k.shape[1], head_dim) or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"k and v must have shape [N, Hkv, D] with q's N = {n} and D = "
                         f"{head_dim}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] == 0 or n_heads % k.shape[1]:
        raise ValueError(f"q's heads ({n_heads}) must be a multiple of k's heads ({k.shape[1]})")
    if n != layout.n_tokens:
        raise ValueError(f"q has {n} tokens but layout has {layout.n_tokens}")
    if layout.device != q.device:
        raise ValueError(f"layout is on {layout.device} but q is on {q.device}: use layout.to()")
    if scale is not None:
        float_arg("scale", scale)


def tree_attention(q: Tensor, k: Tensor, v: Tensor, layout: TreeLayout, *,
                   scale: Optional[float] = None, return_lse: bool = False,
                   deterministic: bool = False):
    """Attention where token i sees exactly itself and its ancestors in `layout`.

    q [N, Hq, D], k/v [N, Hkv, D] (Hq a multiple of Hkv: GQA), packed in the layout's order.
    scale defaults to 1/sqrt(D). Returns o [N, Hq, Dv] (and lse float32 [Hq, N] with
    `return_lse`). Differentiable with respect to q, k and v; `deterministic=True` makes the
    backward bitwise reproducible (no atomics).
    """
    _check_attention_args(q, k, v, layout, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backend = _select_backend(q.dtype, q.device)
    if torch.compiler.is_compiling() and backend not in layout.cache:
        raise RuntimeError(f"tree_attention under torch.compile needs the layout's {backend} "
                           f"metadata built first: call layout.prepare({q.dtype}) outside the "
                           f"compiled code")
    meta = _impl(backend).metadata(layout)
    out, lse = _tree_attention_op(q, k, v, layout.subtree_end, meta, scale, deterministic,
                                  backend)
    return (out, lse) if return_lse else out
