"""The training progress bar: tqdm when it is installed and wanted, else an object with the same
methods that draws nothing (its `write` still prints, so messages are never lost)."""

from __future__ import annotations

import math
from typing import Optional

# (metric key, short name in the bar): what a glance at the bar should tell
POSTFIX_KEYS = (
    ("reward_mean", "reward"),
    ("accuracy", "acc"),
    ("entropy_mean", "H"),
    ("branches", "br"),
    ("tokens_per_s", "tok/s"),
)


class _NoProgress:
    def __init__(self, total: int, initial: int = 0):
        self.total, self.n = total, initial

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def write(self, message: str, *args, **kwargs) -> None:
        print(message)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, *, initial: int = 0, desc: Optional[str] = None, enabled: bool = True):
    """A bar over `total` steps starting at `initial` (a resumed run starts part-way); use
    `bar.set_postfix(format_postfix(metrics))` and `bar.update()` once per step, and `bar.write`
    rather than print while it is open."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)
    return _NoProgress(total, initial)


def format_postfix(metrics: dict) -> dict:
    """The bar's postfix from a step's metrics: reward, accuracy, entropy, branch count and
    throughput (keys in POSTFIX_KEYS) in short form; missing, None or NaN values are left out."""
    postfix = {}
    for key, short in POSTFIX_KEYS:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            postfix[short] = _short(value)
    return postfix


def _short(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if abs(value) >= 1000:
        return f"{value / 1000:.1f}k"
    return f"{value:.3g}"
