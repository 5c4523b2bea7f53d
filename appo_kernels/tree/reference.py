"""Torch path of `tree_attention` (the CPU implementation), float32 accumulation.

Work follows the visible pairs, every tensor it reads is a contiguous range of tokens (no key is
gathered) and no mask is built beyond a causal tile.

**Blocks.** Cut the forest into *segments*, maximal runs [s, e) where every token's parent is the
token before it. Query i sees key j iff j ≤ i ≤ subtree_end[j], so:
- a segment's own queries see it causally: the block `(s, e, s, e, causal)`;
- a token t of a segment that has children other than t + 1 is a *branch point*: the subtrees of
  those children are the contiguous range (end of t + 1's subtree, subtree_end[t]] (all of
  (t, subtree_end[t]] when t ends its segment), and they see exactly [s, t] of the segment, with
  no mask: the block `(that range, s, t + 1, dense)`.
A token's ancestors are the prefixes of the segments on its path, each of them one such block,
so the blocks cover every visible pair exactly once. There are at most as many as segments plus
branch points (the metadata: `[blocks, 5]` rows, linear in tokens, built in vectorised passes),
ordered by their first key, so that the blocks of a tree run, and accumulate, in one order whatever
else is packed with it (a tree gives bitwise the same result alone and packed with others).

**Executors.** Each block runs through PyTorch's fused CPU flash-attention kernels
(`aten::_scaled_dot_product_flash_attention_for_cpu` and its backward, which return and take the
log-sum-exp), and the blocks of a query are merged by their log-sum-exps; the backward hands each
block the merged output and log-sum-exp, which makes the block's share of dq, dk and dv exact.
Where those kernels are missing, off the CPU, or when the caller wants the gradient of the lse,
the *tiled* executor runs instead: plain matmuls on tiles of at most BLOCK_KEYS keys and
BLOCK_SCORES scores per head (causal tiles of CAUSAL_QUERIES queries) with an online softmax.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from appo_kernels.tree.layout import TreeLayout

CAUSAL_QUERIES = 64  # queries per causal tile (tiled executor): bounds the masked diagonal
BLOCK_KEYS = 1024  # keys per tile at most (tiled executor)
BLOCK_SCORES = 1 << 18  # scores per head of one tile at most (1 MiB of float32)
USE_FLASH = True  # the fused CPU kernels where they exist (tests switch them off)


# ------------------------------------------------------------------------------------------------
# metadata: blocks, computed once per layout


def metadata(layout: TreeLayout) -> list[Tensor]:
    """[blocks, 6] int64 rows (qa, qb, ka, kb, causal, count) on the CPU, ordered by first key,
    causal first; consecutive causal blocks of one tree that are adjacent and equally long form
    one row of `count` blocks (one batched call). Cached in layout.cache."""
    if "torch" in layout.cache:
        return layout.cache["torch"]
    n, parent, end = layout.n_tokens, layout.parent, layout.subtree_end
    index = torch.arange(n, device=parent.device)
    new = parent != index - 1
    new[0] = True  # token 0's parent is −1
    starts = index[new]
    stops = torch.cat([starts[1:], starts.new_full((1,), n)])
    segment_start = torch.cummax(torch.where(new, index, 0), 0).values
    # t + 1 continues t's segment: later children start after its subtree; else after t
    follows = torch.zeros(n, dtype=torch.bool, device=parent.device)
    follows[:-1] = parent[1:] == index[:-1]
    first_other = torch.where(follows, end.roll(-1), index) + 1
    branch = index[end >= first_other]
    causal = torch.stack([starts, stops, starts, stops, torch.ones_like(starts)], 1)
    dense = torch.stack([first_other[branch], end[branch] + 1, segment_start[branch],
                         branch + 1, torch.zeros_like(branch)], 1)
    rows = torch.cat([causal, dense])
    rows = rows[torch.argsort(rows[:, 2] * 2 + (1 - rows[:, 4]), stable=True)].tolist()
    tree = torch.cumsum(parent < 0, 0).tolist()
    grouped: list[list[int]] = []
    for qa, qb, ka, kb, is_causal in rows:
        last = grouped[-1] if grouped else None
        if (is_causal and last is not None and last[4] and last[1] == qa
                and (last[1] - last[0]) == (qb - qa) * last[5] and tree[last[0]] == tree[qa]):
            last[1] = last[3] = qb
            last[5] += 1
        else:
            grouped.append([qa, qb, ka, kb, is_causal, 1])
    meta = [torch.tensor(grouped, dtype=torch.long).view(-1, 6)]
    layout.cache["torch"] = meta
    return meta


def tiles(meta):
    """The tiled executor's (qa, qb, ka, kb, causal) of every block, in the blocks' order: key
    chunks of BLOCK_KEYS; a causal block by CAUSAL_QUERIES queries (keys up to the tile's last,
    masked only in the chunk that reaches the tile), a dense one by BLOCK_SCORES / keys queries."""
    for qa, qb, ka, kb, causal, count in meta[0].tolist():
        if causal:
            length = (qb - qa) // count
            for start in range(qa, qb, length):
                for q0 in range(start, start + length, CAUSAL_QUERIES):
                    q1 = min(q0 + CAUSAL_QUERIES, start + length)
                    for k0 in range(start, q1, BLOCK_KEYS):
                        k1 = min(k0 + BLOCK_KEYS, q1)
                        yield q0, q1, k0, k1, k1 > q0
        else:
            for k0 in range(ka, kb, BLOCK_KEYS):
                k1 = min(k0 + BLOCK_KEYS, kb)
                step = max(CAUSAL_QUERIES, BLOCK_SCORES // (k1 - k0))
                for q0 in range(qa, qb, step):
                    yield q0, min(q0 + step, qb), k0, k1, False


# ------------------------------------------------------------------------------------------------
# layouts: queries [group, Hkv, N, D], keys and values [Hkv, N, D], accumulation dtype


def _acc_dtype(x):
    # float64 stays float64 (for gradcheck); everything else accumulates in float32
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _grouped(x: Tensor, n_kv: int, acc) -> Tensor:
    """Per-query-head x [N, Hq, ...] as [group, Hkv, N, ...] in `acc`: a view where x already is
    in `acc` (both executors read strided inputs), else a copy."""
    n, n_heads = x.shape[:2]
    x = x.reshape((n, n_kv, n_heads // n_kv) + x.shape[2:])
    return x.movedim(0, 2).movedim(1, 0).to(acc)


def _kv(x: Tensor, acc) -> Tensor:
    """k or v [N, Hkv, D] as [Hkv, N, D] in `acc` (a view where x is in `acc`)."""
    return x.transpose(0, 1).to(acc)


def _ungrouped(x: Tensor) -> Tensor:
    """[group, Hkv, N, ...] -> [N, Hq, ...] (query head = kv head · group + g)."""
    return x.movedim(1, 0).movedim(2, 0).flatten(1, 2)


def _flash(q: Tensor, grad_lse) -> bool:
    return USE_FLASH and grad_lse is None and q.device.type == "cpu" and _flash_kernels_work()


@functools.cache
def _flash_kernels_work() -> bool:
    """Whether this torch's fused CPU kernels exist and do what the flash executor relies on:
    strided views, query heads sharing key heads (GQA), the log-sum-exp; probed once."""
    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        return False
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, heads, 4, generator=gen, dtype=torch.float64) for heads in (4, 2, 2))
    views = [x[1:5].unflatten(0, (2, 2)).transpose(1, 2) for x in (q, k, v)]  # [2, H, 2, 4]
    try:
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(*views, 0.0, True, scale=0.5)
        grads = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            torch.ones_like(out), *views, out, lse, 0.0, True, scale=0.5)
    except RuntimeError:
        return False
    keys, values = (x.repeat_interleave(2, 1) for x in views[1:])
    scores = (views[0] @ keys.transpose(-1, -2) * 0.5).masked_fill(
        torch.ones(2, 2, dtype=torch.bool).triu(1), float("-inf"))
    want = scores.softmax(-1) @ values
    return (torch.allclose(out, want) and torch.allclose(lse, scores.logsumexp(-1))
            and grads[1].shape == views[1].shape)


def forward(q, k, v, subtree_end, meta, scale):
    acc = _acc_dtype(q)
    if _flash(q, None):
        out, lse = _forward_flash(q.to(acc), k.to(acc), v.to(acc), meta, scale)
        return out.to(q.dtype), lse
    n_kv = k.shape[1]
    out, lse = _forward_tiled(_grouped(q, n_kv, acc), _kv(k, acc), _kv(v, acc), meta, scale)
    return _ungrouped(out).to(q.dtype), lse.transpose(0, 1).flatten(0, 1)


def backward(q, k, v, out, lse, grad_out, grad_lse, subtree_end, meta, scale, deterministic):
    """dq, dk, dv from upstream gradients of the output and (optionally) of lse; always
    deterministic (the blocks run and accumulate in one order)."""
    acc = _acc_dtype(q)
    if _flash(q, grad_lse):
        dq, dk, dv = _backward_flash(q.to(acc), k.to(acc), v.to(acc), out.to(acc), lse,
                                     grad_out.to(acc), meta, scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    n_kv = k.shape[1]
    qh, kh, vh = _grouped(q, n_kv, acc), _kv(k, acc), _kv(v, acc)
    outh, doh = _grouped(out, n_kv, acc), _grouped(grad_out, n_kv, acc)
    lseh = _grouped(lse.t(), n_kv, acc)
    dlse = None if grad_lse is None else _grouped(grad_lse.t(), n_kv, acc)
    dq, dk, dv = _backward_tiled(qh, kh, vh, outh, lseh, doh, dlse, meta, scale)
    return (_ungrouped(dq).to(q.dtype), dk.transpose(0, 1).to(k.dtype),
            dv.transpose(0, 1).to(v.dtype))


# ------------------------------------------------------------------------------------------------
# the flash executor: one fused call per row of blocks, on views of the token-major tensors
# (the kernels read strided inputs and map query head h to key head h // group themselves)


def _view(x: Tensor, a: int, b: int, count: int) -> Tensor:
    """Tokens [a, b) of x [N, H, D] as `count` blocks: [count, H, (b − a) / count, D]."""
    return x[a:b].unflatten(0, (count, -1)).transpose(1, 2)


def _lse_view(x: Tensor, a: int, b: int, count: int) -> Tensor:
    """Tokens [a, b) of x [H, N] as [count, H, (b − a) / count]."""
    return x[:, a:b].unflatten(1, (count, -1)).transpose(0, 1)


def _forward_flash(q, k, v, meta, scale):
    attend = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out = torch.zeros(q.shape[:2] + v.shape[2:], dtype=q.dtype)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=q.dtype)
    for qa, qb, ka, kb, causal, count in meta[0].tolist():
        o, m = attend(_view(q, qa, qb, count), _view(k, ka, kb, count), _view(v, ka, kb, count),
                      0.0, bool(causal), scale=scale)
        old = _lse_view(lse, qa, qb, count)
        new = torch.logaddexp(old, m)  # the first block of a row: its own lse
        _view(out, qa, qb, count).mul_(old.sub_(new).exp_()[..., None]).add_(
            o.mul_(m.sub_(new).exp_()[..., None]))
        old.copy_(new)
    return out, lse


def _backward_flash(q, k, v, out, lse, do, meta, scale):
    attend_back = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for qa, qb, ka, kb, causal, count in meta[0].tolist():
        # with the merged out and lse, the kernel's P and rowsum(dO ⊙ O) are the whole row's
        grads = attend_back(_view(do, qa, qb, count), _view(q, qa, qb, count),
                            _view(k, ka, kb, count), _view(v, ka, kb, count),
                            _view(out, qa, qb, count), _lse_view(lse, qa, qb, count), 0.0,
                            bool(causal), scale=scale)
        for total, grad, (a, b) in zip((dq, dk, dv), grads, ((qa, qb), (ka, kb), (ka, kb))):
            _view(total, a, b, count).add_(grad)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# the tiled executor: matmuls on tiles with an online softmax


def _rows(x: Tensor, a: int, b: int) -> Tensor:
    """Tokens [a, b) of x [group, Hkv, N, ...] as [Hkv, group·R, last], always a copy."""
    rows = x[:, :, a:b].transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1])
    same = rows.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    return rows.clone() if same else rows  # one group or one token: reshape gave a view


def _scores(qh, kh, qa, qb, ka, kb, causal, scale):
    """Scores [Hkv, group·R, L] of one tile (rows group-major), keys after their query hidden in
    a causal tile; and the tile's queries."""
    q = _rows(qh, qa, qb)
    scores = (q @ kh[:, ka:kb].transpose(-1, -2)).mul_(scale)
    if causal:
        i = torch.arange(qa, qb, device=q.device)
        j = torch.arange(ka, kb, device=q.device)
        hidden = j[None, :] > i[:, None]  # [R, L], broadcast over the group
        scores.view(scores.shape[0], qh.shape[0], qb - qa, kb - ka).masked_fill_(
            hidden, float("-inf"))
    return scores, q


def _put(x: Tensor, a: int, b: int, rows: Tensor) -> None:
    """x[:, :, a:b] = rows, for rows [Hkv, group·R, ...] as `_rows` made them."""
    x[:, :, a:b] = rows.view((x.shape[1], x.shape[0], b - a) + rows.shape[2:]).transpose(0, 1)


def _forward_tiled(qh, kh, vh, meta, scale):
    shape = qh.shape[:3]
    out = torch.zeros(shape + vh.shape[2:], dtype=qh.dtype, device=qh.device)
    row_max = torch.full(shape, float("-inf"), dtype=qh.dtype, device=qh.device)
    row_sum = torch.zeros(shape, dtype=qh.dtype, device=qh.device)
    for qa, qb, ka, kb, causal in tiles(meta):
        scores, _ = _scores(qh, kh, qa, qb, ka, kb, causal, scale)
        m_old = _rows(row_max[..., None], qa, qb)[..., 0]
        m_new = torch.maximum(m_old, scores.amax(-1))  # finite: every row sees a key
        p = scores.sub_(m_new[..., None]).exp_()
        alpha = (m_old - m_new).exp_()  # 0 on a row's first tile
        sums = _rows(row_sum[..., None], qa, qb)[..., 0].mul_(alpha).add_(p.sum(-1))
        o = _rows(out, qa, qb).mul_(alpha[..., None]).baddbmm_(p, vh[:, ka:kb])
        _put(row_max, qa, qb, m_new)
        _put(row_sum, qa, qb, sums)
        _put(out, qa, qb, o)
    return out.div_(row_sum[..., None]), row_max.add_(row_sum.log_())


def _backward_tiled(qh, kh, vh, out, lse, do, dlse, meta, scale):
    """With P = softmax(S): dV = Pᵀ dO, dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O) + dlse), dQ = scale·dS K,
    dK = scale·dSᵀ Q, and dK, dV summed over the query heads that share a key head (GQA)."""
    row_term = (do * out).sum(-1)  # rowsum(dO ⊙ O) − dlse
    if dlse is not None:
        row_term -= dlse
    dq = torch.zeros_like(qh)
    dk, dv = torch.zeros_like(kh), torch.zeros_like(vh)
    for qa, qb, ka, kb, causal in tiles(meta):
        scores, q_rows = _scores(qh, kh, qa, qb, ka, kb, causal, scale)
        p = scores.sub_(_rows(lse[..., None], qa, qb)).exp_()  # masked: exp(−inf) = 0
        do_rows = _rows(do, qa, qb)
        ds = (do_rows @ vh[:, ka:kb].transpose(-1, -2)).sub_(
            _rows(row_term[..., None], qa, qb)).mul_(p)
        dq[:, :, qa:qb] += (ds @ kh[:, ka:kb]).mul_(scale).view(
            dq.shape[1], dq.shape[0], qb - qa, -1).transpose(0, 1)
        dk[:, ka:kb].baddbmm_(ds.transpose(-1, -2), q_rows, alpha=scale)
        dv[:, ka:kb].baddbmm_(p.transpose(-1, -2), do_rows)
    return dq, dk, dv
