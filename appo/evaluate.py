"""Held-out evaluation: sample responses to a task's problems and score them with its reward.

The reward convention is the task's (docs/algorithm.md): 1 for an exact match, -1 for bad format,
values in
between for partial credit. `accuracy` counts reward == 1 and `format_error_rate` reward == -1.
Sampling is the rollouts' own (same engine, tool loop and limits), at temperature 1 by default, so
the numbers describe the policy RL trains; `greedy=True` takes the most likely token instead.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

from appo.rollout.base import Sample, SamplingParams

# greedy decoding through the untruncated sampler: at this temperature a logit gap of 1e-3 already
# makes the runner-up e^-10 times less likely, and float32 logits / 1e-4 stay far from overflow
GREEDY_TEMPERATURE = 1e-4
EXACT, BAD_FORMAT = 1.0, -1.0


@dataclass(frozen=True)
class EvalResult:
    accuracy: float  # fraction of responses with reward == 1 (exact match)
    format_error_rate: float  # fraction with reward == -1
    mean_reward: float
    mean_tool_calls: float
    mean_response_len: float  # response tokens, tool results included
    n: int  # responses scored

    @staticmethod
    def merge(parts: Sequence["EvalResult"]) -> "EvalResult":
        """The result over the union of disjoint parts (the shards of `evaluate(shard=...)`)."""
        parts = [p for p in parts if p.n > 0]
        if len(parts) == 1:
            return parts[0]
        n = sum(p.n for p in parts)

        def mean(name):
            return sum(getattr(p, name) * p.n for p in parts) / n

        return EvalResult(mean("accuracy"), mean("format_error_rate"), mean("mean_reward"),
                          mean("mean_tool_calls"), mean("mean_response_len"), n)


def response_text(protocol, sample: Sample) -> str:
    """The response alone as a task's reward reads it (the protocol's canonical text: tool
    results as `<result>...</result>`, special tokens such as the end of sequence left out)."""
    return protocol.response_text(sample.response_ids, sample.response_mask)


def evaluate(engine, task, *, split: str = "eval", n_problems: Optional[int] = None,
             n_samples: int = 1, sampling: SamplingParams = SamplingParams(seed=0),
             greedy: bool = False, batch_size: int = 64,
             shard: tuple[int, int] = (0, 1)) -> EvalResult:
    """Score `n_samples` responses to each of the first `n_problems` problems of `split` (all of it
    when None), generated `batch_size` prompts at a time, with the engine's tool protocol (the
    task's `format` must be the same protocol). `greedy` overrides the temperature (and then
    one sample per problem is all there is to see). `shard=(k, m)`: only every m-th of those
    problems from the k-th (one process's part, n = 0 when it has none; `EvalResult.merge`
    joins the parts). A part's samples are drawn from its own seeds, so sampled (not greedy)
    results differ from the unsharded run's by the draw."""
    protocol = engine.protocol
    if task.format.name != protocol.name:
        raise ValueError(f"task.format is {task.format.name!r} but the engine's tool protocol is "
                         f"{protocol.name!r}: set task.format = engine.protocol")
    problems = task.split(split)
    if n_problems is not None:
        if n_problems < 1:
            raise ValueError(f"n_problems must be >= 1 or None, got {n_problems}")
        problems = problems[:n_problems]
    if not problems:
        raise ValueError(f"split {split!r} of task {task.name!r} has no problems to evaluate")
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard must be (k, m) with 0 <= k < m, got {shard}")
    if n_samples < 1 or batch_size < 1:
        raise ValueError(f"n_samples and batch_size must be >= 1, got n_samples={n_samples}, "
                         f"batch_size={batch_size}")
    if greedy:
        sampling = replace(sampling, temperature=GREEDY_TEMPERATURE)
    problems = problems[rank::world]
    if not problems:
        return EvalResult(0.0, 0.0, 0.0, 0.0, 0.0, n=0)
    rewards, tool_calls, lengths = [], [], []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        prompts = [protocol.encode_prompt(p.prompt, task.instructions, task.tool_names)
                   for p in chunk]
        # a distinct seed per chunk: chunks must not share their samples' random streams
        seed = None if sampling.seed is None else sampling.seed + start
        samples = engine.generate(prompts, n_samples, replace(sampling, seed=seed))
        for sample in samples:
            rewards.append(task.reward(response_text(protocol, sample),
                                       chunk[sample.prompt_index]))
            tool_calls.append(sample.n_tool_calls)
            lengths.append(len(sample.response_ids))
    n = len(rewards)
    return EvalResult(accuracy=sum(r == EXACT for r in rewards) / n,
                      format_error_rate=sum(r == BAD_FORMAT for r in rewards) / n,
                      mean_reward=sum(rewards) / n, mean_tool_calls=sum(tool_calls) / n,
                      mean_response_len=sum(lengths) / n, n=n)
