"""The algorithms' wiring (appo/algorithms.py) on hand-made rollouts: which sequences are trained,
where branches go, and the per-token advantages, against plain float64 formulas written here."""

import math

import pytest
import torch

from appo.algorithms import RolloutSet, get_algorithm
from appo.config import AlgorithmConfig
from appo.rollout.base import Sample
from appo_kernels import BranchScores

V = 50


def sample(mask, prompt_index=0):
    n = len(mask)
    return Sample(prompt_ids=[1, 2], response_ids=torch.randint(3, V, (n,)).tolist(),
                  response_mask=list(mask), response_logprobs=(-torch.rand(n)).tolist(),
                  prompt_index=prompt_index)


def rollout_set(masks, groups, rewards):
    return RolloutSet.of([sample(m, g) for m, g in zip(masks, groups)], groups, rewards)


def grpo_reference(rewards, groups, eps=1e-6):
    out = []
    for r, g in zip(rewards, groups):
        members = [x for x, h in zip(rewards, groups) if h == g]
        mean = sum(members) / len(members)
        std = math.sqrt(sum((x - mean) ** 2 for x in members) / len(members))
        out.append(0.0 if len(members) == 1 else (r - mean) / (std + eps))
    return out


def no_scores(init):
    n = int(init.cu_seqlens[-1])
    return BranchScores(torch.zeros(n), torch.zeros(n, dtype=torch.bool))


def test_grpo_samples_the_whole_budget_and_trains_everything():
    config = AlgorithmConfig(adv_estimator="grpo", branch_budget=3)
    algo = get_algorithm("grpo", config, n=2, vocab_size=V)
    assert algo.initial_rollouts() == 5
    rewards, groups = [1.0, 0.0, -1.0, 1.0, 0.0], [0, 0, 0, 1, 1]
    init = rollout_set([[1, 1, 0, 1]] * 5, groups, rewards)
    branching = algo.branch_points(init, torch.rand(20), no_scores(init),
                                   torch.ones(20, dtype=torch.bool), torch.Generator())
    assert len(branching.parent) == 0 and branching.fill is None
    adv = algo.advantages(init, None, branching)
    assert adv.train is init and not adv.future_kl
    expected = torch.tensor(grpo_reference(rewards, groups)).repeat_interleave(4)
    torch.testing.assert_close(adv.adv_tok, expected.float())


def test_appo_branches_by_score_and_credits_the_procedure():
    config = AlgorithmConfig(adv_estimator="appo", branch_budget=2)
    algo = get_algorithm("appo", config, n=3, vocab_size=V)
    assert algo.initial_rollouts() == 3
    lengths = [5, 4, 6, 3, 5, 4]
    groups = [0, 0, 0, 1, 1, 1]
    init = rollout_set([[1] * n for n in lengths], groups, [1.0, 0.0, 0.0, -1.0, 1.0, 1.0])
    n_tok = sum(lengths)
    score = torch.randn(n_tok)
    strict = torch.zeros(n_tok, dtype=torch.bool)
    eligible = torch.ones(n_tok, dtype=torch.bool)
    branching = algo.branch_points(init, torch.rand(n_tok), BranchScores(score, strict),
                                   eligible, torch.Generator())
    # the top-2 scores of each prompt's tokens
    cu = init.cu_seqlens.tolist()
    for g in (0, 1):
        tokens = [(float(score[t]), s, t - cu[s]) for s in range(6) if groups[s] == g
                  for t in range(cu[s], cu[s + 1])]
        best = sorted(tokens, key=lambda x: -x[0])[:2]
        chosen = [(int(p), int(q)) for p, q in zip(branching.parent, branching.position)
                  if groups[int(p)] == g]
        assert chosen == [(s, pos) for _, s, pos in best]

    branch_rewards = [1.0, -1.0, 0.0, 1.0]
    branch_groups = [groups[int(p)] for p in branching.parent]
    branches = rollout_set([[1, 1]] * 4, branch_groups, branch_rewards)
    adv = algo.advantages(init, branches, branching)
    assert adv.train is init and adv.future_kl  # the loss covers the initial rollouts only
    seq_adv = grpo_reference(init.rewards.tolist(), groups)
    branch_adv = grpo_reference(branch_rewards, branch_groups)
    expected = []
    for s in range(6):
        for t in range(lengths[s]):
            later = [branch_adv[b] for b in range(4)
                     if int(branching.parent[b]) == s and int(branching.position[b]) >= t]
            expected.append(seq_adv[s] + (sum(later) / len(later) if later else 0.0))
    torch.testing.assert_close(adv.adv_tok, torch.tensor(expected, dtype=torch.float32))


def test_appo_without_branches_is_grpo_on_the_initial_group():
    config = AlgorithmConfig(adv_estimator="appo", branch_budget=0)
    algo = get_algorithm("appo", config, n=2, vocab_size=V)
    init = rollout_set([[1, 1], [1, 0, 1]], [0, 0], [1.0, 0.0])
    branching = algo.branch_points(init, torch.rand(5), no_scores(init),
                                   torch.ones(5, dtype=torch.bool), torch.Generator())
    assert len(branching.parent) == 0
    adv = algo.advantages(init, None, branching)
    torch.testing.assert_close(adv.adv_tok, torch.tensor([1.0, 1, -1, -1, -1]), atol=1e-5,
                               rtol=0)


# model (1) and tool (0) tokens: tool results end at positions 3 and 7
TOOL_MASK = [1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1]


def arpo(budget, alpha, beta, k=2):
    config = AlgorithmConfig(adv_estimator="arpo", branch_budget=budget, arpo_alpha=alpha,
                             arpo_beta=beta, arpo_entropy_tokens=k)
    return get_algorithm("arpo", config, n=2, vocab_size=V)


def test_arpo_branches_only_after_tool_results():
    init = rollout_set([TOOL_MASK, TOOL_MASK, [1, 1, 1]], [0, 0, 1], [1.0, 0.0, 0.0])
    n = int(init.cu_seqlens[-1])
    always = arpo(budget=3, alpha=1.0, beta=0.0)  # U(0,1) <= 1: every tool result branches
    b = always.branch_points(init, torch.rand(n), no_scores(init), torch.ones(n, dtype=torch.bool),
                             torch.Generator().manual_seed(0))
    assert list(zip(b.parent.tolist(), b.position.tolist())) == [(0, 3), (0, 7), (1, 3)]
    # prompt 0 used its budget of 3; prompt 1 had no tool call: all 3 as independent samples
    assert b.fill.tolist() == [0, 3]
    never = arpo(budget=3, alpha=-1.0, beta=0.0)
    b = never.branch_points(init, torch.rand(n), no_scores(init), torch.ones(n, dtype=torch.bool),
                            torch.Generator())
    assert len(b.parent) == 0 and b.fill.tolist() == [3, 3]


def test_arpo_follows_the_entropy_change():
    init = rollout_set([TOOL_MASK], [0], [0.0])
    entropy = torch.zeros(len(TOOL_MASK))
    entropy[[0, 1]] = 1.0  # the first k = 2 model tokens of the response
    entropy[[4, 5]] = 3.0  # after the first tool result: entropy rose
    entropy[[8, 9]] = 0.1  # after the second: entropy fell
    n = len(TOOL_MASK)
    algo = arpo(budget=4, alpha=0.0, beta=1e6)  # branch iff ΔH > U / beta ≈ 0
    for seed in range(5):
        b = algo.branch_points(init, entropy, no_scores(init), torch.ones(n, dtype=torch.bool),
                               torch.Generator().manual_seed(seed))
        assert list(zip(b.parent.tolist(), b.position.tolist())) == [(0, 3)]


def test_arpo_trains_branches_with_group_advantages():
    algo = arpo(budget=2, alpha=1.0, beta=0.0)
    init = rollout_set([TOOL_MASK, TOOL_MASK], [0, 0], [1.0, 0.0])
    n = int(init.cu_seqlens[-1])
    branching = algo.branch_points(init, torch.rand(n), no_scores(init),
                                   torch.ones(n, dtype=torch.bool), torch.Generator())
    branches = rollout_set([TOOL_MASK[:5], TOOL_MASK[:9]], [0, 0], [1.0, 1.0])
    adv = algo.advantages(init, branches, branching)
    assert len(adv.train) == 4 and not adv.future_kl
    per_seq = grpo_reference([1.0, 0.0, 1.0, 1.0], [0, 0, 0, 0])
    expected = torch.tensor(per_seq).repeat_interleave(torch.tensor([11, 11, 5, 9]))
    torch.testing.assert_close(adv.adv_tok, expected.float())


def test_unknown_algorithm_is_named():
    with pytest.raises(ValueError, match="unknown algorithm 'ppo'"):
        get_algorithm("ppo", AlgorithmConfig(), n=2, vocab_size=V)
