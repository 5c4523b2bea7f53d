"""Triton kernels for `token_stats`: one program per row, one pass over the vocabulary.

Accumulators are float32 and relative to the running max m of the raw logits, with d = (x − m)/T:
  S = Σ e^d,  A = Σ e^d·d,  B = Σ e^d·d²   →   lse = m/T + log S,  H = log S − A/S,
  Var_p[log p] = B/S − (A/S)².
When the max grows by δ (in units of d) every term is rescaled by c = e^{−δ}: S' = cS,
A' = c(A − δS), B' = c(B − 2δA + δ²S). Nothing is subtracted at the magnitude of the logits, so
±1e4 logits lose no precision. Block sizes depend only on V and the dtype, never on the number of
rows, so a row's result is bitwise the same alone and in a batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from appo_kernels._backend import new_output
from appo_kernels._strides import row_view

NEG_INF: tl.constexpr = float("-inf")
NAN: tl.constexpr = float("nan")
POS_INF: tl.constexpr = float("inf")
MAX_BLOCK_V_16BIT = 4096  # bf16/fp16: 8 KB of logits in flight per program
MAX_BLOCK_V_32BIT = 2048


def _block_config(vocab: int, dtype: torch.dtype) -> tuple[int, int]:
    cap = MAX_BLOCK_V_16BIT if dtype.itemsize <= 2 else MAX_BLOCK_V_32BIT
    block_v = min(triton.next_power_of_2(vocab), cap)
    num_warps = 8 if block_v >= 2048 else 4
    return block_v, num_warps


@triton.jit
def _row_start(x_ptr, row, inner, stride_outer, stride_inner):
    return x_ptr + (row // inner) * stride_outer + (row % inner) * stride_inner


@triton.jit
def _token_stats_fwd_kernel(
    x_ptr, target_ptr, mask_ptr,
    logprob_ptr, entropy_ptr, lse_ptr, var_ptr, top2_ptr, max_ptr, norm_ptr,
    inner, stride_outer, stride_inner, V, inv_t,
    HAS_TARGET: tl.constexpr, HAS_MASK: tl.constexpr,
    WANT_VAR: tl.constexpr, WANT_TOP2: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = _row_start(x_ptr, row, inner, stride_outer, stride_inner)
    keep = tl.full([], 1, tl.int1)
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
    n_read = tl.where(keep, V, 0)  # a masked row is not read at all

    m = tl.full([], NEG_INF, tl.float32)
    s = tl.zeros([], tl.float32)
    a = tl.zeros([], tl.float32)
    b = tl.zeros([], tl.float32)
    top1 = tl.full([], NEG_INF, tl.float32)
    top2 = tl.full([], NEG_INF, tl.float32)
    lanes = tl.arange(0, BLOCK_V)
    for start in range(0, n_read, BLOCK_V):
        offs = start + lanes
        x = tl.load(x_row + offs, mask=offs < V, other=NEG_INF).to(tl.float32)
        block_max = tl.max(x, 0)
        m_new = tl.maximum(m, block_max)
        m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)  # keeps −inf − (−inf) out of the math
        shift = tl.where(m == NEG_INF, 0.0, (m_ref - m) * inv_t)  # δ ≥ 0; S = A = B = 0 before
        c = tl.exp(-shift)
        d = (x - m_ref) * inv_t
        e = tl.exp(d)
        ed = tl.where(e > 0, e * d, 0.0)  # −inf logits contribute exactly 0
        if WANT_VAR:
            edd = tl.where(e > 0, ed * d, 0.0)
            b = c * (b - 2.0 * shift * a + shift * shift * s) + tl.sum(edd, 0)
        a = c * (a - shift * s) + tl.sum(ed, 0)
        s = c * s + tl.sum(e, 0)
        m = m_new
        if WANT_TOP2:
            first = tl.argmax(x, 0)
            second = tl.max(tl.where(lanes == first, NEG_INF, x), 0)
            top2 = tl.maximum(tl.minimum(top1, block_max), tl.maximum(top2, second))
            top1 = tl.maximum(top1, block_max)

    finite = (m > NEG_INF) & (m < POS_INF)
    log_s = tl.log(s)
    mean_d = a / s
    lse = tl.where(finite, m * inv_t + log_s, NAN)
    entropy = tl.where(finite, log_s - mean_d, NAN)
    zero = tl.zeros([], tl.float32)
    tl.store(lse_ptr + row, tl.where(keep, lse, zero))
    tl.store(entropy_ptr + row, tl.where(keep, entropy, zero))
    tl.store(max_ptr + row, tl.where(keep & finite, m, zero))
    tl.store(norm_ptr + row, tl.where(keep, tl.where(finite, log_s, NAN), zero))
    if HAS_TARGET:
        t = tl.load(target_ptr + row).to(tl.int64)
        in_range = (t >= 0) & (t < V)
        x_t = tl.load(x_row + t, mask=in_range & keep, other=0.0).to(tl.float32)
        logprob = tl.where(in_range & finite, (x_t - m) * inv_t - log_s, NAN)
        tl.store(logprob_ptr + row, tl.where(keep, logprob, zero))
    if WANT_VAR:
        var = tl.where(finite, tl.maximum(b / s - mean_d * mean_d, 0.0), NAN)
        tl.store(var_ptr + row, tl.where(keep, var, zero))
    if WANT_TOP2:
        gap = tl.where(top2 > NEG_INF, (top1 - top2) * inv_t, POS_INF)
        tl.store(top2_ptr + row, tl.where(keep, tl.where(finite, gap, NAN), zero))


@triton.jit
def _token_stats_bwd_kernel(
    x_ptr, target_ptr, mask_ptr, max_ptr, norm_ptr, entropy_ptr,
    g_logprob_ptr, g_entropy_ptr, g_lse_ptr, grad_ptr,
    inner, stride_outer, stride_inner, V, inv_t,
    HAS_TARGET: tl.constexpr, HAS_MASK: tl.constexpr, HAS_G_LOGPROB: tl.constexpr,
    HAS_G_ENTROPY: tl.constexpr, HAS_G_LSE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # ∂lse/∂z = p, ∂logprob/∂z = onehot − p, ∂H/∂z_j = −p_j (log p_j + H); ∂z/∂x = 1/T.
    row = tl.program_id(0).to(tl.int64)
    x_row = _row_start(x_ptr, row, inner, stride_outer, stride_inner)
    keep = tl.full([], 1, tl.int1)
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
    m = tl.load(max_ptr + row)
    log_s = tl.load(norm_ptr + row)
    entropy = tl.load(entropy_ptr + row)
    g_p = tl.zeros([], tl.float32)  # coefficient of p
    g_lp = tl.zeros([], tl.float32)
    g_h = tl.zeros([], tl.float32)
    t = tl.full([], -1, tl.int64)
    if HAS_G_LSE:
        g_p += tl.load(g_lse_ptr + row)
    if HAS_G_LOGPROB:
        g_lp = tl.load(g_logprob_ptr + row)
        g_p -= g_lp
        t = tl.load(target_ptr + row).to(tl.int64)
    if HAS_G_ENTROPY:
        g_h = tl.load(g_entropy_ptr + row)
    n_read = tl.where(keep, V, 0)  # a masked row is not read; its gradient is written as 0
    grad_row = grad_ptr + row * V
    lanes = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = start + lanes
        x = tl.load(x_row + offs, mask=offs < n_read, other=NEG_INF).to(tl.float32)
        log_p = (x - m) * inv_t - log_s
        p = tl.exp(log_p)
        g = g_p * p + tl.where(offs == t, g_lp, 0.0)
        if HAS_G_ENTROPY:
            g -= g_h * tl.where(p > 0, p * (log_p + entropy), 0.0)
        g = tl.where(keep, g * inv_t, 0.0)
        tl.store(grad_row + offs, g.to(grad_ptr.dtype.element_ty), mask=offs < V)


def _flat_optional(t, dtype=None):
    if t is None:
        return None
    t = t.reshape(-1)
    if dtype is not None:
        t = t.to(dtype)
    return t.contiguous()


def _mask_bytes(mask):
    # bool tensors are passed as uint8 so every Triton version loads them the same way
    return None if mask is None else mask.reshape(-1).contiguous().view(torch.uint8)


def forward(logits, target, mask, inv_temperature, want_varentropy, want_top2):
    rv = row_view(logits)
    vocab = logits.shape[-1]
    lead = logits.shape[:-1]
    dev = logits.device

    def out(wanted=True):
        return new_output(rv.n_rows if wanted else 0, torch.float32, dev)

    logprob, var, top2 = out(target is not None), out(want_varentropy), out(want_top2)
    entropy, lse, row_max, log_norm = out(), out(), out(), out()
    tgt, keep = _flat_optional(target), _mask_bytes(mask)
    if rv.n_rows:
        block_v, num_warps = _block_config(vocab, logits.dtype)
        _token_stats_fwd_kernel[(rv.n_rows,)](
            rv.tensor, tgt, keep,
            logprob, entropy, lse, var, top2, row_max, log_norm,
            rv.inner, rv.stride_outer, rv.stride_inner, vocab, inv_temperature,
            HAS_TARGET=tgt is not None, HAS_MASK=keep is not None,
            WANT_VAR=want_varentropy, WANT_TOP2=want_top2, BLOCK_V=block_v, num_warps=num_warps,
        )

    def shaped(t, wanted=True):
        return t.reshape(lead) if wanted else t

    return (shaped(logprob, target is not None), shaped(entropy), shaped(lse),
            shaped(var, want_varentropy), shaped(top2, want_top2), shaped(row_max),
            shaped(log_norm))


def backward(logits, target, mask, row_max, log_norm, entropy, g_logprob, g_entropy, g_lse,
             inv_temperature):
    rv = row_view(logits)
    vocab = logits.shape[-1]
    grad = new_output(logits.shape, logits.dtype, logits.device)
    if rv.n_rows == 0:
        return grad
    has_lp = g_logprob is not None and target is not None
    f32 = torch.float32
    block_v, num_warps = _block_config(vocab, logits.dtype)
    _token_stats_bwd_kernel[(rv.n_rows,)](
        rv.tensor, _flat_optional(target), _mask_bytes(mask),
        _flat_optional(row_max, f32), _flat_optional(log_norm, f32), _flat_optional(entropy, f32),
        _flat_optional(g_logprob, f32) if has_lp else None,
        _flat_optional(g_entropy, f32), _flat_optional(g_lse, f32), grad,
        rv.inner, rv.stride_outer, rv.stride_inner, vocab, inv_temperature,
        HAS_TARGET=target is not None, HAS_MASK=mask is not None, HAS_G_LOGPROB=has_lp,
        HAS_G_ENTROPY=g_entropy is not None, HAS_G_LSE=g_lse is not None,
        BLOCK_V=block_v, num_warps=num_warps,
    )
    return grad
