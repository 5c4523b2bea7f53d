"""`linear_token_stats`: `token_stats` of `hidden @ weight.T + bias` without ever holding the
[tokens × V] logits (docs/ops.md, linear_token_stats).

Forward: on the Triton backend the fused kernel of `linear_triton.py` (logits tiles reduced where
they are computed); elsewhere the chunked path below. Backward: the chunked path everywhere.

The chunked torch path: the rows that count (mask) are taken in chunks of a fixed number of rows;
each chunk's logits are computed, reduced by the `token_stats` backend of their device (the
float32 CPU path, Triton on a GPU) and dropped. The backward recomputes each chunk's logits, takes
the fused `token_stats` backward to d(logits) and turns it into d(hidden) = dz·W, d(weight) += dzᵀ·h
and d(bias) += Σ dz, so memory holds one chunk's logits and their gradient, O(chunk × V), forward
and backward. Every product has a multiple of 64 rows (a short chunk is padded with zero rows,
thrown away), because matmul libraries round a row differently in small products (a lone row
takes a matrix-vector path); from 64 rows on, a row's result does not depend on the other rows of
the product (checked in tests/test_linear_token_stats.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from appo_kernels._backend import family_backend
from appo_kernels._checks import FLOAT_DTYPES, int_arg, tensor_arg

CHUNK_ELEMENTS = 1 << 22  # logits per chunk by default (16 MiB in float32)
MIN_CHUNK_ROWS = 64  # products of fewer rows take other code paths in BLAS libraries


def chunk_rows(vocab: int, chunk_size: Optional[int]) -> int:
    rows = chunk_size if chunk_size is not None else CHUNK_ELEMENTS // vocab
    return max(MIN_CHUNK_ROWS, -(-rows // MIN_CHUNK_ROWS) * MIN_CHUNK_ROWS)  # a multiple of 64


def _padded_rows(n: int) -> int:
    """Rows of the product for n rows: a multiple of 64, at least 64."""
    return max(MIN_CHUNK_ROWS, -(-n // MIN_CHUNK_ROWS) * MIN_CHUNK_ROWS)


def _rows_that_count(n: int, mask: Optional[Tensor], device) -> Tensor:
    if mask is None:
        return torch.arange(n, device=device)
    return mask.reshape(-1).nonzero().squeeze(1)  # a device sync: the rows to compute


def _chunk(x: Tensor, rows: int) -> Tensor:
    """x [c, ...] padded with zero rows to [rows, ...]."""
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0],) + x.shape[1:])])


def _logits(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    z = h @ weight.T
    return z if bias is None else z.add_(bias)


def _out_dtype(hidden: Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32  # as token_stats


def _impl(z: Tensor):
    from appo_kernels.token_stats import _impl as token_stats_impl

    return token_stats_impl(z)


@torch.library.custom_op("appo::linear_token_stats", mutates_args=())
def _linear_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Optional[Tensor],
               mask: Optional[Tensor], inv_temperature: float, chunk: int
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(logprob, entropy, lse, row_max, log_norm), float32 [...]; masked rows 0."""
    lead, width = hidden.shape[:-1], hidden.shape[-1]
    rows = hidden.reshape(-1, width)
    outs = [rows.new_zeros(rows.shape[0], dtype=_out_dtype(hidden)) for _ in range(5)]
    index = _rows_that_count(rows.shape[0], mask, hidden.device)
    tgt = None if target is None else target.reshape(-1)
    if family_backend(hidden.device, hidden.dtype) == "triton":  # the fused kernel, all rows
        from appo_kernels.token_stats import linear_triton

        values = linear_triton.forward(rows[index].contiguous(), weight, bias,
                                       None if tgt is None else tgt[index].contiguous(),
                                       inv_temperature)
        for out, value in zip(outs, values):
            if value.numel():
                out[index] = value
        return tuple(o.reshape(lead) for o in outs)
    for a in range(0, len(index), chunk):
        which = index[a:a + chunk]
        padded = _padded_rows(len(which))
        z = _logits(_chunk(rows[which], padded), weight, bias)
        t = None if tgt is None else _chunk(tgt[which], padded)
        lp, ent, lse, _, _, row_max, log_norm = _impl(z).forward(z, t, None, inv_temperature,
                                                                 False, False)
        for out, value in zip(outs, (lp, ent, lse, row_max, log_norm)):
            if value.numel():
                out[which] = value[:len(which)].to(out.dtype)
    return tuple(o.reshape(lead) for o in outs)


@_linear_op.register_fake
def _(hidden, weight, bias, target, mask, inv_temperature, chunk):
    lead = hidden.shape[:-1]
    return tuple(hidden.new_empty(lead, dtype=_out_dtype(hidden)) for _ in range(5))


@torch.library.custom_op("appo::linear_token_stats_backward", mutates_args=())
def _linear_backward_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                        target: Optional[Tensor], mask: Optional[Tensor], row_max: Tensor,
                        log_norm: Tensor, entropy: Tensor, g_logprob: Optional[Tensor],
                        g_entropy: Optional[Tensor], g_lse: Optional[Tensor],
                        inv_temperature: float, chunk: int, want: list[bool]
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """(d hidden, d weight, d bias) of Σ g_lp·logprob + g_H·entropy + g_lse·lse; an unwanted
    gradient is an empty tensor."""
    width = hidden.shape[-1]
    rows = hidden.reshape(-1, width)
    grad_h = torch.zeros_like(rows) if want[0] else rows.new_empty(0)
    acc = _out_dtype(hidden)  # d(weight) and d(bias) sum over chunks in float32 (float64)
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) \
        if want[1] else weight.new_empty(0)
    grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) \
        if want[2] and bias is not None else weight.new_empty(0)
    index = _rows_that_count(rows.shape[0], mask, hidden.device)

    def flat(t):
        return None if t is None else t.reshape(-1)

    tgt, g_lp, g_h, g_lse = flat(target), flat(g_logprob), flat(g_entropy), flat(g_lse)
    m_all, ln_all, h_all = flat(row_max), flat(log_norm), flat(entropy)
    for a in range(0, len(index), chunk):
        which = index[a:a + chunk]
        real = len(which)
        padded = _padded_rows(real)
        h = _chunk(rows[which], padded)
        z = _logits(h, weight, bias)

        def part(t):
            return None if t is None else _chunk(t[which], padded)

        impl = _impl(z)
        extra = {"in_place": True} if impl.__name__.endswith(".cpu") else {}  # z is ours to reuse
        dz = impl.backward(z, part(tgt), None, part(m_all), part(ln_all), part(h_all),
                           part(g_lp), part(g_h), part(g_lse), inv_temperature, **extra)
        dz[real:] = 0  # padded rows (their statistics were never kept)
        if want[0]:
            grad_h[which] = (dz @ weight)[:real]
        if want[1]:
            if dz.dtype == acc:
                grad_w.addmm_(dz.T, h)  # no [V, H] temporary
            else:
                grad_w += (dz.T @ h).to(acc)
        if grad_b.numel():
            grad_b += dz.to(acc).sum(0)
    return (grad_h.reshape(hidden.shape) if want[0] else grad_h, grad_w.to(weight.dtype),
            grad_b.to(weight.dtype))


@_linear_backward_op.register_fake
def _(hidden, weight, bias, target, mask, row_max, log_norm, entropy, g_logprob, g_entropy,
      g_lse, inv_temperature, chunk, want):
    return (torch.empty_like(hidden) if want[0] else hidden.new_empty(0),
            torch.empty_like(weight) if want[1] else weight.new_empty(0),
            weight.new_empty(weight.shape[0]) if want[2] and bias is not None
            else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, target, mask, inv_temperature, chunk = inputs
    _, entropy, _, row_max, log_norm = output
    ctx.save_for_backward(hidden, weight, bias, target, mask, row_max, log_norm, entropy)
    ctx.inv_temperature, ctx.chunk = inv_temperature, chunk


def _backward(ctx, g_logprob, g_entropy, g_lse, _g_max, _g_norm):
    hidden, weight, bias, target, mask, row_max, log_norm, entropy = ctx.saved_tensors
    want = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2]]
    if target is None:
        g_logprob = None
    grad_h, grad_w, grad_b = _linear_backward_op(
        hidden, weight, bias, target, mask, row_max, log_norm, entropy, g_logprob, g_entropy,
        g_lse, ctx.inv_temperature, ctx.chunk, want)
    return (grad_h if want[0] else None, grad_w if want[1] else None,
            grad_b if want[2] else None, None, None, None, None)


torch.library.register_autograd("appo::linear_token_stats", _backward,
                                setup_context=_setup_context)


def linear_token_stats(hidden: Tensor, weight: Tensor, target: Optional[Tensor] = None, *,
                       bias: Optional[Tensor] = None, temperature: float = 1.0,
                       mask: Optional[Tensor] = None, chunk_size: Optional[int] = None):
    """`token_stats(hidden @ weight.T + bias, target, temperature=..., mask=...)` without the
    [..., V] logits: memory O(chunk × V) in the forward and the backward.

    Args:
        hidden: `[..., H]` bfloat16/float16/float32/float64 (the last hidden states).
        weight: `[V, H]` (an lm_head's weight), the dtype and device of `hidden`.
        target: int32/int64 `[...]` token ids, or None (then `logprob` is None).
        bias: `[V]` or None.
        temperature, mask: as in `token_stats` (masked rows are not computed, give 0 and no
            gradient).
        chunk_size: rows per chunk, rounded up to a multiple of 64 (default: about 2^22 logits).

    Returns:
        TokenStats(logprob, entropy, lse), float32 `[...]` (float64 for float64 inputs),
        differentiable with respect to
        hidden, weight and bias.
    """
    from appo_kernels.token_stats import TokenStats, _check_rows

    tensor_arg("hidden", hidden, dtypes=FLOAT_DTYPES)
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"hidden must have shape [..., H] with H >= 1, got {tuple(hidden.shape)}")
    tensor_arg("weight", weight, dtypes=(hidden.dtype,), like=hidden)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape [V, H] with H = hidden.shape[-1] = "
                         f"{hidden.shape[-1]} and V >= 1, got {tuple(weight.shape)}")
    tensor_arg("bias", bias, dtypes=(hidden.dtype,), shape=weight.shape[:1], like=hidden,
               optional=True)
    rows = chunk_rows(weight.shape[0],
                      None if chunk_size is None else int_arg("chunk_size", chunk_size, low=1))
    _check_rows(hidden.shape[:-1], hidden, target, temperature, mask, ())
    logprob, entropy, lse, _, _ = _linear_op(hidden, weight, bias, target, mask,
                                             1.0 / float(temperature), rows)
    return TokenStats(logprob=logprob if target is not None else None, entropy=entropy, lse=lse)
