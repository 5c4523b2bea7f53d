"""What the trainer reports about one step's rollouts: its metrics, the groups that
`rollouts.html` shows, and a plain account of what the rewards had in common when a step has no
learning signal. Takes the step's `PackedRollouts`s (appo.algorithms)."""

from __future__ import annotations

import contextlib
import functools
import time
from collections import Counter
from typing import Callable, Optional, Sequence

import numpy as np

FINISH_MARKS = {"length": "cut at the length limit", "tool_limit": "stopped at the tool-call limit"}


def rollout_groups(decode: Callable[[list[int]], str], problems: Sequence, prompts: Sequence,
                   init, branched, entropy, k: int) -> list[dict]:
    """The `RolloutsPage.add_step` groups of the first `k` prompts of a step: `init` the
    initial rollouts, `branched` what the algorithm forked (`appo.algorithms.Branched`; forks of
    forks are not shown), `entropy` per token of `init`; `decode(ids)` gives the text of token
    ids (the prompt as the model sees it: chat template, system prompt)."""
    bounds = init.cu_seqlens.tolist()
    branching, branches = branched.branching, branched.branches
    parents, positions = branching.parent.tolist(), branching.position.tolist()
    mask, entropy = init.mask.tolist(), entropy.tolist()
    score = (branched.scores.score.tolist() if branched.scores is not None
             else [None] * len(mask))
    groups = []
    for g in range(min(k, len(problems))):
        members = [s for s in range(len(init)) if int(init.group[s]) == g]
        rollouts, branch_rows = [], []
        for r, s in enumerate(members):
            lo, hi = bounds[s], bounds[s + 1]
            sample, model = init.samples[s], mask[lo:hi]
            rollouts.append({
                "tokens": [decode([t]) for t in sample.response_ids],
                "model": model,
                "score": [v if m else None for v, m in zip(score[lo:hi], model)],
                "entropy": [v if m else None for v, m in zip(entropy[lo:hi], model)],
                "reward": float(init.rewards[s]),
                **_grade_fields(init.grades, s),
                "finish": FINISH_MARKS.get(sample.finish_reason),
                "branch_points": [p for b, p in enumerate(positions) if parents[b] == s],
            })
            for b, (parent, position) in enumerate(zip(parents, positions)):
                if parent == s:
                    fork = branches.samples[b]
                    branch_rows.append({
                        "parent": r, "position": position,
                        "text": decode(fork.response_ids[position + 1:]),
                        "reward": float(branches.rewards[b]), **_grade_fields(branches.grades, b),
                        "finish": FINISH_MARKS.get(fork.finish_reason)})
        groups.append({"prompt": decode(list(prompts[g])), "answer": problems[g].answer,
                       "rollouts": rollouts, "branches": branch_rows})
    return groups


def _grade_fields(grades: Sequence, i: int) -> dict:
    if i >= len(grades):
        return {}
    return {"reason": grades[i].reason, "detail": grades[i].detail}


def common_reasons(grades: Sequence, limit: int = 3) -> Optional[str]:
    """What the grades say, most common first: "all 8 rollouts: bad format: no <answer>" or
    "6 rollouts: wrong answer; 2: correct"; None without grades."""
    counts = Counter(g.reason for g in grades).most_common()
    if not counts:
        return None
    if len(counts) == 1:
        return f"all {counts[0][1]} rollouts: {counts[0][0]}"
    shown = [f"{n} rollouts: {reason}" if i == 0 else f"{n}: {reason}"
             for i, (reason, n) in enumerate(counts[:limit])]
    rest = sum(n for _, n in counts[limit:])
    return "; ".join(shown) + (f"; {rest} other" if rest else "")


class StageClock:
    """Wall seconds per stage of the current step, logged as `time_<stage>` (docs/training.md):
    generate, fork, score (no-grad passes), update (PPO mini-batches), sync (weight pushes)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.monotonic() - started

    def metrics(self) -> dict:
        return {f"time_{stage}": seconds for stage, seconds in self.seconds.items()}


def timed(stage: str):
    """Method decorator: the call's time goes to `self.clock` under `stage`."""
    def wrap(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            with self.clock(stage):
                return method(self, *args, **kwargs)
        return run
    return wrap


class TimedEngine:
    """A rollout engine whose generate, fork and update_weights are timed on a StageClock;
    everything else goes to the engine itself."""

    def __init__(self, engine, clock: StageClock):
        self.engine, self.clock = engine, clock

    @timed("generate")
    def generate(self, *args, **kwargs):
        return self.engine.generate(*args, **kwargs)

    @timed("fork")
    def fork(self, *args, **kwargs):
        return self.engine.fork(*args, **kwargs)

    @timed("sync")
    def update_weights(self, model):
        return self.engine.update_weights(model)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def rollout_metrics(init, branches, old, times: dict) -> dict:
    """The rollout half of a step's metrics: rewards, entropy, lengths, tool calls, branches,
    throughput and the tree saving (`old`: the old-policy pass over `init`)."""
    from appo.algorithms import masked_mean

    rewards = init.rewards
    model_mean = masked_mean(init.mask)
    generated = int(init.cu_seqlens[-1]) + (0 if branches is None else _new_tokens(branches))
    record = {
        "reward_mean": float(rewards.mean()),
        "accuracy": float((rewards >= 1).float().mean()),
        "bad_format": float((rewards <= -1).float().mean()),
        "entropy_mean": float(model_mean(old.entropy)),
        # engine vs trainer log-probs of the same tokens under the same weights: ~0 unless
        # the two disagree (misaligned tokens, another temperature, lower-precision sampling)
        "rollout_logprob_gap": float(model_mean((old.logprob - init.rollout_logprob).abs())),
        "response_length_mean": float(init.lengths.float().mean()),
        "truncated": float(np.mean([s.finish_reason == "length" for s in init.samples])),
        "tool_calls_mean": float(np.mean([s.n_tool_calls for s in init.samples])),
        "branches": 0 if branches is None else len(branches),
        "tokens_per_s": generated / max(times["rollout"], 1e-9),
        "tree_tokens": old.forward_tokens,
        "unrolled_tokens": old.sequence_tokens,
        "time_rollout": times["rollout"],
        "time_train": times["train"],
    }
    if branches is not None:
        record["reward_branch_mean"] = float(branches.rewards.mean())
    return record


def _new_tokens(branches) -> int:
    """Tokens the engine sampled for branches (a fork's copied prefix is not new)."""
    return sum(len(s.response_ids) - (s.fork_of[1] + 1 if s.fork_of else 0)
               for s in branches.samples)


# step metrics that count (tokens, sequences, groups): under torchrun the step's value is the sum
# over the ranks, not their mean
RANK_SUMS = frozenset({"branches", "tokens_per_s", "tree_tokens", "unrolled_tokens",
                       "zero_variance_groups", "branch_rescued_groups"})


def learning_signal(step: int, train, adv_tok, init=None, branches=None) -> dict:
    """How many prompt groups of the trained sequences have equal rewards, how many groups whose
    initial rollouts are flat got differing rewards from their branches, and, when no trained
    token has an advantage, a warning that says what the rewards had in common."""
    record = {"zero_variance_groups": zero_variance_groups(train.rewards, train.group)}
    if init is not None and branches is not None and len(branches):
        import torch

        flat = _flat_groups(init.rewards, init.group)
        both = _flat_groups(torch.cat([init.rewards, branches.rewards]),
                            torch.cat([init.group, branches.group]))
        record["branch_rescued_groups"] = int((flat & ~both[:len(flat)]).sum())
    if not bool((adv_tok[train.mask] != 0).any()):
        record["warning"] = (f"step {step}: no learning signal, every group's rewards are "
                             f"equal ({common_reasons(train.grades)})")
    return record


def zero_variance_groups(rewards, group) -> int:
    """The prompt groups whose sequences all have the same reward (no advantage within them)."""
    return int(_flat_groups(rewards, group).sum())


def _flat_groups(rewards, group):
    """bool [groups]: the group ids 0..max present whose rewards are all equal."""
    import torch

    n = int(group.max()) + 1
    high = torch.full((n,), -torch.inf, device=rewards.device).scatter_reduce(
        0, group, rewards, "amax")
    low = torch.full((n,), torch.inf, device=rewards.device).scatter_reduce(
        0, group, rewards, "amin")
    present = torch.bincount(group, minlength=n) > 0
    return (high == low) & present


class UpdateLog:
    """The optimizer steps' metrics of one training step, averaged over its steps (with
    verl's names where they differ from `policy_loss`'s)."""

    NAMES = {"kl_ref": "kl_ref_mean"}

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.n = 0

    def add(self, metrics: dict) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.n += 1

    def means(self) -> dict:
        return {self.NAMES.get(key, key): value / max(1, self.n)
                for key, value in self.sums.items()}


def first_eval(records: Sequence[dict]) -> Optional[float]:
    return next((r["eval_accuracy"] for r in records if "eval_accuracy" in r), None)


def describe_eval(record: dict) -> str:
    if "eval_accuracy" not in record:
        return f"step {record['step']}: no evaluation (data.val_size = 0)"
    return (f"step {record['step']}: held-out accuracy {record['eval_accuracy']:.3f}, "
            f"reward {record['eval_reward']:+.3f}, bad format {record['eval_bad_format']:.3f} "
            f"({record['eval_n']} problems)")
