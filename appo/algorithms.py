"""APPO, ARPO and GRPO (SPEC §3) as the trainer sees them: where to branch, and the per-token
advantages that follow from the rewards. Pure tensor-in, tensor-out on top of `appo_kernels`; the
trainer looks an algorithm up by name (`algorithm.adv_estimator`) and runs

    init rollouts -> branch_points -> forks (and fillers) -> rewards -> advantages -> PPO

| algorithm | initial rollouts | branches                                      | trained on      |
|-----------|------------------|-----------------------------------------------|-----------------|
| appo      | n                | B by branching score (entropy · Ω)            | initial only    |
| arpo      | n                | ≤ B after tool results, entropy change; the   | all G = n + B   |
|           |                  | rest of the budget as independent samples     |                 |
| grpo      | n + B            | none                                          | all G = n + B   |
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from appo.config import AlgorithmConfig
from appo.registry import Registry
from appo.rollout.base import Sample
from appo_kernels import (BranchScores, group_advantages, procedure_advantages,
                          select_branch_points)


@dataclass
class RolloutSet:
    """Samples with their per-token arrays packed (responses only), on one device."""

    samples: list[Sample]
    group: Tensor  # long [S], the prompt (of this step) each sample answers
    rewards: Tensor  # float32 [S]
    ids: Tensor  # long [N]
    mask: Tensor  # bool [N], model tokens
    rollout_logprob: Tensor  # float32 [N], the engine's sampling log-probs (0 on tool tokens)
    cu_seqlens: Tensor  # long [S+1]
    grades: list[Any] = field(default_factory=list)  # the task's Grade of each sample, if known

    @classmethod
    def of(cls, samples: Sequence[Sample], group: Sequence[int], rewards: Sequence[float],
           device="cpu", grades: Sequence[Any] = ()) -> "RolloutSet":
        lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.long)

        def flat(field, dtype):
            values = [v for s in samples for v in getattr(s, field)]
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(list(samples), torch.tensor(list(group), dtype=torch.long, device=device),
                   torch.tensor(list(rewards), dtype=torch.float32, device=device),
                   flat("response_ids", torch.long), flat("response_mask", torch.bool),
                   flat("response_logprobs", torch.float32),
                   torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(device), list(grades))

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> Tensor:
        return self.cu_seqlens.diff()

    def per_token(self, per_sequence: Tensor) -> Tensor:
        """A per-sequence tensor [S] broadcast to the packed tokens [N]."""
        return per_sequence.repeat_interleave(self.lengths, output_size=int(self.cu_seqlens[-1]))

    @staticmethod
    def concat(a: "RolloutSet", b: "RolloutSet") -> "RolloutSet":
        return RolloutSet(a.samples + b.samples, torch.cat([a.group, b.group]),
                          torch.cat([a.rewards, b.rewards]), torch.cat([a.ids, b.ids]),
                          torch.cat([a.mask, b.mask]),
                          torch.cat([a.rollout_logprob, b.rollout_logprob]),
                          torch.cat([a.cu_seqlens, b.cu_seqlens[1:] + a.cu_seqlens[-1]]),
                          a.grades + b.grades)


def masked_mean(mask: Tensor):
    """x -> the mean of x over the tokens where `mask` is set (0 when none is)."""
    count = mask.sum().clamp_min(1)
    return lambda x: (x * mask).sum() / count


@dataclass
class Branching:
    """Where to fork: `parent[b]` indexes the initial rollouts, `position[b]` its response."""

    parent: Tensor  # long [B]
    position: Tensor  # long [B]
    scores: Optional[BranchScores] = None  # per token of the initial rollouts, when computed
    fill: Optional[Tensor] = None  # long [prompts]: independent samples to add per prompt (ARPO)


@dataclass
class Advantages:
    train: RolloutSet  # the sequences the loss covers
    adv_tok: Tensor  # float32 [N of train]
    future_kl: bool  # scale adv_tok by future_kl_scale inside the PPO micro-batches (APPO)


class Algorithm:
    """The hooks the trainer calls; subclasses set `name` and override what differs."""

    name = ""

    def __init__(self, config: AlgorithmConfig, n: int, vocab_size: int):
        self.config, self.n, self.vocab_size = config, n, vocab_size

    def initial_rollouts(self) -> int:
        return self.n

    def branch_points(self, init: RolloutSet, entropy: Tensor, scores: BranchScores,
                      eligible: Tensor, generator: torch.Generator) -> Branching:
        """Branch points in the initial rollouts, from the training policy's exact `entropy` of
        their tokens and the branching `scores` (entropy · Ω); `eligible` marks the tokens a
        fork may keep."""
        empty = torch.zeros(0, dtype=torch.long, device=init.ids.device)
        return Branching(empty, empty)

    def advantages(self, init: RolloutSet, branches: Optional[RolloutSet],
                   branching: Branching) -> Advantages:
        """GRPO over every sequence of a prompt, each token getting its sequence's advantage."""
        train = init if branches is None else RolloutSet.concat(init, branches)
        adv = group_advantages(train.rewards, train.group,
                               normalize_std=self.config.norm_adv_by_std_in_grpo)
        return Advantages(train, train.per_token(adv), future_kl=False)


class GRPO(Algorithm):
    """G = n + B independent samples per prompt, group-normalised rewards."""

    name = "grpo"

    def initial_rollouts(self) -> int:
        return self.n + self.config.branch_budget


class APPO(Algorithm):
    """Branch where the policy is uncertain (entropy) *and* the future matters (Ω); credit each
    initial-rollout token with the branches that split at or after it; train the initial
    rollouts only, with the future-KL scaled advantages (SPEC §3.2–3.6)."""

    name = "appo"

    def branch_points(self, init, entropy, scores, eligible, generator):
        parent, position = select_branch_points(scores.score, scores.strict, eligible,
                                                init.cu_seqlens, init.group,
                                                self.config.branch_budget,
                                                per=self.config.branch_per)
        return Branching(parent, position, scores)

    def advantages(self, init, branches, branching):
        norm = self.config.norm_adv_by_std_in_grpo
        seq_adv = group_advantages(init.rewards, init.group, normalize_std=norm)
        if branches is None or len(branches) == 0:
            return Advantages(init, init.per_token(seq_adv), self.config.use_future_kl)
        # dual groups: the branches of a prompt are normalised among themselves
        branch_adv = group_advantages(branches.rewards, branches.group, normalize_std=norm)
        adv_tok = procedure_advantages(seq_adv, init.cu_seqlens, branching.parent,
                                       branching.position, branch_adv,
                                       n_tokens=int(init.cu_seqlens[-1]))
        return Advantages(init, adv_tok, self.config.use_future_kl)


class ARPO(Algorithm):
    """Branch right after tool results where the entropy rose (ARPO's entropy-based adaptive
    rollout): a tool result at the end of token e is a branch point when
    U(0,1) − β·ΔH ≤ α, ΔH = (mean entropy of the first k model tokens after e − that of the
    first k model tokens of the response) / ln V. At most B branches per prompt (in rollout
    order); the rest of the budget is filled with independent samples so every algorithm sees
    G = n + B sequences per prompt. Soft attribution: GRPO over all G, branches trained."""

    name = "arpo"

    def branch_points(self, init, entropy, scores, eligible, generator):
        cfg, device = self.config, init.ids.device
        k, log_v = cfg.arpo_entropy_tokens, math.log(max(2, self.vocab_size))
        mask, ent = init.mask.cpu(), entropy.detach().float().cpu()
        bounds = init.cu_seqlens.cpu().tolist()
        chosen: dict[int, list[tuple[int, int]]] = {}
        for s in range(len(init)):
            lo, hi = bounds[s], bounds[s + 1]
            model_pos = torch.nonzero(mask[lo:hi]).flatten()
            if len(model_pos) == 0:
                continue
            h0 = ent[lo + model_pos[:k]].mean()
            # ends of tool results that the model continues after
            ends = torch.nonzero(~mask[lo:hi - 1] & mask[lo + 1:hi]).flatten()
            for e in ends.tolist():
                after = model_pos[model_pos > e][:k]
                delta = (ent[lo + after].mean() - h0) / log_v
                u = torch.rand((), generator=generator)
                if u - cfg.arpo_beta * delta <= cfg.arpo_alpha:
                    chosen.setdefault(int(init.group[s]), []).append((s, e))
        parent, position = [], []
        n_groups = int(init.group.max()) + 1 if len(init) else 0
        fill = torch.full((n_groups,), cfg.branch_budget, dtype=torch.long)
        for g, points in sorted(chosen.items()):
            for s, e in points[:cfg.branch_budget]:
                parent.append(s)
                position.append(e)
            fill[g] -= min(len(points), cfg.branch_budget)
        as_long = dict(dtype=torch.long, device=device)
        return Branching(torch.tensor(parent, **as_long), torch.tensor(position, **as_long),
                         fill=fill)


ALGORITHMS = Registry("algorithm", "an Algorithm subclass")
for _cls in (APPO, ARPO, GRPO):
    ALGORITHMS.add(_cls.name, _cls)


def get_algorithm(name: str, config: AlgorithmConfig, n: int, vocab_size: int) -> Algorithm:
    """Algorithm `name` with `n` initial rollouts per prompt, for a model of `vocab_size`."""
    return ALGORITHMS.get(name)(config, n, vocab_size)
