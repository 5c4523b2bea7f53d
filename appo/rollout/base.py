"""The rollout interface every engine implements (docs/algorithm.md; docs/training.md): token ids
in, token ids out.

A sample is the prompt plus a response in which model tokens and tool results alternate. Every
response token has one entry in `response_mask` (1: the model sampled it, 0: a tool wrote it) and
one in `response_logprobs` (the sampling log-prob for model tokens, 0.0 for tool tokens), so the
three lists stay aligned however many tool calls happen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Protocol, Sequence


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. Untruncated (temperature only, no top-p/top-k) so that sampling log-probs
    are comparable with the trainer's full-vocabulary log-softmax."""

    temperature: float = 1.0
    max_response_len: int = 256  # response tokens, model and tool tokens together
    max_tool_calls: int = 4
    seed: Optional[int] = None

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_response_len < 1:
            raise ValueError(f"max_response_len must be >= 1, got {self.max_response_len}")
        if self.max_tool_calls < 0:
            raise ValueError(f"max_tool_calls must be >= 0, got {self.max_tool_calls}")


FINISH_REASONS = ("stop", "length", "tool_limit")


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)  # 1 = model token, 0 = tool result
    response_logprobs: list[float] = field(default_factory=list)  # 0.0 on tool tokens
    n_tool_calls: int = 0
    finish_reason: str = ""  # one of FINISH_REASONS once finished
    prompt_index: int = 0  # which prompt of the generate() call this sample answers
    fork_of: Optional[tuple[int, int]] = None  # (index of the parent in fork()'s input, position)

    def check_aligned(self) -> None:
        n = len(self.response_ids)
        if len(self.response_mask) != n or len(self.response_logprobs) != n:
            raise AssertionError(
                f"sample lists out of step: {n} ids, {len(self.response_mask)} mask entries, "
                f"{len(self.response_logprobs)} log-probs")


class Engine(Protocol):
    """A rollout engine. Implementations: `appo.rollout.hf.HFEngine` (transformers, KV-cache reuse
    for forks) and `appo.rollout.vllm.VLLMEngine` (prefix caching)."""

    def generate(self, prompts: Sequence[Sequence[int]], n: int,
                 sampling: SamplingParams) -> list[Sample]:
        """n samples per prompt, ordered prompt-major (prompt 0's n samples first)."""

    def fork(self, samples: Sequence[Sample], positions: Sequence[int], n: int,
             sampling: SamplingParams) -> list[Sample]:
        """Continue sample s from its response token positions[s] (that token kept; prefix lists
        copied from the parent) with the same tool loop, n times each; the tool-call count
        continues from the prefix. Ordered parent-major."""

    def update_weights(self, model) -> None:
        """Load the training model's current weights (after each update)."""


def weights_of(model) -> dict:
    """The state_dict `update_weights` loads from a module or a state_dict, with the parameter-name
    prefixes of torch.compile and DDP wrappers removed."""
    state = model if isinstance(model, Mapping) else model.state_dict()
    return {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}
