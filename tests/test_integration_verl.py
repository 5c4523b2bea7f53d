"""appo inside verl (docs/integration.md, verl): the registered estimator and policy loss against
verl's own GRPO estimator and `vanilla` loss (verl 0.9.1, its core_algos as installed by
`make test`), the dual-group estimator against a loop, the helpers against float64. verl is a test
dependency: these tests never skip."""

import importlib

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import appo_kernels.integrations.verl as appo_verl
from verl.trainer.ppo import core_algos

MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
         "seq-mean-token-sum-norm"]


@pytest.fixture
def registered(monkeypatch):
    """register() with verl's registries and helpers restored after the test."""
    monkeypatch.setattr(core_algos, "ADV_ESTIMATOR_REGISTRY", dict(core_algos.ADV_ESTIMATOR_REGISTRY))
    monkeypatch.setattr(core_algos, "POLICY_LOSS_REGISTRY", dict(core_algos.POLICY_LOSS_REGISTRY))
    for module_name in appo_verl.HELPER_MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception:
            continue
        for name in appo_verl.HELPERS:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, getattr(module, name))
    for module_name, name in appo_verl.FUSED_MODULES.items():
        try:
            module = importlib.import_module(module_name)
        except Exception:
            continue
        monkeypatch.setattr(module, name, getattr(module, name))
    return appo_verl.register


def rewards_and_uids(n=11, width=7):
    uid = np.array(["p0", "p1", "p0", "p2", "p1", "p0", "p1", "p3", "p2", "p2", "p1"][:n],
                   dtype=object)  # p3 is a lone response
    scores = torch.randn(n)
    mask = (torch.arange(width)[None, :] < torch.randint(1, width + 1, (n, 1))).float()
    rewards = torch.zeros(n, width)
    rewards[torch.arange(n), (mask.sum(-1) - 1).long()] = scores  # verl: the reward at the end
    return rewards, mask, uid


@pytest.mark.parametrize("normalize", [True, False])
def test_the_estimator_equals_verls_grpo(registered, normalize):
    registered()
    rewards, mask, uid = rewards_and_uids()
    config = OmegaConf.create({"norm_adv_by_std_in_grpo": normalize})
    ours, returns = core_algos.get_adv_estimator_fn("appo")(
        token_level_rewards=rewards, response_mask=mask, index=uid, config=config)
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uid,
                                                          norm_adv_by_std_in_grpo=normalize)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours, returns)


def test_the_dual_group_estimator_against_a_loop(registered):
    registered()
    width = 6
    uid = np.array(["a", "a", "b", "b", "a", "a", "b", "b"], dtype=object)
    parent = np.array([-1, -1, -1, -1, 0, 0, 3, 3])  # rows 4-7 are branches
    position = np.array([0, 0, 0, 0, 2, 4, 1, 5])
    rewards = torch.zeros(8, width)
    rewards[:, -1] = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    mask = torch.ones(8, width)
    adv, _ = core_algos.get_adv_estimator_fn("appo")(
        token_level_rewards=rewards, response_mask=mask, index=uid,
        non_tensor_batch={"appo_branch_parent": parent, "appo_branch_position": position})
    scores = rewards.sum(-1).double()

    def group(rows):  # verl's GRPO within each uid, over the given rows
        out = {}
        for u in set(uid[rows]):
            members = [r for r in rows if uid[r] == u]
            values = scores[members]
            std = values.std() if len(members) > 1 else torch.tensor(1.0, dtype=torch.float64)
            mean = values.mean() if len(members) > 1 else 0.0
            out.update({r: (scores[r] - mean) / (std + 1e-6) for r in members})
        return out

    seq, branch = group([0, 1, 2, 3]), group([4, 5, 6, 7])
    for row in range(8):
        for t in range(width):
            if parent[row] >= 0:
                want = 0.0  # branches lend credit, they are not trained
            else:
                later = [branch[b] for b in range(4, 8) if parent[b] == row and position[b] >= t]
                want = seq[row] + (sum(later) / len(later) if later else 0.0)
            assert float(adv[row, t]) == pytest.approx(float(want), abs=1e-5), (row, t)


def loss_inputs(batch=6, width=9):
    old = -torch.rand(batch, width) * 3
    log_prob = (old + torch.empty(batch, width).uniform_(-1.5, 1.5)).requires_grad_()
    advantages = torch.randn(batch, width)
    mask = (torch.arange(width)[None, :] < torch.randint(1, width + 1, (batch, 1))).float()
    mask[2] = 0  # a fully masked row
    return old, log_prob, advantages, mask


def verl_config(global_info=None):
    return OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28,
                             "clip_ratio_c": 3.0, "global_batch_info": global_info or {}})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("global_info", [None, {"dp_size": 2, "batch_num_tokens": 61,
                                                "global_batch_size": 11,
                                                "loss_scale_factor": 12}])
def test_the_loss_equals_verls_vanilla_with_scaling_off(registered, mode, global_info):
    registered(future_kl=False, seq_filter=False)
    old, log_prob, advantages, mask = loss_inputs()
    config = verl_config(global_info)
    ours, metrics = core_algos.get_policy_loss_fn("appo")(old, log_prob, advantages, mask, mode,
                                                         config)
    grad_ours, = torch.autograd.grad(ours, log_prob)
    theirs, their_metrics = core_algos.compute_policy_loss_vanilla(old, log_prob, advantages,
                                                                   mask, mode, config)
    grad_theirs, = torch.autograd.grad(theirs, log_prob)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-5, atol=1e-7)
    for key, value in their_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_future_kl_scaling_doubles_the_advantages_at_equal_policies(registered):
    """At ratio 1 f = clamp(e^0, 1, 1.2) = 1: the loss is exactly twice verl's."""
    registered(seq_filter=False)
    old, _, advantages, mask = loss_inputs()
    log_prob = old.clone().requires_grad_()
    config = verl_config()
    ours, _ = core_algos.get_policy_loss_fn("appo")(old, log_prob, advantages, mask,
                                                   "token-mean", config)
    theirs, _ = core_algos.compute_policy_loss_vanilla(old, log_prob, advantages, mask,
                                                       "token-mean", config)
    torch.testing.assert_close(ours, 2 * theirs)


def test_a_global_count_is_required_with_several_ranks(registered):
    registered(future_kl=False)
    old, log_prob, advantages, mask = loss_inputs()
    with pytest.raises(ValueError, match="global_batch_info must give the global count"):
        core_algos.get_policy_loss_fn("appo")(old, log_prob, advantages, mask, "token-mean",
                                              verl_config({"dp_size": 2}))


def test_the_helpers_are_appos_and_match_float64(registered):
    import verl.utils.torch_functional as verl_F

    patched = registered()["helpers"]
    assert "verl.utils.torch_functional.logprobs_from_logits" in patched
    assert verl_F.logprobs_from_logits is appo_verl.logprobs_from_logits
    assert verl_F.entropy_from_logits is appo_verl.entropy_from_logits
    logits = torch.randn(4, 5, 1003) * 3
    labels = torch.randint(0, 1003, (4, 5))
    log_p = torch.log_softmax(logits.double(), -1)
    want_lp = log_p.gather(-1, labels[..., None])[..., 0]
    want_h = -(log_p.exp() * log_p).sum(-1)
    torch.testing.assert_close(verl_F.logprobs_from_logits(logits, labels).double(), want_lp,
                               rtol=0, atol=2e-6)
    torch.testing.assert_close(verl_F.entropy_from_logits(logits).double(), want_h, rtol=0,
                               atol=2e-6)
    torch.testing.assert_close(verl_F.entropy_from_logits_with_chunking(logits, 2).double(),
                               want_h, rtol=0, atol=2e-6)
    # verl's own torch formula (not patched) agrees to its float32 rounding
    torch.testing.assert_close(verl_F.logprobs_from_logits(logits, labels),
                               verl_F.logprobs_from_logits_v2(logits, labels), rtol=0, atol=1e-5)


def tiny_llama(vocab=97):
    """A random 2-layer Llama of its own subclass: verl's patch replaces the forward of the
    model's class, and must not reach other tests' Llamas."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class VerlPatchedLlama(LlamaForCausalLM):
        pass

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False)
    return VerlPatchedLlama(config).float()


def test_the_fused_kernel_forward_is_appos(registered, monkeypatch):
    """verl's model forward with use_fused_kernels (the torch backend, the one that runs on a
    CPU): before and after register(), against float64 statistics of the model's own logits;
    the gradients of the two are equal to fp32 rounding."""
    from verl.models.transformers.monkey_patch import patch_forward_with_backends
    import verl.utils.experimental.torch_functional as verl_fused

    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    log_p = torch.log_softmax(logits / 0.7, -1)
    labels = torch.roll(ids, -1, dims=-1)  # verl's shift (the last position wraps)
    want_lp = log_p.gather(-1, labels[..., None])[..., 0]
    want_h = -(log_p.exp() * log_p).sum(-1)
    patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")

    def run():
        model.zero_grad()
        out = model(input_ids=ids, return_dict=True, temperature=0.7)
        (out.log_probs.sum() + 0.3 * out.entropy.sum()).backward()
        return (out.log_probs.detach(), out.entropy.detach(),
                {n: p.grad.clone() for n, p in model.named_parameters()})

    verl_lp, verl_h, verl_grads = run()
    patched = registered()["fused"]
    assert "verl.utils.experimental.torch_functional.FusedLinearForPPO" in patched
    assert "verl.utils.kernel.linear_cross_entropy.linear_cross_entropy" in patched
    assert verl_fused.FusedLinearForPPO is appo_verl.FusedLinearForPPO
    calls = []
    ours = appo_verl.linear_token_stats
    monkeypatch.setattr(appo_verl, "linear_token_stats",
                        lambda *a, **k: calls.append(a[0].shape) or ours(*a, **k))
    lp, h, grads = run()
    assert calls == [(2, 9, 32)]  # verl's forward went through appo's op, hidden states in
    assert lp.dtype == h.dtype == torch.float32 and lp.shape == ids.shape
    torch.testing.assert_close(lp.double(), want_lp, rtol=0, atol=2e-6)
    torch.testing.assert_close(h.double(), want_h, rtol=0, atol=2e-6)
    torch.testing.assert_close(lp, verl_lp, rtol=0, atol=2e-6)
    torch.testing.assert_close(h, verl_h, rtol=0, atol=2e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, verl_grads[name], rtol=1e-4,
                                   atol=1e-5 * float(verl_grads[name].abs().max()), msg=name)


def test_the_triton_backend_replacement_matches_float64(registered):
    """verl's Triton `linear_cross_entropy` needs a GPU; its replacement's contract (flat
    float32 log-probs and entropy, what verl's forward calls) against float64."""
    import verl.utils.kernel.linear_cross_entropy as verl_lce

    registered()
    assert verl_lce.linear_cross_entropy is appo_verl.linear_cross_entropy
    hidden = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64)
    labels = torch.randint(0, 50, (2, 7))
    lp, h = verl_lce.linear_cross_entropy(hidden.float(), weight.float(), labels, 1.3, "none")
    log_p = torch.log_softmax(hidden @ weight.T / 1.3, -1)
    assert lp.shape == h.shape == (14,)
    torch.testing.assert_close(lp.double(), log_p.gather(-1, labels[..., None]).reshape(-1),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(h.double(), -(log_p.exp() * log_p).sum(-1).reshape(-1), rtol=0,
                               atol=1e-5)
    with pytest.raises(ValueError, match="reduction='none'"):
        verl_lce.linear_cross_entropy(hidden.float(), weight.float(), labels, 1.0, "mean")
    with pytest.raises(NotImplementedError, match="tensor-parallel"):
        verl_lce.linear_cross_entropy(hidden.float(), weight.float(), labels, 1.0, "none",
                                      object())
