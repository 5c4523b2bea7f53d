"""A run's output directory: its config, checkpoints and resume, and the signals that stop it.

    runs/appo-20261206-101500/
      config.yaml          the config the run started with (the resolved tool format included)
      metrics.jsonl        one record per step (appo.report)
      warm_start/          the policy after the warm start, when there was one
      initial_model/       the starting policy as a transformers directory, when the vLLM engine
                           needs one and the model has no such directory (a GGUF file)
      checkpoints/
        latest             the name of the newest complete checkpoint
        step_000010/       model/ (save_pretrained) and trainer.pt (optimizer, schedule, step)

A checkpoint is written to `step_N.partial` and renamed when complete, and `latest` is replaced
atomically, so a crash never leaves a half-written checkpoint that `--resume` would load. The
newest `trainer.max_actor_ckpt_to_keep` checkpoints are kept.

Interrupts: Ctrl-C (SIGINT) or SIGTERM (what `kill` and schedulers send) during the rollout phase
of a step abandons that step at once; during its update phase (optimizer steps, weight push, log,
checkpoint) the signal is held until the step is complete. Either way the trainer then saves a
checkpoint of the last complete step and returns, so at most one step is lost; `appo train`
exits with 128 + the signal's number (130, 143). A SIGKILL cannot be caught: it loses what
came after the last checkpoint (`trainer.save_freq`, 10 steps by default).
"""

from __future__ import annotations

import shutil
import signal
import threading
from datetime import datetime
from pathlib import Path
from typing import Optional

import torch

from appo.config import Config, load_yaml
from appo.models import save_model

CHECKPOINTS = "checkpoints"
LATEST = "latest"
CONFIG_FILE = "config.yaml"
WARM_START_DIR = "warm_start"
INITIAL_MODEL_DIR = "initial_model"
TRAINER_STATE = "trainer.pt"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signal_name: str) -> int:
    """The shell's status for a process stopped by a signal: 128 + its number (130 for SIGINT,
    143 for SIGTERM)."""
    return 128 + signal.Signals[signal_name].value


class RunDir:
    """The output directory of one run; `resume` says whether it must hold one already."""

    def __init__(self, path, *, resume: bool):
        self.path = Path(path)
        self.checkpoints = self.path / CHECKPOINTS
        self.resume_from = self.latest_checkpoint() if resume else None
        if resume and self.resume_from is None:
            raise ValueError(f"--resume: no checkpoint in {self.checkpoints}")
        if not resume and self.checkpoints.exists():
            raise ValueError(f"{self.path} already holds a run: pass --resume to continue it, "
                             f"or choose another output directory")
        self.path.mkdir(parents=True, exist_ok=True)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def latest_checkpoint(self) -> Optional[Path]:
        latest = self.checkpoints / LATEST
        if not latest.exists():
            return None
        path = self.checkpoints / latest.read_text().strip()
        return path if path.exists() else None

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}"

    def save_checkpoint(self, step: int, model, tokenizer, state: dict,
                        keep: Optional[int] = None) -> Path:
        """Save the policy and the trainer's `state` as the checkpoint of `step`; keep the newest
        `keep` checkpoints (None or 0: all)."""
        final = self.checkpoint_dir(step)
        tmp = final.with_name(final.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, tokenizer, tmp / "model")
        torch.save({"step": step, **state}, tmp / TRAINER_STATE)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        latest = self.checkpoints / LATEST
        latest.with_suffix(".tmp").write_text(final.name)
        latest.with_suffix(".tmp").rename(latest)
        if keep:
            for old in sorted(self.checkpoints.glob("step_*"))[:-keep]:
                if old != final and not old.name.endswith(".partial"):
                    shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load_state(checkpoint: Path, device) -> dict:
        return torch.load(checkpoint / TRAINER_STATE, map_location=device, weights_only=True)


def default_out_dir(algorithm: str) -> Path:
    return Path("runs") / f"{algorithm}-{datetime.now():%Y%m%d-%H%M%S}"


def load_run_config(out_dir) -> Config:
    """The config a run in `out_dir` was started with (for --resume)."""
    path = Path(out_dir) / CONFIG_FILE
    if not path.exists():
        raise ValueError(f"--resume: {out_dir} has no {CONFIG_FILE}; is it an appo run directory?")
    return load_yaml(path)


class Interrupts:
    """SIGINT/SIGTERM handling for the training loop (see the module docstring): inside `with
    interrupts:` a signal raises KeyboardInterrupt at once, unless `critical` is set, when it only
    sets `requested` (the loop checks it after the step). `defer`: always only set `requested`
    (under torchrun, where the ranks must stop at the same point)."""

    def __init__(self, log=print, *, defer: bool = False):
        self.log = log
        self.defer = defer
        self.critical = False
        self.requested: Optional[str] = None
        self._previous: dict = {}

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.critical or self.defer:
            self.requested = name
            self.log(f"{name}: finishing this step's update, then saving" if self.critical else
                     f"{name}: finishing this step on every process, then saving")
        else:
            raise KeyboardInterrupt(name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main only
            self._previous = {s: signal.signal(s, self._handler) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
