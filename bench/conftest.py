"""Shared fixtures for every `bench_*.py` file (bench/README.md).

A bench file asks for `measure` and calls `measure(step, bytes_moved=..., **info)`: it warms `step`
up, times it with `benchmark.pedantic` around a function that synchronises the device, and records
in `benchmark.extra_info` the device-side median (CUDA events on a GPU, `perf_counter` on the CPU),
the GB/s under the bench's own byte count and the fraction of this session's copy bandwidth.
Helpers for bench files live here as fixtures (`bench_device`, `require_memory`, `measure`), so
no bench file imports this module.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import time
from typing import Callable

import pytest
import torch

import appo_kernels

# Copy-bandwidth probe: buffer size (capped by free memory on a GPU) and timed repetitions.
COPY_BYTES_CUDA = 2 << 30
COPY_BYTES_CPU = 128 << 20
COPY_REPS_CUDA = 30
COPY_REPS_CPU = 8
# Calls before the timed rounds: the first compiles (Triton, torch.compile), the others size the run.
WARMUP_CALLS = 3
MAX_ROUNDS = 1000  # microsecond-scale benches would otherwise run thousands of rounds
# Fraction of the free device memory a bench may plan to use; the rest absorbs fragmentation.
MEMORY_HEADROOM = 0.9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _DeviceTimer:
    """Times one call on the device: CUDA events around the launch, or perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda-events" if device.type == "cuda" else "perf_counter"
        if device.type == "cuda":
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable[[], object]) -> float:
        """Runs fn once and returns its duration in ms, with the device idle afterwards."""
        if self.device.type == "cuda":
            self.start.record()
            fn()
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def available_memory(device: torch.device) -> int:
    """Bytes a bench can still allocate: free device memory plus what torch's allocator caches."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture(scope="session")
def copy_bandwidth(bench_device) -> dict:
    """The device copy bandwidth measured once per session: a large `dst.copy_(src)`.

    GB/s counts the bytes read plus the bytes written (2 × buffer size), the same convention the
    benches use, so "% of copy bandwidth" compares like with like.
    """
    device = bench_device
    if device.type == "cuda":
        nbytes = min(COPY_BYTES_CUDA, available_memory(device) // 8)
        reps = COPY_REPS_CUDA
    else:
        nbytes, reps = COPY_BYTES_CPU, COPY_REPS_CPU
    numel = nbytes // 4
    src = torch.rand(numel, device=device) + 1.0  # never zero: no zero-page or compression shortcuts
    dst = torch.empty_like(src)
    timer = _DeviceTimer(device)
    for _ in range(WARMUP_CALLS):
        dst.copy_(src)
    _synchronize(device)
    times = [timer(lambda: dst.copy_(src)) for _ in range(reps)]
    median_ms = statistics.median(times)
    moved = 2 * numel * 4
    result = {
        "device": device_name(device),
        "bytes": moved,
        "median_ms": median_ms,
        "gbps": moved / (median_ms * 1e-3) / 1e9,
        "timer": timer.kind,
    }
    del src, dst
    _release_memory(device)
    return result


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@pytest.fixture(autouse=True)
def _free_device_memory(bench_device):
    """Each bench starts from an empty allocator, so one bench's tensors never squeeze the next."""
    yield
    _release_memory(bench_device)


@pytest.fixture
def require_memory(bench_device) -> Callable[[int, str], None]:
    """`require_memory(nbytes, what)` skips the bench when `nbytes` cannot fit on the device."""

    def _require(nbytes: int, what: str) -> None:
        _release_memory(bench_device)
        have = available_memory(bench_device)
        if nbytes > MEMORY_HEADROOM * have:
            pytest.skip(f"{what} needs ~{nbytes / 2**30:.1f} GiB, "
                        f"{have / 2**30:.1f} GiB available on {bench_device}")

    return _require


@pytest.fixture
def measure(benchmark, bench_device, copy_bandwidth, request):
    """`measure(step, *, bytes_moved, **info)` times `step()` and fills `benchmark.extra_info`.

    Rounds: enough to fill `--benchmark-max-time` seconds, at least `--benchmark-min-rounds`.
    pytest-benchmark's own statistics are host wall times of a synchronised call (launch overhead
    included); `extra_info["median_ms"]`, which GB/s is computed from, is the device-side median.
    Returns that median in ms.
    """

    def _measure(step: Callable[[], object], *, bytes_moved: int, **info) -> float:
        device = bench_device
        timer = _DeviceTimer(device)
        device_ms: list[float] = []

        def timed():
            device_ms.append(timer(step))

        if benchmark.disabled:  # smoke run: one call, no warm-up
            benchmark.pedantic(timed, rounds=1)
        else:
            _synchronize(device)
            warmup_ms = [timer(step) for _ in range(WARMUP_CALLS)]
            estimate_s = min(warmup_ms[1:]) * 1e-3  # the first call may compile
            # pytest-benchmark keeps these options as strings ("1.0"), parsed where used
            max_time = float(request.config.getoption("benchmark_max_time", 1.0))
            min_rounds = int(request.config.getoption("benchmark_min_rounds", 5))
            rounds = max(min_rounds, math.ceil(max_time / max(estimate_s, 1e-6)))
            rounds = min(rounds, MAX_ROUNDS)
            benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)

        median_ms = statistics.median(device_ms)
        gbps = bytes_moved / (median_ms * 1e-3) / 1e9
        benchmark.extra_info.update(info)
        benchmark.extra_info.update({
            "device": device_name(device),
            "bytes": bytes_moved,
            "median_ms": median_ms,
            "gbps": gbps,
            "copy_gbps": copy_bandwidth["gbps"],
            "pct_copy_bw": 100.0 * gbps / copy_bandwidth["gbps"],
            "timer": timer.kind,
            "rounds": len(device_ms),
        })
        measured.append(median_ms)
        return median_ms

    measured: list[float] = []
    yield _measure
    if measured:  # after the test body, so what it adds to extra_info is streamed too
        _stream(request.node.nodeid, benchmark)


def _stream(name: str, benchmark) -> None:
    """Append the bench's row to `$APPO_BENCH_STREAM` (one JSON line) as soon as it is measured, so a
    run cut short by a timeout keeps every finished bench (bench/run_gpu.sh; `report.py` reads it)."""
    path = os.environ.get("APPO_BENCH_STREAM")
    if not path or benchmark.disabled:
        return
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    row = {"name": name, "extra_info": dict(benchmark.extra_info),
           "stats": {"median": getattr(stats, "median", None)},
           "datetime": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "commit": os.environ.get("APPO_BENCH_COMMIT")}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def pytest_report_header(config):
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return [f"appo bench device: {device_name(device)}",
            f"appo backend_info: {appo_kernels.backend_info()}"]


@pytest.hookimpl(optionalhook=True)  # a pytest-benchmark hook: no error where it is not installed
def pytest_benchmark_update_machine_info(config, machine_info):
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    machine_info["appo"] = {"device": device_name(device), **appo_kernels.backend_info()}
