"""APPO, ARPO and GRPO as the trainer sees them (docs/training.md, "Algorithms"): one registered
object each, with the hooks `Trainer.train_step` calls in this order.

- `initial_rollouts`: n (APPO, ARPO); n + B (GRPO).
- `updates_before_branching`: APPO with `algorithm.branch_after_update` (the paper's order):
  the first PPO mini-batch trains on `initial_advantages` (GRPO within the initial group)
  before `branch` scores and forks; the others branch first.
- `branch`: APPO: Ω and the branching score under the (updated) policy, B points per prompt,
  each forked once. ARPO: after tool results by entropy change, breadth-first, forks of forks up
  to `arpo_max_depth`, unused budget as independent samples. GRPO: nothing.
- `advantages`: APPO: dual groups + procedure credit, initial rollouts trained. ARPO and GRPO:
  GRPO over all G = n + B sequences of a prompt, all trained.
- `adjust` (each micro-batch, with its live log-probs): APPO's future-KL scaling; else nothing.

Everything per token comes from `appo_kernels`; the hooks are tensor-in, tensor-out, and what they
need of the trainer mid-step (forking, fresh samples, scoring) comes through a `StepContext`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from appo._deprecated import renamed
from appo.config import AlgorithmConfig
from appo.registry import Registry
from appo.rollout.base import Sample
from appo_kernels import (BranchScores, branching_score, discounted_suffix_sum, future_kl_scale,
                          future_value, group_advantages, procedure_advantages,
                          select_branch_points)


@dataclass
class PackedRollouts:
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
           device="cpu", grades: Sequence[Any] = ()) -> "PackedRollouts":
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
    def concat(a: "PackedRollouts", b: Optional["PackedRollouts"]) -> "PackedRollouts":
        if b is None:
            return a
        return PackedRollouts(a.samples + b.samples, torch.cat([a.group, b.group]),
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
    """Where the forks split off: fork b continues sequence `parent[b]` of the step's pool (the
    initial rollouts, then the branches in order) after its response token `position[b]`."""

    parent: Tensor  # long [B]
    position: Tensor  # long [B]
    depth: Optional[Tensor] = None  # long [B]: 1 forks an initial rollout, 2 a fork of one, ...
    fill: Optional[Tensor] = None  # long [prompts]: independent samples added per prompt (ARPO)


@dataclass
class Branched:
    """What `branch` produced: the forks (in the order of `branching`), then any independent
    fillers, as one PackedRollouts (None when there are none)."""

    branches: Optional[PackedRollouts]
    branching: Branching
    scores: Optional[BranchScores] = None  # per token of the initial rollouts, when computed
    metrics: dict = field(default_factory=dict)


@dataclass
class Advantages:
    train: PackedRollouts  # the sequences the loss covers
    adv_tok: Tensor  # float32 [N of train]


@dataclass
class StepContext:
    """What an algorithm may ask of the trainer while it branches."""

    # (parents, positions, prompt groups) -> one rewarded continuation of each parent, forked
    # after that response token
    fork: Callable[[Sequence[Sample], Sequence[int], Sequence[int]], PackedRollouts]
    # prompt ids of this step (repeats allowed) -> one new rewarded sample each
    generate: Callable[[Sequence[int]], PackedRollouts]
    # rollouts -> their per-token log-prob and entropy under the current policy
    stats: Callable[[PackedRollouts], Any]
    # rollouts -> bool [N], the tokens a fork may keep
    eligible: Callable[[PackedRollouts], Tensor]
    generator: torch.Generator  # for the algorithm's own random draws


_ALGORITHMS = Registry("algorithm", "an Algorithm subclass")


def register_algorithm(name: str):
    """A class decorator registering an Algorithm under `name` (its `name` attribute)."""
    def add(cls):
        cls.name = name
        return _ALGORITHMS.add(name, cls)

    return add


def algorithm_names() -> tuple[str, ...]:
    return _ALGORITHMS.names()


def get_algorithm(name: str, config: AlgorithmConfig, n: int, vocab_size: int) -> "Algorithm":
    """Algorithm `name` with `n` initial rollouts per prompt, for a model of `vocab_size`."""
    return _ALGORITHMS.get(name)(config, n, vocab_size)


class Algorithm:
    """The hooks of the module docstring, with GRPO's behaviour; subclasses override what
    differs."""

    name = ""

    def __init__(self, config: AlgorithmConfig, n: int, vocab_size: int):
        self.config, self.n, self.vocab_size = config, n, vocab_size

    def initial_rollouts(self) -> int:
        return self.n

    @property
    def updates_before_branching(self) -> bool:
        return False

    def initial_advantages(self, init: PackedRollouts) -> Tensor:
        """GRPO within each prompt's initial rollouts, per token."""
        return init.per_token(group_advantages(init.rewards, init.group,
                                               normalize_std=self.config.norm_adv_by_std_in_grpo))

    def branch(self, init: PackedRollouts, policy, context: StepContext) -> Branched:
        """Fork the initial rollouts; `policy` holds the current policy's per-token `logprob`
        and `entropy` of `init`."""
        empty = torch.zeros(0, dtype=torch.long, device=init.ids.device)
        return Branched(None, Branching(empty, empty))

    def advantages(self, init: PackedRollouts, branched: Branched) -> Advantages:
        """GRPO over every sequence of a prompt, each token getting its sequence's advantage."""
        train = PackedRollouts.concat(init, branched.branches)
        return Advantages(train, self.initial_advantages(train))

    def adjust(self, adv: Tensor, logprob: Tensor, old_logprob: Tensor, cu_seqlens: Tensor,
               mask: Tensor, clip_c: float) -> Tensor:
        """The advantages of one micro-batch, given its live log-probs (default: unchanged)."""
        return adv


@register_algorithm("grpo")
class GRPO(Algorithm):
    """G = n + B independent samples per prompt, group-normalised rewards."""

    def initial_rollouts(self) -> int:
        return self.n + self.config.branch_budget


@register_algorithm("appo")
class APPO(Algorithm):
    """Branch where the policy is uncertain (entropy) *and* has moved towards what followed (Ω);
    credit each initial-rollout token with the branches that split at or after it; train the
    initial rollouts only, with the future-KL scaled advantages.

    With `branch_after_update` (the paper's order, the default) the trainer first updates the
    policy on the initial rollouts, so Ω compares the updated policy with the one that sampled;
    without it Ω compares two copies of the same weights and is rounding noise (the reference
    code's order, kept as an ablation). `appo_random_branch_points` picks the points uniformly
    among the eligible tokens instead (an ablation of the score)."""

    @property
    def updates_before_branching(self) -> bool:
        return self.config.branch_after_update

    def branch(self, init, policy, context):
        cfg = self.config
        cu, mask = init.cu_seqlens, init.mask
        # log Ω: the policy's log-likelihood gain on what followed each token (before any clip)
        log_omega = discounted_suffix_sum(policy.logprob - init.rollout_logprob, cu, 1.0,
                                          mask=mask)
        omega = future_value(policy.logprob, init.rollout_logprob, cu, gamma=1.0, mask=mask,
                             clip=tuple(cfg.omega_clip))
        scores = branching_score(policy.entropy, omega, cu, mask=mask)
        eligible = context.eligible(init)
        if cfg.appo_random_branch_points:
            noise = torch.rand(mask.shape, generator=context.generator).to(mask.device)
            chosen_by = BranchScores(noise, torch.zeros_like(mask))
        else:
            chosen_by = scores
        parent, position = select_branch_points(chosen_by.score, chosen_by.strict, eligible, cu,
                                                init.group, cfg.branch_budget, per=cfg.branch_per)
        metrics = {"omega_log_std": _mean_std_per_sequence(log_omega, mask, cu)}
        branches = None
        if len(parent):
            branches = context.fork([init.samples[p] for p in parent.tolist()],
                                    position.tolist(), init.group[parent].tolist())
            starts = cu[parent] + position
            metrics["branch_strict_fraction"] = float(scores.strict[starts].float().mean())
            metrics["branch_position_mean"] = float(
                ((position + 1).float() / init.lengths[parent].float()).mean())
        depth = torch.ones_like(parent)
        return Branched(branches, Branching(parent, position, depth), scores, metrics)

    def advantages(self, init, branched):
        norm = self.config.norm_adv_by_std_in_grpo
        seq_adv = group_advantages(init.rewards, init.group, normalize_std=norm)
        branches = branched.branches
        if branches is None or len(branches) == 0:
            return Advantages(init, init.per_token(seq_adv))
        # dual groups: the branches of a prompt are normalised among themselves
        branch_adv = group_advantages(branches.rewards, branches.group, normalize_std=norm)
        adv_tok = procedure_advantages(seq_adv, init.cu_seqlens, branched.branching.parent,
                                       branched.branching.position, branch_adv,
                                       n_tokens=int(init.cu_seqlens[-1]))
        return Advantages(init, adv_tok)

    def adjust(self, adv, logprob, old_logprob, cu_seqlens, mask, clip_c):
        cfg = self.config
        if not cfg.use_future_kl:
            return adv
        return future_kl_scale(adv, logprob.detach(), old_logprob, cu_seqlens, mask,
                               gamma=cfg.future_kl_gamma, weight=cfg.future_kl_weight,
                               clip=cfg.future_kl_clip, clip_c=clip_c)


@register_algorithm("arpo")
class ARPO(Algorithm):
    """Branch right after tool results where the entropy rose, as the ARPO code does: a tool
    result ending at token e is a branch point when clamp(U(0,1) − β·ΔH, 0, 1) ≤ α, with
    ΔH = (H(first k model tokens after e) − H(first k model tokens of the sequence's first
    turn)) / ln V, H the *sum* of the exact per-token entropies over those (at most
    `arpo_entropy_tokens`) tokens of that turn. The budget B per prompt is spent breadth-first:
    the first tool result of every rollout, then the second, ...; forks may branch again at
    their own later tool results, up to `arpo_max_depth` levels; what is left of the budget
    becomes independent samples, so every algorithm sees G = n + B sequences per prompt. Soft
    attribution: GRPO over all G, branches trained. Metrics: the range of β·ΔH met."""

    def branch(self, init, policy, context):
        cfg = self.config
        n_groups = int(init.group.max()) + 1 if len(init) else 0
        left = [cfg.branch_budget] * n_groups
        pool, entropy = init, policy.entropy
        starts = [0] * len(init)  # where each pool sequence's own turns begin (a fork's e + 1)
        offset = 0  # index of `pool`'s first sequence among all sequences of the step
        parents, positions, depths, rounds, beta_dh = [], [], [], [], []
        for depth in range(1, cfg.arpo_max_depth + 1):
            if depth > 1:  # the forks of the last round are the pool: their entropy
                entropy = context.stats(pool).entropy
            chosen = self._choose(pool, entropy, starts, left, context.generator, beta_dh)
            if not chosen:
                break
            fork = context.fork([pool.samples[s] for s, _ in chosen], [e for _, e in chosen],
                                [int(pool.group[s]) for s, _ in chosen])
            parents += [offset + s for s, _ in chosen]
            positions += [e for _, e in chosen]
            depths += [depth] * len(chosen)
            rounds.append(fork)
            offset += len(pool)
            pool, starts = fork, [e + 1 for _, e in chosen]
            if not any(left):
                break
        wanted = [g for g, k in enumerate(left) for _ in range(k)]
        if wanted:
            rounds.append(context.generate(wanted))
        branches = None
        for part in rounds:
            branches = part if branches is None else PackedRollouts.concat(branches, part)
        as_long = dict(dtype=torch.long, device=init.ids.device)
        metrics = {}
        if beta_dh:
            metrics = {"arpo_beta_dh_min": min(beta_dh), "arpo_beta_dh_max": max(beta_dh)}
        branching = Branching(torch.tensor(parents, **as_long), torch.tensor(positions, **as_long),
                              torch.tensor(depths, **as_long), torch.tensor(left, **as_long))
        return Branched(branches, branching, None, metrics)

    def _choose(self, pool: PackedRollouts, entropy: Tensor, starts: list[int], left: list[int],
                generator: torch.Generator, beta_dh: list[float]) -> list[tuple[int, int]]:
        """(sequence, tool-result end) of the pool to fork, taking every sequence's first
        candidate before any second one; spends `left` per prompt; records β·ΔH."""
        cfg = self.config
        k, log_v = cfg.arpo_entropy_tokens, math.log(max(2, self.vocab_size))
        mask, ent = pool.mask.cpu().tolist(), entropy.detach().double().cpu().tolist()
        bounds = pool.cu_seqlens.cpu().tolist()
        candidates = []  # (turn index, sequence, e, ΔH)
        for s in range(len(pool)):
            lo, hi = bounds[s], bounds[s + 1]
            turns = _model_turns(mask[lo:hi], starts[s])
            if len(turns) < 2:
                continue
            first = sum(ent[lo + t] for t in turns[0][:k])
            for j, turn in enumerate(turns[1:]):
                delta = (sum(ent[lo + t] for t in turn[:k]) - first) / log_v
                candidates.append((j, s, turn[0] - 1, delta))
        chosen = []
        for _, s, e, delta in sorted(candidates, key=lambda c: (c[0], c[1])):
            g = int(pool.group[s])
            if left[g] == 0:
                continue
            u = float(torch.rand((), generator=generator, dtype=torch.float64))
            beta_dh.append(cfg.arpo_beta * delta)
            if min(1.0, max(0.0, u - cfg.arpo_beta * delta)) <= cfg.arpo_alpha:
                chosen.append((s, e))
                left[g] -= 1
        return chosen


def _model_turns(mask: list, start: int) -> list[list[int]]:
    """The runs of model tokens (mask 1) of a response from position `start` on; every run but
    the first follows a tool result."""
    turns: list[list[int]] = []
    for t in range(start, len(mask)):
        if mask[t]:
            if t == start or not mask[t - 1]:
                turns.append([])
            turns[-1].append(t)
    return turns


def _mean_std_per_sequence(x: Tensor, mask: Tensor, cu_seqlens: Tensor) -> float:
    """The mean over sequences with a masked token of the population std of x over them."""
    from appo_kernels.packing import token_segments

    seg = token_segments(cu_seqlens, x.numel())
    n = cu_seqlens.numel() - 1
    x, keep = x.double(), mask.double()
    count = torch.zeros(n, dtype=torch.float64, device=x.device).index_add_(0, seg, keep)
    total = torch.zeros_like(count).index_add_(0, seg, x * keep)
    mean = total / count.clamp_min(1)
    var = torch.zeros_like(count).index_add_(0, seg, (x - mean[seg]) ** 2 * keep)
    std = (var / count.clamp_min(1)).sqrt()
    has = count > 0
    return float(std[has].mean()) if bool(has.any()) else 0.0


# the old name, for one release
__getattr__ = renamed(__name__, {'RolloutSet': ('PackedRollouts', PackedRollouts)})
