"""Torch reference for `tree_attention`: the CPU implementation, float32 accumulation.

Work follows the visible pairs, not N² per tree. The forest is cut into *units*: contiguous query
ranges [a, b) of at most UNIT_QUERIES tokens of one tree. In pre-order every ancestor of a token of
[a, b) that precedes a is an ancestor of a, so a unit's keys are a's ancestors followed by [a, b),
and key j is visible to query i iff j ≤ i ≤ subtree_end[j]. A unit only grows over tokens inside
the subtree of a's parent, whose queries all see every ancestor of a: what the mask hides lies in
the [a, b) block. Units of one tree with the same padded shape form a batch of dense attention
(G units × Lq queries × Lk keys); padded slots read a zero *null row* appended to every input
(index N).

Batch invariance: units, their padding and their batches depend only on their tree, and a tree's
batches run, and add into dk/dv, in one order whatever else is packed with it, so a tree gives
bitwise the same result alone and packed with others.
"""

from __future__ import annotations

import torch
from torch import Tensor

from appo_kernels._backend import new_output
from appo_kernels.tree.layout import TreeLayout, _kth_ancestor, _ragged_ranks

UNIT_QUERIES = 64  # queries per unit at most: bounds the masked [a, b) × [a, b) block
PAD_BITS = 3  # unit sizes are padded to 3 significant bits (< 25% padding) so that units batch
BATCH_ELEMENTS = 1 << 24  # scores plus gathered rows of one batch (64 MB of float32)


# ------------------------------------------------------------------------------------------------
# metadata: units, computed once per layout


def _unit_starts(layout: TreeLayout) -> Tensor:
    """First query of every unit, ascending (units partition [0, N)): a loop over chain segments,
    whose tokens all lie in the subtree of the segment's first token."""
    parent, subtree_end = layout.parent.tolist(), layout.subtree_end.tolist()
    starts = layout.segment_starts().tolist()
    cuts: list[int] = []
    a, limit = 0, -1  # current unit's start, and the end of its parent's subtree

    def cut(at):
        nonlocal a, limit
        cuts.append(at)
        a, limit = at, subtree_end[parent[at] if parent[at] >= 0 else at]  # a root: its tree

    for s, e in zip(starts, starts[1:] + [layout.n_tokens]):
        if s > limit:  # the segment leaves the subtree of the unit's parent
            cut(s)
        while a + UNIT_QUERIES < e:
            cut(a + UNIT_QUERIES)
    return torch.tensor(cuts, dtype=torch.long, device=layout.device)


def _padded(size: Tensor) -> Tensor:
    """Round up to PAD_BITS significant bits."""
    bits = torch.floor(torch.log2(size.double())).long() + 1
    step = 1 << (bits - PAD_BITS).clamp_min(0)
    return (size + step - 1) // step * step


def metadata(layout: TreeLayout) -> list[Tensor]:
    """Per batch: query indices [G, Lq] and key indices [G, Lk] (N in padded slots), in the order
    the batches run; cached in layout.cache."""
    if "torch" in layout.cache:
        return layout.cache["torch"]
    n, parent = layout.n_tokens, layout.parent
    first = _unit_starts(layout)
    n_queries = torch.diff(first, append=first.new_full((1,), n))
    n_ancestors = layout.depth[first]
    tree = torch.cumsum(parent < 0, 0)[first]
    lq, lk = _padded(n_queries), _padded(n_ancestors + n_queries)
    # batch key: tree, then padded shape; stable, so a batch keeps its units in pre-order
    batch_key = (tree * (UNIT_QUERIES + 1) + lq) * (int(lk.max()) + 1) + lk
    order = torch.argsort(batch_key, stable=True)
    first, n_queries, n_ancestors, lq, lk = (x[order] for x in (first, n_queries, n_ancestors,
                                                                 lq, lk))
    _, counts = torch.unique_consecutive(batch_key[order], return_counts=True)

    unit, row = _ragged_ranks(lq)
    queries = torch.where(row < n_queries[unit], first[unit] + row, n)
    unit, slot = _ragged_ranks(lk)
    ancestors = n_ancestors[unit]
    # slots [0, A) hold the ancestors of the unit's first query, root first, then the queries
    ancestor = _kth_ancestor(parent, first[unit], (ancestors - slot).clamp_min(0))
    keys = torch.where(slot < ancestors, ancestor, first[unit] + slot - ancestors)
    keys = torch.where(slot < ancestors + n_queries[unit], keys, n)

    last = torch.cumsum(counts, 0) - 1  # one unit of each batch, to read the batch's shape
    meta = []
    for q_part, k_part, rows, slots in zip(queries.split((counts * lq[last]).tolist()),
                                           keys.split((counts * lk[last]).tolist()),
                                           lq[last].tolist(), lk[last].tolist()):
        meta += [q_part.view(-1, rows), k_part.view(-1, slots)]
    layout.cache["torch"] = meta
    return meta


# ------------------------------------------------------------------------------------------------
# attention over units, heads first: [Hkv, N + 1, ...] with the null row last


def _acc_dtype(x):
    # float64 stays float64 (for gradcheck); everything else accumulates in float32
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _head_major(x: Tensor, dtype) -> Tensor:
    """x [N, Hkv, ...] as [Hkv, N + 1, ...] in `dtype`, the null row zero."""
    out = x.new_empty((x.shape[1], x.shape[0] + 1) + x.shape[2:], dtype=dtype)
    out[:, :-1] = x.transpose(0, 1)
    out[:, -1] = 0
    return out


def _token_major(x: Tensor, n: int) -> Tensor:
    """[Hkv, N + 1, group, ...] -> [N, Hkv·group, ...] without the null row."""
    return x[:, :n].transpose(0, 1).flatten(1, 2)


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """x[:, index] for x [Hkv, N + 1, ...] and index [G, L]: [Hkv, G, L, ...]."""
    return x.index_select(1, index.flatten()).unflatten(1, index.shape)


def _query_rows(x: Tensor, queries: Tensor) -> Tensor:
    """Per-query values x [Hkv, N + 1, group] as a column [Hkv, G, Lq·group, 1] of the scores."""
    return _rows(x, queries).flatten(2)[..., None]


def _put_rows(dst: Tensor, queries: Tensor, rows: Tensor) -> None:
    """dst[:, queries] = rows for dst [Hkv, N + 1, group, ...] and rows [Hkv, G, Lq·group, ...]
    (the null row keeps whichever padded query slot wrote last)."""
    dst.index_copy_(1, queries.flatten(), rows.reshape((dst.shape[0], -1) + dst.shape[2:]))


def _add_rows(dst: Tensor, keys: Tensor, rows: Tensor) -> None:
    """dst[keys] += rows for dst [N + 1, Hkv, D] and rows [Hkv, G, Lk, D], repeated keys summed
    in order: index_add_ is sequential on the CPU but uses atomics on CUDA, where index_put_ with
    accumulate sorts instead."""
    keys, rows = keys.flatten(), rows.flatten(1, 2).transpose(0, 1).contiguous()
    if dst.is_cuda:
        dst.index_put_((keys,), rows, accumulate=True)
    else:
        dst.index_add_(0, keys, rows)


def _batches(meta, n_heads: int, n_kv: int, head_dim: int):
    """(queries, keys) index blocks of at most BATCH_ELEMENTS scores and gathered rows."""
    for queries, keys in zip(meta[0::2], meta[1::2]):
        lq, lk = queries.shape[1], keys.shape[1]
        per_unit = lq * lk * n_heads + (lq * n_heads + 2 * lk * n_kv) * head_dim
        step = max(1, BATCH_ELEMENTS // per_unit)
        for g in range(0, queries.shape[0], step):
            yield queries[g:g + step], keys[g:g + step]


def _inputs(q, k, v, subtree_end, scale):
    """Scaled queries [Hkv, N + 1, group, D], keys and values [Hkv, N + 1, D], and subtree_end
    with the null row's (N: visible to no real query)."""
    n, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    acc = _acc_dtype(q)
    qh = _head_major(q.view(n, n_kv, n_heads // n_kv, head_dim), acc).mul_(scale)
    end = torch.cat([subtree_end, subtree_end.new_full((1,), n)])
    return qh, _head_major(k, acc), _head_major(v, acc), end


def _scores(qh, kh, subtree_end, queries, keys):
    """Masked scores [Hkv, G, Lq·group, Lk] of a batch of units (rows query-major), with the
    batch's queries [Hkv, G, Lq·group, D] and keys [Hkv, G, Lk, D]."""
    q, k = _rows(qh, queries).flatten(2, 3), _rows(kh, keys)
    scores = q @ k.transpose(-1, -2)
    i, j = queries[:, :, None], keys[:, None, :]
    hidden = (j > i) | (i > subtree_end[keys][:, None, :])  # [G, Lq, Lk]
    scores.unflatten(2, (queries.shape[1], -1)).masked_fill_(hidden[:, :, None], float("-inf"))
    return scores, q, k


def forward(q, k, v, subtree_end, meta, scale):
    n, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    qh, kh, vh, end = _inputs(q, k, v, subtree_end, scale)
    out = new_output(qh.shape[:3] + v.shape[2:], qh.dtype, q.device)
    lse = new_output(qh.shape[:3], qh.dtype, q.device)
    for queries, keys in _batches(meta, n_heads, n_kv, head_dim):
        scores, _, _ = _scores(qh, kh, end, queries, keys)
        p = torch.softmax(scores, -1)  # NaN only in padded query slots that see no key
        _put_rows(out, queries, p @ _rows(vh, keys))
        # lse = s − log p at the row's maximum, where p ≥ 1/Lk is far from underflow
        _put_rows(lse, queries, scores.amax(-1) - p.amax(-1).log())
    return _token_major(out, n).to(q.dtype), _token_major(lse, n).t().contiguous()


def backward(q, k, v, out, lse, grad_out, grad_lse, subtree_end, meta, scale, deterministic):
    """dq, dk, dv from upstream gradients of the output and (optionally) of lse; always
    deterministic.

    With P = softmax(S): dV = Pᵀ dO, dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O) + dlse), dQ = scale·dS K,
    dK = scale·dSᵀ Q, and dK, dV summed over the query heads that share a key head (GQA).
    """
    n, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    qh, kh, vh, end = _inputs(q, k, v, subtree_end, scale)
    acc = qh.dtype
    doh = _head_major(grad_out.view(n, n_kv, -1, grad_out.shape[2]), acc)
    row_term = (grad_out.to(acc) * out.to(acc)).sum(-1)  # rowsum(dO ⊙ O) − dlse, [N, H]
    if grad_lse is not None:
        row_term = row_term - grad_lse.t().to(acc)
    row_term = _head_major(row_term.view(n, n_kv, -1), acc)
    # the null row's lse 0 makes its P 0 wherever its scores are masked
    lse = _head_major(lse.t().view(n, n_kv, -1), acc)
    dq = new_output(qh.shape, acc, q.device)
    dk = torch.zeros((n + 1,) + k.shape[1:], dtype=acc, device=k.device)
    dv = torch.zeros((n + 1,) + v.shape[1:], dtype=acc, device=v.device)
    for queries, keys in _batches(meta, n_heads, n_kv, head_dim):
        scores, q_rows, k_rows = _scores(qh, kh, end, queries, keys)
        p = scores.sub_(_query_rows(lse, queries)).exp_()
        do = _rows(doh, queries).flatten(2, 3)
        dp = do @ _rows(vh, keys).transpose(-1, -2)
        ds = dp.sub_(_query_rows(row_term, queries)).mul_(p)
        _put_rows(dq, queries, ds @ k_rows)
        _add_rows(dk, keys, ds.transpose(-1, -2) @ q_rows)
        _add_rows(dv, keys, p.transpose(-1, -2) @ do)
    dq = _token_major(dq, n) * scale
    return dq.to(q.dtype), dk[:n].to(k.dtype), dv[:n].to(v.dtype)
