"""discounted_suffix_sum, future_value, future_kl_scale and branching_score (docs/ops.md) against
brute-force float64 loops and the O(L²) decay-matrix formulation of the reference code."""

import math

import pytest
import torch

from appo_kernels import _backend
from appo_kernels.packing import pack, unpack
from appo_kernels.scan import (branching_score, discounted_suffix_sum, future_kl_scale,
                               future_value)
from packed import cu_seqlens_of, spans

GAMMAS = [0.0, 1.0, 2 ** (-1 / 64), 0.5]


def random_packing(lengths=None):
    """A shuffled mix of lengths around the kernel's 1024-token chunks, with empty and length-1
    sequences, unless `lengths` is given; returns cu_seqlens int32."""
    if lengths is None:
        lengths = [0, 1, 7, 300, 1, 0, 64, 1500, 2, 0]
        lengths = [lengths[i] for i in torch.randperm(len(lengths)).tolist()]
    return cu_seqlens_of(lengths)


def brute_suffix(values, cu, gamma):
    """The obvious loop: walk every sequence backwards, y = v + gamma·y."""
    y = torch.zeros(len(values), dtype=torch.float64)
    for start, end in spans(cu):
        acc = 0.0
        for t in range(end - 1, start - 1, -1):
            acc = float(values[t]) + gamma * acc
            y[t] = acc
    return y


def matrix_suffix(values, cu, gamma):
    """The reference code's formulation: an L×L decay matrix per sequence."""
    y = torch.zeros(len(values), dtype=torch.float64)
    for start, end in spans(cu):
        length = end - start
        if length == 0:
            continue
        i = torch.arange(length, dtype=torch.float64)
        power = i[None, :] - i[:, None]
        decay = torch.where(power >= 0, torch.tensor(gamma, dtype=torch.float64) ** power, 0.0)
        y[start:end] = decay @ values[start:end].double()
    return y


def assert_scan_close(actual, expected, magnitude, what):
    """float32 rounding of a sum is bounded by a few ulps of the sum of magnitudes."""
    assert actual.dtype == torch.float32, f"{what}: dtype {actual.dtype}"
    err = (actual.double() - expected).abs()
    tol = 1e-6 + 2e-6 * magnitude
    bad = err > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} tokens off, worst "
                           f"{err.max().item():.3g} at {int(err.argmax())}")


@pytest.mark.parametrize("gamma", GAMMAS)
def test_discounted_suffix_sum_matches_loop(backend, gamma):
    cu = random_packing()
    n = int(cu[-1])
    x = torch.randn(n) * 2
    mask = torch.rand(n) > 0.3
    with _backend.poisoned_outputs():
        y = discounted_suffix_sum(x, cu, gamma, mask)
    values = torch.where(mask, x.double(), 0.0)
    expected = brute_suffix(values, cu, gamma)
    assert_scan_close(y, expected, brute_suffix(values.abs(), cu, gamma), "suffix sum")
    torch.testing.assert_close(expected, matrix_suffix(values, cu, gamma))


def test_suffix_sum_without_mask_and_edge_packings(backend):
    for lengths in ([0], [1], [0, 0, 3], [5, 0], [1, 1, 1], [1024], [1025], [2049]):
        cu = random_packing(lengths)
        x = torch.randn(int(cu[-1]))
        y = discounted_suffix_sum(x, cu, 0.9)
        expected = brute_suffix(x, cu, 0.9)
        assert_scan_close(y, expected, brute_suffix(x.abs(), cu, 0.9), f"lengths {lengths}")


def test_suffix_sum_int64_offsets_and_half_inputs(backend):
    cu = random_packing().long()
    x = torch.randn(int(cu[-1])).to(torch.bfloat16)
    y = discounted_suffix_sum(x, cu, 1.0)
    expected = brute_suffix(x.double(), cu, 1.0)
    assert_scan_close(y, expected, brute_suffix(x.double().abs(), cu, 1.0), "bf16 input")


def test_suffix_sum_batch_invariance(backend):
    cu = random_packing([13, 700, 5])
    x = torch.randn(int(cu[-1]))
    together = discounted_suffix_sum(x, cu, 0.97)
    alone = discounted_suffix_sum(x[13:713], torch.tensor([0, 700], dtype=torch.int32), 0.97)
    assert torch.equal(together[13:713], alone)


def test_suffix_sum_gradient(backend):
    cu = random_packing([3, 0, 9, 1])
    x = torch.randn(int(cu[-1]), dtype=torch.float32, requires_grad=True)
    mask = torch.rand(x.shape[0]) > 0.3
    weights = torch.randn(x.shape[0])
    (discounted_suffix_sum(x, cu, 0.8, mask) * weights).sum().backward()
    x64 = x.detach().double().requires_grad_()
    values = torch.where(mask, x64, 0.0)
    out = torch.zeros_like(values)
    for start, end in spans(cu):  # differentiable brute force
        for t in range(start, end):
            k = torch.arange(t, end)
            out = out.index_put((torch.tensor([t]),), (0.8 ** (k - t) * values[k]).sum()[None])
    (out * weights).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-6, rtol=1e-5)


def test_suffix_sum_gradcheck():
    cu = random_packing([4, 0, 3])
    x = torch.randn(7, dtype=torch.float64, requires_grad=True)
    # the op computes in float32: check the analytic gradient with a float32-sized step
    assert torch.autograd.gradcheck(lambda v: discounted_suffix_sum(v, cu, 0.7).double(), (x,),
                                    eps=1e-3, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("gamma", [1.0, 0.95])
@pytest.mark.parametrize("clip", [(0.8, 1.2), (0.0, 1e30), None])
def test_future_value(backend, gamma, clip):
    cu = random_packing()
    n = int(cu[-1])
    logprob = -torch.rand(n) * 3
    old = logprob + torch.randn(n) * 0.05
    mask = torch.rand(n) > 0.2
    omega = future_value(logprob, old, cu, gamma=gamma, mask=mask, clip=clip)
    ratio = torch.where(mask, logprob.double() - old.double(), 0.0)
    s = brute_suffix(ratio, cu, gamma)
    lo, hi = clip if clip is not None else (-math.inf, math.inf)
    expected = s.clamp(-20, 20).exp().clamp(lo, hi)
    magnitude = brute_suffix(ratio.abs(), cu, gamma)
    # d exp(S) = exp(S)·dS: the tolerance scales with the value
    tol = (1e-6 + 2e-6 * magnitude) * expected.abs() + 1e-6
    assert ((omega.double() - expected).abs() <= tol).all()


def test_future_value_clamps_the_exponent(backend):
    cu = random_packing([50])
    logprob = torch.zeros(50) - 1.0
    old = logprob - 2.0  # S_0 = 100 > 20
    omega = future_value(logprob, old, cu, clip=None)
    assert omega[0].item() == pytest.approx(math.exp(20), rel=1e-5)


def brute_future_kl(adv, logprob, old, mask, cu, gamma, weight, clip, high_only, clip_c, safety):
    """docs/ops.md, sequence ops future_kl_scale, one token at a time."""
    out = torch.zeros(len(adv), dtype=torch.float64)
    d = (logprob.double() - old.double()).clamp(-20, 20)
    for start, end in spans(cu):
        for t in range(start, end):
            total = 0.0
            for k in range(t, end):
                if mask[k] and math.exp(d[k]) <= clip_c:
                    total += gamma ** (k - t) * float(d[k])
            f = min(max(math.exp(total), 1.0 if high_only else 1.0 - clip), 1.0 + clip)
            if adv[t] < 0 and math.exp(d[t]) > safety:
                f = min(max(f, 0.8), 1.0)
            out[t] = float(adv[t]) * (1.0 + weight * f)
    return out


@pytest.mark.parametrize("high_only", [True, False])
def test_future_kl_scale(backend, high_only):
    cu = random_packing([0, 1, 40, 3, 120, 0, 2])
    n = int(cu[-1])
    adv = torch.randn(n)
    logprob = -torch.rand(n) * 2
    # log-ratios spread around log 3 (dual clip) and log 6 (safety cap), both signs
    old = logprob - torch.empty(n).uniform_(-2.5, 2.5)
    mask = torch.rand(n) > 0.2
    out = future_kl_scale(adv, logprob, old, cu, mask, gamma=0.9, weight=0.5, clip=0.2,
                          high_only=high_only)
    expected = brute_future_kl(adv, logprob, old, mask, cu, 0.9, 0.5, 0.2, high_only, 3.0, 6.0)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_future_kl_scale_gradient_flows_to_adv_only(backend):
    cu = random_packing([6, 4])
    adv = torch.randn(10, requires_grad=True)
    logprob = torch.randn(10, requires_grad=True)
    old = logprob.detach() + 0.1
    out = future_kl_scale(adv, logprob, old, cu, torch.ones(10, dtype=torch.bool), weight=0.7)
    out.sum().backward()
    assert logprob.grad is None
    factor = (out / adv).detach()
    torch.testing.assert_close(adv.grad, factor)


def brute_zscore(x, keep, start, end):
    """z of x over the masked tokens of [start, end), and whether those values are all equal."""
    vals = [float(x[t]) for t in range(start, end) if keep[t]]
    mean = sum(vals) / len(vals) if vals else 0.0
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals)) if vals else 0.0
    return [(float(x[t]) - mean) / (std + 1e-6) for t in range(start, end)], len(set(vals)) <= 1


def brute_branching_score(entropy, omega, mask, cu):
    """score and strict per token, by the definition: z(entropy)·z(omega), a flat factor
    replaced by 1, both flat by 0."""
    score, strict = [], []
    for start, end in spans(cu):
        (z_e, flat_e), (z_o, flat_o) = (brute_zscore(entropy, mask, start, end),
                                        brute_zscore(omega, mask, start, end))
        if flat_e or flat_o:
            z_e = [0.0 if flat_o else 1.0] * len(z_e) if flat_e else z_e
            z_o = [0.0 if flat_e else 1.0] * len(z_o) if flat_o else z_o
        for i, t in enumerate(range(start, end)):
            score.append(z_e[i] * z_o[i] if mask[t] else 0.0)
            strict.append(bool(mask[t] and z_e[i] > 0 and z_o[i] > 0))
    return score, strict


def test_branching_score(backend):
    cu = random_packing()
    n = int(cu[-1])
    entropy = torch.rand(n) * 4
    omega = 0.8 + 0.4 * torch.rand(n)
    mask = torch.rand(n) > 0.3
    start, end = spans(cu)[int(torch.argmax((cu[1:] - cu[:-1]).float()))]
    mask[start:start + 3] = False
    with _backend.poisoned_outputs():
        scores = branching_score(entropy, omega, cu, mask)
    want_score, want_strict = brute_branching_score(entropy, omega, mask, cu)
    for t in range(n):
        assert scores.score[t].item() == pytest.approx(want_score[t], rel=1e-4, abs=1e-4)
        assert bool(scores.strict[t]) == want_strict[t]


def test_branching_score_falls_back_to_the_factor_that_varies(backend):
    """A sequence whose Ω is flat (every continuation equally likely under old and new policy,
    or clipped at one bound) branches on entropy alone, and one with flat entropy on Ω; both
    flat gives no preference (0), an all-masked sequence too."""
    cu = random_packing([6, 5, 4, 3, 1])
    n = int(cu[-1])
    entropy = torch.rand(n) * 3
    omega = 0.8 + 0.4 * torch.rand(n)
    mask = torch.ones(n, dtype=torch.bool)
    omega[0:6] = 1.2  # Ω clipped at its upper bound: flat
    entropy[6:11] = 0.7  # flat entropy
    omega[11:15], entropy[11:15] = 1.0, 2.0  # both flat
    mask[15:18] = False  # all masked
    with _backend.poisoned_outputs():
        scores = branching_score(entropy, omega, cu, mask)
    want_score, want_strict = brute_branching_score(entropy, omega, mask, cu)
    assert scores.score.tolist() == pytest.approx(want_score, rel=1e-4, abs=1e-4)
    assert scores.strict.tolist() == want_strict
    z_e, _ = brute_zscore(entropy, mask, 0, 6)
    assert scores.score[0:6].tolist() == pytest.approx(z_e, rel=1e-4, abs=1e-4)
    assert scores.strict[0:6].any() and not scores.strict[11:].any()
    assert (scores.score[11:18] == 0).all()


def KL_ARGS():
    return (torch.randn(5), torch.randn(5), torch.randn(5), torch.tensor([0, 5]),
            torch.ones(5, dtype=torch.bool))


BAD = [
    ("cu_seqlens must be non-decreasing", ValueError,
     lambda: discounted_suffix_sum(torch.randn(5), torch.tensor([0, 3, 2, 5]), 1.0)),
    ("cu_seqlens\\[-1\\] must equal the number of packed tokens 5", ValueError,
     lambda: discounted_suffix_sum(torch.randn(5), torch.tensor([0, 3, 4]), 1.0)),
    ("cu_seqlens\\[0\\] must be 0", ValueError,
     lambda: discounted_suffix_sum(torch.randn(5), torch.tensor([1, 5]), 1.0)),
    ("cu_seqlens must have dtype int32 or int64", TypeError,
     lambda: discounted_suffix_sum(torch.randn(5), torch.tensor([0.0, 5.0]), 1.0)),
    ("gamma must be <= 1.0", ValueError,
     lambda: discounted_suffix_sum(torch.randn(5), torch.tensor([0, 5]), 1.5)),
    ("mask must have shape", ValueError,
     lambda: discounted_suffix_sum(torch.randn(5), torch.tensor([0, 5]), 1.0,
                                   torch.ones(4, dtype=torch.bool))),
    ("x must be 1-D", ValueError,
     lambda: discounted_suffix_sum(torch.randn(5, 1), torch.tensor([0, 5]), 1.0)),
    ("old_logprob must have shape", ValueError,
     lambda: future_value(torch.randn(5), torch.randn(6), torch.tensor([0, 5]))),
    ("logprob must have dtype", TypeError,
     lambda: future_value(torch.arange(5), torch.randn(5), torch.tensor([0, 5]))),
    ("clip must have low <= high", ValueError,
     lambda: future_value(torch.randn(5), torch.randn(5), torch.tensor([0, 5]), clip=(1.2, 0.8))),
    ("mask must be a torch.Tensor", TypeError,
     lambda: future_kl_scale(torch.randn(5), torch.randn(5), torch.randn(5),
                             torch.tensor([0, 5]), None)),
    ("omega must have shape", ValueError,
     lambda: branching_score(torch.randn(5), torch.randn(4), torch.tensor([0, 5]))),
    # the argument that is wrong is the one named
    ("adv_tok must have shape \\(5,\\)", ValueError,
     lambda: future_kl_scale(torch.randn(4), torch.randn(5), torch.randn(5),
                             torch.tensor([0, 5]), torch.ones(5, dtype=torch.bool))),
    ("weight must be a finite number", ValueError,
     lambda: future_kl_scale(*KL_ARGS(), weight=math.nan)),
    ("high_only must be a bool", TypeError,
     lambda: future_kl_scale(*KL_ARGS(), high_only=1)),
    ("clip must be a Python float", TypeError,
     lambda: future_kl_scale(*KL_ARGS(), clip=(0.2, 0.3))),
    ("clip must be >= 0.0", ValueError,
     lambda: future_kl_scale(*KL_ARGS(), clip=-0.1)),
    ("gamma must be a Python float", TypeError,
     lambda: future_value(torch.randn(5), torch.randn(5), torch.tensor([0, 5]), gamma="1")),
]


@pytest.mark.parametrize("message,error,call", BAD, ids=[m[:30] for m, _, _ in BAD])
def test_bad_inputs_raise(message, error, call):
    with pytest.raises(error, match=message):
        call()


def test_pack_unpack_round_trip():
    batch, length = 4, 9
    x = torch.randn(batch, length, 3)
    attention = torch.rand(batch, length) > 0.4
    attention[0] = False  # an empty row
    flat, cu = pack(x, attention)
    assert cu.dtype == torch.int32 and int(cu[-1]) == int(attention.sum())
    assert torch.equal(flat, x[attention])
    back = unpack(flat, cu, pad=-1.0, attention_mask=attention)
    assert torch.equal(back[attention], x[attention]) and (back[~attention] == -1).all()
    right = unpack(flat, cu, pad=0.0)
    lengths = attention.sum(1)
    assert right.shape == (batch, int(lengths.max()), 3)
    for b in range(batch):
        assert torch.equal(right[b, :lengths[b]], x[b][attention[b]])
        assert (right[b, lengths[b]:] == 0).all()


def test_torch_compile_fullgraph(backend):
    cu = random_packing([5, 0, 40, 1])
    n = int(cu[-1])
    adv, logprob = torch.randn(n), -torch.rand(n)
    old = logprob + 0.1 * torch.randn(n)
    mask = torch.rand(n) > 0.2

    def step(x):
        omega = future_value(logprob, old, cu, mask=mask)
        scores = branching_score(x.detach(), omega, cu, mask)
        scaled = future_kl_scale(adv, logprob, old, cu, mask)
        return (discounted_suffix_sum(x, cu, 0.9, mask) * scaled).sum() + scores.score.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1, x2 = torch.randn(n, requires_grad=True), None
    x2 = x1.detach().clone().requires_grad_()
    eager, traced = step(x1), compiled(x2)
    eager.backward()
    traced.backward()
    torch.testing.assert_close(traced, eager)
    torch.testing.assert_close(x2.grad, x1.grad)
