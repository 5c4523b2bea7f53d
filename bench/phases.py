"""The phases of a lent GPU session (`bash bench/run_gpu.sh`; bench/README.md, "On a lent GPU").

A lent machine gives a session 15 minutes of device time in all and 10 minutes per command, the
machine's start (1-2 minutes) included in the 15. So the work is cut into phases, each under its
own time limit, each leaving its results under `$OUT` as it finishes: a phase that runs out of time
loses only the bench it was in (every finished bench is streamed to `bench.jsonl`), and the next
phase still runs.

    bash bench/run_gpu.sh --plan                       # what would run, limits, estimates; no GPU
    bash bench/run_gpu.sh                              # every phase
    PHASES=token_stats,tree bash bench/run_gpu.sh      # a rerun of some phases

What comes back from `$OUT` (the device tool returns at most 8 files): `phases.json` (device,
each phase's command, exit code, seconds, and whether it hit its limit), `build.log`, `tests.log`,
`bench.log`, `bench.jsonl` (one row per finished bench), `table.md`, and
`results-<device>.json` (bench/results/<device>.json after this run's rows are merged in).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
COMMAND_LIMIT_S = 600  # the device tool's limit on one command
SESSION_BUDGET_S = 900  # device time per session, the machine's start included
START_S = 120  # what a machine's start costs, at most, as seen so far
PY = sys.executable

# The op tests that mean something on a GPU (every backend: cuda, triton, torch); the trainer's
# tests run on the CPU in CI.
OP_TESTS = ("tests/test_token_stats.py", "tests/test_sequence_scans.py",
            "tests/test_tree_attention.py", "tests/test_tree_layout.py", "tests/test_losses.py",
            "tests/test_advantages.py", "tests/test_selection.py",
            "tests/test_linear_token_stats.py")
BENCH_FLAGS = ("-q", "-p", "no:cacheprovider", "--benchmark-max-time=0.5",
               "--benchmark-min-rounds=5")


@dataclass
class Phase:
    name: str
    what: str
    command: list[str]
    limit_s: int  # the phase is stopped here (SIGTERM, then SIGKILL 10 s later)
    estimate_s: int  # on paper; replaced by the measured time once a GPU run has one
    basis: str  # how the estimate was reached
    log: str
    needs: Optional[str] = None  # a file the phase needs; skipped (not failed) without it


PHASES = (
    Phase("build", "build appo_kernels._C (csrc/*.cu) for sm_90 in place",
          [PY, "setup.py", "build_ext", "--inplace"], 120, 90,
          "two translation units, nvcc -O3 for one architecture; ~60-90 s on 16 cores elsewhere",
          "build.log"),
    Phase("tests", "the op tests on the GPU, every backend (" + ", ".join(
        Path(t).stem for t in OP_TESTS) + ")",
          [PY, "-m", "pytest", *OP_TESTS, "-q", "-p", "no:cacheprovider", "-rfEs",
           "--durations=10"], 120, 100,
          "554 cases on the CPU, more with the cuda backend; each a few ms once its Triton "
          "variant is compiled (~40 variants at ~1-2 s of compile each)",
          "tests.log"),
    Phase("token_stats", "token_stats at T=8192, V=151936 bf16, fwd and fwd+bwd: appo (cuda, "
          "triton, torch) vs eager verl and TRL formulas, torch.compile, Liger",
          [PY, "-m", "pytest", "bench/bench_token_stats.py", "-k", "V151936 and bf16",
           *BENCH_FLAGS], 120, 70,
          "14 benches at ~2 s each (2.5 GB of logits, a float64 check of 64 rows, 3 warm-ups, "
          "0.5 s of rounds) plus two torch.compile builds at ~20 s",
          "bench.log"),
    Phase("tree", "tree attention on the rollout trees C1-C3, fwd, bwd and fwd+bwd, appo vs "
          "per-path SDPA and FlexAttention",
          [PY, "-m", "pytest", "bench/bench_tree_attention.py", "-k", "C1 or C2 or C3",
           *BENCH_FLAGS], 120, 80,
          "27 benches (appo-triton, flex, sdpa-unrolled × 3 trees × 3 modes) at ~1 s plus "
          "FlexAttention builds (one per tree and grad mode, ~5 s each)",
          "bench.log"),
    Phase("sequence", "future_value and future_kl_scale, 768 × 6144 tokens: appo (triton, "
          "torch) vs the batched decay-matrix matmul",
          [PY, "-m", "pytest", "bench/bench_sequence.py", *BENCH_FLAGS], 40, 15,
          "6 benches under 1 s each; the matrix peer builds one 6144² decay matrix", "bench.log"),
    Phase("linear", "linear_token_stats vs the logits route and the fused peers",
          [PY, "-m", "pytest", "bench/bench_linear_token_stats.py", *BENCH_FLAGS], 75, 60,
          "headline shape only, as token_stats", "bench.log",
          needs="bench/bench_linear_token_stats.py"),
)
NAMES = tuple(p.name for p in PHASES)


def select(names: Optional[str]) -> list[Phase]:
    if not names:
        return list(PHASES)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in NAMES]
    if unknown:
        raise SystemExit(f"PHASES: unknown phase(s) {unknown}; the phases are {list(NAMES)}")
    return [p for p in PHASES if p.name in wanted]


def plan(phases: list[Phase]) -> str:
    lines = ["| phase | limit s | estimate s | what | basis of the estimate |",
             "|---|---:|---:|---|---|"]
    for p in phases:
        skip = "" if p.needs is None or (ROOT / p.needs).exists() else f" (skipped: no {p.needs})"
        lines.append(f"| {p.name} | {p.limit_s} | {p.estimate_s} | {p.what}{skip} | {p.basis} |")
    active = [p for p in phases if p.needs is None or (ROOT / p.needs).exists()]
    limit = sum(p.limit_s for p in active)
    estimate = sum(p.estimate_s for p in active)
    lines += [
        "",
        f"Sum of the limits: {limit} s (one command may run {COMMAND_LIMIT_S} s: "
        f"{'fits' if limit <= COMMAND_LIMIT_S else 'DOES NOT FIT'}); sum of the estimates: "
        f"{estimate} s. With a start of up to {START_S} s, a session's {SESSION_BUDGET_S} s leave "
        f"{SESSION_BUDGET_S - START_S - estimate} s after an estimated run (a rerun of the "
        "phases that failed), "
        f"{SESSION_BUDGET_S - START_S - limit} s if every phase runs to its limit.",
        "Estimates are on paper until a GPU run replaces them with its measured seconds "
        "(phases.json).",
    ]
    return "\n".join(lines)


def run_phase(phase: Phase, out: Path, env: dict) -> dict:
    record = {"phase": phase.name, "command": " ".join(phase.command), "limit_s": phase.limit_s}
    if phase.needs is not None and not (ROOT / phase.needs).exists():
        return {**record, "skipped": f"{phase.needs} does not exist"}
    print(f"== {phase.name}: {phase.what} (limit {phase.limit_s} s)", flush=True)
    started = time.monotonic()
    with open(out / phase.log, "a") as log:
        log.write(f"\n== {phase.name}: {record['command']}\n")
        log.flush()
        process = subprocess.Popen(phase.command, cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=phase.limit_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(process.pid, 15)
            try:
                code = process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                code = process.wait()
    seconds = round(time.monotonic() - started, 1)
    status = "TIMED OUT" if timed_out else ("ok" if code == 0 else f"exit {code}")
    print(f"   {phase.name}: {status} after {seconds} s (log: {phase.log})", flush=True)
    return {**record, "returncode": code, "seconds": seconds, "timed_out": timed_out}


def device_info() -> dict:
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        return {"nvidia_smi": smi.stdout.strip() or smi.stderr.strip()}
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"nvidia_smi": f"unavailable: {e}"}


def report(out: Path) -> None:
    """Merge the streamed rows into bench/results/<device>.json, copy it to $OUT, write table.md."""
    stream = out / "bench.jsonl"
    if not stream.exists() or not stream.read_text().strip():
        return
    results_dir = os.environ.get("APPO_BENCH_RESULTS")  # default: bench/results
    extra = ["--out-dir", results_dir] if results_dir else []
    done = subprocess.run([PY, "bench/report.py", str(stream), *extra], cwd=ROOT,
                          capture_output=True, text=True)
    (out / "table.md").write_text(done.stdout + done.stderr)
    for line in done.stderr.splitlines():
        if line.startswith("wrote ") and " rows to " in line:
            results = Path(line.split(" rows to ", 1)[1].strip())
            shutil.copy(results, out / f"results-{results.name}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", action="store_true",
                        help="print the phases, their limits and estimates; run nothing")
    args = parser.parse_args(argv)
    phases = select(os.environ.get("PHASES"))
    if args.plan:
        print(plan(phases))
        return 0

    out = Path(os.environ.get("OUT") or ROOT / "gpu-out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or None
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "APPO_BENCH_STREAM": str(out / "bench.jsonl"),
           "APPO_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": os.environ.get(
               "TORCH_CUDA_ARCH_LIST", "9.0"), "MAX_JOBS": os.environ.get("MAX_JOBS", "16")}
    if commit:
        env["APPO_BENCH_COMMIT"] = commit
    summary = {"commit": commit, **device_info(), "phases": []}
    print(summary["nvidia_smi"], flush=True)
    for phase in phases:
        summary["phases"].append(run_phase(phase, out, env))
        (out / "phases.json").write_text(json.dumps(summary, indent=1) + "\n")
        report(out)  # after every phase, so a later failure keeps what is done
    print()
    for r in summary["phases"]:
        state = r.get("skipped") or ("TIMED OUT" if r["timed_out"] else
                                      "ok" if r["returncode"] == 0 else f"exit {r['returncode']}")
        print(f"{r['phase']:12} {state:10} {r.get('seconds', 0):7.1f} s / {r['limit_s']} s")
    if (out / "table.md").exists():
        print((out / "table.md").read_text()[-6000:])
    failed = [r for r in summary["phases"] if not r.get("skipped") and (
        r["timed_out"] or r["returncode"] != 0)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
