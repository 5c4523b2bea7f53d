"""`appo train`: the whole APPO loop from the command line (docs/training.md).

    appo train                                  # the embedded default: tiny model, calc task
    appo train --algo grpo --steps 20 --out runs/grpo
    appo train --model ./my-model --engine vllm actor_rollout_ref.actor.optim.lr=1e-6
    appo train --config run.yaml data.train_batch_size=32
    appo train --resume runs/appo-20261122-101500

Trailing `key=value` arguments override the config with verl's dotted paths or TRL's names
(`learning_rate=1e-6`); flags win over the config file, overrides win over flags.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from appo.config import BRANCH_PER, Config, apply_overrides, load_yaml, set_value
from appo.rollout.engines import engine_names

# flag -> config key, applied when the flag is given
FLAG_KEYS = {
    "algo": "algorithm.adv_estimator",
    "model": "actor_rollout_ref.model.path",
    "engine": "actor_rollout_ref.rollout.name",
    "task": "data.task",
    "steps": "trainer.total_training_steps",
    "out": "trainer.default_local_dir",
    "seed": "trainer.seed",
    "device": "trainer.device",
    "branch_per": "algorithm.branch_per",
    "unrolled": "actor_rollout_ref.actor.unrolled",
    "max_time": "trainer.max_time_s",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    # no defaults formatter: a flag's default is the config's, said once in its help
    train = commands.add_parser("train", help="run APPO / ARPO / GRPO training")
    train.add_argument("--config", metavar="FILE", help="a YAML config (verl's layout)")
    from appo.algorithms import algorithm_names

    train.add_argument("--algo", choices=algorithm_names(), help="the algorithm (default appo)")
    train.add_argument("--model", metavar="PATH",
                       help="a local transformers causal LM directory or a .gguf file "
                            "(default: the embedded tiny model)")
    train.add_argument("--engine", choices=engine_names(), help="the rollout engine (default hf)")
    train.add_argument("--task", help="a registered task (default calc)")
    train.add_argument("--steps", type=int, help="training steps")
    train.add_argument("--out", metavar="DIR", help="output directory (default runs/<algo>-<time>)")
    train.add_argument("--resume", metavar="DIR", help="continue the run in DIR")
    train.add_argument("--seed", type=int)
    train.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    train.add_argument("--branch-per", choices=BRANCH_PER,
                       help="APPO's branch budget per prompt group, or per rollout (the paper)")
    train.add_argument("--unrolled", action="store_true", default=None,
                       help="train on unrolled padded sequences instead of packed trees")
    train.add_argument("--max-time", type=float, metavar="SECONDS",
                       help="stop after the step that passes this wall time (with a checkpoint)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides, e.g. actor_rollout_ref.actor.optim.lr=1e-6")

    from appo.compare import ARMS

    compare = commands.add_parser(
        "compare", help="algorithms side by side over paired seeds, with confidence intervals",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    compare.add_argument("--config", metavar="FILE", help="the YAML config every arm shares")
    compare.add_argument("--arms", default=",".join(ARMS),
                         help=f"comma-separated arms among {', '.join(ARMS)}")
    compare.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    compare.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    compare.add_argument("--out", metavar="DIR", default="runs/compare",
                         help="output directory (an interrupted comparison continues there)")
    compare.add_argument("--no-progress", action="store_true", help="no progress bar")
    compare.add_argument("overrides", nargs="*", metavar="key=value",
                         help="config overrides for every arm")
    return parser


def compare_main(parser, args) -> int:
    from pathlib import Path

    from appo.compare import compare

    from appo.distributed import world_size

    try:
        if world_size() > 1:
            raise ValueError("appo compare runs its arms in one process (--jobs at a time): "
                             "start it without torchrun")
        config = _load_config_file(args.config) if args.config else Config()
        apply_overrides(config, args.overrides)
        config.validate()
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        if args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    except ValueError as e:
        parser.error(str(e))
    try:
        summary = compare(config, arms, seeds, Path(args.out), n_jobs=args.jobs,
                          progress=not args.no_progress)
    except ValueError as e:
        parser.error(str(e))
    except KeyboardInterrupt:
        print(f"interrupted: `appo compare --out {args.out}` continues the comparison")
        return 130
    return 1 if summary["failed"] else 0


def _load_config_file(path: str) -> Config:
    """`--config FILE` with its errors as ValueErrors that name the file."""
    import yaml

    try:
        return load_yaml(path)
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None


def config_from_args(args: argparse.Namespace) -> Config:
    if args.resume:
        from appo.run import load_run_config

        config = load_run_config(args.resume)
        if args.config:
            raise ValueError("--resume takes the run's own config; pass changes as key=value")
    else:
        config = _load_config_file(args.config) if args.config else Config()
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            set_value(config, key, value)
    if args.no_progress:
        config.trainer.progress = False
    apply_overrides(config, args.overrides)
    if args.resume:
        config.trainer.default_local_dir = args.resume
    return config.validate()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "compare":
        return compare_main(parser, args)
    try:
        config = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    from appo.trainer import Trainer

    try:  # what the config names but cannot be had: a model path, a logger's package, ...
        trainer = Trainer(config, resume=bool(args.resume))
    except ValueError as e:
        parser.error(str(e))
    say = print if trainer.dist.main else (lambda *args, **kwargs: None)  # torchrun: rank 0
    world = f" on {trainer.dist.world} processes" if trainer.dist.world > 1 else ""
    say(f"appo: {config.algorithm.adv_estimator} on task {config.data.task!r}, "
        f"{config.trainer.total_training_steps} steps{world}, output in {trainer.out}", flush=True)
    try:
        result = trainer.train()
    finally:
        trainer.dist.close()
    before, after = result.eval_before, result.eval_after
    if before is not None and after is not None:
        say(f"held-out accuracy {before:.3f} -> {after:.3f} "
            f"({100 * (after - before):+.1f} points)")
    say(f"{result.step} steps in {result.seconds:.0f} s; metrics, plots, rollouts.html and "
        f"checkpoints in {result.out_dir}")
    from appo.run import exit_code

    return exit_code(result.interrupted) if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
