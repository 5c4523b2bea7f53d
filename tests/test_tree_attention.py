"""tree_attention (docs/ops.md) against ordinary causal attention on every unrolled root-to-leaf
path, computed in float64 with an explicit softmax, on every backend.

A token shared by several paths appears once in the packed tree: its output, lse and dq equal those
of any path through it, and its dk/dv are the sum over the paths of the contributions of the
queries each path holds. So that every query is counted once in that sum, each query's upstream
gradient is given to one path (the first that holds it) when dk/dv are computed per path.
"""

import itertools
import math
import random

import pytest
import torch

from appo_kernels import _backend
from appo_kernels.tree import TreeLayout, reference, tree_attention
from conftest import BACKENDS


@pytest.fixture(params=BACKENDS + ["torch-tiled"])
def backend(request, monkeypatch):
    """Every backend available here (forced with APPO_BACKEND), and the torch path's tiled executor
    (its fallback where the fused CPU kernels are missing, and its path for lse gradients)."""
    name = "torch" if request.param == "torch-tiled" else request.param
    monkeypatch.setenv("APPO_BACKEND", name)
    monkeypatch.setattr(reference, "USE_FLASH", request.param != "torch-tiled")
    return name

# error bound relative to the largest magnitude of the expected tensor (outputs and gradients)
# error bound relative to max|reference|. Low-precision kernels round P and dS to the input dtype
# before the matmuls (as FlashAttention does): with the same bf16 inputs upcast to float32 the
# kernel agrees to 1e-6, while bf16 gradients at head dim 256 deviate by up to ~3.5% (measured).
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}
LSE_TOL = 1e-4  # lse is float32 whatever the input dtype


# ------------------------------------------------------------------------------------------------
# trees


def random_sequences(rng, *, n_trees=1, max_depth=6, max_branch=4, chunk=(1, 12),
                     max_tokens=160, depth=None):
    """Root-to-leaf token sequences of a random forest, for `TreeLayout.from_sequences`.

    Each tree has `depth` levels of nodes (random in [1, max_depth] if None); every node holds a
    chunk of fresh token ids (so no two nodes merge by accident) and has 1..max_branch children
    until the depth or the token budget runs out.
    """
    ids = itertools.count()
    budget = max_tokens
    seqs = []

    def grow(prefix, level, levels):
        nonlocal budget
        length = max(1, min(rng.randint(*chunk), budget))
        budget -= length
        seq = prefix + [next(ids) for _ in range(length)]
        n_children = rng.randint(1, max_branch) if level < levels and budget > 0 else 0
        for child in range(n_children):
            if child and budget <= 0:
                break
            grow(seq, level + 1, levels)
        if n_children == 0:
            seqs.append(seq)

    for _ in range(n_trees):
        grow([], 1, depth or rng.randint(1, max_depth))
    return seqs


def branched_trunk():
    """A 200-token chain (two 128-token tiles) with branches at unaligned points, a branch of a
    branch, a one-token branch and a second tree: tile edges and segments that start mid-tile."""
    trunk = list(range(200))
    branch = trunk[:77] + list(range(1000, 1100))
    return [trunk, branch, branch[:140] + list(range(2000, 2030)), trunk[:150] + [3000],
            list(range(4000, 4040))]


def wide_tree(prompt_len, n_leaves, offset=0):
    """A prompt with `n_leaves` one-token branches off its last token: many one-token segments
    that share every ancestor."""
    prompt = list(range(offset, offset + prompt_len))
    return [prompt + [offset + prompt_len + leaf] for leaf in range(n_leaves)]


def leaves_on_trunk(rng, trunk_len, n_leaves, offset=0):
    """A trunk with one-token branches off random trunk tokens (some off the same token)."""
    trunk = list(range(offset, offset + trunk_len))
    return [trunk] + [trunk[:rng.randint(1, trunk_len)] + [offset + trunk_len + leaf]
                      for leaf in range(n_leaves)]


def tree_sequences(kind, rng):
    if kind == "random":
        return random_sequences(rng, max_tokens=120)
    if kind == "deep":  # six levels of short nodes
        return random_sequences(rng, depth=6, chunk=(1, 4), max_tokens=70)
    if kind == "forest":
        return random_sequences(rng, n_trees=4, max_depth=3, max_tokens=120)
    if kind == "single_token":
        return [[0]]
    if kind == "roots_only":  # a forest of single-token trees
        return [[t] for t in range(5)]
    if kind == "long_chain":
        return [list(range(rng.randint(150, 300)))]
    if kind == "branched_trunk":
        return branched_trunk()
    if kind == "wide":  # more one-token branches than a unit holds
        return wide_tree(5, 70)
    if kind == "mixed":  # a forest of a wide tree, leaves on a trunk and a chain
        return (wide_tree(3, 20) + leaves_on_trunk(rng, 100, 10, offset=1000)
                + [list(range(2000, 2000 + rng.randint(100, 200)))])
    # too large for the Triton interpreter
    if kind == "chain_2000":
        return [list(range(2000))]
    if kind == "deep_wide":
        return leaves_on_trunk(rng, 400, 120)
    raise ValueError(kind)


TREE_KINDS = ["random", "deep", "forest", "single_token", "roots_only", "long_chain",
              "branched_trunk", "wide", "mixed"]
LARGE_TREE_KINDS = ["chain_2000", "deep_wide"]


def seeded_rng():
    return random.Random(int(torch.randint(2**31, ())))  # follows the test's torch seed


# ------------------------------------------------------------------------------------------------
# the unrolled reference


def causal_attention(q, k, v, scale):
    """Ordinary causal attention on one sequence, explicit softmax: q [L, Hq, D], k/v [L, Hkv, D]
    -> out [L, Hq, D], lse [Hq, L]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    length = q.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, -math.inf)
    lse = torch.logsumexp(scores, -1)
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v), lse


def unrolled_reference(q, k, v, paths, scale, grad_out, grad_lse):
    """float64 results per path: [(path, out, lse, dq)], and dk, dv summed over the paths."""
    q, k, v, grad_out, grad_lse = (t.detach().cpu().double() for t in (q, k, v, grad_out,
                                                                          grad_lse))
    owner = torch.full((q.shape[0],), -1)
    for index in reversed(range(len(paths))):
        owner[paths[index]] = index
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    per_path = []
    for index, path in enumerate(paths):
        path = path.cpu()
        qp, kp, vp = (t[path].requires_grad_() for t in (q, k, v))
        out, lse = causal_attention(qp, kp, vp, scale)
        g_out, g_lse = grad_out[path], grad_lse[:, path]
        dq, = torch.autograd.grad((out, lse), qp, (g_out, g_lse), retain_graph=True)
        own = owner[path] == index
        dkp, dvp = torch.autograd.grad((out, lse), (kp, vp),
                                       (g_out * own[:, None, None], g_lse * own[None, :]))
        dk.index_add_(0, path, dkp)
        dv.index_add_(0, path, dvp)
        per_path.append((path, out.detach(), lse.detach(), dq))
    return per_path, dk, dv


def assert_close(actual, expected, tol, what):
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    err = (a - e).abs()
    bound = tol * max(float(e.abs().max()), 1e-3)
    bad = ~(err <= bound)  # NaN (an unwritten, poisoned element) counts as bad
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} elements off (bound {bound:.3g}), e.g. at "
                             f"{i}: {a[i].item()!r} vs {e[i].item()!r}")


def random_qkv(n, n_heads, n_kv, head_dim, dtype, device):
    return tuple(torch.randn(n, h, head_dim, device=device).to(dtype).requires_grad_()
                 for h in (n_heads, n_kv, n_kv))


def run_tree_attention(q, k, v, layout, *, deterministic=False, lse_grad=True, scale=None):
    """tree_attention forward and backward with random upstream gradients, outputs poisoned."""
    grad_out = torch.randn(q.shape, device=q.device).to(q.dtype)
    grad_lse = torch.randn(q.shape[1], q.shape[0], device=q.device) if lse_grad else None
    with _backend.poisoned_outputs():
        out, lse = tree_attention(q, k, v, layout, scale=scale, return_lse=True,
                                  deterministic=deterministic)
        outputs, grads = (out, lse), (grad_out, grad_lse)
        if not lse_grad:
            outputs, grads = (out,), (grad_out,)
        dq, dk, dv = torch.autograd.grad(outputs, (q, k, v), grads)
    if grad_lse is None:
        grad_lse = torch.zeros(q.shape[1], q.shape[0])
    return (out, lse, dq, dk, dv), (grad_out, grad_lse)


def check_against_paths(q, k, v, layout, paths, *, deterministic=False, lse_grad=True,
                        scale=None):
    (out, lse, dq, dk, dv), (grad_out, grad_lse) = run_tree_attention(
        q, k, v, layout, deterministic=deterministic, lse_grad=lse_grad, scale=scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[1], q.shape[0])
    assert (dq.dtype, dk.dtype, dv.dtype) == (q.dtype,) * 3
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    per_path, dk_ref, dv_ref = unrolled_reference(q, k, v, paths, scale, grad_out, grad_lse)
    # every path: the packed token's result equals the path's (shared tokens on several paths)
    every = torch.cat([p for p, *_ in per_path])
    tol = TOL[q.dtype]
    assert_close(out[every], torch.cat([o for _, o, _, _ in per_path]), tol, "out")
    assert_close(lse[:, every], torch.cat([lse_p for _, _, lse_p, _ in per_path], 1), LSE_TOL,
                 "lse")
    assert_close(dq[every], torch.cat([g for *_, g in per_path]), tol, "dq")
    assert_close(dk, dk_ref, tol, "dk")
    assert_close(dv, dv_ref, tol, "dv")


# ------------------------------------------------------------------------------------------------
# properties


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", TREE_KINDS)
def test_matches_unrolled_paths(backend, device, kind, dtype):
    layout, _, paths = TreeLayout.from_sequences(tree_sequences(kind, seeded_rng()))
    layout = layout.to(device)
    q, k, v = random_qkv(layout.n_tokens, 2, 1, 64, dtype, device)
    check_against_paths(q, k, v, layout, paths)


@pytest.mark.parametrize("kind", LARGE_TREE_KINDS)
def test_matches_unrolled_paths_large(backend, device, kind):
    """A chain of many units; one-token branches all along a deep trunk."""
    if backend == "triton" and _backend.triton_interpret():
        pytest.skip("too large for the Triton interpreter")
    layout, _, paths = TreeLayout.from_sequences(tree_sequences(kind, seeded_rng()))
    layout = layout.to(device)
    q, k, v = random_qkv(layout.n_tokens, 2, 1, 64, torch.float32, device)
    check_against_paths(q, k, v, layout, paths)


@pytest.mark.parametrize("group", [1, 4, 8])
def test_gqa(backend, device, group):
    layout, _, paths = TreeLayout.from_sequences(random_sequences(seeded_rng(), max_tokens=60))
    layout = layout.to(device)
    n_kv = 2 if group == 1 else 1
    q, k, v = random_qkv(layout.n_tokens, group * n_kv, n_kv, 32, torch.float32, device)
    check_against_paths(q, k, v, layout, paths)


@pytest.mark.parametrize("head_dim", [40, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_head_dims(backend, device, head_dim, dtype):
    # 40 is padded to 64 inside the kernels; 256 takes the kernels' smallest blocks
    seqs = [list(range(20)), list(range(12)) + [100, 101, 102], [200, 201]]
    layout, _, paths = TreeLayout.from_sequences(seqs)
    q, k, v = random_qkv(layout.n_tokens, 2, 1, head_dim, dtype, device)
    check_against_paths(q, k, v, layout.to(device), paths, scale=0.3)


@pytest.mark.parametrize("deterministic", [False, True])
def test_out_only_and_deterministic(backend, device, deterministic):
    """Without an upstream gradient on lse; both dq paths (atomics and the dq kernel)."""
    layout, _, paths = TreeLayout.from_sequences(branched_trunk())
    q, k, v = random_qkv(layout.n_tokens, 2, 1, 32, torch.float32, device)
    check_against_paths(q, k, v, layout.to(device), paths, deterministic=deterministic,
                        lse_grad=False)


def test_return_lse(backend, device):
    layout, _, _ = TreeLayout.from_sequences(random_sequences(seeded_rng(), max_tokens=60))
    layout = layout.to(device)
    q, k, v = random_qkv(layout.n_tokens, 2, 1, 32, torch.float32, device)
    out = tree_attention(q, k, v, layout)
    out2, lse = tree_attention(q, k, v, layout, return_lse=True)
    assert torch.equal(out, out2) and lse.shape == (2, layout.n_tokens)
    assert lse.dtype == torch.float32


def test_deterministic_is_bitwise_reproducible(backend, device):
    layout, _, _ = TreeLayout.from_sequences(branched_trunk())
    layout = layout.to(device)
    q, k, v = random_qkv(layout.n_tokens, 2, 1, 32, torch.bfloat16, device)
    seed = int(torch.randint(2**31, ()))
    runs = []
    for _ in range(2):
        torch.manual_seed(seed)  # the same upstream gradients
        (_, _, *grads), _ = run_tree_attention(q, k, v, layout, deterministic=True)
        runs.append(grads)
    for a, b, name in zip(*runs, ("dq", "dk", "dv")):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", ["random", "leaves_on_trunk"])
def test_tree_results_do_not_depend_on_the_forest(backend, device, shape, dtype):
    """Batch invariance (docs/ops.md): a tree's outputs and deterministic gradients are bitwise the
    same alone and packed with other trees, and with and without autograd."""
    rng = seeded_rng()
    tree = (random_sequences(rng, max_tokens=150, chunk=(20, 60)) if shape == "random"
            else leaves_on_trunk(rng, 100, 30))
    before, after = ([[t + offset for t in s] for s in random_sequences(rng, max_depth=3,
                                                                         max_tokens=40)]
                     for offset in (10**6, 2 * 10**6))  # fresh token ids: separate trees
    alone, _, _ = TreeLayout.from_sequences(tree)
    packed, _, paths = TreeLayout.from_sequences(before + tree + after)
    where = torch.cat(paths[len(before):len(before) + len(tree)]).unique()  # the tree, packed
    assert torch.equal(where - where[0], torch.arange(alone.n_tokens))
    q, k, v = random_qkv(packed.n_tokens, 2, 1, 32, dtype, device)
    grad_out = torch.randn(q.shape, device=device).to(q.dtype)

    def run(layout, index):
        qs, ks, vs = (t.detach()[index].requires_grad_() for t in (q, k, v))
        out = tree_attention(qs, ks, vs, layout.to(device), deterministic=True)
        with torch.no_grad():
            assert torch.equal(out, tree_attention(qs, ks, vs, layout.to(device)))
        return (out, *torch.autograd.grad(out, (qs, ks, vs), grad_out[index]))

    in_forest = run(packed, torch.arange(packed.n_tokens))
    on_its_own = run(alone, where)
    for a, b, name in zip(in_forest, on_its_own, ("out", "dq", "dk", "dv")):
        assert torch.equal(a[where], b), f"{name} of the tree changes when packed with others"


@pytest.mark.parametrize("return_lse", [True, False])
def test_gradcheck_float64(return_lse):
    """With the lse's gradient the torch path runs its tiled executor, without it the fused one."""
    layout, _, _ = TreeLayout.from_sequences([[0, 1, 2, 3], [0, 1, 4], [5, 6], [0, 7, 8, 9]])
    q, k, v = (torch.randn(layout.n_tokens, h, 4, dtype=torch.float64, requires_grad=True)
               for h in (2, 1, 1))
    fn = lambda q, k, v: tree_attention(q, k, v, layout, return_lse=return_lse)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_invalid_inputs(backend, device):
    layout, _, _ = TreeLayout.from_sequences([[0, 1, 2], [0, 3]])
    layout = layout.to(device)
    n = layout.n_tokens
    q, k, v = (torch.randn(n, h, 8, device=device) for h in (4, 2, 2))
    with pytest.raises(ValueError, match="q"):
        tree_attention(q[:, 0], k, v, layout)
    with pytest.raises(ValueError, match="k and v"):
        tree_attention(q, k[..., :4], v, layout)
    with pytest.raises(ValueError, match="k and v"):
        tree_attention(q, k, v[:, :1], layout)
    with pytest.raises(ValueError, match="multiple"):
        tree_attention(q[:, :3], k, v, layout)
    with pytest.raises(ValueError, match="layout"):
        tree_attention(q[:-1], k[:-1], v[:-1], layout)
    with pytest.raises(TypeError, match="layout"):
        tree_attention(q, k, v, layout.parent)
    with pytest.raises(TypeError, match="k"):
        tree_attention(q, k.double(), v, layout)


def test_triton_metadata_covers_exactly_the_ancestors():
    """The tile lists alone reproduce the visibility mask: query tiles stay inside one chain
    segment and see their intervals plus the causal part; key tiles partition each tree."""
    pytest.importorskip("triton")
    from appo_kernels.tree import triton as tree_triton

    for seqs in (random_sequences(seeded_rng(), n_trees=3, max_tokens=400),
                 branched_trunk(), [[0]]):
        layout, _, _ = TreeLayout.from_sequences(seqs)
        q_tiles, intervals, k_tiles = tree_triton.metadata(layout)
        assert tree_triton.metadata(layout) is layout.cache["triton"][tree_triton.TILE]
        n = layout.n_tokens
        mask = torch.zeros(n, n, dtype=torch.bool)
        covered = torch.zeros(n, dtype=torch.long)
        for q_lo, q_hi, seg_start, first, end in q_tiles.tolist():
            assert 0 < q_hi - q_lo <= tree_triton.TILE and seg_start <= q_lo
            chain = torch.arange(seg_start + 1, q_hi)
            assert torch.equal(layout.parent[chain], chain - 1), "a tile straddles segments"
            covered[q_lo:q_hi] += 1
            for lo, hi in intervals[first:end].tolist() + [[seg_start, q_hi]]:
                mask[q_lo:q_hi, lo:hi] = True
        assert torch.equal(covered, torch.ones(n, dtype=torch.long))
        assert torch.equal(mask.tril(), layout.dense_mask())
        covered.zero_()
        for k0, k1 in k_tiles.tolist():
            assert 0 < k1 - k0 <= tree_triton.TILE
            assert (layout.parent[k0 + 1:k1] >= 0).all(), "a key tile straddles trees"
            covered[k0:k1] += 1
        assert torch.equal(covered, torch.ones(n, dtype=torch.long))


@pytest.mark.parametrize("small_tiles", [False, True])
def test_torch_blocks_cover_exactly_the_visible_pairs(small_tiles, monkeypatch):
    """The torch path's blocks (and the tiled executor's tiles): every visible (query, key) pair
    in exactly one, no hidden pair outside a causal block's mask, blocks within one tree, and
    no more blocks than segments plus branch points (setup linear in tokens)."""
    if small_tiles:  # tiles cut keys, causal queries and dense queries at these trees' sizes
        monkeypatch.setattr(reference, "BLOCK_KEYS", 16)
        monkeypatch.setattr(reference, "CAUSAL_QUERIES", 4)
        monkeypatch.setattr(reference, "BLOCK_SCORES", 64)
    rng = seeded_rng()
    for seqs in (random_sequences(rng, n_trees=3, max_tokens=400), branched_trunk(),
                 wide_tree(5, 150) + leaves_on_trunk(rng, 200, 60, offset=1000),
                 [list(range(300))], [[0]], [[0], [1], [2]]):
        layout, _, _ = TreeLayout.from_sequences(seqs)
        meta = reference.metadata(layout)
        assert reference.metadata(layout) is meta and layout.cache["torch"] is meta
        n = layout.n_tokens
        visible = layout.dense_mask()
        tree = torch.cumsum(layout.parent < 0, 0)
        segments = len(layout.segment_starts())
        assert len(meta[0]) <= 2 * segments + n // 1000  # at most a segment and a branch point
        for rows, kind in ((meta[0].tolist(), "block"),
                           ([list(r) + [1] for r in reference.tiles(meta)], "tile")):
            covered = torch.zeros(n, n, dtype=torch.long)
            for qa, qb, ka, kb, causal, count in rows:
                assert qa < qb and ka < kb and (qb - qa) % count == 0
                length = (qb - qa) // count
                for a in range(qa, qb, length):
                    q0, q1, k0, k1 = (a, a + length, a, a + length) if count > 1 else (qa, qb, ka, kb)
                    assert (tree[q0:q1] == tree[k0]).all() and (tree[k0:k1] == tree[k0]).all(), \
                        f"a {kind} straddles trees"
                    i = torch.arange(q0, q1)[:, None]
                    j = torch.arange(k0, k1)[None, :]
                    seen = ~(j > i) if causal else torch.ones(q1 - q0, k1 - k0, dtype=torch.bool)
                    assert visible[q0:q1, k0:k1][seen].all(), f"a {kind} sees a hidden pair"
                    covered[q0:q1, k0:k1] += seen
                    if kind == "tile" and small_tiles:
                        assert k1 - k0 <= 16 and (q1 - q0) * (k1 - k0) <= max(64, 4 * (k1 - k0))
            assert torch.equal(covered, visible.long()), f"{kind}s miss or repeat a visible pair"


def test_torch_compile_fullgraph(backend, device):
    layout, _, _ = TreeLayout.from_sequences([[1, 2, 3, 4], [1, 2, 5], [1, 6, 7, 8, 9]])
    layout = layout.to(device).prepare()
    q, k, v = (torch.randn(layout.n_tokens, heads, 16, device=device) for heads in (4, 2, 2))

    def loss_fn(q, k, v):
        out, lse = tree_attention(q, k, v, layout, return_lse=True)
        return (out * out).sum() + lse.sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    eager_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    traced_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    eager, traced = loss_fn(*eager_inputs), compiled(*traced_inputs)
    eager.backward()
    traced.backward()
    torch.testing.assert_close(traced, eager)
    for a, b in zip(traced_inputs, eager_inputs):
        torch.testing.assert_close(a.grad, b.grad)


def test_zero_heads_or_head_dim_is_an_error():
    layout = TreeLayout.from_parents([-1, 0])
    with pytest.raises(ValueError, match="at least one head of dimension >= 1"):
        tree_attention(torch.randn(2, 2, 0), torch.randn(2, 1, 0), torch.randn(2, 1, 0), layout)


def test_the_cpu_runs_the_fused_kernels(monkeypatch):
    """On this torch the CPU path's probe finds the fused kernels and forward and backward use
    them (were the probe to fail, the tiled executor would run: slower, equally right)."""
    assert reference._flash_kernels_work()

    def tiled(*args):
        raise AssertionError("the tiled executor ran")

    monkeypatch.setattr(reference, "_forward_tiled", tiled)
    monkeypatch.setattr(reference, "_backward_tiled", tiled)
    layout, _, _ = TreeLayout.from_sequences([[0, 1, 2, 3], [0, 1, 4, 5], [6, 7]])
    q, k, v = (torch.randn(layout.n_tokens, h, 8, requires_grad=True) for h in (4, 2, 2))
    tree_attention(q, k, v, layout).sum().backward()
    assert all(t.grad is not None for t in (q, k, v))
