"""Plots of the metrics log against the step: one PNG per quantity (reward, accuracy, entropy, KL).

Drawn with matplotlib's Agg canvas directly (no pyplot), so it needs no display and leaves the
user's pyplot backend alone. A key that no record holds is left out of its plot; a plot none of
whose keys has a value is not written (so a run without a reference model has no KL-to-reference
line, and a run that logs no KL at all has no kl.png).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ._atomic import atomic_open

FIGSIZE = (6.4, 4.0)
DPI = 110
# a line series of at least this many points is drawn faint, under its trailing mean
SMOOTH_MIN_POINTS = 20
SMOOTH_FRACTION = 0.05  # the trailing window, as a share of the points


@dataclass(frozen=True)
class Series:
    key: str
    label: str
    sparse: bool = False  # logged at a few steps only (evals): markers, no smoothing


@dataclass(frozen=True)
class Plot:
    title: str
    ylabel: str
    series: tuple[Series, ...]


PLOTS = {
    "reward.png": Plot("reward", "mean reward", (
        Series("reward_mean", "initial rollouts"),
        Series("reward_branch_mean", "branches"))),
    "accuracy.png": Plot("accuracy", "accuracy", (
        Series("accuracy", "train"),
        Series("eval_accuracy", "eval", sparse=True),
        Series("eval_accuracy_greedy", "eval (greedy)", sparse=True))),
    "entropy.png": Plot("policy entropy", "mean token entropy (nats)", (
        Series("entropy_mean", "model tokens"),)),
    "kl.png": Plot("KL", "KL", (
        Series("kl_ref_mean", "to the reference policy"),
        Series("approx_kl", "approx. KL, old → new policy"))),
}


def plot_metrics(records: Iterable[dict], out_dir: Union[str, Path]) -> list[Path]:
    """Writes the plots of `PLOTS` that have data into `out_dir` (each replaced atomically) and
    returns their paths. Records need an int "step"; values that are None, NaN, ±inf or not
    numbers are skipped; a step logged twice keeps its last value."""
    out_dir = Path(out_dir)
    records = list(records)
    written = []
    for name, plot in PLOTS.items():
        data = [(s, _points(records, s.key)) for s in plot.series]
        data = [(s, xy) for s, xy in data if len(xy[0])]
        if data:
            written.append(_write_plot(out_dir / name, plot, data))
    return written


def _points(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    by_step = {}
    for record in records:
        step, value = record.get("step"), record.get(key)
        if (isinstance(step, int) and isinstance(value, (int, float))
                and not isinstance(value, bool) and math.isfinite(value)):
            by_step[step] = float(value)
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps.tolist()], dtype=np.float64)


def _trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    sums = np.concatenate([[0.0], np.cumsum(values)])
    end = np.arange(1, len(values) + 1)
    start = np.maximum(end - window, 0)
    return (sums[end] - sums[start]) / (end - start)


def _write_plot(path: Path, plot: Plot, data) -> Path:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (series, (steps, values)) in enumerate(data):
        color = f"C{i}"
        if series.sparse:
            ax.plot(steps, values, "o--", color=color, label=series.label, markersize=5,
                    linewidth=1)
        elif len(values) >= SMOOTH_MIN_POINTS:
            window = max(2, round(SMOOTH_FRACTION * len(values)))
            ax.plot(steps, values, color=color, alpha=0.3, linewidth=1)
            ax.plot(steps, _trailing_mean(values, window), color=color, linewidth=2,
                    label=f"{series.label} (mean of {window})")
        else:
            ax.plot(steps, values, ".-", color=color, label=series.label)
    ax.set_title(plot.title)
    ax.set_xlabel("step")
    ax.set_ylabel(plot.ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    return path
