"""`linear_token_stats` against the logits route (bench/README.md): log-prob, entropy and lse from
hidden states and an lm_head, forward and forward+backward to hidden and weight.

Providers, all in the same run:
  appo-linear       `appo_kernels.linear_token_stats` (chunked: one chunk's logits at a time)
  appo-logits       `token_stats(hidden @ weight.T)`: the logits materialised, then appo's kernel
  torch-eager       `hidden @ weight.T`, then log_softmax + gather and −Σ p·log p (verl's
                    formulas), all in the input dtype
  liger-flce        Liger's fused linear cross-entropy (GPU, where installed): log-prob only
  trl-fused         TRL's fused LM head (`trl.trainer.utils._ChunkedLogProbFunction`, what
                    `add_fused_lm_head` runs; TRL ≥ 1.16, where installed): log-prob and entropy
                    in chunks of its default size

Workload: T tokens, H hidden, V vocabulary; fresh random inputs per bench. FLOPs: 2·T·H·V in the
forward (the product), 6·T·H·V forward+backward (the product and its two gradients); TFLOP/s is
under that count for every provider. Peak memory (GPU) is recorded beside the time.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from appo_kernels import linear_token_stats, token_stats

ON_CUDA = torch.cuda.is_available()
CPU_RATIOS = os.environ.get("APPO_BENCH_CPU_SHAPES", "0") not in ("", "0")
if ON_CUDA:
    WORKLOADS = [(8192, 4096, v, torch.bfloat16) for v in (131072, 151936)]
elif CPU_RATIOS:  # bench/README.md, CPU ratios: T=4096, H=128, V=50257, fp32
    WORKLOADS = [(4096, 128, 50257, torch.float32)]
else:  # a smoke test
    WORKLOADS = [(256, 64, 4099, torch.float32)]
MODES = ("fwd", "fwd_bwd")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}
PROVIDERS = ("appo-linear", "appo-logits", "torch-eager", "liger-flce", "trl-fused")


def eager(hidden, weight, target):
    logits = hidden @ weight.T
    log_p = F.log_softmax(logits, -1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return log_p.gather(-1, target[:, None])[:, 0], entropy


def liger_available() -> bool:
    return ON_CUDA and importlib.util.find_spec("liger_kernel") is not None


def trl_fused():
    """TRL's chunked log-prob/entropy autograd function, or None (no TRL, or one without it)."""
    if importlib.util.find_spec("trl") is None:
        return None
    from trl.trainer import utils

    function = getattr(utils, "_ChunkedLogProbFunction", None)
    chunk = getattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", None)
    return None if function is None or chunk is None else (function, chunk)


def make_step(provider, hidden, weight, target, mode):
    leaves = (hidden, weight)
    if provider == "appo-linear":
        def stats():
            s = linear_token_stats(hidden, weight, target)
            return s.logprob.sum() + s.entropy.sum()
    elif provider == "appo-logits":
        def stats():
            s = token_stats(hidden @ weight.T, target)
            return s.logprob.sum() + s.entropy.sum()
    elif provider == "torch-eager":
        def stats():
            logprob, entropy = eager(hidden, weight, target)
            return logprob.float().sum() + entropy.float().sum()
    elif provider == "trl-fused":
        function, chunk = trl_fused()

        def stats():  # TRL's arguments: bias, targets, temperature, chunk, softcap, scale, outputs
            logprob, entropy, *_ = function.apply(hidden, weight, None, target, 1.0, chunk, None,
                                                  1.0, ("log_probs", "entropy"))
            return logprob.sum() + entropy.sum()
    else:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def stats():
            return -liger_fused_linear_cross_entropy(hidden, weight, target, reduction="sum")

    if mode == "fwd":
        def step():
            with torch.no_grad():
                return stats()
    else:
        def step():
            return torch.autograd.grad(stats(), leaves)
    return step


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("workload", WORKLOADS,
                         ids=lambda w: f"T{w[0]}-H{w[1]}-V{w[2]}-{DTYPE_NAMES[w[3]]}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_linear_token_stats(benchmark, measure, require_memory, bench_device, provider, workload,
                            mode):
    tokens, width, vocab, dtype = workload
    if provider == "liger-flce" and not liger_available():
        pytest.skip("liger-flce: needs a GPU and liger-kernel")
    if provider == "trl-fused" and trl_fused() is None:
        pytest.skip("trl-fused: needs trl >= 1.16")
    logits_bytes = tokens * vocab * torch.finfo(dtype).bits // 8
    chunked = provider in ("appo-linear", "liger-flce", "trl-fused")
    require_memory((1 if chunked else 4) * logits_bytes + (1 << 30),
                   f"{provider} T={tokens} V={vocab}")
    hidden = torch.randn(tokens, width, device=bench_device).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, width, device=bench_device) * width ** -0.5 * 3).to(dtype)
    weight.requires_grad_()
    target = torch.randint(0, vocab, (tokens,), device=bench_device)
    step = make_step(provider, hidden, weight, target, mode)
    if ON_CUDA:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    flops = (2 if mode == "fwd" else 6) * tokens * width * vocab
    # bytes: hidden and weight read (and their gradients written in fwd+bwd), nothing T × V
    median_ms = measure(step, bytes_moved=2 * (tokens + vocab) * width * torch.finfo(dtype).bits // 8,
                        op="linear_token_stats", provider=provider,
                        shape=[tokens, width, vocab], dtype=DTYPE_NAMES[dtype], mode=mode,
                        flops=flops,
                        **({"note": "no entropy: log-prob only"} if provider == "liger-flce"
                           else {}))
    benchmark.extra_info["tflops"] = flops / (median_ms * 1e-3) / 1e12
    if ON_CUDA:
        benchmark.extra_info["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
