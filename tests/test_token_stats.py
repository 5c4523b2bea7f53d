"""token_stats (docs/ops.md) against a float64 reference written the obvious way, on every
backend."""

import math

import pytest
import torch

import appo_kernels
from appo_kernels import _backend, token_stats

from conftest import ON_GPU

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# vocab sizes that are not multiples of any block, plus the large real ones
VOCABS = [7, 1000, 50257, 151936]
ABS_TOL, REL_TOL = 2e-5, 2.4e-7  # docs/ops.md, token_stats error bound for logprob, entropy and lse
GRAD_TOL = {torch.float32: (1e-6, 1e-5), torch.float16: (2e-5, 1e-3), torch.bfloat16: (2e-5, 8e-3)}


def reference(logits, target=None, temperature=1.0, mask=None):
    """float64 statistics of softmax(logits / temperature), straight from the definitions."""
    z = logits.detach().double() / temperature
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    finite = torch.isfinite(log_p)
    entropy = -torch.where(finite, p * log_p, 0.0).sum(-1)
    out = {
        "lse": torch.logsumexp(z, dim=-1),
        "entropy": entropy,
        "varentropy": torch.where(finite, p * log_p * log_p, 0.0).sum(-1) - entropy**2,
    }
    top = z.topk(min(2, z.shape[-1]), dim=-1).values
    out["top2_margin"] = top[..., 0] - top[..., 1] if z.shape[-1] > 1 else torch.full_like(
        entropy, math.inf)
    if target is not None:
        out["logprob"] = log_p.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    no_finite_logit = ~torch.isfinite(z).any(-1)  # docs/ops.md: such a row gives NaN in its outputs
    out = {k: torch.where(no_finite_logit, math.nan, v) for k, v in out.items()}
    if mask is not None:
        out = {k: torch.where(mask, v, 0.0) for k, v in out.items()}
    return out


def assert_within_spec(actual, expected, what, abs_tol=ABS_TOL, rel_tol=REL_TOL):
    assert actual.dtype == torch.float32, f"{what}: dtype {actual.dtype}, want float32"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = actual.double().cpu(), expected.double().cpu()
    assert torch.equal(a.isnan(), e.isnan()), f"{what}: NaN in different places"
    ok = a.isnan() | (a == e) | ((a - e).abs() <= abs_tol + rel_tol * e.abs())
    if not ok.all():
        i = (~ok).nonzero()[0].tolist()
        raise AssertionError(f"{what}: {(~ok).sum().item()} elements off, e.g. at {i}: "
                             f"{a[tuple(i)].item()!r} vs {e[tuple(i)].item()!r}")


def check_all(stats, ref, extras=()):
    for name in ("logprob", "entropy", "lse"):
        if name in ref:
            assert_within_spec(getattr(stats, name), ref[name], name)
    if "varentropy" in extras:
        assert_within_spec(stats.varentropy, ref["varentropy"], "varentropy", 1e-4, 1e-4)
    if "top2_margin" in extras:
        assert_within_spec(stats.top2_margin, ref["top2_margin"], "top2_margin", 1e-5, 1e-6)


def random_logits(shape, dtype, device, scale=3.0):
    return (torch.randn(shape, device=device) * scale).to(dtype)


def rows_for(vocab, backend):
    # the Triton interpreter is slow: few rows for the large vocabularies
    return 3 if (backend == "triton" and not ON_GPU and vocab > 20000) else 16


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_fp64_reference(backend, device, vocab, dtype):
    x = random_logits((rows_for(vocab, backend), vocab), dtype, device)
    t = torch.randint(0, vocab, x.shape[:-1], device=device)
    extras = ("varentropy", "top2_margin")
    with _backend.poisoned_outputs():
        stats = token_stats(x, t, extras=extras)
    check_all(stats, reference(x, t), extras)


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.6])
@pytest.mark.parametrize("dtype", DTYPES)
def test_temperature(backend, device, temperature, dtype):
    x = random_logits((8, 1000), dtype, device, scale=5.0)
    t = torch.randint(0, 1000, (8,), device=device)
    extras = ("varentropy", "top2_margin")
    stats = token_stats(x, t, temperature=temperature, extras=extras)
    check_all(stats, reference(x, t, temperature), extras)


def test_target_none_gives_no_logprob(backend, device):
    x = random_logits((4, 100), torch.float32, device)
    stats = token_stats(x)
    assert stats.logprob is None and stats.varentropy is None and stats.top2_margin is None
    check_all(stats, reference(x))


def test_int32_target(backend, device):
    x = random_logits((6, 300), torch.float32, device)
    t = torch.randint(0, 300, (6,), device=device, dtype=torch.int32)
    check_all(token_stats(x, t), reference(x, t))


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_magnitude_logits(backend, device, dtype):
    # ±1e4 logits, and logits near 1e4 that differ by O(1): no cancellation allowed
    spread = random_logits((6, 1000), torch.float32, device, scale=1e4).to(dtype)
    offset = (1e4 + random_logits((6, 1000), torch.float32, device, scale=2.0)).to(dtype)
    for x in (spread, offset, -offset):
        t = torch.randint(0, 1000, (6,), device=device)
        check_all(token_stats(x, t, temperature=0.9), reference(x, t, 0.9))


def test_one_hot_and_uniform_rows(backend, device):
    vocab = 1000
    x = torch.zeros(4, vocab, device=device)
    x[0, 17] = 1e4  # one-hot: entropy exactly 0, logprob of the hot token 0
    x[1] = -1e4
    x[1, 3] = 0.0
    x[2] = 2.5  # uniform: entropy log V
    x[3] = -7.0
    t = torch.tensor([17, 3, 5, 999], device=device)
    stats = token_stats(x, t, extras=("varentropy", "top2_margin"))
    check_all(stats, reference(x, t), ("varentropy", "top2_margin"))
    assert stats.entropy[0].item() == 0.0 and stats.logprob[0].item() == 0.0
    assert stats.top2_margin[2].item() == 0.0
    assert abs(stats.entropy[2].item() - math.log(vocab)) < 1e-5


def test_negative_infinity_entries(backend, device):
    x = random_logits((5, 1000), torch.float32, device)
    x[0, ::2] = -math.inf
    x[1, :-1] = -math.inf  # a single finite logit: entropy 0
    x[2] = -math.inf  # no finite logit: NaN in that row only
    x[3, 500:] = -math.inf
    t = torch.tensor([1, 999, 0, 3, 4], device=device)
    extras = ("varentropy", "top2_margin")
    stats = token_stats(x, t, extras=extras)
    check_all(stats, reference(x, t), ("varentropy",))
    assert stats.entropy[1].item() == 0.0
    for name in ("logprob", "entropy", "lse", "varentropy", "top2_margin"):
        value = getattr(stats, name)
        assert value[2].isnan(), f"{name} of the all −inf row should be NaN"
        assert not value[[0, 1, 3, 4]].isnan().any(), f"{name}: NaN leaked into other rows"
    assert stats.top2_margin[1].item() == math.inf


def test_target_on_negative_infinity_logit(backend, device):
    x = random_logits((2, 50), torch.float32, device)
    x[:, 7] = -math.inf
    stats = token_stats(x, torch.tensor([7, 8], device=device))
    assert stats.logprob[0].item() == -math.inf and math.isfinite(stats.logprob[1].item())


@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_rows_not_read(backend, device, dtype):
    x = random_logits((4, 9, 1000), dtype, device)
    mask = torch.rand(4, 9, device=device) > 0.4
    mask[0, 0], mask[0, 1] = True, False
    x[~mask] = math.nan  # masked rows hold garbage: it must not leak
    t = torch.randint(0, 1000, (4, 9), device=device)
    extras = ("varentropy", "top2_margin")
    with _backend.poisoned_outputs():
        stats = token_stats(x, t, mask=mask, extras=extras)
    check_all(stats, reference(x, t, mask=mask), extras)
    for value in stats:
        assert (value[~mask] == 0).all()


def test_out_of_range_target_is_nan_or_raises(backend, device):
    x = random_logits((3, 20), torch.float32, device)
    t = torch.tensor([0, 20, -100], device=device)
    stats = token_stats(x, t)
    assert not stats.logprob[0].isnan() and stats.logprob[1:].isnan().all()
    with pytest.raises(ValueError, match="target"):
        token_stats(x, t, validate=True)
    masked = torch.tensor([True, False, False], device=device)
    token_stats(x, t, mask=masked, validate=True)  # masked rows are not checked


def _layouts(device):
    base = random_logits((3, 7, 1003), torch.float32, device)
    wide = random_logits((3, 7, 1100), torch.float32, device)
    deep = random_logits((2, 3, 4, 5, 300), torch.float32, device)
    return {
        "shifted": base[:, :-1],  # the usual logits[:, :-1]: two stride levels
        "transposed": base.transpose(0, 1),
        "row_padding": wide[..., :1003],  # row stride larger than V
        "three_levels": deep[:, ::2, 1:, :-1],  # needs a copy inside the kernels
        "one_row": base[1, 2],
    }


@pytest.mark.parametrize("layout", ["shifted", "transposed", "row_padding", "three_levels",
                                    "one_row"])
def test_strided_views(backend, device, layout):
    x = _layouts(device)[layout]
    vocab = x.shape[-1]
    t = torch.randint(0, vocab, x.shape[:-1], device=device)
    stats = token_stats(x, t, temperature=1.3)
    check_all(stats, reference(x, t, 1.3))
    assert stats.entropy.shape == x.shape[:-1]


@pytest.mark.parametrize("shape", [(0, 50), (2, 0, 50), (1,), (5, 1)])
def test_degenerate_shapes(backend, device, shape):
    x = random_logits(shape, torch.float32, device)
    t = torch.zeros(shape[:-1], dtype=torch.long, device=device)
    stats = token_stats(x, t, extras=("varentropy", "top2_margin"))
    check_all(stats, reference(x, t), ("varentropy", "top2_margin"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariance(backend, device, dtype):
    x = random_logits((12, 50257 if ON_GPU else 3000), dtype, device)
    t = torch.randint(0, x.shape[-1], (12,), device=device)
    extras = ("varentropy", "top2_margin")
    full = token_stats(x, t, extras=extras)
    alone = token_stats(x[5:6], t[5:6], extras=extras)
    picked = token_stats(x[[9, 5, 0]], t[[9, 5, 0]], extras=extras)
    for name, value in full._asdict().items():
        assert torch.equal(value[5:6], getattr(alone, name)), f"{name} differs alone"
        assert torch.equal(value[[9, 5, 0]], getattr(picked, name)), f"{name} differs in a batch"


@pytest.mark.parametrize("vocab", [40000, 151936])
def test_batch_invariance_of_long_rows_on_several_threads(vocab):
    """torch splits the reduction of a lone long row across threads (and rounds it differently
    than inside a batch); the CPU path never reduces a lone row, so nothing changes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = random_logits((5, vocab), torch.float32, "cpu")
        t = torch.randint(0, vocab, (5,))
        full = token_stats(x, t, extras=("varentropy",))
        alone = token_stats(x[3:4], t[3:4], extras=("varentropy",))
        odd = token_stats(x[[1, 3, 4]], t[[1, 3, 4]], extras=("varentropy",))
        for name in ("logprob", "entropy", "lse", "varentropy"):
            value = getattr(full, name)
            assert torch.equal(value[3:4], getattr(alone, name)), f"{name} differs alone"
            assert torch.equal(value[[1, 3, 4]], getattr(odd, name)), f"{name} differs in a batch"
        grad_full = torch.autograd.grad(token_stats(x.requires_grad_(), t).entropy.sum(), x)[0]
        grad_alone = torch.autograd.grad(token_stats(x[3:4], t[3:4]).entropy.sum(), x)[0]
        assert torch.equal(grad_full[3], grad_alone[3])
    finally:
        torch.set_num_threads(threads)


def test_cpu_path_is_more_accurate_than_the_eager_formula():
    """float32 work in cache-sized chunks, no float64 copy: still closer to float64 than
    log_softmax + gather + −Σp·log p in float32 (bench/README.md, CPU ratios)."""
    x = random_logits((64, 32000), torch.float32, "cpu")
    t = torch.randint(0, 32000, (64,))
    ref = reference(x, t)
    ours = token_stats(x, t)
    log_p = torch.log_softmax(x, -1)
    eager = {"logprob": log_p.gather(-1, t[:, None])[:, 0], "entropy": -(log_p.exp() * log_p).sum(-1)}
    for name in ("logprob", "entropy"):
        ours_err = (getattr(ours, name).double() - ref[name]).abs().max().item()
        eager_err = (eager[name].double() - ref[name]).abs().max().item()
        assert ours_err < eager_err, (name, ours_err, eager_err)


def test_grad_and_no_grad_agree_bitwise(backend, device):
    x = random_logits((6, 700), torch.bfloat16, device)
    t = torch.randint(0, 700, (6,), device=device)
    with torch.no_grad():
        plain = token_stats(x, t)
    tracked = token_stats(x.clone().requires_grad_(), t)
    for a, b in zip(plain[:3], tracked[:3]):
        assert torch.equal(a, b.detach())


def _reference_grad(x, t, temperature, mask, weights):
    x64 = x.detach().double().requires_grad_()
    z = x64 / temperature
    log_p = torch.log_softmax(z, -1)
    p = log_p.exp()
    outputs = {
        "logprob": log_p.gather(-1, t.unsqueeze(-1)).squeeze(-1),
        # where() on log p, not on p·log p: the untaken 0·(−inf) branch would give NaN gradients
        "entropy": -(p * torch.where(p > 0, log_p, 0.0)).sum(-1),
        "lse": torch.logsumexp(z, -1),
    }
    loss = sum((weights[k] * v * mask).sum() for k, v in outputs.items() if k in weights)
    (grad,) = torch.autograd.grad(loss, x64)
    return grad


@pytest.mark.parametrize("which", ["logprob", "entropy", "lse", "all"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_fp64_autograd(backend, device, which, dtype):
    rows, vocab, temperature = 10, 1000, 0.8
    x = random_logits((rows, vocab), dtype, device)
    x[0, :300] = -math.inf
    x.requires_grad_()
    t = torch.randint(0, vocab, (rows,), device=device)
    t[0] = 300 + t[0] % 700  # the target of row 0 is a finite logit
    mask = torch.rand(rows, device=device) > 0.3
    mask[0] = True
    names = ["logprob", "entropy", "lse"] if which == "all" else [which]
    weights = {k: torch.randn(rows, device=device) for k in names}
    stats = token_stats(x, t, temperature=temperature, mask=mask)
    loss = sum((weights[k] * getattr(stats, k)).sum() for k in names)
    with _backend.poisoned_outputs():
        (grad,) = torch.autograd.grad(loss, x)
    expected = _reference_grad(x, t, temperature, mask, weights)
    assert grad.dtype == dtype and grad.shape == x.shape
    atol, rtol = GRAD_TOL[dtype]
    torch.testing.assert_close(grad.double(), expected, atol=atol, rtol=rtol)
    assert (grad[~mask] == 0).all() and (grad[0, :300] == 0).all()


def test_gradient_through_strided_view(backend, device):
    base = random_logits((2, 6, 333), torch.float32, device).requires_grad_()
    x = base[:, :-1]
    t = torch.randint(0, 333, x.shape[:-1], device=device)
    stats = token_stats(x, t, temperature=1.2)
    (stats.logprob.sum() - 0.5 * stats.entropy.sum()).backward()
    ones = torch.ones(x.shape[:-1], device=device)
    expected = _reference_grad(x, t, 1.2, ones, {"logprob": ones, "entropy": -0.5 * ones})
    torch.testing.assert_close(base.grad[:, :-1].double(), expected, atol=1e-6, rtol=1e-5)
    assert (base.grad[:, -1] == 0).all()


def test_gradcheck_fp64():
    # float64 always runs the torch reference: this checks the analytic backward formula itself
    x = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 7, (3, 4))
    mask = torch.rand(3, 4) > 0.25

    def fn(logits):
        s = token_stats(logits, t, temperature=0.7, mask=mask)
        return s.logprob, s.entropy, s.lse

    assert torch.autograd.gradcheck(fn, (x,))


def test_opcheck(device):
    x = random_logits((3, 5, 40), torch.float32, device).requires_grad_()
    t = torch.randint(0, 40, (3, 5), device=device)
    mask = torch.rand(3, 5, device=device) > 0.5
    torch.library.opcheck(torch.ops.appo.token_stats.default, (x, t, mask, 1.25, True, True))
    torch.library.opcheck(torch.ops.appo.token_stats.default, (x, None, None, 1.0, False, False))


def test_torch_compile_fullgraph(backend, device):
    x = random_logits((4, 6, 97), torch.float32, device)
    t = torch.randint(0, 97, (4, 6), device=device)

    def loss_fn(logits):
        s = token_stats(logits, t, temperature=0.9)
        return (s.logprob - 0.1 * s.entropy + 0.01 * s.lse).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager, traced = loss_fn(x1), compiled(x2)
    eager.backward()
    traced.backward()
    torch.testing.assert_close(traced, eager)
    torch.testing.assert_close(x2.grad, x1.grad)


def test_torch_compile_dynamic_shapes():
    """With dynamic shapes the temperature may reach the op as a symbolic float: the checks
    must let it through (its value is checked where it is a plain float)."""
    t = torch.randint(0, 31, (3, 5))

    def loss_fn(logits, temperature):
        s = token_stats(logits, t, temperature=temperature)
        return (s.logprob + s.entropy).sum()

    from torch._dynamo import config as dynamo_config

    compiled = torch.compile(loss_fn, dynamic=True, fullgraph=True, backend="aot_eager")
    with dynamo_config.patch(specialize_float=False):  # the temperature stays symbolic
        for temperature in (0.7, 1.3):
            x = random_logits((3, 5, 31), torch.float32, "cpu")
            torch.testing.assert_close(compiled(x, temperature), loss_fn(x, temperature))


def _logits(d):
    return torch.ones(2, 3, device=d)


# (message the error must contain, error type, d -> (args, kwargs))
BAD_INPUTS = [
    ("logits must be a torch.Tensor", TypeError, lambda d: (([[1.0, 2.0]],), {})),
    ("logits must have dtype bfloat16", TypeError,
     lambda d: ((torch.ones(2, 3, dtype=torch.long, device=d),), {})),
    ("V >= 1", ValueError, lambda d: ((torch.ones(2, 0, device=d),), {})),
    ("stride 1", ValueError, lambda d: ((torch.ones(5, 3, device=d).t(),), {})),
    ("target must have dtype", TypeError,
     lambda d: ((_logits(d), torch.zeros(2, device=d)), {})),
    ("target must have shape", ValueError,
     lambda d: ((_logits(d), torch.zeros(3, dtype=torch.long, device=d)), {})),
    ("mask must have dtype", TypeError,
     lambda d: ((_logits(d),), {"mask": torch.ones(2, device=d)})),
    ("mask must have shape", ValueError,
     lambda d: ((_logits(d),), {"mask": torch.ones(2, 3, dtype=torch.bool, device=d)})),
    ("temperature must be > 0.0", ValueError,
     lambda d: ((_logits(d),), {"temperature": 0.0})),
    ("temperature must be a finite number", ValueError,
     lambda d: ((_logits(d),), {"temperature": math.nan})),
    # 1/temperature would overflow or underflow float32 in the kernels (Triton gave NaN there)
    ("its reciprocal a normal float32", ValueError,
     lambda d: ((_logits(d),), {"temperature": 1e-40})),
    ("its reciprocal a normal float32", ValueError,
     lambda d: ((_logits(d),), {"temperature": 1e39})),
    ("temperature must be a Python float", TypeError,
     lambda d: ((_logits(d),), {"temperature": True})),
    ("temperature must be a Python float", TypeError,
     lambda d: ((_logits(d),), {"temperature": torch.tensor(1.0)})),
    ("extras must be a tuple", TypeError, lambda d: ((_logits(d),), {"extras": "varentropy"})),
    ("extras: unknown", ValueError, lambda d: ((_logits(d),), {"extras": ("entropy2",)})),
]


@pytest.mark.parametrize("message,error,build", BAD_INPUTS,
                         ids=[f"{i}-{m[:24]}" for i, (m, _, _) in enumerate(BAD_INPUTS)])
def test_bad_inputs_raise(device, message, error, build):
    args, kwargs = build(device)
    with pytest.raises(error, match=message):
        token_stats(*args, **kwargs)


def test_backend_selection(monkeypatch):
    monkeypatch.setenv("APPO_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="APPO_BACKEND"):
        token_stats(torch.randn(2, 3))
    monkeypatch.setenv("APPO_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="APPO_BACKEND=cuda"):
        token_stats(torch.randn(2, 3))
    monkeypatch.delenv("APPO_BACKEND")
    info = appo_kernels.backend_info()
    assert info["cpu"] == "torch" and info["torch"] == torch.__version__
