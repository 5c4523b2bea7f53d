"""Argument checks at the public boundary: one place, messages that name the argument.

Checks of shape, dtype and device cost nothing and always run. Checks of values need the data on
the host: they run for CPU tensors, and for GPU tensors only with `validate=True` or
`APPO_VALIDATE=1` (a device sync); never while torch.compile traces.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from appo_kernels import _backend

INDEX_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor_arg(
    name: str,
    value,
    *,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    ndim: Optional[int] = None,
    shape: Optional[Sequence[int]] = None,
    like: Optional[Tensor] = None,
    optional: bool = False,
) -> None:
    """Raise TypeError/ValueError unless `value` is a tensor of the given dtype, rank, shape and
    (with `like`) on the same device as `like`."""
    if value is None:
        if optional:
            return
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_dtype_names(dtypes)}, got "
                        f"{str(value.dtype).replace('torch.', '')}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    if like is not None and value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but the other inputs are on {like.device}")


def check_values(t: Tensor, validate: bool = False) -> bool:
    """Whether value checks (which read the data on the host) should run for `t`."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or validate or _backend.validate_default()


def cu_seqlens_arg(cu_seqlens, n_tokens: int, *, like: Optional[Tensor] = None,
                   validate: bool = False, name: str = "cu_seqlens") -> int:
    """Check a FlashAttention-style offsets vector `[S+1]` over `n_tokens` packed tokens;
    returns S, the number of sequences."""
    tensor_arg(name, cu_seqlens, dtypes=INDEX_DTYPES, ndim=1, like=like)
    if cu_seqlens.numel() == 0:
        raise ValueError(f"{name} must have S+1 >= 1 entries (cu_seqlens[0] = 0), got none")
    if check_values(cu_seqlens, validate):
        cu = cu_seqlens.detach().cpu()
        if cu[0].item() != 0:
            raise ValueError(f"{name}[0] must be 0, got {cu[0].item()}")
        steps = cu[1:] - cu[:-1]
        if (steps < 0).any():
            i = int((steps < 0).nonzero()[0])
            raise ValueError(f"{name} must be non-decreasing, but {name}[{i + 1}] = "
                             f"{cu[i + 1].item()} < {name}[{i}] = {cu[i].item()}")
        if cu[-1].item() != n_tokens:
            raise ValueError(f"{name}[-1] must equal the number of packed tokens {n_tokens}, "
                             f"got {cu[-1].item()}")
    return cu_seqlens.numel() - 1


FLOAT32_MAX = float(torch.finfo(torch.float32).max)
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)  # the smallest normal float32


def float_arg(name: str, value, *, low: Optional[float] = None, high: Optional[float] = None,
              low_open: bool = False, finite: bool = True) -> float:
    """`value` as a float: TypeError unless a real number (not a bool), ValueError when NaN,
    infinite (unless `finite=False`) or outside [low, high] ((low, high] with `low_open`). A
    value being traced by torch.compile passes unchecked (it may be symbolic: no value yet)."""
    if isinstance(value, (torch.SymFloat, torch.SymInt)) or torch.compiler.is_compiling():
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"{name} must be a {'finite ' if finite else ''}number, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def int_arg(name: str, value, *, low: Optional[int] = None) -> int:
    """`value` as an int: TypeError unless a Python int (not a bool), ValueError below `low`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__} {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def bool_arg(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value
