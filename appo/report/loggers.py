"""Where a run's metrics go (`trainer.logger`, verl's key): `console`, `jsonl`, `tensorboard`,
`wandb`.

- `jsonl`: `metrics.jsonl` (`MetricsLog`), always written: the plots and `--resume` read it.
- `console`: a line per step on stdout when there is no progress bar (with one, the bar's postfix
  shows the step and its `write` the evaluations and warnings).
- `tensorboard`: event files in `<run>/tensorboard` (`torch.utils.tensorboard`; needs the
  tensorboard package).
- `wandb`: a wandb run in `<run>/wandb`, offline unless `WANDB_MODE` says otherwise (`wandb sync`
  uploads it later), resumed with the run.

A logger whose package is missing fails when the run starts, naming the key.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

from .metrics import METRICS_FILE, MetricsLog

CONSOLE_KEYS = (("reward_mean", "reward"), ("accuracy", "acc"), ("loss", "loss"),
                ("entropy_mean", "H"), ("zero_variance_groups", "flat groups"),
                ("time_step", "s"))


class RunLoggers:
    """The loggers named in `names` for the run in `out`; `log(record)` sends a step's record to
    each, `close()` flushes them. `write` prints a line (the progress bar's, when there is one)."""

    def __init__(self, names: Sequence[str], out: Path, *, config: Optional[dict] = None,
                 project: str = "appo", experiment: Optional[str] = None,
                 write: Callable[[str], None] = print, console_lines: bool = True):
        self.metrics = MetricsLog(Path(out) / METRICS_FILE)
        self.write = write
        self.console_lines = "console" in names and console_lines
        self._tensorboard = self._wandb = None
        for name, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
            if name in names and importlib.util.find_spec(package) is None:
                raise ValueError(f"trainer.logger includes {name}, but the {package} package is "
                                 f"not installed (pip install {package})")
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(Path(out) / "tensorboard"))
        if "wandb" in names:
            import wandb

            os.makedirs(Path(out) / "wandb", exist_ok=True)
            run_dir = Path(out).resolve()
            self._wandb = wandb.init(project=project, name=experiment or run_dir.name,
                                     id=_wandb_id(str(run_dir)), dir=str(out), config=config,
                                     resume="allow", mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, record: dict) -> None:
        self.metrics.log(record)
        step = record["step"]
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v)}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self.console_lines and any(k in record for k, _ in CONSOLE_KEYS[:2]):
            parts = [f"{short} {record[k]:.4g}" for k, short in CONSOLE_KEYS
                     if isinstance(record.get(k), (int, float))]
            self.write(f"step {step}: " + ", ".join(parts))

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_id(path: str) -> str:
    """A stable run id from the run directory, so a resumed run continues the same wandb run."""
    import zlib

    return f"appo-{zlib.crc32(path.encode()):08x}"


class NoLoggers:
    """The loggers of every process but rank 0 under torchrun (`appo.distributed`): rank 0
    writes the run's metrics, the others nothing."""

    class _NoMetrics:
        @staticmethod
        def records() -> list[dict]:
            return []

        @staticmethod
        def truncate_after(step: int) -> int:
            return 0

    metrics = _NoMetrics()

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass
