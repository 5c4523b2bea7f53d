"""Torch reference for `tree_attention`: the CPU implementation, float32 accumulation.

Queries are processed in chunks; a chunk [a, b) only needs keys j < b (keys come before their
descendants in pre-order), and j is visible to i iff j ≤ i ≤ subtree_end[j].
"""

from __future__ import annotations

import torch

from appo_kernels._backend import new_output

CHUNK_SCORES = 1 << 24  # score-matrix elements per chunk (64 MB of float32)


def _chunks(n_tokens: int, n_heads: int):
    step = max(1, CHUNK_SCORES // max(1, n_tokens * n_heads))
    for a in range(0, n_tokens, step):
        yield a, min(n_tokens, a + step)


def _acc_dtype(x):
    # float64 stays float64 (for gradcheck); everything else accumulates in float32
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _expand_heads(x, group):
    x = x.to(_acc_dtype(x))
    return x.repeat_interleave(group, dim=1) if group > 1 else x


def _probs(q, k, subtree_end, a, b, scale):
    """Scores and probabilities of queries [a, b) over keys [0, b): ([H, C, b], lse [H, C])."""
    i = torch.arange(a, b, device=q.device)
    j = torch.arange(b, device=q.device)
    visible = (j[None, :] <= i[:, None]) & (i[:, None] <= subtree_end[None, :b])
    scores = torch.einsum("qhd,khd->hqk", q[a:b], k[:b]) * scale
    scores = scores.masked_fill(~visible[None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse[..., None]), lse


def forward(q, k, v, subtree_end, scale):
    n, n_heads, _ = q.shape
    group = n_heads // k.shape[1]
    qf, kf, vf = q.to(_acc_dtype(q)), _expand_heads(k, group), _expand_heads(v, group)
    out = new_output(v.shape[:1] + (n_heads, v.shape[2]), q.dtype, q.device)
    lse = new_output((n_heads, n), _acc_dtype(q), q.device)
    for a, b in _chunks(n, n_heads):
        p, lse[:, a:b] = _probs(qf, kf, subtree_end, a, b, scale)
        out[a:b] = torch.einsum("hqk,khd->qhd", p, vf[:b]).to(q.dtype)
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
    for a, b in _chunks(n, n_heads):
        p, _ = _probs(qf, kf, subtree_end, a, b, scale)
        dv[:b] += torch.einsum("hqk,qhd->khd", p, do[a:b])
        dp = torch.einsum("qhd,khd->hqk", do[a:b], vf[:b])
        ds = p * (dp - delta[:, a:b, None])
        if grad_lse is not None:
            ds = ds + p * grad_lse[:, a:b, None].to(qf.dtype)
        dq[a:b] = torch.einsum("hqk,khd->qhd", ds, kf[:b]) * scale
        dk[:b] += torch.einsum("hqk,qhd->khd", ds, qf[a:b]) * scale
    if group > 1:
        dk = dk.view(n, n_kv, group, -1).sum(2)
        dv = dv.view(n, n_kv, group, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
