"""The models of a run: the policy it trains (from a checkpoint, a model path or the embedded
default, warm-started when asked), the KL reference (the policy before RL), and a transformers
directory of the policy's architecture for engines that start from one (vLLM)."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from appo.config import Config
from appo.models import default_model_dir, is_gguf, load_default, load_model, save_model
from appo.run import INITIAL_MODEL_DIR, WARM_START_DIR, RunDir


def model_dtype(name: str, device: torch.device) -> torch.dtype:
    """`actor_rollout_ref.model.dtype` as a torch dtype (auto: bfloat16 on a GPU, else float32)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"actor_rollout_ref.model.dtype: unknown dtype {name!r}")
    return dtype


def load_policy(config: Config, device: torch.device, checkpoint: Optional[Path] = None):
    """(model, tokenizer) in eval mode: the checkpoint's, else the model path's, else the
    embedded default's."""
    dtype = model_dtype(config.model.dtype, device)
    if checkpoint is not None:
        return load_model(checkpoint / "model", dtype, device)
    if config.model.path is None:
        return load_default(device=device, dtype=dtype)
    return load_model(config.model.path, dtype, device)


def wants_warm_start(config: Config) -> bool:
    """warm_start_steps > 0, or None (its default) for the embedded model."""
    steps = config.model.warm_start_steps
    return bool(steps) or (steps is None and config.model.path is None)


def warm_start_policy(model, tokenizer, task, config: Config, protocol, run: RunDir) -> None:
    """The supervised warm start (`appo.warmstart`) in place; the result is saved in the run's
    warm_start/ (the KL reference when the run resumes)."""
    from appo.warmstart import WarmStartConfig, warm_start

    if protocol.name != "tags":
        raise ValueError("actor_rollout_ref.model.warm_start_steps: the warm start's "
                         "demonstrations are written in the tags tool format, this run uses "
                         f"{protocol.name!r}; set warm_start_steps=0")
    seed = config.model.warm_start_seed
    warm = replace(WarmStartConfig(), seed=config.trainer.seed if seed is None else seed)
    if config.model.warm_start_steps is not None:
        warm = replace(warm, steps=config.model.warm_start_steps)
    if config.model.warm_start_direct_share is not None:
        warm = replace(warm, direct_share=config.model.warm_start_direct_share)
    warm_start(model, tokenizer, task, warm, progress=config.trainer.progress)
    save_model(model, tokenizer, run / WARM_START_DIR)


def load_reference(config: Config, device: torch.device, policy, run: RunDir):
    """The KL reference, or None without a KL loss: a copy of `policy` at the start of a run; on
    resume the warm start's weights, else the model path's, else the embedded initial ones."""
    actor = config.actor
    if not (actor.use_kl_loss and actor.kl_loss_coef > 0):
        return None
    if run.resume_from is None:
        return copy.deepcopy(policy).eval().requires_grad_(False)
    dtype = model_dtype(config.model.dtype, device)
    warm, path = run / WARM_START_DIR, config.model.path
    if warm.exists():
        ref, _ = load_model(warm, dtype, device)
    elif path is not None:
        ref, _ = load_model(path, dtype, device)
    else:
        ref, _ = load_default(device=device, dtype=dtype)
    return ref.eval().requires_grad_(False)


def weights_dir(config: Config, run: RunDir, model, tokenizer) -> Path:
    """A transformers directory of the policy's architecture: the warm start's, the model's
    own, or (for a GGUF file) the policy saved once into the run's initial_model/."""
    warm, path = run / WARM_START_DIR, config.model.path
    if warm.exists():
        return warm
    if path is None:
        return default_model_dir()
    if not is_gguf(path):
        return Path(path)
    initial = run / INITIAL_MODEL_DIR
    if not (initial / "config.json").exists():
        save_model(model, tokenizer, initial)
    return initial
