"""`tree_attention` on the rollout trees C1–C5 against its peers (bench/README.md).

Providers, all in the same run:
  appo-triton     `appo_kernels.tree_attention`, APPO_BACKEND=triton (GPU, where
                  `appo_kernels/tree/triton.py` exists)
  appo-torch      `appo_kernels.tree_attention`, APPO_BACKEND=torch: the reference (CPU only)
  flex            FlexAttention on the same tree, `flex_tree_attention(..., compiled=True)`, with
                  its BlockMask built once outside the timed region (build time: `block_mask_ms`)
  sdpa-unrolled   every root-to-leaf path as its own causal sequence through
                  `F.scaled_dot_product_attention(is_causal=True)` (the flash backend on a GPU);
                  paths of equal length share one batched call, GQA through `enable_gqa`

Modes: fwd (no grad), bwd (the forward runs outside the timer, `torch.autograd.grad` inside),
fwd_bwd (both, timed together). Workload: the trees of `bench/trees.py` with Hq=32, Hkv=8, D=128,
bf16 on a GPU; on the CPU, as a smoke test, the trees at 1/128 of their lengths, Hq=4, Hkv=2, D=32,
fp32. The unrolled provider gets its inputs already unrolled (gathered once, outside the timer), as
a trainer that runs every path as its own sequence would hold them.

FLOP count (README, "Tree attention"): 4·D·Hq per visible (query, key) pair in the forward
(QKᵀ and PV, a multiply-add each), ×2.5 for the backward and ×3.5 for forward+backward
(FlashAttention's convention). `tflops` counts the tree's pairs for every provider (useful work),
`unrolled_tflops` the unrolled paths' pairs (the work the unrolled provider does).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import time
from typing import Callable, NamedTuple, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from appo_kernels import _backend
from appo_kernels.tree import TreeLayout, flex_tree_attention, reference, tree_attention
from bench.trees import TREES, RolloutTree, rollout_tree

ON_CUDA = torch.cuda.is_available()
# bench/README.md on a GPU; on the CPU a smoke test of a few seconds (`pytest bench/
# --benchmark-disable`).
if ON_CUDA:
    TREE_SCALE, Q_HEADS, KV_HEADS, HEAD_DIM, DTYPE = 1.0, 32, 8, 128, torch.bfloat16
    CHECK_SCALE = 1 / 32  # the tree each provider is checked on before timing: N ≈ 1k–4k
elif os.environ.get("APPO_BENCH_CPU_SHAPES", "0") not in ("", "0"):  # the CPU ratios
    TREE_SCALE, Q_HEADS, KV_HEADS, HEAD_DIM, DTYPE = 1 / 16, 4, 2, 32, torch.float32
    CHECK_SCALE = 1 / 256
else:
    TREE_SCALE, Q_HEADS, KV_HEADS, HEAD_DIM, DTYPE = 1 / 128, 4, 2, 32, torch.float32
    CHECK_SCALE = 1 / 256
SCALE = HEAD_DIM ** -0.5
TREE_NAMES = tuple(TREES)
MODES = ("fwd", "bwd", "fwd_bwd")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}

FWD_FLOPS_PER_PAIR_HEAD = 4 * HEAD_DIM  # QKᵀ and PV: 2·D each per visible pair and query head
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}  # FlashAttention: backward = 2.5 × forward
LSE_BYTES = 4
SLACK_BYTES = 1 << 30  # allocator rounding, kernel workspaces, the check's small tree
BLOCK_MASK_BUILDS = 3  # timed BlockMask builds after a warm one; block_mask_ms is their median
RECOMPILE_LIMIT = 64  # flex compiles once per tree size and grad mode: more than dynamo's default 8
# (forward, gradients) tolerances relative to the reference's RMS; a wrong mask or a missing path
# is off by O(RMS), bf16 rounding by ~1%.
TOLERANCES = {torch.bfloat16: (2e-2, 5e-2), torch.float32: (1e-3, 1e-3)}


def bytes_moved(n_tokens: int, mode: str) -> int:
    """The workload's minimal traffic over the packed tree (README), the same for every provider.

    fwd: q, k, v read, o and the fp32 lse written. bwd: q, k, v, o, dO and lse read, dq, dk, dv
    written. fwd_bwd: both.
    """
    s = torch.finfo(DTYPE).bits // 8
    fwd = n_tokens * (HEAD_DIM * s * (2 * Q_HEADS + 2 * KV_HEADS) + Q_HEADS * LSE_BYTES)
    bwd = n_tokens * (HEAD_DIM * s * (4 * Q_HEADS + 4 * KV_HEADS) + Q_HEADS * LSE_BYTES)
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def flops(pairs: int, mode: str) -> float:
    return FLOP_FACTOR[mode] * FWD_FLOPS_PER_PAIR_HEAD * Q_HEADS * pairs


def _activation_bytes(n_tokens: int, kv_heads: int = KV_HEADS) -> int:
    """q, o, dO, dq and k, v, dk, dv of n_tokens: what a fwd_bwd holds at its peak."""
    return n_tokens * HEAD_DIM * (torch.finfo(DTYPE).bits // 8) * 4 * (Q_HEADS + kv_heads)


# ------------------------------------------------------------------------------------------------
# Trees and inputs, built once per session (outside every timed region)

@functools.lru_cache(maxsize=None)
def _tree(name: str, scale: float) -> RolloutTree:
    return rollout_tree(name, scale)


@functools.lru_cache(maxsize=None)
def _layout(name: str, scale: float, device: torch.device) -> TreeLayout:
    return _tree(name, scale).layout(device)


@functools.lru_cache(maxsize=None)
def _block_mask(name: str, scale: float, device: torch.device):
    # one BlockMask object per tree, so compiled flex finds its graph again in the next mode
    return _layout(name, scale, device).to_block_mask()


def _random_inputs(n_tokens: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fresh q, k, v and upstream gradient dO (never zero)."""
    q = torch.randn(n_tokens, Q_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    k = torch.randn(n_tokens, KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    v = torch.randn(n_tokens, KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    do = torch.randn(n_tokens, Q_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    return q, k, v, do


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# Providers

class Attention(NamedTuple):
    """One provider set up on one tree: the leaves it differentiates and the forward to time."""

    inputs: tuple[Tensor, ...]  # leaf tensors: packed q, k, v, or their per-path copies
    forward: Callable[[], list[Tensor]]
    grad_outputs: list[Tensor]  # the upstream gradient of each output
    # (outputs, input grads) -> packed o and [dq, dk, dv], to compare with the reference
    packed: Callable[[list[Tensor], tuple[Tensor, ...]], tuple[Tensor, list[Tensor]]]
    info: dict  # provider facts for extra_info


# (tree name, scale, q, k, v, dO, with grad) -> Attention
Setup = Callable[[str, float, Tensor, Tensor, Tensor, Tensor, bool], Attention]


class Provider(NamedTuple):
    name: str
    setup: Setup
    unavailable: Callable[[torch.device], Optional[str]]  # why it cannot run here, or None
    unrolled: bool = False  # holds a copy of every path: memory grows with the unrolled tokens
    appo_backend: Optional[str] = None
    compiled: bool = False  # runs through torch.compile


def _leaves(tensors, grad: bool) -> tuple[Tensor, ...]:
    return tuple(x.detach().requires_grad_(grad) for x in tensors)


def _as_packed(outputs, grads):
    return outputs[0], list(grads)


def _setup_appo(name, scale, q, k, v, do, grad) -> Attention:
    layout = _layout(name, scale, q.device)
    inputs = _leaves((q, k, v), grad)

    def forward():
        return [tree_attention(*inputs, layout, scale=SCALE)]

    return Attention(inputs, forward, [do], _as_packed, {})


def _setup_flex(name, scale, q, k, v, do, grad) -> Attention:
    layout = _layout(name, scale, q.device)
    block_mask = _block_mask(name, scale, q.device)
    build_ms = []
    for _ in range(BLOCK_MASK_BUILDS):  # timed apart: a trainer builds it once per step
        _synchronize(q.device)
        t0 = time.perf_counter()
        layout.to_block_mask()
        _synchronize(q.device)
        build_ms.append((time.perf_counter() - t0) * 1e3)
    inputs = _leaves((q, k, v), grad)

    def forward():
        return [flex_tree_attention(*inputs, layout, scale=SCALE, block_mask=block_mask,
                                    compiled=True)]

    info = {"block_mask_ms": sorted(build_ms)[len(build_ms) // 2],
            "block_size": block_mask.BLOCK_SIZE[0]}
    return Attention(inputs, forward, [do], _as_packed, info)


@functools.lru_cache(maxsize=None)
def _sdpa_native_gqa(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether SDPA (the flash backend on a GPU) runs `enable_gqa=True` forward and backward."""
    q = torch.randn(1, Q_HEADS, 16, HEAD_DIM, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, KV_HEADS, 16, HEAD_DIM, device=device, dtype=dtype, requires_grad=True)
    try:
        with _sdpa_backend(device):
            out = F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
        out.sum().backward()
    except RuntimeError:
        return False
    return True


def _sdpa_backend(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def _setup_unrolled(name, scale, q, k, v, do, grad) -> Attention:
    device, n, tree = q.device, q.shape[0], _tree(name, scale)
    by_length: dict[int, list[Tensor]] = {}
    for path in tree.paths:
        by_length.setdefault(path.numel(), []).append(path)
    # one batched call per path length, longest first: exact causal attention, no padding
    groups = [torch.stack(by_length[length]).to(device)
              for length in sorted(by_length, reverse=True)]

    index = torch.cat([g.flatten() for g in groups])  # the unrolled tokens, group after group
    sizes = [g.numel() for g in groups]

    def unroll(x: Tensor) -> list[Tensor]:  # packed [N, H, D] -> per group [paths, H, L, D]
        return [u.view(*g.shape, *x.shape[1:]).transpose(1, 2).contiguous()
                for g, u in zip(groups, x[index].split(sizes))]

    def pack(chunks: list[Tensor]) -> Tensor:  # per group [paths, H, L, D] -> [U, H, D]
        return torch.cat([c.transpose(1, 2).reshape(-1, c.shape[1], c.shape[3]) for c in chunks])

    q_paths, k_paths, v_paths = (_leaves(unroll(x), grad) for x in (q, k, v))
    native_gqa = _sdpa_native_gqa(device, q.dtype)
    group = Q_HEADS // KV_HEADS

    def attend(qp: Tensor, kp: Tensor, vp: Tensor) -> Tensor:
        if not native_gqa:  # as HF's repeat_kv does, inside the differentiated forward
            kp, vp = kp.repeat_interleave(group, dim=1), vp.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=SCALE,
                                              enable_gqa=native_gqa)

    def forward():
        with _sdpa_backend(device):
            return [attend(*qkv) for qkv in zip(q_paths, k_paths, v_paths)]

    # Each copy of a token gets its upstream gradient divided by the number of copies: summed over
    # the copies, the unrolled gradients are then exactly the tree's (docs/ops.md).
    copies = torch.bincount(index, minlength=n)
    grad_outputs = unroll((do.float() / copies[:, None, None]).to(do.dtype))

    def packed(outputs, grads):
        out = torch.empty_like(q)
        out[index] = pack(outputs)  # every copy of a token holds the same output
        if not grads:
            return out, []
        per_input = [grads[i * len(groups):(i + 1) * len(groups)] for i in range(3)]
        sums = [torch.zeros(x.shape, device=device).index_add_(0, index, pack(g).float())
                for x, g in zip((q, k, v), per_input)]
        return out, sums

    info = {"sdpa_calls": len(groups), "sdpa_gqa": "enable_gqa" if native_gqa else "repeated kv"}
    if device.type == "cuda":
        from torch.nn import attention

        impl = getattr(attention, "current_flash_attention_impl", lambda: None)()
        info["sdpa_backend"] = f"flash ({impl or 'built-in'})"
    return Attention(q_paths + k_paths + v_paths, forward, grad_outputs, packed, info)


def _needs_cuda(device: torch.device) -> Optional[str]:
    return None if device.type == "cuda" else "GPU only"


def _triton_missing(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "GPU only"
    if _backend.TRITON_VERSION is None:
        return "triton is not installed"
    if importlib.util.find_spec("appo_kernels.tree.triton") is None:
        return "appo_kernels/tree/triton.py does not exist"
    return None


def _cpu_only(device: torch.device) -> Optional[str]:
    return None if device.type == "cpu" else "the torch reference is timed on the CPU only"


PROVIDERS = (
    Provider("appo-triton", _setup_appo, _triton_missing, appo_backend="triton"),
    Provider("appo-torch", _setup_appo, _cpu_only, appo_backend="torch"),
    Provider("flex", _setup_flex, _needs_cuda, compiled=True),
    Provider("sdpa-unrolled", _setup_unrolled, lambda device: None, unrolled=True),
)


# ------------------------------------------------------------------------------------------------

def _timed_step(att: Attention, mode: str) -> Callable[[], object]:
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return att.forward()
    elif mode == "bwd":
        outputs = att.forward()  # outside the timer; the graph is kept for every timed backward

        def step():
            return torch.autograd.grad(outputs, att.inputs, att.grad_outputs, retain_graph=True)
    else:
        def step():
            return torch.autograd.grad(att.forward(), att.inputs, att.grad_outputs)
    return step


def _assert_close(what: str, actual: Tensor, expected: Tensor, tol: float) -> None:
    rms = expected.pow(2).mean().sqrt().item()
    torch.testing.assert_close(actual.float(), expected, rtol=tol, atol=tol * rms,
                               msg=lambda m: f"{what}: {m}")


_CHECKED: set[tuple[str, str, bool]] = set()


def _check(provider: Provider, name: str, device: torch.device, grad: bool) -> None:
    """The provider once on the scaled-down tree against the fp32 torch reference, with the same
    grad mode as the timed call: a peer that computes something else fails instead of posting a
    time. Checked once per (provider, tree, grad mode) and session."""
    if (provider.name, name, grad) in _CHECKED:
        return
    tree = _tree(name, CHECK_SCALE)
    layout = _layout(name, CHECK_SCALE, device)
    q, k, v, do = _random_inputs(tree.n_tokens, device)
    att = provider.setup(name, CHECK_SCALE, q, k, v, do, grad)
    if grad:
        outputs = att.forward()
        grads = torch.autograd.grad(outputs, att.inputs, att.grad_outputs)
    else:
        with torch.no_grad():
            outputs = att.forward()
        grads = ()
    out, packed_grads = att.packed(outputs, grads)

    qf, kf, vf, dof = (x.float() for x in (q, k, v, do))
    meta = reference.metadata(layout)
    want, lse = reference.forward(qf, kf, vf, layout.subtree_end, meta, SCALE)
    tol_out, tol_grad = TOLERANCES[DTYPE]
    _assert_close(f"{provider.name} on {name}: o", out, want, tol_out)
    if grad:
        want_grads = reference.backward(qf, kf, vf, want, lse, dof, None, layout.subtree_end,
                                        meta, SCALE, True)
        for what, actual, expected in zip(("dq", "dk", "dv"), packed_grads, want_grads):
            _assert_close(f"{provider.name} on {name}: {what}", actual, expected, tol_grad)
    _CHECKED.add((provider.name, name, grad))


def _provider_params() -> list:
    """Providers that cannot run on this machine are skipped at collection, with the reason."""
    device = torch.device("cuda" if ON_CUDA else "cpu")
    params = []
    for p in PROVIDERS:
        reason = p.unavailable(device)
        params.append(pytest.param(p, id=p.name, marks=pytest.mark.skipif(
            reason is not None, reason=f"{p.name}: {reason}")))
    return params


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", TREE_NAMES)
@pytest.mark.parametrize("provider", _provider_params())
def test_tree_attention(benchmark, measure, require_memory, bench_device, monkeypatch,
                        provider, name, mode):
    device, dtype_name = bench_device, DTYPE_NAMES[DTYPE]
    if provider.appo_backend is not None:
        monkeypatch.setenv("APPO_BACKEND", provider.appo_backend)  # read at call time
    if provider.compiled:
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") \
            else "cache_size_limit"
        monkeypatch.setattr(torch._dynamo.config, limit, RECOMPILE_LIMIT)
        # the timed backward reuses one graph (retain_graph=True): AOTAutograd must not donate
        # the saved activations' buffers to the first backward
        monkeypatch.setattr(torch._functorch.config, "donated_buffer", False, raising=False)
    tree = _tree(name, TREE_SCALE)
    need = _activation_bytes(tree.n_tokens) + SLACK_BYTES
    if provider.unrolled:  # the per-path copies, KV heads counted as Q heads if repeated
        need += _activation_bytes(tree.unrolled_tokens, kv_heads=Q_HEADS)
    if device.type == "cuda":  # the CPU trees are tiny; the check would only cost a gc pass
        require_memory(need, f"{provider.name} {mode} {name} N={tree.n_tokens}")
    benchmark.group = f"tree_attention {mode} {name}"

    grad = mode != "fwd"
    out_of_memory = None
    try:
        _check(provider, name, device, grad)
        q, k, v, do = _random_inputs(tree.n_tokens, device)
        att = provider.setup(name, TREE_SCALE, q, k, v, do, grad)
        del q, k, v
        median_ms = measure(
            _timed_step(att, mode),
            bytes_moved=bytes_moved(tree.n_tokens, mode),
            op="tree_attention",
            provider=provider.name,
            shape=f"{name} N={tree.n_tokens}",
            dtype=dtype_name,
            mode=mode,
            tree=name,
            tree_scale=TREE_SCALE,
            heads=[Q_HEADS, KV_HEADS],
            head_dim=HEAD_DIM,
            n_tokens=tree.n_tokens,
            n_paths=len(tree.paths),
            unrolled_tokens=tree.unrolled_tokens,
            tree_pairs=tree.tree_pairs,
            unrolled_pairs=tree.unrolled_pairs,
            pair_saving=tree.pair_saving,
            appo_backend=provider.appo_backend,
            torch_version=torch.__version__,
            **att.info,
        )
        useful, unrolled = flops(tree.tree_pairs, mode), flops(tree.unrolled_pairs, mode)
        benchmark.extra_info.update({
            "flops": useful,
            "tflops": useful / (median_ms * 1e-3) / 1e12,
            "unrolled_flops": unrolled,
            "unrolled_tflops": unrolled / (median_ms * 1e-3) / 1e12,
        })
    except torch.OutOfMemoryError as e:  # the memory estimate is rough: skip, never crash the run
        out_of_memory = str(e).splitlines()[0]
    if out_of_memory is not None:
        pytest.skip(f"{provider.name}: out of memory: {out_of_memory}")
