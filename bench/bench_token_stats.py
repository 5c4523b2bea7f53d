"""`token_stats` against its peers (bench/README.md): forward, and forward+backward to the logits.

Providers, all in the same run:
  appo-cuda, appo-triton, appo-torch   `appo_kernels.token_stats` with APPO_BACKEND forced
  torch-verl          verl's formulas in eager torch
  torch-trl           TRL's formulas in eager torch
  torch-compile-verl  `torch.compile` of the verl formulas (GPU only)
  liger-ce            Liger's cross-entropy kernel (GPU only, where installed): log-prob only

Workload: T tokens × V vocabulary, fresh random logits and targets per bench. Byte counts
(`bytes_moved`) are those of the workload, the same for every provider, so GB/s compares time.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from typing import Callable, NamedTuple, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from appo_kernels import _backend, token_stats

ON_CUDA = torch.cuda.is_available()
# bench/README.md shapes on a GPU; a smoke test on the CPU (`pytest bench/ --benchmark-disable`).
# APPO_BENCH_CPU_SHAPES=1: the CPU ratios of bench/README.md (one thread: OMP_NUM_THREADS=1).
CPU_RATIOS = os.environ.get("APPO_BENCH_CPU_SHAPES", "0") not in ("", "0")
if ON_CUDA:
    WORKLOADS = [(8192, v, d) for v in (32000, 128256, 151936, 262144)
                 for d in (torch.bfloat16, torch.float32)]
elif CPU_RATIOS:
    WORKLOADS = [(512, 32000, torch.float32), (256, 151936, torch.bfloat16)]
else:
    WORKLOADS = [(64, v, torch.float32) for v in (1000, 32000)]
MODES = ("fwd", "fwd_bwd")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}

TARGET_BYTES = 8  # int64 token ids
STAT_BYTES = 4  # each of logprob, entropy, lse is float32
N_STATS = 3
TRL_ENTROPY_CHUNK = 128  # rows per chunk in TRL's entropy_from_logits
CHECK_ROWS = 64  # rows checked against a float64 reference before timing
LOGIT_SCALE = 3.0  # randn × 3: peaked enough that p varies over many orders of magnitude
SLACK_BYTES = 1 << 30  # allocator rounding, reference-backend chunks, CUDA/Triton workspaces


def bytes_moved(tokens: int, vocab: int, dtype: torch.dtype, mode: str) -> int:
    """Bytes the workload must move at least (README, "Byte counts").

    fwd:     T·V·s (logits read once) + T·8 (target read) + T·3·4 (logprob, entropy, lse written)
    fwd_bwd: 3·T·V·s (logits read in forward and in backward, grad written) + 2·(8 + 3·4)·T
             (forward: target read, stats written; backward: target and 3 upstream grads read)
    """
    logits = tokens * vocab * torch.finfo(dtype).bits // 8
    small = tokens * (TARGET_BYTES + N_STATS * STAT_BYTES)
    return logits + small if mode == "fwd" else 3 * logits + 2 * small


# ------------------------------------------------------------------------------------------------
# Peers: the formulas trainers use today, written out in plain torch.

def verl_stats(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """verl: `logprobs_from_logits_naive` (log_softmax + gather) and `entropy_from_logits`
    (logsumexp(z) − Σ softmax(z)·z), both in the logits' dtype as verl runs them."""
    logprob = torch.gather(F.log_softmax(logits, dim=-1), -1, target.unsqueeze(-1)).squeeze(-1)
    probs = F.softmax(logits, dim=-1)
    entropy = torch.logsumexp(logits, dim=-1) - torch.sum(probs * logits, dim=-1)
    return logprob.float(), entropy.float()


def trl_stats(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """TRL: `selective_log_softmax` (fp32: gather − logsumexp; bf16/fp16: log_softmax + gather) and
    `entropy_from_logits` (−Σ exp(log p)·log p over 128-row chunks), in the logits' dtype.

    TRL loops `selective_log_softmax` over the sequences of a batch to cap memory; the T rows here
    are one sequence, so that loop has one iteration and is left out.
    """
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, -1, target.unsqueeze(-1)).squeeze(-1)
        logprob = picked - torch.logsumexp(logits, dim=-1)
    else:  # TRL: logsumexp is unstable in bf16, so it takes the log_softmax route there
        logprob = torch.gather(F.log_softmax(logits, dim=-1), -1, target.unsqueeze(-1)).squeeze(-1)
    entropy = []
    for chunk in logits.split(TRL_ENTROPY_CHUNK, dim=0):
        logp = F.log_softmax(chunk, dim=-1)
        entropy.append(-(torch.exp(logp) * logp).sum(-1))
    return logprob.float(), torch.cat(entropy).float()


def appo_stats(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    stats = token_stats(logits, target)
    return stats.logprob, stats.entropy


def _liger_cross_entropy():
    """Liger's functional cross-entropy; needs a version whose wrapper takes `reduction=`."""
    from liger_kernel.transformers.functional import liger_cross_entropy

    if "reduction" not in inspect.signature(liger_cross_entropy).parameters:
        raise ImportError("this liger_kernel's liger_cross_entropy takes no reduction= argument")
    return liger_cross_entropy


def _liger_loss(out) -> Tensor:
    # Liger returns the loss alone, a (loss, z_loss) tuple or an output object, by version.
    if isinstance(out, tuple):
        return out[0]
    return getattr(out, "loss", out)


# ------------------------------------------------------------------------------------------------
# Providers

class Impl(NamedTuple):
    # (logits, target) -> (logprob, entropy or None), float32 [T]
    stats: Callable[[Tensor, Tensor], tuple[Tensor, Optional[Tensor]]]
    # (logits, target) -> scalar whose gradient is timed; default logprob.sum() + entropy.sum()
    loss: Optional[Callable[[Tensor, Tensor], Tensor]] = None
    # d loss / d logits = grad_sign × d(logprob.sum())/d logits [+ d(entropy.sum())/d logits]
    grad_sign: float = 1.0


class Provider(NamedTuple):
    name: str
    make: Callable[[], Impl]  # called once per bench, after the skip checks
    unavailable: Callable[[torch.device], Optional[str]]  # why it cannot run here, or None
    # peak memory as a multiple of the logits' bytes, for (fwd, fwd_bwd); used to skip what won't fit
    memory: tuple[float, float]
    entropy: bool = True
    appo_backend: Optional[str] = None


def _needs_cuda(device: torch.device) -> Optional[str]:
    return None if device.type == "cuda" else "GPU only"


def _appo_backend_missing(backend: str) -> Callable[[torch.device], Optional[str]]:
    def unavailable(device: torch.device) -> Optional[str]:
        if backend == "torch":
            return None
        if device.type != "cuda":
            return "GPU only"
        if backend == "triton" and _backend.TRITON_VERSION is None:
            return "triton is not installed"
        if backend == "cuda" and not _backend.cuda_extension_available():
            return "the CUDA extension appo_kernels._C is not built"
        if importlib.util.find_spec(f"appo_kernels.token_stats.{backend}") is None:
            return f"appo_kernels.token_stats.{backend} does not exist yet"
        return None

    return unavailable


def _liger_missing(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "GPU only"
    try:
        _liger_cross_entropy()
    except ImportError as e:
        return f"liger_kernel not usable: {e}"
    return None


def _make_compiled_verl() -> Impl:
    torch._dynamo.reset()  # each shape compiles afresh instead of hitting the recompile limit
    return Impl(torch.compile(verl_stats, dynamic=False))


def _make_liger() -> Impl:
    ce = _liger_cross_entropy()

    def stats(logits, target):
        return -_liger_loss(ce(logits, target, reduction="none")).float(), None

    def loss(logits, target):  # how trainers call it: a scalar loss, upstream gradient 1
        return _liger_loss(ce(logits, target, reduction="sum"))

    return Impl(stats, loss, grad_sign=-1.0)


PROVIDERS = (
    Provider("appo-cuda", lambda: Impl(appo_stats), _appo_backend_missing("cuda"), (1.0, 2.0),
             appo_backend="cuda"),
    Provider("appo-triton", lambda: Impl(appo_stats), _appo_backend_missing("triton"), (1.0, 2.0),
             appo_backend="triton"),
    Provider("appo-torch", lambda: Impl(appo_stats), _appo_backend_missing("torch"), (1.0, 2.0),
             appo_backend="torch"),
    Provider("torch-verl", lambda: Impl(verl_stats), lambda device: None, (4.0, 7.0)),
    Provider("torch-trl", lambda: Impl(trl_stats), lambda device: None, (4.0, 7.0)),
    Provider("torch-compile-verl", _make_compiled_verl, _needs_cuda, (2.0, 4.0)),
    Provider("liger-ce", _make_liger, _liger_missing, (1.5, 1.5), entropy=False),
)


# ------------------------------------------------------------------------------------------------
# Check against float64 before timing: a peer computing something else would make the ratio a lie.

def _reference_rows(logits: Tensor, target: Tensor) -> dict[str, Tensor]:
    z = logits[:CHECK_ROWS].detach().to(torch.float64)
    t = target[:CHECK_ROWS].unsqueeze(-1)
    logp = torch.log_softmax(z, dim=-1)
    p = torch.exp(logp)
    entropy = -(p * logp).sum(-1)
    return {
        "logprob": logp.gather(-1, t).squeeze(-1),
        "entropy": entropy,
        "g_logprob": torch.zeros_like(z).scatter_(-1, t, 1.0) - p,  # onehot − p
        "g_entropy": -p * (logp + entropy.unsqueeze(-1)),  # −p (log p + H)
    }


class Tolerance(NamedTuple):
    rtol: float
    atol: float  # stats: absolute; gradients: in units of the mean |gradient| (they are O(1/V))


# (stats, gradient) tolerances. Peers that compute in bf16 round log p (≈ −12) to 2^-4 and their
# gradients lose most digits near cancellation; a formula error (a missing entropy term, a wrong
# sign) is off by thousands of mean |gradient| units, so it still fails all of these.
TOLERANCES = {
    "appo": (Tolerance(1e-3, 1e-3), Tolerance(1e-2, 1e-2)),
    "peer-fp32": (Tolerance(1e-3, 5e-3), Tolerance(2e-2, 0.2)),
    "peer-low-precision": (Tolerance(2e-2, 0.1), Tolerance(0.2, 20.0)),
}


def _tolerances(dtype: torch.dtype, provider: Provider) -> tuple[Tolerance, Tolerance]:
    if provider.appo_backend is not None:  # appo accumulates in fp32 whatever the input dtype
        return TOLERANCES["appo"]
    return TOLERANCES["peer-fp32" if dtype == torch.float32 else "peer-low-precision"]


def _check(name: str, actual: Tensor, expected: Tensor, rtol: float, atol: float) -> None:
    torch.testing.assert_close(actual[:CHECK_ROWS].detach().to(torch.float64), expected,
                               rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------

def _checked_step(provider: Provider, impl: Impl, device: torch.device, tokens: int, vocab: int,
                  dtype: torch.dtype, mode: str) -> Callable[[], object]:
    """Fresh inputs, and the call to time, checked once against float64 on the first rows."""
    logits = (torch.randn(tokens, vocab, device=device, dtype=dtype) * LOGIT_SCALE
              ).requires_grad_(mode == "fwd_bwd")
    target = torch.randint(0, vocab, (tokens,), device=device)
    expected = _reference_rows(logits, target)  # before the call: Liger overwrites its input
    tol_stats, tol_grad = _tolerances(dtype, provider)

    if mode == "fwd":
        def step():
            with torch.no_grad():
                return impl.stats(logits, target)

        logprob, entropy = step()
        _check("logprob", logprob, expected["logprob"], *tol_stats)
        if provider.entropy:
            _check("entropy", entropy, expected["entropy"], *tol_stats)
        return step

    def logprob_plus_entropy(logits, target):
        logprob, entropy = impl.stats(logits, target)
        return logprob.sum() + entropy.sum()

    loss_fn = impl.loss or logprob_plus_entropy

    def step():
        (grad,) = torch.autograd.grad(loss_fn(logits, target), logits)
        return grad

    want = impl.grad_sign * expected["g_logprob"]
    if provider.entropy:
        want = want + expected["g_entropy"]
    unit = want.abs().mean().item()
    _check("grad", step(), want, tol_grad.rtol, tol_grad.atol * unit)
    return step


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("workload", WORKLOADS,
                         ids=lambda w: f"T{w[0]}-V{w[1]}-{DTYPE_NAMES[w[2]]}")
@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.name)
def test_token_stats(benchmark, measure, require_memory, bench_device, monkeypatch,
                     provider, workload, mode):
    tokens, vocab, dtype = workload
    device, dtype_name = bench_device, DTYPE_NAMES[dtype]
    reason = provider.unavailable(device)
    if reason:
        pytest.skip(f"{provider.name}: {reason}")
    if provider.appo_backend is not None:
        monkeypatch.setenv("APPO_BACKEND", provider.appo_backend)  # read at call time
    logits_bytes = tokens * vocab * torch.finfo(dtype).bits // 8
    factor = provider.memory[MODES.index(mode)]
    require_memory(int(factor * logits_bytes) + SLACK_BYTES,
                   f"{provider.name} {mode} T={tokens} V={vocab} {dtype_name}")
    benchmark.group = f"token_stats {mode} T={tokens} V={vocab} {dtype_name}"

    out_of_memory = None
    try:
        step = _checked_step(provider, provider.make(), device, tokens, vocab, dtype, mode)
        measure(
            step,
            bytes_moved=bytes_moved(tokens, vocab, dtype, mode),
            op="token_stats",
            provider=provider.name,
            shape=[tokens, vocab],
            dtype=dtype_name,
            mode=mode,
            computes="logprob, entropy" if provider.entropy else "logprob",
            **({} if provider.entropy else {"note": "no entropy: computes the log-prob only"}),
            appo_backend=provider.appo_backend,
            torch_version=torch.__version__,
        )
    except torch.OutOfMemoryError as e:  # the memory estimate is rough: skip, never crash the run
        out_of_memory = str(e).splitlines()[0]
    if out_of_memory is not None:
        pytest.skip(f"{provider.name}: out of memory: {out_of_memory}")
