"""Triton kernels for `tree_attention` (docs/ops.md): flash attention over the tree's ancestor
intervals, so every shared prefix is read once per query tile and never duplicated.

Query tiles never straddle a chain segment (a maximal run with parent[t] = t − 1). Inside a
segment attention is causal, and all its queries share the ancestors outside it, which form a few
contiguous key intervals, one per ancestor segment s': [start(s'), last ancestor in s']. The
forward (and the deterministic dq kernel) walk, per query tile: those intervals (every key visible
to every row, no mask but the interval's end), then the segment's keys before the tile (all
visible), then the tile's diagonal block (causal mask). Softmax is online, in base 2, with fp32
accumulators.

Backward: key j is seen exactly by the queries [j, subtree_end[j]], so a key tile [k0, k1) has
the one contiguous query range [k0, max subtree_end over the tile]; the dk/dv kernel walks it with
the per-element mask j ≤ i ≤ subtree_end[j], summing over the query heads of a GQA group, and
adds dq through fp32 atomics, or, with `deterministic`, leaves dq to a kernel that walks the
forward's intervals (no atomics: bitwise reproducible).

Batch invariance: query tiles start at segment starts and key tiles at tree roots, and a tile's
key or query blocks start at interval, segment or tile starts, so a tree's results do not depend
on the other trees of a forest or on where it sits in the packing. Block sizes depend only on the
head dim and the dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from appo_kernels._backend import new_output, triton_interpret
from appo_kernels.tree.layout import TreeLayout, _depths, _kth_ancestor, _ragged_ranks

NEG_INF: tl.constexpr = float("-inf")
LOG2E: tl.constexpr = 1.4426950408889634  # softmax runs in base 2: exp(x) = exp2(x·log2 e)
LN2: tl.constexpr = 0.6931471805599453
TILE = 128  # tokens per query tile (forward, dq) and per key tile (dk/dv): the metadata's unit
MAX_HEAD_DIM = 256
DELTA_BLOCK_T = 64  # tokens per program of the delta preprocess
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


class _Blocks(NamedTuple):
    """Rows per step of each kernel. Each divides TILE, and fwd_m, dq_m are multiples of fwd_n,
    dq_n, so a query block's causal part is whole key blocks (the masks make any size correct)."""

    fwd_m: int
    fwd_n: int
    dkdv_m: int  # queries per step
    dkdv_n: int  # keys held by one program at a time
    dq_m: int
    dq_n: int
    num_warps: int
    num_stages: int


# By bytes of one head row of the inputs (padded head dim × element size), for H100 (228 KB of
# shared memory, 255 registers a thread): the fp32 accumulators (forward: BLOCK_M × D; dk/dv:
# 2 × BLOCK_N × D; dq: BLOCK_M × D) and the BLOCK_M × BLOCK_N score blocks must fit in registers.
_BLOCKS_BY_ROW_BYTES = {
    256: _Blocks(128, 64, 32, 128, 128, 32, num_warps=8, num_stages=2),  # 16-bit D ≤ 128
    512: _Blocks(64, 32, 32, 64, 64, 32, num_warps=8, num_stages=1),  # 16-bit D 256, fp32 D 128
    1024: _Blocks(64, 32, 32, 32, 32, 32, num_warps=8, num_stages=1),  # fp32 D = 256
}


class _Config(NamedTuple):
    blocks: _Blocks
    block_d: int
    dot_dtype: tl.dtype
    precision: str


def _config(head_dim: int, dtype: torch.dtype) -> _Config:
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"the Triton tree_attention supports head dims up to {MAX_HEAD_DIM}, "
                         f"got {head_dim}")
    block_d = max(16, triton.next_power_of_2(head_dim))
    # the interpreter computes in numpy, which has no bfloat16: feed tl.dot float32 there
    dot_dtype = tl.float32 if triton_interpret() else _TL_DTYPES[dtype]
    row_bytes = max(256, block_d * dtype.itemsize)  # the GPU's blocks, in the interpreter too
    # fp32 inputs: three TF32 products give fp32 accuracy on tensor cores
    precision = "tf32x3" if dtype == torch.float32 else "tf32"
    return _Config(_BLOCKS_BY_ROW_BYTES[row_bytes], block_d, dot_dtype, precision)


# ------------------------------------------------------------------------------------------------
# metadata: tile lists, computed once per layout with vectorised torch ops


def _tiles(starts: Tensor, ends: Tensor, tile: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split every range [starts[g], ends[g]) into tiles of `tile` tokens: (owner g, lo, hi)."""
    owner, rank = _ragged_ranks(torch.div(ends - starts + tile - 1, tile, rounding_mode="floor"))
    lo = starts[owner] + rank * tile
    return owner, lo, torch.minimum(lo + tile, ends[owner])


def _query_tiles(layout: TreeLayout, tile: int) -> tuple[Tensor, Tensor]:
    """Forward query tiles [T, 5] int32 (q_lo, q_hi, segment start, first and end interval) and
    the ancestor intervals [I + 1, 2] int32 (lo, hi) of every segment, root-most first."""
    n, parent, dev = layout.n_tokens, layout.parent, layout.device
    starts = layout.segment_starts()
    ends = torch.cat([starts[1:], starts.new_full((1,), n)])
    is_start = torch.zeros(n, dtype=torch.long, device=dev)
    is_start[starts] = 1
    segment_of = torch.cumsum(is_start, 0) - 1
    head_parent = parent[starts]
    segment_parent = torch.where(head_parent >= 0, segment_of[head_parent.clamp_min(0)], -1)
    n_ancestors = _depths(segment_parent)  # ancestor segments of each segment

    # interval r of segment g covers ancestor segment a at distance d = depth(g) − r, from its
    # start to the parent of the chain's head one level below (at distance d − 1)
    segment, rank = _ragged_ranks(n_ancestors)
    below = _kth_ancestor(segment_parent, segment, n_ancestors[segment] - rank - 1)
    lo = starts[segment_parent[below]]
    hi = parent[starts[below]] + 1
    sentinel = lo.new_zeros((1, 2))  # never read; keeps the tensor non-empty for every launcher
    intervals = torch.cat([torch.stack([lo, hi], 1), sentinel])

    segment, q_lo, q_hi = _tiles(starts, ends, tile)
    first = (torch.cumsum(n_ancestors, 0) - n_ancestors)[segment]
    tiles = torch.stack([q_lo, q_hi, starts[segment], first, first + n_ancestors[segment]], 1)
    keys_seen = layout.depth[q_hi - 1] + 1  # the tile's last query sees the most keys
    order = torch.argsort(keys_seen, descending=True, stable=True)  # longest tiles start first
    return tiles[order].int().contiguous(), intervals.int().contiguous()


def _key_tiles(layout: TreeLayout, tile: int) -> Tensor:
    """Backward key tiles [K, 2] int32 (k0, k1), aligned to tree roots."""
    n, dev = layout.n_tokens, layout.device
    index = torch.arange(n, device=dev)
    roots = index[layout.parent < 0]
    _, k0, k1 = _tiles(roots, torch.cat([roots[1:], roots.new_full((1,), n)]), tile)
    tile_start = torch.zeros(n, dtype=torch.long, device=dev)
    tile_start[k0] = 1
    last_query = torch.full_like(k0, -1).scatter_reduce(
        0, torch.cumsum(tile_start, 0) - 1, layout.subtree_end, "amax")
    order = torch.argsort(last_query - k0, descending=True, stable=True)
    return torch.stack([k0, k1], 1)[order].int().contiguous()


def metadata(layout: TreeLayout) -> list[Tensor]:
    """[query tiles, ancestor intervals, key tiles] for `layout`, cached in layout.cache."""
    cache = layout.cache.setdefault("triton", {})
    if TILE not in cache:
        cache[TILE] = [*_query_tiles(layout, TILE), _key_tiles(layout, TILE)]
    return cache[TILE]


# ------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_keys(acc, l_i, m_i, q, offs_m, k_ptr, v_ptr, stride_kn, stride_vn, offs_d, d_mask,
              lo, hi, qk_scale, DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr,
              DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax of the query rows over keys [lo, hi): all visible, or causal (DIAGONAL)."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        in_range = offs_n < hi
        kv_mask = in_range[:, None] & d_mask[None, :]
        rows = offs_n.to(tl.int64)[:, None]
        k = tl.load(k_ptr + rows * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * qk_scale
        visible = in_range[None, :]
        if DIAGONAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(visible, s, NEG_INF)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)  # no −inf − (−inf) for rows seeing nothing
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + rows * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc * alpha[:, None],
                     input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_rows(first, stop, d_mask, BLOCK_M: tl.constexpr):
    """Query rows [first, first + BLOCK_M) cut at `stop`: indices, row mask, [rows, D] mask and
    int64 row offsets."""
    offs_m = first + tl.arange(0, BLOCK_M)
    row_mask = offs_m < stop
    return offs_m, row_mask, row_mask[:, None] & d_mask[None, :], offs_m.to(tl.int64)[:, None]


@triton.jit
def _load_rows(ptr, rows, head, stride_n, stride_h, offs_d, io_mask, DOT_DTYPE: tl.constexpr):
    return tl.load(ptr + rows * stride_n + head * stride_h + offs_d[None, :], mask=io_mask,
                   other=0.0).to(DOT_DTYPE)


@triton.jit
def _query_tile(tiles_ptr, n_heads, GROUP: tl.constexpr):
    """This program's query head, its key head (GQA) and its tile's row of the tile list."""
    # heads vary fastest: the longest tiles (first in the list) start first for every head, and
    # the query heads of a GQA group run side by side on the same keys
    tile = tl.program_id(0) // n_heads
    head = tl.program_id(0) % n_heads
    row = tiles_ptr + tile * 5
    return (head, head // GROUP, tl.load(row), tl.load(row + 1), tl.load(row + 2),
            tl.load(row + 3), tl.load(row + 4))


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, tiles_ptr, intervals_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    n_tokens, n_heads, head_dim, qk_scale,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    head, kv_head, q_lo, q_hi, seg_start, iv_first, iv_end = _query_tile(tiles_ptr, n_heads,
                                                                         GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_vh
    for sub in range(q_lo, q_hi, BLOCK_M):
        offs_m, row_mask, io_mask, rows = _query_rows(sub, q_hi, d_mask, BLOCK_M)
        q = _load_rows(q_ptr, rows, head, stride_qn, stride_qh, offs_d, io_mask, DOT_DTYPE)
        m_i = tl.full([BLOCK_M], NEG_INF, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for iv in range(iv_first, iv_end):  # ancestors outside the segment, root-most first
            lo = tl.load(intervals_ptr + iv * 2)
            hi = tl.load(intervals_ptr + iv * 2 + 1)
            acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, offs_m, k_head, v_head, stride_kn,
                                      stride_vn, offs_d, d_mask, lo, hi, qk_scale, False,
                                      BLOCK_N, DOT_DTYPE, PRECISION)
        # the segment before this block: every key precedes every row
        acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, offs_m, k_head, v_head, stride_kn, stride_vn,
                                  offs_d, d_mask, seg_start, sub, qk_scale, False, BLOCK_N,
                                  DOT_DTYPE, PRECISION)
        acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, offs_m, k_head, v_head, stride_kn, stride_vn,
                                  offs_d, d_mask, sub, tl.minimum(sub + BLOCK_M, q_hi), qk_scale,
                                  True, BLOCK_N, DOT_DTYPE, PRECISION)
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) * LN2, NEG_INF)
        tl.store(out_ptr + rows * stride_on + head * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=io_mask)
        tl.store(lse_ptr + head * n_tokens + offs_m, lse, mask=row_mask)


def _row_major(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def forward(q, k, v, subtree_end, meta, scale):
    """out [N, Hq, D] in q's dtype and lse float32 [Hq, N]."""
    q, k, v = _row_major(q), _row_major(k), _row_major(v)
    n, n_heads, head_dim = q.shape
    cfg = _config(head_dim, q.dtype)
    tiles, intervals, _ = meta
    out = new_output((n, n_heads, head_dim), q.dtype, q.device)
    lse = new_output((n_heads, n), torch.float32, q.device)
    grid = (tiles.shape[0] * n_heads,)
    _fwd_kernel[grid](
        q, k, v, out, lse, tiles, intervals,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), n, n_heads, head_dim, scale * LOG2E,
        GROUP=n_heads // k.shape[1], BLOCK_M=cfg.blocks.fwd_m, BLOCK_N=cfg.blocks.fwd_n,
        BLOCK_D=cfg.block_d, DOT_DTYPE=cfg.dot_dtype, PRECISION=cfg.precision,
        num_warps=cfg.blocks.num_warps, num_stages=cfg.blocks.num_stages,
    )
    return out, lse


# ------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _delta_kernel(out_ptr, do_ptr, dlse_ptr, delta_ptr, stride_on, stride_oh, stride_dn,
                  stride_dh, n_tokens, head_dim,
                  HAS_DLSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # dS = P ⊙ (dP − delta) with delta = rowsum(dO ⊙ O) − dlse, since ∂lse/∂S = P
    head = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_mask = offs_t < n_tokens
    mask = t_mask[:, None] & (offs_d < head_dim)[None, :]
    rows = offs_t.to(tl.int64)[:, None]
    o = tl.load(out_ptr + rows * stride_on + head * stride_oh + offs_d[None, :], mask=mask,
                other=0.0).to(tl.float32)
    do = tl.load(do_ptr + rows * stride_dn + head * stride_dh + offs_d[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + head * n_tokens + offs_t, mask=t_mask, other=0.0)
    tl.store(delta_ptr + head * n_tokens + offs_t, delta, mask=t_mask)


@triton.jit
def _dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, end_ptr, dk_ptr, dv_ptr, dq_ptr, tiles_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_dn, stride_dh,
    stride_dkn, stride_dkh, stride_dvn, stride_dvh, stride_dqn, stride_dqh,
    n_tokens, n_kv_heads, head_dim, qk_scale, scale,
    GROUP: tl.constexpr, ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0) // n_kv_heads
    kv_head = tl.program_id(0) % n_kv_heads
    k0 = tl.load(tiles_ptr + tile * 2)
    k1 = tl.load(tiles_ptr + tile * 2 + 1)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    for kk in range(k0, k1, BLOCK_N):  # key blocks of the tile (one, unless D is large)
        offs_n = kk + tl.arange(0, BLOCK_N)
        key_mask = offs_n < k1
        kv_mask = key_mask[:, None] & d_mask[None, :]
        keys = offs_n.to(tl.int64)[:, None]
        k = tl.load(k_ptr + keys * stride_kn + kv_head * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0).to(DOT_DTYPE)
        v = tl.load(v_ptr + keys * stride_vn + kv_head * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0).to(DOT_DTYPE)
        end = tl.load(end_ptr + offs_n, mask=key_mask, other=-1).to(tl.int32)
        q_stop = tl.max(end, 0) + 1  # the keys' subtrees: one contiguous query range
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for g in range(GROUP):  # the query heads that read this key head
            head = kv_head * GROUP + g
            for start in range(kk, q_stop, BLOCK_M):
                offs_m, row_mask, io_mask, rows = _query_rows(start, q_stop, d_mask, BLOCK_M)
                q = _load_rows(q_ptr, rows, head, stride_qn, stride_qh, offs_d, io_mask,
                               DOT_DTYPE)
                do = _load_rows(do_ptr, rows, head, stride_dn, stride_dh, offs_d, io_mask,
                                DOT_DTYPE)
                lse = tl.load(lse_ptr + head * n_tokens + offs_m, mask=row_mask, other=0.0)
                delta = tl.load(delta_ptr + head * n_tokens + offs_m, mask=row_mask, other=0.0)
                s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
                visible = (offs_n[:, None] <= offs_m[None, :]) & (offs_m[None, :] <= end[:, None])
                p_t = tl.where(visible, tl.exp2(s_t - lse[None, :] * LOG2E), 0.0)
                dv = tl.dot(p_t.to(DOT_DTYPE), do, dv, input_precision=PRECISION)
                dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                ds_t = p_t * (dp_t - delta[None, :])
                dk = tl.dot(ds_t.to(DOT_DTYPE), q, dk, input_precision=PRECISION)
                if ATOMIC_DQ:
                    dq = tl.dot(tl.trans(ds_t.to(DOT_DTYPE)), k, input_precision=PRECISION)
                    tl.atomic_add(dq_ptr + rows * stride_dqn + head * stride_dqh + offs_d[None, :],
                                  dq * scale, mask=io_mask, sem="relaxed")
        tl.store(dk_ptr + keys * stride_dkn + kv_head * stride_dkh + offs_d[None, :],
                 (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptr + keys * stride_dvn + kv_head * stride_dvh + offs_d[None, :],
                 dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_keys(dq, q, do, lse, delta, offs_m, k_ptr, v_ptr, stride_kn, stride_vn, offs_d, d_mask,
             lo, hi, qk_scale, DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr,
             DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """dq of the query rows from keys [lo, hi): all visible, or causal (DIAGONAL)."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        in_range = offs_n < hi
        kv_mask = in_range[:, None] & d_mask[None, :]
        rows = offs_n.to(tl.int64)[:, None]
        k = tl.load(k_ptr + rows * stride_kn + offs_d[None, :], mask=kv_mask,
                    other=0.0).to(DOT_DTYPE)
        v = tl.load(v_ptr + rows * stride_vn + offs_d[None, :], mask=kv_mask,
                    other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = in_range[None, :]
        if DIAGONAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(DOT_DTYPE), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, tiles_ptr, intervals_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_dn, stride_dh,
    stride_dqn, stride_dqh, n_tokens, n_heads, head_dim, qk_scale, scale,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    # the forward's walk over a query tile's keys, accumulating dS·K instead of P·V
    head, kv_head, q_lo, q_hi, seg_start, iv_first, iv_end = _query_tile(tiles_ptr, n_heads,
                                                                         GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_vh
    for sub in range(q_lo, q_hi, BLOCK_M):
        offs_m, row_mask, io_mask, rows = _query_rows(sub, q_hi, d_mask, BLOCK_M)
        q = _load_rows(q_ptr, rows, head, stride_qn, stride_qh, offs_d, io_mask, DOT_DTYPE)
        do = _load_rows(do_ptr, rows, head, stride_dn, stride_dh, offs_d, io_mask, DOT_DTYPE)
        lse = tl.load(lse_ptr + head * n_tokens + offs_m, mask=row_mask, other=0.0) * LOG2E
        delta = tl.load(delta_ptr + head * n_tokens + offs_m, mask=row_mask, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for iv in range(iv_first, iv_end):
            lo = tl.load(intervals_ptr + iv * 2)
            hi = tl.load(intervals_ptr + iv * 2 + 1)
            dq = _dq_keys(dq, q, do, lse, delta, offs_m, k_head, v_head, stride_kn, stride_vn,
                          offs_d, d_mask, lo, hi, qk_scale, False, BLOCK_N, DOT_DTYPE, PRECISION)
        dq = _dq_keys(dq, q, do, lse, delta, offs_m, k_head, v_head, stride_kn, stride_vn, offs_d,
                      d_mask, seg_start, sub, qk_scale, False, BLOCK_N, DOT_DTYPE, PRECISION)
        dq = _dq_keys(dq, q, do, lse, delta, offs_m, k_head, v_head, stride_kn, stride_vn, offs_d,
                      d_mask, sub, tl.minimum(sub + BLOCK_M, q_hi), qk_scale, True, BLOCK_N,
                      DOT_DTYPE, PRECISION)
        tl.store(dq_ptr + rows * stride_dqn + head * stride_dqh + offs_d[None, :],
                 (dq * scale).to(dq_ptr.dtype.element_ty), mask=io_mask)


def backward(q, k, v, out, lse, grad_out, grad_lse, subtree_end, meta, scale, deterministic):
    """dq, dk, dv in the input dtypes, from upstream gradients of out and (optionally) lse."""
    q, k, v = _row_major(q), _row_major(k), _row_major(v)
    out, grad_out = _row_major(out), _row_major(grad_out)
    n, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    cfg = _config(head_dim, q.dtype)
    blocks = cfg.blocks
    q_tiles, intervals, k_tiles = meta
    dev = q.device
    qk_scale = scale * LOG2E
    lse = lse.float().contiguous()
    end = subtree_end.contiguous()

    delta = torch.empty((n_heads, n), dtype=torch.float32, device=dev)
    dlse = None if grad_lse is None else grad_lse.float().contiguous()
    _delta_kernel[(triton.cdiv(n, DELTA_BLOCK_T), n_heads)](
        out, grad_out, dlse, delta, out.stride(0), out.stride(1), grad_out.stride(0),
        grad_out.stride(1), n, head_dim,
        HAS_DLSE=dlse is not None, BLOCK_T=DELTA_BLOCK_T, BLOCK_D=cfg.block_d, num_warps=4,
    )

    dk = new_output(k.shape, k.dtype, dev)
    dv = new_output(v.shape, v.dtype, dev)
    # atomics need a zeroed fp32 buffer; the deterministic kernel writes every element of dq
    dq = (new_output(q.shape, q.dtype, dev) if deterministic
          else torch.zeros(q.shape, dtype=torch.float32, device=dev))
    common = dict(GROUP=n_heads // n_kv, BLOCK_D=cfg.block_d, DOT_DTYPE=cfg.dot_dtype,
                  PRECISION=cfg.precision, num_warps=blocks.num_warps,
                  num_stages=blocks.num_stages)
    _dkdv_kernel[(k_tiles.shape[0] * n_kv,)](
        q, k, v, grad_out, lse, delta, end, dk, dv, dq, k_tiles,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        grad_out.stride(0), grad_out.stride(1), dk.stride(0), dk.stride(1), dv.stride(0),
        dv.stride(1), dq.stride(0), dq.stride(1), n, n_kv, head_dim, qk_scale, scale,
        ATOMIC_DQ=not deterministic, BLOCK_M=blocks.dkdv_m, BLOCK_N=blocks.dkdv_n, **common,
    )
    if deterministic:
        _dq_kernel[(q_tiles.shape[0] * n_heads,)](
            q, k, v, grad_out, lse, delta, dq, q_tiles, intervals,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            grad_out.stride(0), grad_out.stride(1), dq.stride(0), dq.stride(1), n, n_heads,
            head_dim, qk_scale, scale, BLOCK_M=blocks.dq_m, BLOCK_N=blocks.dq_n, **common,
        )
    return dq.to(q.dtype), dk, dv
