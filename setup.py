"""Builds the optional CUDA extension `appo_kernels._C`; package metadata lives in pyproject.toml.

APPO_BUILD_CUDA=auto (default) builds it when torch is a CUDA build and nvcc is found, 1 always
builds it (and fails loudly when it cannot), 0 never does. TORCH_CUDA_ARCH_LIST (default "8.0;9.0")
picks the GPU architectures and MAX_JOBS the parallel compile jobs, as for any torch extension.
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import setup

DEFAULT_ARCH_LIST = "8.0;9.0"  # A100 and H100/H200
CSRC = "csrc"
# No --use_fast_math: the kernels rely on accurate expf/logf for the docs/ops.md error bounds.
NVCC_FLAGS = ["-O3", "-lineinfo"]
CXX_FLAGS = ["-O3"]


def _build_mode() -> str:
    mode = os.environ.get("APPO_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"APPO_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def _cuda_toolchain_problem() -> str | None:
    """Why the CUDA extension cannot be built here, or None when it can."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return "torch is not importable here (build with pip install --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    cuda_home = cpp_extension.CUDA_HOME
    nvcc_found = (cuda_home is not None and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
                  ) or shutil.which("nvcc") is not None
    if not nvcc_found:
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    return None


def _extension_args() -> dict:
    mode = _build_mode()
    if mode == "0":
        return {}
    problem = _cuda_toolchain_problem()
    if problem is not None:
        if mode == "1":
            raise SystemExit(f"APPO_BUILD_CUDA=1 but the CUDA extension cannot be built: {problem}")
        print(f"appo: not building the CUDA extension ({problem}); Triton/torch backends only")
        return {}

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    sources = [os.path.join(CSRC, "bindings.cpp")] + sorted(glob.glob(os.path.join(CSRC, "*.cu")))
    ext = CUDAExtension(
        name="appo_kernels._C",
        sources=sources,
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**_extension_args())
