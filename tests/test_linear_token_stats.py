"""linear_token_stats (docs/ops.md): token_stats of hidden @ weight.T + bias without the logits,
against float64 references, on every backend of the inner token_stats; memory held to a chunk."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from appo_kernels import linear_token_stats, token_stats

ABS_TOL, REL_TOL = 2e-5, 2.4e-7  # token_stats' bound (docs/ops.md), plus the matmul's rounding


def inputs(tokens, hidden, vocab, dtype=torch.float32, device="cpu", bias=True, lead=None):
    h = torch.randn(*(lead or (tokens,)), hidden, device=device).to(dtype)
    w = (torch.randn(vocab, hidden, device=device) * hidden ** -0.5 * 3).to(dtype)
    b = (torch.randn(vocab, device=device) * 0.5).to(dtype) if bias else None
    t = torch.randint(0, vocab, h.shape[:-1], device=device)
    return h, w, b, t


def reference(h, w, b, t, temperature=1.0, mask=None):
    """float64 statistics from the definitions, and their autograd."""
    z = h.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    log_p = torch.log_softmax(z / temperature, -1)
    out = {"logprob": log_p.gather(-1, t[..., None].long())[..., 0],
           "entropy": -(log_p.exp() * log_p).sum(-1),
           "lse": torch.logsumexp(z / temperature, -1)}
    if mask is not None:
        out = {k: torch.where(mask, v, 0.0) for k, v in out.items()}
    return out


def close(actual, expected, what, abs_tol=ABS_TOL, rel_tol=REL_TOL, scale=1.0):
    a, e = actual.double().cpu(), expected.double().cpu()
    err = (a - e).abs()
    bound = (abs_tol + rel_tol * e.abs()) * scale
    assert bool((err <= bound).all()), f"{what}: max error {err.max().item():.3g}"


@pytest.mark.parametrize("shape", [(1, 7, 13), (37, 33, 1003), (130, 16, 4099), (70, 5, 8300)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_float64(backend, device, shape, with_bias):
    """V not a multiple of any block; 8300 spans two of the fused kernel's vocabulary splits."""
    tokens, hidden, vocab = shape
    h, w, b, t = inputs(tokens, hidden, vocab, device=device, bias=with_bias)
    stats = linear_token_stats(h, w, t, bias=b, temperature=0.8, chunk_size=16)
    ref = reference(h, w, b, t, temperature=0.8)
    for name in ("logprob", "entropy", "lse"):
        value = getattr(stats, name)
        assert value.dtype == torch.float32 and value.shape == (tokens,)
        close(value, ref[name], name, scale=10)  # the float32 matmul's rounding on top


def test_gradients_match_float64_autograd(backend, device):
    h, w, b, t = inputs(29, 12, 517, device=device)
    grads = [torch.randn(29, device=device) for _ in range(3)]
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    stats = linear_token_stats(*leaves[:2], t, bias=leaves[2], temperature=1.3, chunk_size=8)
    got = torch.autograd.grad(sum((s * g).sum() for s, g in zip(stats[:3], grads)), leaves)
    ref_leaves = [x.detach().double().requires_grad_() for x in (h, w, b)]
    ref = reference(*ref_leaves, t, temperature=1.3)
    want = torch.autograd.grad(sum((ref[k] * g.double()).sum() for k, g in
                                   zip(("logprob", "entropy", "lse"), grads)), ref_leaves)
    for name, a, e in zip(("hidden", "weight", "bias"), got, want):
        assert a.dtype == torch.float32
        scale = e.abs().max().item()
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_gradcheck_float64_with_mask():
    h, w, b, t = inputs(5, 3, 11, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, True])
    leaves = tuple(x.requires_grad_() for x in (h, w, b))
    assert torch.autograd.gradcheck(
        lambda h, w, b: tuple(linear_token_stats(h, w, t, bias=b, mask=mask, chunk_size=2)[:3]),
        leaves)


def test_bf16_matches_token_stats_on_the_same_logits(backend, device):
    """In bf16 the logits are rounded to bf16 either way: the fused op equals token_stats of the
    same product, up to the product's own rounding."""
    h, w, b, t = inputs(40, 64, 2000, dtype=torch.bfloat16, device=device)
    fused = linear_token_stats(h, w, t, bias=b, chunk_size=16)
    plain = token_stats(h @ w.T + b, t)
    for name in ("logprob", "entropy", "lse"):
        torch.testing.assert_close(getattr(fused, name), getattr(plain, name), rtol=2e-2,
                                   atol=5e-2, msg=name)


def test_strided_bias(backend, device):
    h, w, _, t = inputs(11, 6, 300, device=device)
    every_other = torch.randn(600, device=device)[::2]  # a bias view with stride 2
    got = linear_token_stats(h, w, t, bias=every_other)
    want = reference(h, w, every_other, t)
    for name in ("logprob", "entropy", "lse"):
        close(getattr(got, name), want[name], name, scale=10)


def test_extreme_logits(backend, device):
    """Rows whose logits reach ±1e4 (a hidden row scaled up, a −inf-like bias entry) keep the
    float64 statistics to float32 rounding of their magnitude."""
    h, w, b, t = inputs(20, 9, 700, device=device)
    h[3] *= 3000.0
    h[7] *= 1e-6  # nearly uniform
    b[5] = -1e30
    t[2] = 5
    stats = linear_token_stats(h, w, t, bias=b)
    ref = reference(h, w, b, t)
    magnitude = (h.double() @ w.double().T).abs().amax(-1)
    for name in ("logprob", "entropy", "lse"):
        err = (getattr(stats, name).double().cpu() - ref[name].cpu()).abs()
        bound = 1e-4 + 2e-6 * magnitude.cpu() + 1e-6 * ref[name].abs().cpu()
        assert bool((err <= bound).all()), f"{name}: max error {err.max().item():.3g}"


def test_masked_rows_are_zero_and_get_no_gradient(backend, device):
    h, w, b, t = inputs(9, 8, 300, device=device, lead=(3, 3))
    mask = torch.tensor([[True, False, True], [False, False, False], [True, True, False]],
                        device=device)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    stats = linear_token_stats(*leaves[:2], t, bias=leaves[2], mask=mask, chunk_size=4)
    ref = reference(h, w, b, t, mask=mask)
    for name in ("logprob", "entropy", "lse"):
        assert bool((getattr(stats, name)[~mask] == 0).all())
        close(getattr(stats, name), ref[name], name, scale=10)
    grad_h, = torch.autograd.grad(stats.entropy.sum() + stats.logprob.sum(), leaves[0])
    assert bool((grad_h[~mask] == 0).all()) and bool((grad_h[mask] != 0).any())


def test_all_rows_masked():
    h, w, b, t = inputs(4, 5, 50)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    stats = linear_token_stats(*leaves[:2], t, bias=leaves[2], mask=torch.zeros(4, dtype=bool))
    assert all(bool((v == 0).all()) for v in stats[:3])
    grads = torch.autograd.grad(stats.lse.sum(), leaves)
    assert all(bool((g == 0).all()) for g in grads)


def test_no_target_gives_no_logprob():
    h, w, _, _ = inputs(6, 4, 30, bias=False)
    stats = linear_token_stats(h, w)
    assert stats.logprob is None
    torch.testing.assert_close(stats.entropy, token_stats(h @ w.T).entropy)


@pytest.mark.parametrize("chunk_size", [64, None])  # chunks of 64 rows; one chunk of 200 rows
def test_a_row_gives_the_same_bits_alone_in_a_batch_and_without_grad(backend, chunk_size):
    h, w, b, t = inputs(200, 24, 3001)
    full = linear_token_stats(h, w, t, bias=b, chunk_size=chunk_size)
    alone = linear_token_stats(h[41:42], w, t[41:42], bias=b, chunk_size=chunk_size)
    picked = linear_token_stats(h[[166, 41, 3]], w, t[[166, 41, 3]], bias=b,
                                chunk_size=chunk_size)
    for name in ("logprob", "entropy", "lse"):
        value = getattr(full, name)
        assert torch.equal(value[41:42], getattr(alone, name)), name
        assert torch.equal(value[[166, 41, 3]], getattr(picked, name)), name
    with torch.no_grad():
        no_grad = linear_token_stats(h, w, t, bias=b, chunk_size=64)
    hg = h.clone().requires_grad_()
    with_grad = linear_token_stats(hg, w, t, bias=b, chunk_size=64)
    for name in ("logprob", "entropy", "lse"):
        assert torch.equal(getattr(no_grad, name), getattr(with_grad, name).detach()), name
    g_full, = torch.autograd.grad(with_grad.entropy.sum(), hg)
    ha = h[41:42].clone().requires_grad_()
    g_alone, = torch.autograd.grad(linear_token_stats(ha, w, t[41:42], bias=b,
                                                      chunk_size=64).entropy.sum(), ha)
    assert torch.equal(g_full[41:42], g_alone)


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def test_no_tensor_of_tokens_by_vocab_is_ever_made():
    """Forward and backward hold one chunk's logits (and the weight's gradient), never T × V."""
    tokens, hidden, vocab, chunk = 2048, 16, 3000, 64
    h, w, b, t = inputs(tokens, hidden, vocab)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    with LargestTensor() as probe:
        stats = linear_token_stats(*leaves[:2], t, bias=leaves[2], chunk_size=chunk)
        torch.autograd.grad(stats.logprob.sum() + stats.entropy.sum(), leaves)
    allowed = max(chunk * vocab, vocab * hidden, tokens * hidden)
    assert probe.largest <= allowed < tokens * vocab // 16, probe.largest
    with LargestTensor() as plain:  # the probe sees the logits route's tensors
        token_stats((h @ w.T + b).requires_grad_(), t).entropy.sum().backward()
    assert plain.largest >= tokens * vocab


def test_opcheck():
    h, w, b, t = inputs(6, 5, 40)
    mask = torch.rand(6) > 0.3
    for args in ((h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), t, mask, 1.25, 4),
                 (h, w, None, None, None, 1.0, 64)):
        torch.library.opcheck(torch.ops.appo.linear_token_stats.default, args)


def test_torch_compile_fullgraph():
    h, w, b, t = inputs(12, 8, 97)

    def loss_fn(h, w):
        s = linear_token_stats(h, w, t, bias=b, temperature=0.9, chunk_size=8)
        return (s.logprob - 0.1 * s.entropy + 0.01 * s.lse).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    eager_leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    traced_leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    loss_fn(*eager_leaves).backward()
    compiled(*traced_leaves).backward()
    for a, e in zip(traced_leaves, eager_leaves):
        torch.testing.assert_close(a.grad, e.grad)


@pytest.mark.parametrize("message, error, build", [
    ("hidden must be a torch.Tensor", TypeError, lambda h, w, b, t: (h.tolist(), w, t, {})),
    ("weight must have shape", ValueError, lambda h, w, b, t: (h, w[:, :3], t, {})),
    ("weight must have dtype", TypeError, lambda h, w, b, t: (h, w.double(), t, {})),
    ("bias must have shape", ValueError, lambda h, w, b, t: (h, w, t, {"bias": b[:5]})),
    ("target must have shape", ValueError, lambda h, w, b, t: (h, w, t[:2], {})),
    ("mask must have dtype", TypeError,
     lambda h, w, b, t: (h, w, t, {"mask": torch.ones(h.shape[:-1])})),
    ("chunk_size must be >= 1", ValueError, lambda h, w, b, t: (h, w, t, {"chunk_size": 0})),
    ("temperature", ValueError, lambda h, w, b, t: (h, w, t, {"temperature": 0.0})),
])
def test_bad_inputs_name_the_argument(message, error, build):
    h, w, b, t = inputs(4, 6, 20)
    hidden, weight, target, kwargs = build(h, w, b, t)
    with pytest.raises(error, match=message):
        linear_token_stats(hidden, weight, target, **kwargs)


def test_tree_version_matches_tree_token_stats_on_the_product():
    """tree_linear_token_stats equals tree_token_stats of hidden @ weight.T + bias, branch starts
    (whose token is not the row's next one) included, values and gradients."""
    from appo_kernels import TreeLayout, tree_linear_token_stats, tree_token_stats

    seqs = [[1, 2, 3, 4, 5], [1, 2, 3, 9, 8, 7], [1, 2, 6], [4, 4]]
    layout, token_ids, _ = TreeLayout.from_sequences(seqs)
    n = layout.n_tokens
    h, w, b, _ = inputs(n, 8, 12)
    mask = torch.rand(n) > 0.2
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    fused = tree_linear_token_stats(*leaves, layout, token_ids, temperature=0.9, mask=mask)
    plain_leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    logits = plain_leaves[0] @ plain_leaves[1].T + plain_leaves[2]
    plain = tree_token_stats(logits, layout, token_ids, temperature=0.9, mask=mask)
    for name in ("logprob", "entropy", "lse"):
        torch.testing.assert_close(getattr(fused, name), getattr(plain, name), atol=1e-5,
                                   rtol=1e-5, msg=name)
    weights = torch.randn(n)
    got = torch.autograd.grad((fused.logprob * weights).sum() + fused.entropy.sum(), leaves)
    want = torch.autograd.grad((plain.logprob * weights).sum() + plain.entropy.sum(),
                               plain_leaves)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="hidden must have one row per layout token"):
        tree_linear_token_stats(h[:-1], w, b, layout, token_ids)
