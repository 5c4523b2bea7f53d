"""Tree attention through FlexAttention: a `BlockMask` built from the layout's ancestor intervals
(the fallback on GPUs where appo's Triton kernel is not tuned, and a peer in the benchmarks)."""

from __future__ import annotations

import torch
from torch import Tensor

from appo_kernels._checks import int_arg


def block_mask_from_layout(layout, block_size: int = 128):
    from torch.nn.attention.flex_attention import BlockMask

    int_arg("block_size", block_size, low=1)
    n = layout.n_tokens
    dev = layout.device
    end = layout.subtree_end
    n_blocks = -(-n // block_size)
    padded = torch.full((n_blocks * block_size,), -1, dtype=end.dtype, device=dev)
    padded[:n] = end
    max_end = padded.view(n_blocks, block_size).amax(1)
    padded[n:] = torch.iinfo(end.dtype).max  # padding never lowers a block's minimum
    min_end = padded.view(n_blocks, block_size).amin(1)

    block = torch.arange(n_blocks, device=dev)
    q_first = block * block_size
    q_last = torch.clamp((block + 1) * block_size, max=n) - 1
    before = block[None, :] < block[:, None]  # [q block, k block]
    diagonal = torch.eye(n_blocks, dtype=torch.bool, device=dev)
    any_visible = (before & (max_end[None, :] >= q_first[:, None])) | diagonal
    # a diagonal tile is full only when it holds a single token (it then sees itself)
    single = (q_last == q_first)[:, None]
    all_visible = (before & (min_end[None, :] >= q_last[:, None])) | (diagonal & single)
    partial = any_visible & ~all_visible

    def as_lists(selected: Tensor):
        counts = selected.sum(1, dtype=torch.int32)
        # stable sort puts the selected key blocks first, in ascending order
        indices = torch.argsort((~selected).to(torch.int8), dim=1, stable=True).to(torch.int32)
        return counts[None, None], indices[None, None]

    def tree_mask(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx <= end[kv_idx])

    kv_num, kv_idx = as_lists(partial)
    full_num, full_idx = as_lists(all_visible)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                    mask_mod=tree_mask, seq_lengths=(n, n))


def flex_tree_attention(q: Tensor, k: Tensor, v: Tensor, layout, *, scale=None,
                        return_lse: bool = False, block_mask=None, compiled: bool | None = None):
    """`tree_attention` computed by FlexAttention (q [N, Hq, D], k/v [N, Hkv, D]).

    `block_mask` may be passed to reuse one across calls; `compiled` (default: on CUDA) runs
    FlexAttention through torch.compile, which it needs to be fast.
    """
    from torch.nn.attention.flex_attention import flex_attention

    if block_mask is None:
        block_mask = layout.to_block_mask()
    if compiled is None:
        compiled = q.is_cuda
    fn = _compiled_flex() if compiled else flex_attention
    lse_request = {}
    if return_lse:  # torch >= 2.9 asks for the lse through AuxRequest, older versions by a flag
        try:
            from torch.nn.attention.flex_attention import AuxRequest

            lse_request = {"return_aux": AuxRequest(lse=True)}
        except ImportError:
            lse_request = {"return_lse": True}
    out = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
             block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1],
             **lse_request)
    if return_lse:
        o, aux = out
        lse = aux.lse if hasattr(aux, "lse") else aux
        return o[0].transpose(0, 1), lse[0].float()
    return out[0].transpose(0, 1)


_COMPILED = None


def _compiled_flex():
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED
