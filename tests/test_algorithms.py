"""The algorithms (appo/algorithms.py) on hand-made rollouts: which sequences are trained, where
branches go, and the per-token advantages, against plain float64 formulas written here. Forking
goes through a fake step context that records what was asked and answers with made-up rewards."""

import math
from types import SimpleNamespace

import pytest
import torch

from appo.algorithms import (PackedRollouts, StepContext, algorithm_names, get_algorithm,
                             register_algorithm)
from appo.config import AlgorithmConfig, Config, from_dict
from appo.rollout.base import Sample
from appo_kernels import future_kl_scale

V = 50


def sample(mask, prompt_index=0):
    n = len(mask)
    return Sample(prompt_ids=[1, 2], response_ids=torch.randint(3, V, (n,)).tolist(),
                  response_mask=list(mask), response_logprobs=(-torch.rand(n)).tolist(),
                  prompt_index=prompt_index)


def rollout_set(masks, groups, rewards):
    return PackedRollouts.of([sample(m, g) for m, g in zip(masks, groups)], groups, rewards)


def grpo_reference(rewards, groups, eps=1e-6):
    out = []
    for r, g in zip(rewards, groups):
        members = [x for x, h in zip(rewards, groups) if h == g]
        mean = sum(members) / len(members)
        std = math.sqrt(sum((x - mean) ** 2 for x in members) / len(members))
        out.append(0.0 if len(members) == 1 else (r - mean) / (std + eps))
    return out


class FakeContext:
    """Forks copy the parent's prefix and append one model token; their rewards, the entropy of
    their tokens and independent samples come from the given lists."""

    def __init__(self, rewards=(), entropy=None, fill_rewards=(), generator_seed=0):
        self.rewards, self.entropy, self.fill_rewards = list(rewards), entropy, list(fill_rewards)
        self.forks, self.generated = [], []
        self.generator = torch.Generator().manual_seed(generator_seed)

    def fork(self, parents, positions, groups):
        self.forks.append(list(zip(parents, positions, groups)))
        samples = [Sample(prompt_ids=p.prompt_ids, response_ids=p.response_ids[:e + 1] + [7],
                          response_mask=p.response_mask[:e + 1] + [1],
                          response_logprobs=p.response_logprobs[:e + 1] + [-0.5])
                   for p, e in zip(parents, positions)]
        rewards = [self.rewards.pop(0) if self.rewards else 0.0 for _ in samples]
        return PackedRollouts.of(samples, groups, rewards)

    def generate(self, wanted):
        self.generated.append(list(wanted))
        return rollout_set([[1, 1]] * len(wanted), wanted,
                           [self.fill_rewards.pop(0) if self.fill_rewards else 0.0
                            for _ in wanted])

    def stats(self, rollouts):
        n = int(rollouts.cu_seqlens[-1])
        entropy = self.entropy(rollouts) if self.entropy else torch.rand(n)
        return SimpleNamespace(logprob=torch.zeros(n), entropy=entropy)

    def context(self, eligible=None):
        return StepContext(self.fork, self.generate, self.stats,
                           eligible or (lambda r: r.mask.clone()), self.generator)


def policy(logprob, entropy):
    return SimpleNamespace(logprob=logprob, entropy=entropy)


# ----------------------------------------------------------------------------------------------
# the registry

def test_the_registry_is_the_list_of_algorithms(monkeypatch):
    from appo import algorithms

    assert algorithm_names() == ("grpo", "appo", "arpo")
    with pytest.raises(ValueError, match="unknown algorithm 'ppo'"):
        get_algorithm("ppo", AlgorithmConfig(), n=2, vocab_size=V)
    monkeypatch.setattr(algorithms._ALGORITHMS, "entries", dict(algorithms._ALGORITHMS.entries))

    @register_algorithm("greedy-test")
    class Greedy(algorithms.GRPO):
        pass

    assert Greedy.name == "greedy-test"
    from_dict({"algorithm.adv_estimator": "greedy-test"}).validate()  # config reads it
    with pytest.raises(ValueError, match="adv_estimator must be one of"):
        from_dict({"algorithm.adv_estimator": "nope"}).validate()


def test_the_paper_order_needs_two_minibatches():
    config = from_dict({"data.train_batch_size": 4, "actor_rollout_ref.actor.ppo_mini_batch_size": 4})
    with pytest.raises(ValueError, match="branch_after_update must be false when the update has"):
        config.validate()
    from_dict({"data.train_batch_size": 4, "actor_rollout_ref.actor.ppo_mini_batch_size": 4,
               "actor_rollout_ref.actor.ppo_epochs": 2}).validate()
    Config().validate()  # the default: 16 prompts in mini-batches of 8


# ----------------------------------------------------------------------------------------------
# GRPO

def test_grpo_samples_the_whole_budget_and_trains_everything():
    config = AlgorithmConfig(adv_estimator="grpo", branch_budget=3)
    algo = get_algorithm("grpo", config, n=2, vocab_size=V)
    assert algo.initial_rollouts() == 5 and not algo.updates_before_branching
    rewards, groups = [1.0, 0.0, -1.0, 1.0, 0.0], [0, 0, 0, 1, 1]
    init = rollout_set([[1, 1, 0, 1]] * 5, groups, rewards)
    fake = FakeContext()
    branched = algo.branch(init, policy(torch.zeros(20), torch.rand(20)), fake.context())
    assert branched.branches is None and not fake.forks and not fake.generated
    adv = algo.advantages(init, branched)
    assert adv.train is init
    expected = torch.tensor(grpo_reference(rewards, groups)).repeat_interleave(4)
    torch.testing.assert_close(adv.adv_tok, expected.float())
    adv_in = torch.randn(20)
    assert algo.adjust(adv_in, torch.randn(20), torch.randn(20), init.cu_seqlens,
                       init.mask, 3.0) is adv_in


# ----------------------------------------------------------------------------------------------
# APPO

def appo_setup(**options):
    config = AlgorithmConfig(adv_estimator="appo", branch_budget=2, **options)
    algo = get_algorithm("appo", config, n=3, vocab_size=V)
    lengths, groups = [5, 4, 6, 3, 5, 4], [0, 0, 0, 1, 1, 1]
    init = rollout_set([[1] * n for n in lengths], groups, [1.0, 0.0, 0.0, -1.0, 1.0, 1.0])
    return algo, init, lengths, groups


def brute_scores(logprob, rollout_logprob, entropy, cu, clip=(0.8, 1.2)):
    """Ω by its definition (a loop over suffixes), z-scores per rollout, their product."""
    score, log_omega = [], []
    for s in range(len(cu) - 1):
        lo, hi = cu[s], cu[s + 1]
        gains = [float(logprob[t] - rollout_logprob[t]) for t in range(lo, hi)]
        suffix = [sum(gains[i:]) for i in range(hi - lo)]
        omega = [min(max(math.exp(x), clip[0]), clip[1]) for x in suffix]
        ent = [float(entropy[t]) for t in range(lo, hi)]

        def z(xs):
            mean = sum(xs) / len(xs)
            std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
            return [(x - mean) / (std + 1e-6) for x in xs]

        score += [a * b for a, b in zip(z(ent), z(omega))]
        mean = sum(suffix) / len(suffix)
        log_omega.append(math.sqrt(sum((x - mean) ** 2 for x in suffix) / len(suffix)))
    return score, sum(log_omega) / len(log_omega)


def test_appo_branches_where_the_updated_policy_gained_and_credits_the_procedure():
    algo, init, lengths, groups = appo_setup(omega_clip=(0.01, 100.0))
    assert algo.updates_before_branching  # the paper's order is the default
    n_tok = sum(lengths)
    # an updated policy: its log-probs differ from the sampler's by up to ±0.5 nats a token
    logprob = init.rollout_logprob + (torch.rand(n_tok) - 0.5)
    entropy = torch.rand(n_tok) * 3
    fake = FakeContext(rewards=[1.0, -1.0, 0.0, 1.0])
    branched = algo.branch(init, policy(logprob, entropy), fake.context())
    cu = init.cu_seqlens.tolist()
    score, omega_log_std = brute_scores(logprob, init.rollout_logprob, entropy, cu,
                                        clip=(0.01, 100.0))
    torch.testing.assert_close(branched.scores.score, torch.tensor(score, dtype=torch.float32),
                               atol=1e-4, rtol=1e-4)
    assert branched.metrics["omega_log_std"] == pytest.approx(omega_log_std, rel=1e-5)
    # per prompt: its strict tokens first by score, then the rest by score
    strict = branched.scores.strict.tolist()
    for g in (0, 1):
        tokens = sorted(((not strict[t], -score[t], s, t - cu[s]) for s in range(6)
                         if groups[s] == g for t in range(cu[s], cu[s + 1])))
        chosen = [(int(p), int(q)) for p, q in zip(branched.branching.parent,
                                                   branched.branching.position)
                  if groups[int(p)] == g]
        assert chosen == [(s, pos) for _, _, s, pos in tokens[:2]]
    (call,) = fake.forks  # one fork call, with each parent's prompt group
    assert [(init.samples.index(p), e, g) for p, e, g in call] == [
        (int(p), int(e), groups[int(p)]) for p, e in zip(branched.branching.parent,
                                                        branched.branching.position)]
    assert branched.metrics["branch_strict_fraction"] == pytest.approx(
        sum(strict[cu[int(p)] + int(e)] for p, e in zip(branched.branching.parent,
                                                       branched.branching.position)) / 4)
    adv = algo.advantages(init, branched)
    assert adv.train is init  # the loss covers the initial rollouts only
    seq_adv = grpo_reference(init.rewards.tolist(), groups)
    branch_groups = [groups[int(p)] for p in branched.branching.parent]
    branch_adv = grpo_reference([1.0, -1.0, 0.0, 1.0], branch_groups)
    expected = []
    for s in range(6):
        for t in range(lengths[s]):
            later = [branch_adv[b] for b in range(4) if int(branched.branching.parent[b]) == s
                     and int(branched.branching.position[b]) >= t]
            expected.append(seq_adv[s] + (sum(later) / len(later) if later else 0.0))
    torch.testing.assert_close(adv.adv_tok, torch.tensor(expected, dtype=torch.float32))


def test_appo_initial_advantages_and_future_kl_adjustment():
    algo, init, lengths, groups = appo_setup()
    expected = torch.tensor(grpo_reference(init.rewards.tolist(), groups))
    torch.testing.assert_close(algo.initial_advantages(init),
                               expected.repeat_interleave(torch.tensor(lengths)).float())
    n = sum(lengths)
    adv, logprob, old = torch.randn(n), torch.randn(n) * 0.1, torch.randn(n) * 0.1
    got = algo.adjust(adv, logprob, old, init.cu_seqlens, init.mask, 3.0)
    want = future_kl_scale(adv, logprob, old, init.cu_seqlens, init.mask, clip_c=3.0)
    torch.testing.assert_close(got, want)
    plain = get_algorithm("appo", AlgorithmConfig(use_future_kl=False), n=3, vocab_size=V)
    assert plain.adjust(adv, logprob, old, init.cu_seqlens, init.mask, 3.0) is adv


def test_appo_random_branch_points_are_eligible_and_vary_with_the_draw():
    algo, init, lengths, groups = appo_setup(appo_random_branch_points=True)
    n = sum(lengths)
    eligible = torch.rand(n) > 0.4
    picks = set()
    for seed in range(6):
        fake = FakeContext(generator_seed=seed)
        b = algo.branch(init, policy(torch.zeros(n), torch.rand(n)),
                        fake.context(lambda r: eligible)).branching
        starts = init.cu_seqlens[b.parent] + b.position
        assert eligible[starts].all() and len(b.parent) == 4
        picks.add(tuple(starts.tolist()))
    assert len(picks) > 1


def test_appo_without_branches_is_grpo_on_the_initial_group():
    config = AlgorithmConfig(adv_estimator="appo", branch_budget=0)
    algo = get_algorithm("appo", config, n=2, vocab_size=V)
    init = rollout_set([[1, 1], [1, 0, 1]], [0, 0], [1.0, 0.0])
    branched = algo.branch(init, policy(init.rollout_logprob, torch.rand(5)),
                           FakeContext().context())
    assert branched.branches is None and len(branched.branching.parent) == 0
    assert branched.metrics["omega_log_std"] == 0.0  # the sampling policy: Ω ≡ 1
    adv = algo.advantages(init, branched)
    torch.testing.assert_close(adv.adv_tok, torch.tensor([1.0, 1, -1, -1, -1]), atol=1e-5,
                               rtol=0)


# ----------------------------------------------------------------------------------------------
# ARPO

# model (1) and tool (0) tokens: tool results end at positions 3 and 7
TOOL_MASK = [1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1]


def arpo(budget, alpha, beta, k=2, depth=1):
    config = AlgorithmConfig(adv_estimator="arpo", branch_budget=budget, arpo_alpha=alpha,
                             arpo_beta=beta, arpo_entropy_tokens=k, arpo_max_depth=depth)
    return get_algorithm("arpo", config, n=2, vocab_size=V)


def points(branched):
    b = branched.branching
    return list(zip(b.parent.tolist(), b.position.tolist(), b.depth.tolist()))


def test_arpo_spends_its_budget_breadth_first_after_tool_results():
    init = rollout_set([TOOL_MASK, TOOL_MASK, [1, 1, 1]], [0, 0, 1], [1.0, 0.0, 0.0])
    n = int(init.cu_seqlens[-1])
    always = arpo(budget=3, alpha=1.0, beta=0.0)  # clamp(U) <= 1: every tool result branches
    fake = FakeContext(fill_rewards=[1.0, 0.0, 1.0])
    branched = always.branch(init, policy(torch.zeros(n), torch.rand(n)), fake.context())
    # every rollout's first tool result before any second one
    assert points(branched) == [(0, 3, 1), (1, 3, 1), (0, 7, 1)]
    # prompt 0 used its budget of 3; prompt 1 had no tool call: 3 independent samples
    assert branched.branching.fill.tolist() == [0, 3] and fake.generated == [[1, 1, 1]]
    assert len(branched.branches) == 6 and branched.branches.group.tolist() == [0, 0, 0, 1, 1, 1]
    never = arpo(budget=3, alpha=-1.0, beta=0.0)
    fake = FakeContext()
    branched = never.branch(init, policy(torch.zeros(n), torch.rand(n)), fake.context())
    assert points(branched) == [] and fake.generated == [[0, 0, 0, 1, 1, 1]]


def test_arpo_sums_the_entropy_of_a_turn_as_its_code_does():
    """ΔH = (Σ entropy of the first k tokens after the tool result − Σ of the first turn's
    first k) / ln V, and a point branches when clamp(U − β·ΔH, 0, 1) ≤ α."""
    init = rollout_set([TOOL_MASK], [0], [0.0])
    entropy = torch.zeros(len(TOOL_MASK))
    entropy[[0, 1]] = torch.tensor([1.0, 2.0])  # first turn: sum 3
    entropy[[4, 5, 6]] = torch.tensor([3.0, 3.0, 9.0])  # after the first result: k=2 → sum 6
    entropy[[8, 9]] = torch.tensor([0.1, 0.2])  # after the second: 0.3
    n = len(TOOL_MASK)
    beta = 0.5
    algo = arpo(budget=4, alpha=0.3, beta=beta)
    deltas = [(6.0 - 3.0) / math.log(V), (0.3 - 3.0) / math.log(V)]
    for seed in range(8):
        fake = FakeContext(generator_seed=seed)
        draws = torch.rand(2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        branched = algo.branch(init, policy(torch.zeros(n), entropy), fake.context())
        expected = [(0, e, 1) for e, u, d in zip((3, 7), draws.tolist(), deltas)
                    if min(1.0, max(0.0, u - beta * d)) <= 0.3]
        assert points(branched) == expected
        assert branched.metrics["arpo_beta_dh_min"] == pytest.approx(beta * min(deltas))
        assert branched.metrics["arpo_beta_dh_max"] == pytest.approx(beta * max(deltas))


def test_arpo_forks_branch_again_up_to_the_depth_limit():
    """A fork kept up to its parent's first tool result; here the fake forks go on with model
    tokens, a tool result and more model tokens, so each has one candidate of its own."""
    init = rollout_set([TOOL_MASK], [0], [0.0])
    n = len(TOOL_MASK)

    class Deeper(FakeContext):
        def fork(self, parents, positions, groups):
            self.forks.append(list(zip(parents, positions, groups)))
            samples = [Sample(prompt_ids=p.prompt_ids,
                              response_ids=p.response_ids[:e + 1] + [5, 5, 6, 6, 5, 5],
                              response_mask=p.response_mask[:e + 1] + [1, 1, 0, 0, 1, 1],
                              response_logprobs=p.response_logprobs[:e + 1] + [-0.1] * 6)
                       for p, e in zip(parents, positions)]
            return PackedRollouts.of(samples, groups, [0.0] * len(samples))

    for depth, expected in [(1, [(0, 3, 1), (0, 7, 1)]),
                            (2, [(0, 3, 1), (0, 7, 1), (1, 7, 2), (2, 11, 2)])]:
        fake = Deeper()
        branched = arpo(budget=4, alpha=1.0, beta=0.0, depth=depth).branch(
            init, policy(torch.zeros(n), torch.rand(n)), fake.context())
        assert points(branched) == expected, depth
        assert len(fake.forks) == depth
    # depth 2: the second round forks the forks (pool indices 1 and 2: after the init rollout)
    assert [e for _, e, _ in fake.forks[1]] == [7, 11]
    # a budget spent in the first round ends the branching there (no second round)
    fake = Deeper()
    branched = arpo(budget=2, alpha=1.0, beta=0.0, depth=2).branch(
        init, policy(torch.zeros(n), torch.rand(n)), fake.context())
    assert points(branched) == [(0, 3, 1), (0, 7, 1)] and len(fake.forks) == 1


def test_arpo_trains_branches_with_group_advantages():
    algo = arpo(budget=2, alpha=1.0, beta=0.0)
    init = rollout_set([TOOL_MASK, TOOL_MASK], [0, 0], [1.0, 0.0])
    n = int(init.cu_seqlens[-1])
    fake = FakeContext(rewards=[1.0, 1.0])
    branched = algo.branch(init, policy(torch.zeros(n), torch.rand(n)), fake.context())
    assert points(branched) == [(0, 3, 1), (1, 3, 1)]
    adv = algo.advantages(init, branched)
    assert len(adv.train) == 4
    per_seq = grpo_reference([1.0, 0.0, 1.0, 1.0], [0, 0, 0, 0])
    expected = torch.tensor(per_seq).repeat_interleave(torch.tensor([11, 11, 5, 5]))
    torch.testing.assert_close(adv.adv_tok, expected.float())
