"""Policy-gradient losses over packed tokens (docs/ops.md; docs/algorithm.md): token-level PPO with
clip-higher and dual clip, APPO's filter of sequences hit repeatedly by the dual clip, verl's loss
aggregation modes, and the k1/k2/k3 KL penalties.

Plain torch, differentiable by autograd, no host sync (so the functions trace under
torch.compile). The per-token formulas follow verl's `compute_policy_loss` and `kl_penalty`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from appo_kernels._checks import FLOAT_DTYPES, cu_seqlens_arg, float_arg, tensor_arg
from appo_kernels.packing import token_segments
from appo_kernels.scan.reference import LOG_RATIO_CLAMP  # verl's ±20 on log-ratios before exp

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
             "seq-mean-token-sum-norm")
# TRL's GRPOTrainer loss_type names -> verl's loss_agg_mode names (see `policy_loss`)
AGG_ALIASES = {"dapo": "token-mean", "grpo": "seq-mean-token-mean",
               "dr_grpo": "seq-mean-token-sum-norm"}
KL_KINDS = {"k1": "k1", "kl": "k1", "k2": "k2", "mse": "k2", "k3": "k3", "low_var_kl": "k3"}
K3_CLAMP = 10.0  # verl clamps the k3 estimate to ±10
DUAL_CLIP_HITS_ALLOWED = 1  # APPO: a sequence with more dual-clipped tokens than this is dropped


def _result_dtype(*tensors: Tensor) -> torch.dtype:
    # float32 whatever the input dtype; float64 inputs stay float64 (for gradcheck)
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_policy_args(logprob, old_logprob, adv_tok, mask, clip_low, clip_high, clip_c, agg,
                       seq_filter, cu_seqlens, loss_scale_factor, denominator,
                       validate) -> tuple[str, int]:
    tensor_arg("logprob", logprob, dtypes=FLOAT_DTYPES, ndim=1)
    for name, t in (("old_logprob", old_logprob), ("adv_tok", adv_tok)):
        tensor_arg(name, t, dtypes=FLOAT_DTYPES, shape=logprob.shape, like=logprob)
    tensor_arg("mask", mask, dtypes=(torch.bool,), shape=logprob.shape, like=logprob)
    float_arg("clip_low", clip_low, low=0.0)
    if clip_low >= 1:
        raise ValueError(f"clip_low must be < 1 (the ratio is clipped at 1 − clip_low), "
                         f"got {clip_low}")
    float_arg("clip_high", clip_high, low=0.0)
    float_arg("clip_c", clip_c, low=1.0, low_open=True)  # verl: dual clip needs c > 1
    if not isinstance(agg, str) or AGG_ALIASES.get(agg, agg) not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES} or a TRL alias {tuple(AGG_ALIASES)}, "
                         f"got {agg!r}")
    mode = AGG_ALIASES.get(agg, agg)
    if not isinstance(seq_filter, bool):
        raise TypeError(f"seq_filter must be a bool, got {type(seq_filter).__name__}")
    if loss_scale_factor is not None:
        float_arg("loss_scale_factor", loss_scale_factor, low=0.0, low_open=True)
    if denominator is not None:
        if isinstance(denominator, Tensor):
            tensor_arg("denominator", denominator, ndim=0, like=logprob)
        else:
            float_arg("denominator", denominator, low=0.0, low_open=True)
        if mode == "token-sum":
            raise ValueError("denominator has no use with agg='token-sum' (nothing is divided)")
    if cu_seqlens is None:
        needs = [why for why, used in (("seq_filter=True", seq_filter),
                                       (f"agg={agg!r}", mode.startswith("seq-mean"))) if used]
        if needs:
            raise ValueError(f"cu_seqlens is required with {' and '.join(needs)}: pass the "
                             f"[S+1] sequence offsets of the packed tokens (or use "
                             f"seq_filter=False, agg='token-mean')")
        return mode, 0
    return mode, cu_seqlens_arg(cu_seqlens, logprob.shape[0], like=logprob, validate=validate)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp_min(1)


def policy_loss(
    logprob: Tensor,
    old_logprob: Tensor,
    adv_tok: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_c: float = 3.0,
    agg: str = "token-mean",
    seq_filter: bool = True,
    cu_seqlens: Optional[Tensor] = None,
    loss_scale_factor: Optional[float] = None,
    denominator=None,
    validate: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-level PPO loss with clip-higher and dual clip, aggregated as verl does.

    Per token, with r = exp(clamp(logprob − old_logprob, −20, 20)) and A = adv_tok:
        L = max(−A·r, −A·clamp(r, 1 − clip_low, 1 + clip_high))          (clip-higher PPO)
        L = min(L, −A·clip_c)   where A < 0                                (dual clip)
    A token is "dual-clipped" when A < 0 and the cap applies (L > −A·clip_c before the min).
    With `seq_filter`, a sequence with more than one dual-clipped counted token is dropped:
    it is aggregated exactly as if its mask were all False.

    Aggregation (`agg`, verl's `loss_agg_mode`; m = mask after the filter, S = the number of
    sequences in the call, all of them, also empty or fully masked ones, as TRL and current verl
    (local batch size) count them; some earlier verl releases left fully masked sequences out):
        token-mean               Σ m·L / max(Σ m, 1)
        token-sum                Σ m·L
        seq-mean-token-mean      (1/S) Σ_s Σ_t m·L / max(Σ_t m, 1)
        seq-mean-token-sum       (1/S) Σ_s Σ_t m·L
        seq-mean-token-sum-norm  (1/S) Σ_s Σ_t m·L / loss_scale_factor
    TRL's GRPOTrainer `loss_type` names are aliases: "dapo" -> token-mean (TRL divides by the
    number of completion tokens of the whole gradient-accumulation batch; within one micro-batch
    on one process they agree), "grpo" -> seq-mean-token-mean (identical), "dr_grpo" ->
    seq-mean-token-sum-norm (TRL divides by B · max_completion_length: identical when
    `loss_scale_factor=max_completion_length`; the default here is the longest sequence of the
    call, the packed counterpart of verl's default, the padded response length).

    Args:
        logprob: float `[N]` log-probs of the sampled tokens under the current policy
            (differentiable).
        old_logprob: float `[N]` log-probs under the policy that sampled them.
        adv_tok: float `[N]` per-token advantages.
        mask: bool `[N]`, the tokens that count (model-generated tokens).
        clip_low, clip_high: the ratio is clipped to [1 − clip_low, 1 + clip_high] (DAPO's
            clip-higher: clip_high > clip_low).
        clip_c: the dual-clip constant, > 1.
        agg: one of AGG_MODES, or a TRL alias "dapo", "grpo", "dr_grpo".
        seq_filter: drop sequences with more than one dual-clipped token (needs cu_seqlens).
        cu_seqlens: int32/int64 `[S+1]` offsets of the packed sequences; required by seq_filter
            and by the seq-mean modes.
        loss_scale_factor: the constant of seq-mean-token-sum-norm (verl's name); default the
            longest sequence in the call.
        denominator: what token-mean divides by instead of max(Σ m, 1), and the seq-mean modes
            instead of S: a float or a 0-dim tensor, e.g. the token or sequence count of the
            whole batch over all data-parallel ranks (verl's `batch_num_tokens` and
            `global_batch_size`), so that each rank's loss is its share of the global mean.
        validate: check `cu_seqlens` values on the GPU too (a device sync).

    Returns:
        `(loss, metrics)`: the scalar loss (float32, float64 for float64 inputs) and a dict of
        detached float scalars, computed over all tokens of `mask` (before the filter):
        "clip_frac" (tokens whose clipped term was taken, verl's pg_clipfrac),
        "dual_clip_frac" (dual-clipped tokens, verl's pg_clipfrac_lower),
        "approx_kl" (mean of old_logprob − logprob, i.e. k1 of KL(π_old ‖ π), verl's ppo_kl,
        with the clamped log-ratio) and "dropped_seqs" (the number of sequences the filter
        dropped). No host sync.
    """
    mode, n_seqs = _check_policy_args(logprob, old_logprob, adv_tok, mask, clip_low, clip_high,
                                      clip_c, agg, seq_filter, cu_seqlens, loss_scale_factor,
                                      denominator, validate)
    dtype = _result_dtype(logprob, old_logprob, adv_tok)
    adv = torch.where(mask, adv_tok.to(dtype), 0.0)
    # tokens outside the mask get ratio 1 and no gradient, whatever their values
    log_ratio = torch.where(mask, logprob.to(dtype) - old_logprob.to(dtype), 0.0)
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    ppo = torch.maximum(unclipped, clipped)
    cap = -adv * clip_c
    dual_hit = mask & (adv < 0) & (ppo > cap)
    per_token = torch.where(adv < 0, torch.minimum(ppo, cap), ppo)

    counted = mask
    dropped_seqs = torch.zeros((), dtype=dtype, device=logprob.device)
    if cu_seqlens is not None:  # always given with seq_filter and the seq-mean modes (checked)
        seq_of_token = token_segments(cu_seqlens, logprob.shape[0])
        per_seq = torch.zeros(n_seqs, dtype=dtype, device=logprob.device)
    if seq_filter:
        hits = per_seq.index_add(0, seq_of_token, dual_hit.to(dtype))
        dropped = hits > DUAL_CLIP_HITS_ALLOWED
        counted = mask & ~dropped[seq_of_token]
        dropped_seqs = dropped.sum().to(dtype)

    if mode == "token-mean" and denominator is None:
        loss = _masked_mean(per_token, counted)
    elif mode in ("token-mean", "token-sum"):
        loss = torch.where(counted, per_token, 0.0).sum()
        if denominator is not None:
            loss = loss / denominator
    else:
        seq_sum = per_seq.index_add(0, seq_of_token, torch.where(counted, per_token, 0.0))
        if mode == "seq-mean-token-mean":
            seq_count = per_seq.index_add(0, seq_of_token, counted.to(dtype))
            seq_loss = seq_sum / seq_count.clamp_min(1)
        elif mode == "seq-mean-token-sum":
            seq_loss = seq_sum
        else:  # seq-mean-token-sum-norm
            if loss_scale_factor is None:
                lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(dtype)
                scale = lengths.max().clamp_min(1) if n_seqs else lengths.new_ones(())
            else:
                scale = loss_scale_factor
            seq_loss = seq_sum / scale
        loss = seq_loss.sum() / (max(n_seqs, 1) if denominator is None else denominator)

    with torch.no_grad():
        metrics = {
            "clip_frac": _masked_mean((clipped > unclipped).to(dtype), mask),
            "dual_clip_frac": _masked_mean(dual_hit.to(dtype), mask),
            "approx_kl": _masked_mean(-log_ratio, mask),
            "dropped_seqs": dropped_seqs,
        }
    return loss, metrics


def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from the sampled tokens' log-probs (Schulman's k1,
    k2, k3), float32 with the shape of the inputs (float64 for float64 inputs).

    With d = logprob − ref_logprob:
        "k1" ("kl")             d
        "k2" ("mse")            ½·d²
        "k3" ("low_var_kl")     exp(−d) + d − 1, with −d clamped to ±20 before exp and the
                                result clamped to ±10, as verl does (unbiased, always ≥ 0)
    Differentiable with respect to both inputs.
    """
    tensor_arg("logprob", logprob, dtypes=FLOAT_DTYPES)
    tensor_arg("ref_logprob", ref_logprob, dtypes=FLOAT_DTYPES, shape=logprob.shape, like=logprob)
    if not isinstance(kind, str) or kind not in KL_KINDS:
        raise ValueError(f"kind must be one of {tuple(KL_KINDS)}, got {kind!r}")
    dtype = _result_dtype(logprob, ref_logprob)
    log_ratio = logprob.to(dtype) - ref_logprob.to(dtype)
    kind = KL_KINDS[kind]
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    ref_log_ratio = (-log_ratio).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (ref_log_ratio.exp() - ref_log_ratio - 1.0).clamp(-K3_CLAMP, K3_CLAMP)
