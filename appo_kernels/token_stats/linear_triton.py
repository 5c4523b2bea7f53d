"""The fused Triton forward of `linear_token_stats`: logits tiles computed and reduced in place.

Each program takes BLOCK_T rows and one *split* of the vocabulary (SPLIT_V columns), loops over
its columns BLOCK_V at a time, builds each [BLOCK_T, BLOCK_V] tile of `hidden @ weight.T (+ bias)`
with `tl.dot` over H in BLOCK_H steps (float32 accumulation; float32 inputs in IEEE precision,
never TF32) and folds it into per-row accumulators relative to the running max m of the raw
logits, with d = (z − m)/T (as the `token_stats` kernels do):
  S = Σ e^d,  A = Σ e^d·d;  a max grown by δ (in units of d) rescales S' = cS, A' = c(A − δS),
  c = e^{−δ},
and keeps the target's logit when it falls in the split. The splits' (m, S, A, z_target) are
merged in float32 by the same rescaling, in split order: lse = m/T + log S, H = log S − A/S,
logprob = (z_t − m)/T − log S. No [tokens × V] tensor exists at any point.

Batch invariance: tiles, splits and their order depend only on V, H and the dtype, and a row's
dot products do not depend on the other rows of its tile, so a row gives bitwise the same result
alone and in a batch. The backward is the chunked one of `linear.py` (each chunk's logits
recomputed by a matmul and reduced by the `token_stats` kernels).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from appo_kernels._backend import triton_interpret

NEG_INF: tl.constexpr = float("-inf")
BLOCK_T = 64
BLOCK_V = 128
BLOCK_H = 64
SPLIT_V = 8192  # columns per program: a multiple of BLOCK_V, fixed (never from the row count)


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, m_ptr, s_ptr, a_ptr, zt_ptr,
                T, V, H, stride_h, stride_w, inv_t,
                HAS_BIAS: tl.constexpr, HAS_TARGET: tl.constexpr, UPCAST: tl.constexpr,
                IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_H: tl.constexpr, SPLIT_V: tl.constexpr):
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    target = tl.full([BLOCK_T], -1, tl.int64)
    if HAS_TARGET:
        target = tl.load(t_ptr + rows64, mask=row_ok, other=-1).to(tl.int64)
    m = tl.full([BLOCK_T], NEG_INF, tl.float32)
    s = tl.zeros([BLOCK_T], tl.float32)
    a = tl.zeros([BLOCK_T], tl.float32)
    z_t = tl.zeros([BLOCK_T], tl.float32)
    v_lo = split * SPLIT_V
    v_hi = tl.minimum(v_lo + SPLIT_V, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        cols64 = cols.to(tl.int64)
        acc = tl.zeros([BLOCK_T, BLOCK_V], tl.float32)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < H
            h = tl.load(h_ptr + rows64[:, None] * stride_h + ks[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + cols64[None, :] * stride_w + ks[:, None],
                        mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # [BLOCK_H, BLOCK_V]
            if UPCAST:  # the interpreter has no 16-bit matmul
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            if IEEE:
                acc = tl.dot(h, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(h, w, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols64, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        x = tl.where(col_ok[None, :], acc, NEG_INF)
        m_new = tl.maximum(m, tl.max(x, 1))
        m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)  # keeps −inf − (−inf) out of the math
        shift = tl.where(m == NEG_INF, 0.0, (m_ref - m) * inv_t)  # δ ≥ 0; S = A = 0 before
        c = tl.exp(-shift)
        d = (x - m_ref[:, None]) * inv_t
        e = tl.exp(d)
        ed = e * tl.where(e > 0, d, 0.0)  # −inf logits contribute exactly 0 (never 0·−inf)
        a = c * (a - shift * s) + tl.sum(ed, 1)
        s = c * s + tl.sum(e, 1)
        m = m_new
        if HAS_TARGET:
            z_t += tl.sum(tl.where(cols64[None, :] == target[:, None], x, 0.0), 1)
    out = split * T + rows64
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(a_ptr + out, a, mask=row_ok)
    tl.store(zt_ptr + out, z_t, mask=row_ok)


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias, target, inv_temperature: float):
    """(logprob, entropy, lse, row_max, log_norm) float32 [T] of hidden [T, H] (rows that count,
    contiguous), weight [V, H]; logprob is empty without a target."""
    n, width = hidden.shape
    vocab = weight.shape[0]
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()  # the kernel reads it with stride 1
    splits = triton.cdiv(vocab, SPLIT_V)
    parts = [torch.empty((splits, n), dtype=torch.float32, device=hidden.device)
             for _ in range(4)]
    if n:
        grid = (triton.cdiv(n, BLOCK_T), splits)
        _fwd_kernel[grid](
            hidden, weight, bias, target, *parts, n, vocab, width, hidden.stride(0),
            weight.stride(0), inv_temperature, HAS_BIAS=bias is not None,
            HAS_TARGET=target is not None, UPCAST=triton_interpret(),
            IEEE=hidden.dtype == torch.float32, BLOCK_T=BLOCK_T, BLOCK_V=BLOCK_V,
            BLOCK_H=BLOCK_H, SPLIT_V=SPLIT_V, num_warps=4, num_stages=3)
    return merge(*parts, target, vocab, inv_temperature)


def merge(m, s, a, z_t, target, vocab: int, inv_t: float):
    """Fold the splits' accumulators [splits, T], in split order, into the row statistics."""
    row_max, total_s, total_a = m[0], s[0], a[0]
    for i in range(1, m.shape[0]):
        new = torch.maximum(row_max, m[i])
        ref = torch.where(new == float("-inf"), 0.0, new)

        def rescaled(m_part, s_part, a_part):
            shift = torch.where(m_part == float("-inf"), 0.0, (ref - m_part) * inv_t)
            c = torch.exp(-shift)
            return c * s_part, c * (a_part - shift * s_part)

        (s_old, a_old), (s_new, a_new) = rescaled(row_max, total_s, total_a), rescaled(m[i], s[i],
                                                                                      a[i])
        row_max, total_s, total_a = new, s_old + s_new, a_old + a_new
    finite = torch.isfinite(row_max)
    log_s = torch.log(total_s)
    nan = torch.full_like(log_s, float("nan"))
    lse = torch.where(finite, row_max * inv_t + log_s, nan)
    entropy = torch.where(finite, log_s - total_a / total_s, nan)
    log_norm = torch.where(finite, log_s, nan)
    if target is None:
        logprob = log_s.new_empty(0)
    else:
        in_range = (target >= 0) & (target < vocab)
        logprob = torch.where(in_range & finite,
                              (z_t.sum(0) - row_max) * inv_t - log_s, nan)
    return logprob, entropy, lse, torch.where(finite, row_max, 0.0), log_norm
