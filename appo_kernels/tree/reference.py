"""Torch reference for `tree_attention`: the CPU implementation, float32 accumulation.

Each tree of the forest is processed on its own, in query chunks [a, b) whose boundaries and keys
[root, b) depend only on that tree, so a tree gives bitwise the same result alone and packed with
others (batch invariance). Keys precede their descendants in pre-order, and j is visible to i iff
j ≤ i ≤ subtree_end[j].
"""

from __future__ import annotations

import torch

from appo_kernels._backend import new_output

CHUNK_SCORES = 1 << 24  # score-matrix elements per chunk (64 MB of float32)


def _chunks(subtree_end, n_heads: int):
    """(root, a, b): query chunks [a, b) of every tree [root, subtree_end[root]]."""
    ends = subtree_end.tolist()
    root = 0
    while root < len(ends):
        last = ends[root]
        size = last - root + 1
        step = max(1, CHUNK_SCORES // (size * n_heads))
        for a in range(root, last + 1, step):
            yield root, a, min(last + 1, a + step)
        root = last + 1


def _acc_dtype(x):
    # float64 stays float64 (for gradcheck); everything else accumulates in float32
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _expand_heads(x, group):
    x = x.to(_acc_dtype(x))
    return x.repeat_interleave(group, dim=1) if group > 1 else x


def _probs(q, k, subtree_end, root, a, b, scale):
    """Probabilities of queries [a, b) over keys [root, b) ([H, C, b − root]) and lse [H, C]."""
    i = torch.arange(a, b, device=q.device)
    j = torch.arange(root, b, device=q.device)
    visible = (j[None, :] <= i[:, None]) & (i[:, None] <= subtree_end[None, root:b])
    scores = torch.einsum("qhd,khd->hqk", q[a:b], k[root:b]) * scale
    scores = scores.masked_fill(~visible[None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse[..., None]), lse


def forward(q, k, v, subtree_end, scale):
    n, n_heads, _ = q.shape
    group = n_heads // k.shape[1]
    qf, kf, vf = q.to(_acc_dtype(q)), _expand_heads(k, group), _expand_heads(v, group)
    out = new_output(v.shape[:1] + (n_heads, v.shape[2]), q.dtype, q.device)
    lse = new_output((n_heads, n), _acc_dtype(q), q.device)
    for root, a, b in _chunks(subtree_end, n_heads):
        p, lse[:, a:b] = _probs(qf, kf, subtree_end, root, a, b, scale)
        out[a:b] = torch.einsum("hqk,khd->qhd", p, vf[root:b]).to(q.dtype)
    return out, lse


def backward(q, k, v, out, lse, grad_out, grad_lse, subtree_end, scale):
    """dq, dk, dv from upstream gradients of the output and (optionally) of lse.

    With P = softmax(S): dV = Pᵀ dO, dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O) + dlse), dQ = scale·dS K,
    dK = scale·dSᵀ Q, and dK, dV summed over the query heads that share a key head (GQA).
    """
    n, n_heads, _ = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    qf, kf, vf = q.to(_acc_dtype(q)), _expand_heads(k, group), _expand_heads(v, group)
    do = grad_out.to(qf.dtype)
    delta = (do * out.to(qf.dtype)).sum(-1).transpose(0, 1)  # [H, N]
    dq = torch.zeros_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    for root, a, b in _chunks(subtree_end, n_heads):
        p, _ = _probs(qf, kf, subtree_end, root, a, b, scale)
        dv[root:b] += torch.einsum("hqk,qhd->khd", p, do[a:b])
        dp = torch.einsum("qhd,khd->hqk", do[a:b], vf[root:b])
        ds = p * (dp - delta[:, a:b, None])
        if grad_lse is not None:
            ds = ds + p * grad_lse[:, a:b, None].to(qf.dtype)
        dq[a:b] = torch.einsum("hqk,khd->qhd", ds, kf[root:b]) * scale
        dk[root:b] += torch.einsum("hqk,qhd->khd", ds, qf[a:b]) * scale
    if group > 1:
        dk = dk.view(n, n_kv, group, -1).sum(2)
        dv = dv.view(n, n_kv, group, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
