"""`token_stats`: log-prob of the target, exact entropy and logsumexp of every row of logits (docs/ops.md, token_stats).

One pass over the logits with float32 accumulators relative to the running max. Backends: float32
torch on the CPU (`cpu.py`), the float64 torch reference (float64 logits, and `APPO_BACKEND=torch`
on a GPU), a Triton kernel and a CUDA kernel, behind one `torch.library` custom op with a
fake implementation and a fused backward, so the op works under `torch.compile(fullgraph=True)`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from appo_kernels import _backend
from appo_kernels._checks import (FLOAT32_MAX, FLOAT32_TINY, FLOAT_DTYPES, INDEX_DTYPES,
                                  float_arg, tensor_arg)

EXTRAS = ("varentropy", "top2_margin")


class TokenStats(NamedTuple):
    logprob: Optional[Tensor]
    entropy: Tensor
    lse: Tensor
    varentropy: Optional[Tensor] = None
    top2_margin: Optional[Tensor] = None


def _impl(logits: Tensor):
    backend = _backend.family_backend(logits.device, logits.dtype, has_cuda_kernel=True)
    if backend == "triton":
        from appo_kernels.token_stats import triton as impl
    elif backend == "cuda":
        from appo_kernels.token_stats import cuda as impl
    elif logits.device.type == "cpu" and logits.dtype != torch.float64:
        from appo_kernels.token_stats import cpu as impl  # float32 work, cache-sized chunks
    else:
        from appo_kernels.token_stats import reference as impl  # float64 (and torch on a GPU)
    return impl


@torch.library.custom_op("appo::token_stats", mutates_args=())
def _token_stats_op(
    logits: Tensor,
    target: Optional[Tensor],
    mask: Optional[Tensor],
    inv_temperature: float,
    want_varentropy: bool,
    want_top2: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = _impl(logits)
    return impl.forward(logits, target, mask, inv_temperature, want_varentropy, want_top2)


@_token_stats_op.register_fake
def _(logits, target, mask, inv_temperature, want_varentropy, want_top2):
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lead = logits.shape[:-1]

    def out(wanted: bool) -> Tensor:
        return logits.new_empty(lead if wanted else (0,), dtype=dtype)

    return (out(target is not None), out(True), out(True), out(want_varentropy), out(want_top2),
            out(True), out(True))


@torch.library.custom_op("appo::token_stats_backward", mutates_args=())
def _token_stats_backward_op(
    logits: Tensor,
    target: Optional[Tensor],
    mask: Optional[Tensor],
    row_max: Tensor,
    log_norm: Tensor,
    entropy: Tensor,
    g_logprob: Optional[Tensor],
    g_entropy: Optional[Tensor],
    g_lse: Optional[Tensor],
    inv_temperature: float,
) -> Tensor:
    impl = _impl(logits)
    return impl.backward(logits, target, mask, row_max, log_norm, entropy,
                         g_logprob, g_entropy, g_lse, inv_temperature)


@_token_stats_backward_op.register_fake
def _(logits, target, mask, row_max, log_norm, entropy, g_logprob, g_entropy, g_lse,
      inv_temperature):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, target, mask, inv_temperature, _, _ = inputs
    _, entropy, _, _, _, row_max, log_norm = output
    ctx.save_for_backward(logits, target, mask, row_max, log_norm, entropy)
    ctx.inv_temperature = inv_temperature


def _backward(ctx, g_logprob, g_entropy, g_lse, *_extras):
    logits, target, mask, row_max, log_norm, entropy = ctx.saved_tensors
    if target is None:
        g_logprob = None
    grad = _token_stats_backward_op(logits, target, mask, row_max, log_norm, entropy,
                                    g_logprob, g_entropy, g_lse, ctx.inv_temperature)
    return grad, None, None, None, None, None


torch.library.register_autograd("appo::token_stats", _backward, setup_context=_setup_context)


def _check_args(logits, target, temperature, mask, extras) -> None:
    tensor_arg("logits", logits, dtypes=FLOAT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if logits.stride(-1) != 1:
        raise ValueError(
            f"logits: the vocabulary (last) dimension must have stride 1, got strides "
            f"{tuple(logits.stride())}; pass logits.contiguous()"
        )
    _check_rows(logits.shape[:-1], logits, target, temperature, mask, extras)


def _check_rows(lead, like: Tensor, target, temperature, mask, extras) -> None:
    """target, mask, temperature and extras of rows `lead` (shared with linear_token_stats)."""
    tensor_arg("target", target, dtypes=INDEX_DTYPES, shape=lead, like=like, optional=True)
    tensor_arg("mask", mask, dtypes=(torch.bool,), shape=lead, like=like, optional=True)
    temperature = float_arg("temperature", temperature, low=0.0, low_open=True)
    # the kernels scale by 1/temperature in float32: it must be a finite normal float32
    if not torch.compiler.is_compiling() and not (
            FLOAT32_TINY <= 1.0 / temperature <= FLOAT32_MAX):
        raise ValueError(f"temperature must be in [{1 / FLOAT32_MAX:.3g}, "
                         f"{1 / FLOAT32_TINY:.3g}] (its reciprocal a normal float32), "
                         f"got {temperature}")
    if isinstance(extras, str) or not all(isinstance(e, str) for e in extras):
        raise TypeError(f"extras must be a tuple of names from {EXTRAS}, got {extras!r}")
    unknown = [e for e in extras if e not in EXTRAS]
    if unknown:
        raise ValueError(f"extras: unknown names {unknown}; choose from {EXTRAS}")


def _check_target_range(logits: Tensor, target: Tensor, mask: Optional[Tensor]) -> None:
    vocab = logits.shape[-1]
    bad = (target < 0) | (target >= vocab)
    if mask is not None:
        bad &= mask
    if bool(bad.any()):  # a device sync: only with validate=True
        where = tuple(i.item() for i in bad.nonzero()[0])
        raise ValueError(
            f"target holds ids outside [0, {vocab}) at index {where}: {target[where].item()}")


def token_stats(
    logits: Tensor,
    target: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    mask: Optional[Tensor] = None,
    extras: tuple[str, ...] = (),
    validate: bool = False,
) -> TokenStats:
    """Per-row statistics of `softmax(logits / temperature)` over the last dimension.

    Args:
        logits: `[..., V]` bfloat16/float16/float32 (float64 runs the reference, for gradcheck);
            the last dim must have stride 1, other strides are free.
        target: int32/int64 `[...]` token ids, or None (then `logprob` is None). Ids outside
            `[0, V)` give NaN (or raise with `validate=True`).
        temperature: z = logits / temperature, computed in float32.
        mask: bool `[...]`; rows where it is False are not read, give 0 and get no gradient.
        extras: any of "varentropy" (Var_p[log p]) and "top2_margin" (z_(1) - z_(2)); these two
            are returned detached (not differentiable).
        validate: check target ids (a device sync). Also on with `APPO_VALIDATE=1`.

    Returns:
        TokenStats(logprob, entropy, lse, varentropy, top2_margin), float32 `[...]`; logprob,
        entropy and lse are differentiable with respect to `logits` in one fused backward.
    """
    _check_args(logits, target, temperature, mask, extras)
    if target is not None and (validate or _backend.validate_default()):
        _check_target_range(logits, target, mask)
    want_var, want_top2 = "varentropy" in extras, "top2_margin" in extras
    logprob, entropy, lse, var, top2, _, _ = _token_stats_op(
        logits, target, mask, 1.0 / float(temperature), want_var, want_top2)
    return TokenStats(
        logprob=logprob if target is not None else None,
        entropy=entropy,
        lse=lse,
        varentropy=var.detach() if want_var else None,
        top2_margin=top2.detach() if want_top2 else None,
    )
