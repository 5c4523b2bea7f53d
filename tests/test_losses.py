"""policy_loss and kl_penalty (docs/ops.md) against float64 references written token by token, with
the aggregations in the padded [S, L] form in which verl and TRL define them."""

import math

import pytest
import torch

from appo_kernels.losses import AGG_ALIASES, AGG_MODES, kl_penalty, policy_loss

from packed import cu_seqlens_of, random_lengths, spans

CLIP_LOW, CLIP_HIGH, CLIP_C = 0.2, 0.28, 3.0
LOSS_TOL = dict(atol=1e-6, rtol=1e-5)  # float32 results against float64 references


def brute_token_loss(logprob, old, adv, clip_low, clip_high, clip_c):
    """One token: (loss, clipped, dual-clipped), verl's compute_policy_loss by hand."""
    ratio = (logprob - old).clamp(-20, 20).exp()
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    dual = adv < 0 and loss.item() > -adv * clip_c
    if dual:
        loss = torch.minimum(loss, torch.tensor(-adv * clip_c, dtype=torch.float64))
    return loss, clipped.item() > unclipped.item(), dual


def brute_policy_loss(logprob, old, adv, mask, cu, agg, seq_filter, scale=None,
                      clip_low=CLIP_LOW, clip_high=CLIP_HIGH, clip_c=CLIP_C, denominator=None):
    """float64 loss (differentiable in `logprob`) and metrics; aggregation on the padded layout."""
    n_seqs = len(cu) - 1
    width = max([end - start for start, end in spans(cu)] + [0])
    losses = torch.zeros(n_seqs, width, dtype=torch.float64)
    counted = torch.zeros(n_seqs, width, dtype=torch.float64)
    n_masked = n_clipped = n_dual = kl_sum = 0.0
    n_dropped = 0
    for s, (start, end) in enumerate(spans(cu)):
        hits = 0
        for t in range(start, end):
            if not mask[t]:
                continue
            loss, clipped, dual = brute_token_loss(logprob[t], float(old[t]), float(adv[t]),
                                                   clip_low, clip_high, clip_c)
            losses = losses.index_put((torch.tensor(s), torch.tensor(t - start)), loss)
            counted[s, t - start] = 1.0
            n_masked, n_clipped, n_dual = n_masked + 1, n_clipped + clipped, n_dual + dual
            kl_sum += float(old[t]) - logprob[t].item()
            hits += dual
        if seq_filter and hits > 1:  # dropped: as if its mask were all False
            counted[s] = 0.0
            n_dropped += 1
    masked_losses = losses * counted
    agg = AGG_ALIASES.get(agg, agg)
    seqs = n_seqs if denominator is None else denominator
    if agg == "token-mean":  # verl token-mean, TRL bnpo/dapo
        loss = masked_losses.sum() / (counted.sum().clamp(min=1) if denominator is None
                                      else denominator)
    elif agg == "token-sum":
        loss = masked_losses.sum()
    elif agg == "seq-mean-token-mean":  # TRL grpo
        loss = (masked_losses.sum(-1) / counted.sum(-1).clamp(min=1)).sum() / seqs
    elif agg == "seq-mean-token-sum":
        loss = masked_losses.sum(-1).sum() / seqs
    else:  # TRL dr_grpo: sum / (B · max_completion_length)
        loss = masked_losses.sum() / (seqs * (width if scale is None else scale))
    n_masked = max(n_masked, 1)
    metrics = {"clip_frac": n_clipped / n_masked, "dual_clip_frac": n_dual / n_masked,
               "approx_kl": kl_sum / n_masked, "dropped_seqs": float(n_dropped)}
    return loss, metrics


def loss_inputs(lengths, device="cpu", dtype=torch.float32):
    """Log-ratios spread across the clip range [log 0.8, log 1.28] and the dual-clip threshold
    log 3, advantages of both signs, a quarter of the tokens masked out."""
    cu = cu_seqlens_of(lengths)
    n = int(cu[-1])
    logprob = -torch.rand(n) * 3
    old = logprob - torch.empty(n).uniform_(-1.6, 1.6)
    adv = torch.randn(n)
    mask = torch.rand(n) < 0.75
    return [t.to(device) for t in (logprob.to(dtype), old.to(dtype), adv.to(dtype), mask, cu)]


@pytest.mark.parametrize("seq_filter", [True, False])
@pytest.mark.parametrize("agg", [*AGG_MODES, *AGG_ALIASES])
def test_policy_loss_and_gradient_match_reference(device, agg, seq_filter):
    logprob, old, adv, mask, cu = loss_inputs(random_lengths(12, 20), device)
    logprob.requires_grad_()
    loss, metrics = policy_loss(logprob, old, adv, mask, agg=agg, seq_filter=seq_filter,
                                cu_seqlens=cu)
    loss.backward()
    lp64 = logprob.detach().cpu().double().requires_grad_()
    want, want_metrics = brute_policy_loss(lp64, old.cpu(), adv.cpu(), mask.cpu(), cu.cpu(), agg,
                                           seq_filter)
    want.backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    # token-sum is an unnormalised float32 sum of ~150 terms of size ~1: its rounding reaches
    # a few 1e-6 (seen: 1.8e-6), where the normalised modes stay below 1e-6
    loss_tol = dict(LOSS_TOL, atol=1e-5) if agg == "token-sum" else LOSS_TOL
    torch.testing.assert_close(loss.detach().cpu().double(), want.detach(), **loss_tol)
    torch.testing.assert_close(logprob.grad.cpu().double(), lp64.grad, **LOSS_TOL)
    for name, value in want_metrics.items():
        assert metrics[name].dtype == torch.float32 and not metrics[name].requires_grad
        assert metrics[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("agg", [mode for mode in AGG_MODES if mode != "token-sum"])
def test_a_global_denominator_replaces_the_local_count(device, agg):
    """denominator: the whole batch's token (or sequence) count, as verl's global batch info."""
    logprob, old, adv, mask, cu = loss_inputs(random_lengths(9, 15), device)
    logprob.requires_grad_()
    total = 123.0 if agg == "token-mean" else 17.0
    loss, _ = policy_loss(logprob, old, adv, mask, agg=agg, cu_seqlens=cu,
                          denominator=torch.tensor(total, device=device))
    loss.backward()
    lp64 = logprob.detach().cpu().double().requires_grad_()
    want, _ = brute_policy_loss(lp64, old.cpu(), adv.cpu(), mask.cpu(), cu.cpu(), agg, True,
                                denominator=total)
    want.backward()
    torch.testing.assert_close(loss.detach().cpu().double(), want.detach(), **LOSS_TOL)
    torch.testing.assert_close(logprob.grad.cpu().double(), lp64.grad, **LOSS_TOL)


def test_aliases_are_verl_modes(device):
    logprob, old, adv, mask, cu = loss_inputs(random_lengths(8, 12), device)
    for alias, mode in AGG_ALIASES.items():
        a, _ = policy_loss(logprob, old, adv, mask, agg=alias, cu_seqlens=cu)
        b, _ = policy_loss(logprob, old, adv, mask, agg=mode, cu_seqlens=cu)
        assert torch.equal(a, b), alias


def test_dr_grpo_with_max_completion_length_matches_trl(device):
    max_completion_length = 64
    logprob, old, adv, mask, cu = loss_inputs(random_lengths(6, 30), device)
    loss, _ = policy_loss(logprob, old, adv, mask, agg="dr_grpo", seq_filter=False,
                          cu_seqlens=cu, loss_scale_factor=max_completion_length)
    want, _ = brute_policy_loss(logprob.cpu().double(), old.cpu(), adv.cpu(), mask.cpu(),
                                cu.cpu(), "dr_grpo", False, scale=max_completion_length)
    torch.testing.assert_close(loss.cpu().double(), want, **LOSS_TOL)


def test_dual_clip_boundary_and_sequence_filter(device):
    """Sequence 0 has one dual-clipped token (kept), sequence 1 two (dropped), sequence 2 one
    dual-clipped token outside the mask (not counted, kept)."""
    cu = torch.tensor([0, 3, 6, 8], device=device)
    log_ratio = torch.tensor([1.5, 0.0, 0.1, 1.5, 2.0, -0.1, 1.5, 0.0], device=device)
    adv = torch.tensor([-1.0, 0.5, 2.0, -0.5, -2.0, 1.0, -1.0, 1.0], device=device)
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 0, 1], dtype=torch.bool, device=device)
    old = -torch.rand(8, device=device)
    logprob = (old + log_ratio).requires_grad_()
    loss, metrics = policy_loss(logprob, old, adv, mask, cu_seqlens=cu)
    assert metrics["dropped_seqs"].item() == 1.0
    assert metrics["dual_clip_frac"].item() == pytest.approx(3 / 7)
    kept = mask.clone()
    kept[3:6] = False
    same, _ = policy_loss(logprob, old, adv, kept, seq_filter=False, cu_seqlens=cu)
    assert torch.equal(loss, same)
    loss.backward()
    # a dual-clipped token's loss is the constant −A·c: no gradient; dropped tokens neither
    assert logprob.grad[0] == 0 and (logprob.grad[3:7] == 0).all()
    assert logprob.grad[1] != 0


def test_masked_tokens_are_not_read(device):
    logprob, old, adv, mask, cu = loss_inputs(random_lengths(6, 10), device)
    logprob.requires_grad_()
    for agg in AGG_MODES:
        poisoned = [torch.where(mask, t, v) for t, v in ((logprob, math.inf), (old, math.nan),
                                                         (adv, -math.inf))]
        loss, metrics = policy_loss(*poisoned, mask, agg=agg, cu_seqlens=cu)
        clean, _ = policy_loss(logprob, old, adv, mask, agg=agg, cu_seqlens=cu)
        assert torch.equal(loss, clean), agg
        assert all(torch.isfinite(v) for v in metrics.values())
        (grad,) = torch.autograd.grad(loss, logprob)
        assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()


def test_token_mean_without_cu_seqlens_and_half_inputs(device):
    logprob, old, adv, mask, cu = loss_inputs(random_lengths(5, 10), device, torch.bfloat16)
    loss, _ = policy_loss(logprob, old, adv, mask, seq_filter=False)
    want, _ = brute_policy_loss(logprob.cpu().double(), old.cpu().double(), adv.cpu().double(),
                                mask.cpu(), cu.cpu(), "token-mean", False)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.cpu().double(), want, **LOSS_TOL)


def test_empty_batch_gives_zero(device):
    empty = torch.zeros(0, device=device)
    cu = torch.zeros(1, dtype=torch.int32, device=device)
    for agg in AGG_MODES:
        loss, metrics = policy_loss(empty, empty, empty, empty.bool(), agg=agg, cu_seqlens=cu)
        assert loss.item() == 0 and all(v.item() == 0 for v in metrics.values())


@pytest.mark.parametrize("agg", AGG_MODES)
def test_policy_loss_gradcheck(agg):
    logprob, old, adv, mask, cu = loss_inputs([3, 0, 1, 5], dtype=torch.float64)
    logprob.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda lp: policy_loss(lp, old, adv, mask, agg=agg, cu_seqlens=cu)[0], (logprob,))


def test_policy_loss_compiles_without_graph_breaks(device):
    logprob, old, adv, mask, cu = loss_inputs(random_lengths(6, 10), device)
    compiled = torch.compile(policy_loss, fullgraph=True, backend="eager")
    loss, metrics = compiled(logprob, old, adv, mask, agg="seq-mean-token-sum-norm",
                             cu_seqlens=cu)
    eager, eager_metrics = policy_loss(logprob, old, adv, mask, agg="seq-mean-token-sum-norm",
                                       cu_seqlens=cu)
    torch.testing.assert_close(loss, eager)
    assert metrics.keys() == eager_metrics.keys()


# ------------------------------------------------------------------ kl_penalty


def brute_kl(logprob, ref, kind):
    d = logprob - ref
    if kind in ("k1", "kl"):
        return d
    if kind in ("k2", "mse"):
        return 0.5 * d * d
    r = min(max(-d, -20.0), 20.0)
    return min(max(math.exp(r) - r - 1, -10.0), 10.0)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "low_var_kl", "kl", "mse"])
def test_kl_penalty_matches_formula_and_gradient(device, kind):
    logprob = (-torch.rand(7, 9) * 3).to(device).requires_grad_()
    # mostly small log-ratios, plus ones beyond the ±20 and ±10 clamps of k3
    ref = (logprob.detach() + torch.randn(7, 9, device=device) * 0.5)
    ref[0, :4] = logprob.detach()[0, :4] + torch.tensor([30.0, -30.0, 3.0, -3.0], device=device)
    kl = kl_penalty(logprob, ref, kind)
    assert kl.dtype == torch.float32 and kl.shape == logprob.shape
    want = torch.tensor([[brute_kl(float(a), float(b), kind) for a, b in zip(ra, rb)]
                         for ra, rb in zip(logprob.detach().cpu().double(),
                                           ref.cpu().double())], dtype=torch.float64)
    torch.testing.assert_close(kl.detach().cpu().double(), want, atol=1e-5, rtol=1e-5)
    weights = torch.randn(7, 9, device=device)
    (kl * weights).sum().backward()
    lp64 = logprob.detach().cpu().double().requires_grad_()
    (kl_penalty(lp64, ref.cpu().double(), kind) * weights.cpu().double()).sum().backward()
    torch.testing.assert_close(logprob.grad.cpu().double(), lp64.grad, atol=1e-5, rtol=1e-5)


def test_k3_is_nonnegative_and_zero_at_equal_policies(device):
    logprob = -torch.rand(50, device=device) * 5
    assert (kl_penalty(logprob, logprob.clone()) == 0).all()
    assert (kl_penalty(logprob, logprob + torch.randn(50, device=device)) >= 0).all()


def test_kl_penalty_gradcheck():
    logprob = -torch.rand(6, dtype=torch.float64, requires_grad=True)
    ref = -torch.rand(6, dtype=torch.float64, requires_grad=True)
    for kind in ("k1", "k2", "k3"):
        assert torch.autograd.gradcheck(lambda a, b: kl_penalty(a, b, kind), (logprob, ref))


def bad_loss_call(**change):
    args = dict(logprob=torch.randn(5), old_logprob=torch.randn(5), adv_tok=torch.randn(5),
                mask=torch.rand(5) < 0.5, cu_seqlens=torch.tensor([0, 2, 5]))
    args.update(change)
    return lambda: policy_loss(**args)


BAD = [
    ("cu_seqlens is required with seq_filter=True", ValueError, bad_loss_call(cu_seqlens=None)),
    ("cu_seqlens is required with agg='grpo'", ValueError,
     bad_loss_call(cu_seqlens=None, seq_filter=False, agg="grpo")),
    ("agg must be one of", ValueError, bad_loss_call(agg="sum")),
    ("cu_seqlens must be non-decreasing", ValueError,
     bad_loss_call(cu_seqlens=torch.tensor([0, 3, 2, 5]))),
    ("cu_seqlens\\[-1\\] must equal the number of packed tokens 5", ValueError,
     bad_loss_call(cu_seqlens=torch.tensor([0, 2, 4]))),
    ("cu_seqlens must have dtype int32 or int64", TypeError,
     bad_loss_call(cu_seqlens=torch.tensor([0.0, 5.0]))),
    ("old_logprob must have shape \\(5,\\)", ValueError,
     bad_loss_call(old_logprob=torch.randn(4))),
    ("adv_tok must have dtype", TypeError, bad_loss_call(adv_tok=torch.arange(5))),
    ("mask must have dtype bool", TypeError, bad_loss_call(mask=torch.ones(5))),
    ("logprob must be 1-D", ValueError, bad_loss_call(logprob=torch.randn(5, 1))),
    ("clip_c must be > 1.0", ValueError, bad_loss_call(clip_c=1.0)),
    ("clip_low must be < 1", ValueError, bad_loss_call(clip_low=1.0)),
    ("clip_high must be >= 0.0", ValueError, bad_loss_call(clip_high=-0.1)),
    ("seq_filter must be a bool", TypeError, bad_loss_call(seq_filter=1)),
    ("loss_scale_factor must be > 0.0", ValueError,
     bad_loss_call(agg="dr_grpo", loss_scale_factor=0)),
    ("denominator must be > 0.0", ValueError, bad_loss_call(denominator=0.0)),
    ("denominator has no use with agg='token-sum'", ValueError,
     bad_loss_call(agg="token-sum", denominator=3.0)),
    ("denominator must be 0-D", ValueError, bad_loss_call(denominator=torch.ones(2))),
    ("kind must be one of", ValueError, lambda: kl_penalty(torch.randn(3), torch.randn(3), "k4")),
    ("ref_logprob must have shape \\(3,\\)", ValueError,
     lambda: kl_penalty(torch.randn(3), torch.randn(4))),
    ("logprob must have dtype", TypeError,
     lambda: kl_penalty(torch.arange(3), torch.randn(3))),
]


@pytest.mark.parametrize("message,error,call", BAD, ids=[m[:30] for m, _, _ in BAD])
def test_bad_inputs_raise(message, error, call):
    with pytest.raises(error, match=message):
        call()
