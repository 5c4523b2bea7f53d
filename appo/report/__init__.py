"""What a training run leaves in its output directory (docs/training.md): the metrics log, its
plots, the
rollout page, and the progress bar. Pure Python + numpy + matplotlib (Agg) + tqdm; no torch.

    log = MetricsLog(out_dir / METRICS_FILE)      # one JSON object per line, each with "step"
    log.log({"step": 3, "reward_mean": 0.4, ...})
    plot_metrics(log.records(), out_dir)          # reward.png, accuracy.png, entropy.png, kl.png
    report = RolloutsPage(out_dir / ROLLOUTS_FILE, keep_steps=5)
    report.add_step(3, groups)                    # rewrites rollouts.html
    bar = progress(total_steps, initial=start, desc="appo", enabled=True)
    bar.set_postfix(format_postfix(metrics)); bar.update()

`loggers.RunLoggers` sends each step's record to the loggers of `trainer.logger` (metrics.jsonl,
the console, tensorboard, wandb); `steps` turns a step's rollouts into its metrics, the groups of
rollouts.html and, when a step has no learning signal, the reason.

Every file is replaced atomically (a temporary file beside it, then a rename), so a crash leaves
either the old or the new version, never half of one; the metrics log is appended line by line.
"""

from appo._deprecated import renamed

from .metrics import METRICS_FILE, MetricsLog, read_metrics
from .plots import PLOTS, plot_metrics
from .progress import format_postfix, progress
from .rollouts import ROLLOUTS_FILE, RolloutsPage

__all__ = ["METRICS_FILE", "MetricsLog", "read_metrics", "PLOTS", "plot_metrics", "progress",
           "format_postfix", "ROLLOUTS_FILE", "RolloutsPage"]


# the old name, for one release
__getattr__ = renamed(__name__, {'RolloutReport': ('RolloutsPage', RolloutsPage)})
