"""`appo compare`: algorithms side by side, paired by seed, with confidence intervals.

    appo compare --config examples/calc_branching.yaml --seeds 0,1,2 --jobs 2 --out runs/cmp

For every seed one warm start is trained and shared by all arms (or one for all seeds, when the
config sets `actor_rollout_ref.model.warm_start_seed`: then only the RL seeds vary); every arm
then trains from it with that seed, so the arms of a seed see the same prompts and sampler seeds
at every step (the pairing). Evaluations are the config's (`data.val_size` held-out problems every
`trainer.test_freq` steps; the warm start's evaluation is every arm's step 0). Runs go to
`OUT/runs/<arm>-s<seed>` (each a normal `appo train` run directory), `jobs` at a time, each on one
torch thread; a run that already finished is skipped and one that stopped part-way resumes, so
an interrupted comparison continues where it stopped.

Results (`OUT/compare.md`, `compare.json`, `curves.png`): per arm the final accuracy, its gain
over the warm start (final − step 0) and the area under the accuracy curve (its mean over the
steps, trapezoidal), mean over seeds with a 95% t-interval; and per arm the paired difference
from the baseline arm (GRPO), seed by seed, with its 95% t-interval. With few seeds the intervals are wide; the table says which exclude 0.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from appo.config import Config, dump_yaml

# arm -> the config it changes (every arm otherwise runs the same config)
ARMS = {
    "grpo": {"algorithm.adv_estimator": "grpo"},
    "arpo": {"algorithm.adv_estimator": "arpo"},
    "appo": {"algorithm.adv_estimator": "appo"},
    "appo-no-fkl": {"algorithm.adv_estimator": "appo", "algorithm.use_future_kl": False},
    "appo-random": {"algorithm.adv_estimator": "appo",
                    "algorithm.appo_random_branch_points": True},
    "appo-before": {"algorithm.adv_estimator": "appo", "algorithm.branch_after_update": False},
}
BASELINE = "grpo"
# two-sided 95% quantiles of Student's t by degrees of freedom (1.96 beyond the table)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
         17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}
DONE = "done"


@dataclass
class Job:
    name: str
    out: Path
    args: list[str]
    needs: Optional[str] = None  # the job that must finish first
    state: str = "waiting"  # waiting, running, done, failed
    process: Optional[subprocess.Popen] = None
    started: float = 0.0
    seconds: float = 0.0
    log: Optional[object] = field(default=None, repr=False)


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (inf with one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.inf
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    df = n - 1
    t = T_975.get(df) or (T_975[max(k for k in T_975 if k <= df)] if df <= 30 else 1.96)
    return mean, t * sd / math.sqrt(n)


def area_under_curve(steps: Sequence[int], values: Sequence[float]) -> float:
    """The trapezoidal mean of a curve over [first step, last step]."""
    if len(steps) < 2:
        return values[0]
    area = sum((steps[i + 1] - steps[i]) * (values[i] + values[i + 1]) / 2
               for i in range(len(steps) - 1))
    return area / (steps[-1] - steps[0])


def run_finished(out: Path, total: int) -> bool:
    from appo.report import METRICS_FILE, read_metrics

    path = out / METRICS_FILE
    return path.exists() and any(r["step"] == total and "eval_accuracy" in r
                                 for r in read_metrics(path))


def warm_start_name(config: Config, seed: int) -> str:
    """The warm start a seed's arms train from: its own (`s<seed>`), or the one every seed
    shares when the config fixes `actor_rollout_ref.model.warm_start_seed` (`w<that seed>`)."""
    shared = config.model.warm_start_seed
    return f"s{seed}" if shared is None else f"w{shared}"


def plan(config: Config, config_file: Path, arms: Sequence[str], seeds: Sequence[int],
         out: Path) -> list[Job]:
    """The warm start of each seed (or the one they share), then every arm × seed run from it."""
    base = [sys.executable, "-m", "appo", "train", "--config", str(config_file), "--no-progress"]
    jobs = []
    for seed in seeds:
        name = warm_start_name(config, seed)
        warm = out / "warm_start" / name
        if not any(job.name == f"warm-start-{name}" for job in jobs):
            jobs.append(Job(f"warm-start-{name}", warm, base + [
                "--seed", str(seed), "--out", str(warm), "trainer.cpu_threads=1",
                "trainer.total_training_steps=0"]))
        for arm in arms:
            run = out / "runs" / f"{arm}-s{seed}"
            overrides = [f"{key}={json.dumps(value)}" for key, value in ARMS[arm].items()]
            jobs.append(Job(f"{arm}-s{seed}", run, base + [
                "--seed", str(seed), "--out", str(run), "trainer.cpu_threads=1",
                f"actor_rollout_ref.model.path={warm / 'warm_start'}",
                "actor_rollout_ref.model.warm_start_steps=0", "trainer.val_before_train=false",
                *overrides], needs=f"warm-start-{name}"))
    for job in jobs:
        total = 0 if job.name.startswith("warm-start") else config.trainer.total_training_steps
        if job.name.startswith("warm-start"):
            if (job.out / "warm_start" / "config.json").exists() and run_finished(job.out, 0):
                job.state = DONE
        elif run_finished(job.out, total):
            job.state = DONE
        elif (job.out / "checkpoints" / "latest").exists():  # with the run's own config
            job.args = [sys.executable, "-m", "appo", "train", "--no-progress", "--resume",
                        str(job.out)]
    return jobs


def execute(jobs: list[Job], n_jobs: int, out: Path, write=print, progress: bool = True) -> None:
    """Run the jobs, `n_jobs` at a time, each after the one it needs; logs in OUT/logs."""
    from appo.report import progress as progress_bar

    (out / "logs").mkdir(parents=True, exist_ok=True)
    by_name = {job.name: job for job in jobs}
    done_before = sum(job.state == DONE for job in jobs)
    bar = progress_bar(len(jobs), initial=done_before, desc="compare", enabled=progress)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        while any(job.state in ("waiting", "running") for job in jobs):
            for job in jobs:
                if job.state == "running" and job.process.poll() is not None:
                    job.seconds = time.monotonic() - job.started
                    job.log.close()
                    job.state = DONE if job.process.returncode == 0 else "failed"
                    bar.update()
                    status = "done" if job.state == DONE else \
                        f"FAILED (exit {job.process.returncode}, log {out / 'logs' / job.name}.log)"
                    bar.write(f"{job.name}: {status} in {job.seconds / 60:.1f} min")
            running = sum(job.state == "running" for job in jobs)
            for job in jobs:
                if running >= n_jobs:
                    break
                need = by_name.get(job.needs) if job.needs else None
                if job.state != "waiting" or (need is not None and need.state != DONE):
                    if job.state == "waiting" and need is not None and need.state == "failed":
                        job.state = "failed"
                        bar.update()
                        bar.write(f"{job.name}: skipped ({need.name} failed)")
                    continue
                job.log = open(out / "logs" / f"{job.name}.log", "a")
                job.process = subprocess.Popen(job.args, stdout=job.log, stderr=subprocess.STDOUT,
                                               env=env)
                job.state, job.started = "running", time.monotonic()
                running += 1
            time.sleep(1.0)
    finally:
        for job in jobs:
            if job.state == "running":
                job.process.terminate()  # each run saves its last complete step (SIGTERM)
                job.process.wait()
        bar.close()


def curves(out: Path, arms: Sequence[str], seeds: Sequence[int], config: Config) -> dict:
    """{arm: {seed: (steps, accuracies)}}, step 0 from the seed's warm start."""
    from appo.report import METRICS_FILE, read_metrics

    result: dict = {}
    for seed in seeds:
        path = out / "warm_start" / warm_start_name(config, seed) / METRICS_FILE
        start = next((r["eval_accuracy"] for r in (read_metrics(path) if path.exists() else [])
                      if r["step"] == 0 and "eval_accuracy" in r), None)
        if start is None:  # the warm start did not finish: no run of this seed either
            continue
        for arm in arms:
            path = out / "runs" / f"{arm}-s{seed}" / METRICS_FILE
            if not path.exists():
                continue
            evals = {r["step"]: r["eval_accuracy"] for r in read_metrics(path)
                     if "eval_accuracy" in r}
            steps = [0] + sorted(s for s in evals if s > 0)
            result.setdefault(arm, {})[seed] = (steps, [start] + [evals[s] for s in steps[1:]])
    return result


def summarise(data: dict, arms: Sequence[str], seeds: Sequence[int], total: int) -> dict:
    """Final accuracy and AUC per arm (mean, 95% CI), and paired differences from GRPO."""
    finished = {arm: {s: c for s, c in data.get(arm, {}).items() if c[0][-1] == total}
                for arm in arms}
    summary = {"arms": {}, "paired": {}, "seeds": list(seeds), "steps": total}
    for arm in arms:
        runs = finished[arm]
        if not runs:
            continue
        final = [c[1][-1] for c in runs.values()]
        auc = [area_under_curve(*c) for c in runs.values()]
        gain = [c[1][-1] - c[1][0] for c in runs.values()]
        summary["arms"][arm] = {"n": len(runs), "final": mean_ci(final), "auc": mean_ci(auc),
                                "gain": mean_ci(gain),
                                "final_by_seed": {s: c[1][-1] for s, c in runs.items()}}
    if BASELINE in finished:
        for arm in arms:
            common = sorted(set(finished[arm]) & set(finished[BASELINE]))
            if arm == BASELINE or not common:
                continue
            diff_final = [finished[arm][s][1][-1] - finished[BASELINE][s][1][-1] for s in common]
            diff_auc = [area_under_curve(*finished[arm][s]) -
                        area_under_curve(*finished[BASELINE][s]) for s in common]
            summary["paired"][arm] = {"n": len(common), "final": mean_ci(diff_final),
                                      "auc": mean_ci(diff_auc)}
    return summary


def table(summary: dict) -> str:
    def pct(mean_half, signed=False):
        mean, half = mean_half
        sign = "+" if signed and mean >= 0 else ""
        half_text = "∞" if math.isinf(half) else f"{100 * half:.1f}"
        return f"{sign}{100 * mean:.1f} ± {half_text}"

    lines = [f"{len(summary['seeds'])} seeds, {summary['steps']} steps; accuracy in points, "
             f"mean ± 95% t-interval half-width over seeds", "",
             "| arm | runs | final accuracy | final − start | area under the curve | "
             "final − GRPO (paired) | AUC − GRPO (paired) |", "|---|---|---|---|---|---|---|"]
    for arm, row in summary["arms"].items():
        paired = summary["paired"].get(arm)
        diffs = ["-", "-"] if paired is None else [
            pct(paired["final"], True) + _resolved(paired["final"]),
            pct(paired["auc"], True) + _resolved(paired["auc"])]
        lines.append(f"| {arm} | {row['n']} | {pct(row['final'])} | "
                     f"{pct(row['gain'], True)}{_resolved(row['gain'])} | {pct(row['auc'])} | "
                     f"{diffs[0]} | {diffs[1]} |")
    lines += ["", "(*: the interval excludes 0)"]
    return "\n".join(lines) + "\n"


def _resolved(mean_half) -> str:
    mean, half = mean_half
    return " *" if not math.isinf(half) and abs(mean) > half else ""


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, runs in data.items():
        steps = sorted({s for c in runs.values() for s in c[0]})
        means = [sum(c[1][c[0].index(s)] for c in runs.values() if s in c[0]) /
                 sum(s in c[0] for c in runs.values()) for s in steps]
        ax.plot(steps, [100 * m for m in means], marker="o", label=f"{arm} ({len(runs)} seeds)")
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out accuracy (%), mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(config: Config, arms: Sequence[str], seeds: Sequence[int], out: Path, *,
            n_jobs: int = 2, progress: bool = True, write=print) -> dict:
    """Run (or continue) the comparison and write its results; returns the summary."""
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        raise ValueError(f"--arms: unknown arm(s) {unknown}; arms: {', '.join(ARMS)}")
    if not seeds:
        raise ValueError("--seeds: give at least one seed")
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "compare_config.yaml"
    if config_file.exists():  # a continued comparison keeps its first config
        from appo.config import load_yaml

        config = load_yaml(config_file)
    else:
        dump_yaml(config, config_file)
    jobs = plan(config, config_file, arms, seeds, out)
    write(f"appo compare: {len(arms)} arms × {len(seeds)} seeds ({len(jobs)} jobs, "
          f"{sum(j.state == DONE for j in jobs)} done already), {n_jobs} at a time, in {out}")
    started = time.monotonic()
    execute(jobs, n_jobs, out, write, progress)
    data = curves(out, arms, seeds, config)
    summary = summarise(data, arms, seeds, config.trainer.total_training_steps)
    summary["minutes"] = (time.monotonic() - started) / 60
    summary["failed"] = [job.name for job in jobs if job.state == "failed"]
    (out / "compare.json").write_text(json.dumps({**summary, "curves": {
        arm: {str(s): c for s, c in runs.items()} for arm, runs in data.items()}}, indent=1))
    (out / "compare.md").write_text(table(summary))
    if data:
        plot(data, out / "curves.png")
    write(table(summary))
    return summary
