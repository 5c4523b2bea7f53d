"""Backend choice for every op: CUDA extension, then Triton, then torch.

`APPO_BACKEND=torch|triton|cuda` forces one backend for all ops; a forced backend that cannot run
on the tensor's device raises instead of silently falling back. CPU tensors run the torch reference,
except that `APPO_BACKEND=triton` together with `TRITON_INTERPRET=1` runs the Triton kernels through
Triton's interpreter (that is how CI tests them on machines without a GPU).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

from typing import Optional

import torch

BACKENDS = ("torch", "triton", "cuda")

try:  # the CUDA extension is optional: the package works without it
    from appo_kernels import _C  # type: ignore[attr-defined]
except ImportError:
    _C = None


def _triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    return triton.__version__


TRITON_VERSION = _triton_version()


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def forced_backend() -> str | None:
    name = os.environ.get("APPO_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"APPO_BACKEND={name!r} is not one of {BACKENDS}")
    return name


def validate_default() -> bool:
    return os.environ.get("APPO_VALIDATE", "0") not in ("", "0")


def cuda_extension_available() -> bool:
    return _C is not None


def select(device: torch.device, *, has_cuda_kernel: bool = True) -> str:
    """The backend an op runs with for tensors on `device`."""
    forced = forced_backend()
    if device.type == "cuda":
        if forced == "torch":
            return "torch"
        if forced == "triton":
            if TRITON_VERSION is None:
                raise RuntimeError("APPO_BACKEND=triton but triton is not installed")
            return "triton"
        if forced == "cuda":
            if not (has_cuda_kernel and _C is not None):
                raise RuntimeError(
                    "APPO_BACKEND=cuda but the CUDA extension appo_kernels._C is not built "
                    "(reinstall with APPO_BUILD_CUDA=1 on a machine with nvcc and a CUDA torch)"
                )
            return "cuda"
        if has_cuda_kernel and _C is not None:
            return "cuda"
        return "triton" if TRITON_VERSION is not None else "torch"
    if forced == "triton":
        if TRITON_VERSION is None or not triton_interpret():
            raise RuntimeError(
                f"APPO_BACKEND=triton on a {device.type} tensor needs triton installed and "
                "TRITON_INTERPRET=1 set before triton is imported"
            )
        return "triton"
    if forced == "cuda":
        raise RuntimeError(f"APPO_BACKEND=cuda cannot run on a {device.type} tensor")
    return "torch"


def family_backend(device: torch.device, dtype: Optional[torch.dtype] = None, *,
                   has_cuda_kernel: bool = False) -> str:
    """The backend an op family runs with (the one place this is decided): `select`, except that
    float64 (gradcheck) always runs the reference, since the kernels accumulate in float32. Each
    family maps the name to its module: `reference.py` (torch), `triton.py`, `cuda.py`."""
    return "torch" if dtype == torch.float64 else select(device, has_cuda_kernel=has_cuda_kernel)


def backend_info() -> dict:
    """What appo_kernels runs with on this machine, and why."""
    cuda_ok = torch.cuda.is_available()
    return {
        "forced": os.environ.get("APPO_BACKEND") or None,
        "torch": torch.__version__,
        "triton": TRITON_VERSION,
        "triton_interpret": triton_interpret(),
        "cuda_extension": _C is not None,
        "cuda_device": torch.cuda.get_device_name() if cuda_ok else None,
        "cpu": select(torch.device("cpu")) if forced_backend() != "cuda" else "unavailable",
        "cuda": select(torch.device("cuda")) if cuda_ok else None,
    }


_poison_outputs = False


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Uninitialised output buffer; NaN-filled under `poisoned_outputs()` so tests see unwritten
    elements."""
    if isinstance(shape, int):
        shape = (shape,)
    if _poison_outputs:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@contextlib.contextmanager
def poisoned_outputs():
    global _poison_outputs
    saved, _poison_outputs = _poison_outputs, True
    try:
        yield
    finally:
        _poison_outputs = saved
