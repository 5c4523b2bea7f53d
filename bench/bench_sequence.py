"""`future_value` and `future_kl_scale` against the O(L²) decay-matrix formulation
(bench/README.md).

Providers, in the same run:
  appo-triton, appo-torch   `appo_kernels.scan` with APPO_BACKEND forced (triton on GPU only)
  matrix                    the reference code's method made as fast as it goes: the L×L matrix
                            of gamma^(k−t) (k ≥ t) built once per length (not timed), then one
                            batched matmul over all sequences (the reference builds it per
                            sequence and multiplies one sequence at a time)

Workload: S sequences of L tokens packed with cu_seqlens, fresh random log-probs, 80% of tokens
masked in. Byte counts are the op's minimal traffic, the same for every provider.
"""

from __future__ import annotations

import os

import pytest
import torch

from appo_kernels import _backend
from appo_kernels.scan import future_kl_scale, future_value

ON_CUDA = torch.cuda.is_available()
# bench/README.md: 768 sequences × 6144 tokens on a GPU; a smoke test on the CPU, or the CPU
# ratios' shape with APPO_BENCH_CPU_SHAPES=1
CPU_RATIOS = os.environ.get("APPO_BENCH_CPU_SHAPES", "0") not in ("", "0")
SEQS, LENGTH = (768, 6144) if ON_CUDA else (64, 4096) if CPU_RATIOS else (8, 256)
FUTURE_KL_GAMMA = 2 ** (-1 / 64)
CLIP = (0.8, 1.2)
F32, MASK_BYTES = 4, 1
OPS = ("future_value", "future_kl_scale")


def bytes_moved(n_tokens: int, op: str) -> int:
    """future_value: logprob, old_logprob, mask read, omega written.
    future_kl_scale: adv, logprob, old_logprob, mask read, scaled advantage written."""
    per_token = 3 * F32 + MASK_BYTES if op == "future_value" else 4 * F32 + MASK_BYTES
    return n_tokens * per_token


def workload(device):
    n = SEQS * LENGTH
    cu = torch.arange(0, n + 1, LENGTH, dtype=torch.int32, device=device)
    logprob = -torch.rand(n, device=device) * 3
    old = logprob + 0.05 * torch.randn(n, device=device)
    mask = torch.rand(n, device=device) > 0.2
    adv = torch.randn(n, device=device)
    return cu, logprob, old, mask, adv


_DECAY: dict = {}


def decay_matrix(gamma: float, device, dtype) -> torch.Tensor:
    """decay[t, k] = gamma^(k−t) for k ≥ t, else 0: built once per (gamma, length, device), as a
    trainer would keep it, so its construction is not timed."""
    key = (gamma, LENGTH, str(device), dtype)
    if key not in _DECAY:
        steps = torch.arange(LENGTH, device=device, dtype=torch.float64)
        power = steps[None, :] - steps[:, None]
        _DECAY[key] = torch.where(power >= 0, gamma ** power.clamp_min(0), 0.0).to(dtype)
    return _DECAY[key]


def matrix_suffix_sum(values: torch.Tensor, gamma: float) -> torch.Tensor:
    """y = decay @ v for every sequence at once: one batched matmul [S, L] × [L, L]ᵀ (O(S·L²)
    multiply-adds, the sequences all of length L)."""
    decay = decay_matrix(gamma, values.device, values.dtype)
    return (values.view(SEQS, LENGTH) @ decay.T).reshape(-1)


def matrix_future_value(logprob, old, mask):
    s = matrix_suffix_sum(torch.where(mask, logprob - old, 0.0), 1.0)
    return s.clamp(-20, 20).exp().clamp(*CLIP)


def matrix_future_kl_scale(adv, logprob, old, mask, clip=0.2, clip_c=3.0, safety=6.0):
    d = (logprob - old).clamp(-20, 20)
    keep = mask & (d.exp() <= clip_c)
    f = matrix_suffix_sum(torch.where(keep, d, 0.0), FUTURE_KL_GAMMA).exp().clamp(1.0, 1.0 + clip)
    f = torch.where((adv < 0) & (d.exp() > safety), f.clamp(0.8, 1.0), f)
    return adv * (1.0 + f)


def providers():
    names = ["appo-torch", "matrix"]
    if ON_CUDA and _backend.TRITON_VERSION is not None:
        names.insert(0, "appo-triton")
    return names


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("provider", providers())
def test_sequence_scan(measure, bench_device, monkeypatch, op, provider):
    cu, logprob, old, mask, adv = workload(bench_device)
    if provider.startswith("appo-"):
        monkeypatch.setenv("APPO_BACKEND", provider.removeprefix("appo-"))
        if op == "future_value":
            def step():
                return future_value(logprob, old, cu, mask=mask, clip=CLIP)
        else:
            def step():
                return future_kl_scale(adv, logprob, old, cu, mask)
    elif op == "future_value":
        def step():
            return matrix_future_value(logprob, old, mask)
    else:
        def step():
            return matrix_future_kl_scale(adv, logprob, old, mask)

    n = SEQS * LENGTH
    measure(step, bytes_moved=bytes_moved(n, op), op=op, provider=provider,
            shape=f"{SEQS}x{LENGTH}", dtype="fp32", mode="fwd")
