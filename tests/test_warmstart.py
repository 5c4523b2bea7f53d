"""The supervised warm start (appo/warmstart.py) on the embedded default model and `calc` task."""

import random

import pytest
import torch

from appo.models import load_default
from appo.rollout.protocol import TagProtocol
from appo.tasks import get_task
from appo.warmstart import (WarmStartConfig, accumulate_loss, encode_demonstration, lr_factor,
                            warm_start)


def test_demonstration_masks_prompt_and_tool_results():
    _, tokenizer = load_default()
    task = get_task("calc")
    problem = task.split("train")[0]
    response = task.demonstration(problem, random.Random(0))
    prompt_ids = TagProtocol(tokenizer).encode_prompt(problem.prompt)
    ids, mask = encode_demonstration(tokenizer, prompt_ids, response)
    assert len(ids) == len(mask) and ids[-1] == tokenizer.eos_token_id and mask[-1] == 1
    assert ids[:len(prompt_ids)] == prompt_ids and not any(mask[:len(prompt_ids)])
    body = ids[len(prompt_ids):-1]
    assert tokenizer.decode(body) == response
    model_text = "".join(tokenizer.decode([i]) for i, m in zip(body, mask[len(prompt_ids):-1])
                         if m)
    tool_text = "".join(tokenizer.decode([i]) for i, m in zip(body, mask[len(prompt_ids):-1])
                        if not m)
    assert "<result>" not in model_text and tool_text.startswith("<result>")
    assert "<calculator>" in model_text and "<answer>" in model_text


def test_warm_start_lowers_the_loss():
    torch.manual_seed(0)
    model, tokenizer = load_default()
    before = [p.detach().clone() for p in model.parameters()]
    losses = warm_start(model, tokenizer, get_task("calc"),
                        WarmStartConfig(steps=12, batch_size=8), progress=False)
    assert len(losses) == 12
    # from ~log(vocab) ≈ 4.6 nats per token the loss falls fast on this regular format
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not model.training  # restored to eval mode


@pytest.mark.parametrize("max_ratio", [1.0, 1.5, float("inf")])
def test_length_grouped_loss_matches_each_example_alone(max_ratio):
    """The loss and gradient of accumulate_loss (examples grouped by length, padded within a
    group) equal those of every example run alone without padding, in float64."""
    model, tokenizer = load_default(dtype=torch.float64)
    task = get_task("calc")
    rng = random.Random(1)
    examples = []
    for i, problem in enumerate(task.split("train")[:7]):
        response = task.direct_answer(problem) if i % 3 else task.demonstration(problem, rng)
        examples.append(encode_demonstration(tokenizer, TagProtocol(tokenizer).encode_prompt(problem.prompt),
                                             response))
    assert len({len(ids) for ids, _ in examples}) > 2  # long and short: several groups
    model.zero_grad()
    loss = accumulate_loss(model, examples, tokenizer.pad_token_id, max_ratio=max_ratio)
    grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    n_loss = sum(sum(mask[1:]) for _, mask in examples)
    reference = 0.0
    for ids, mask in examples:
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        logprob = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        nll = -(logprob * torch.tensor(mask[1:], dtype=torch.float64)).sum() / n_loss
        nll.backward()
        reference += nll.item()
    assert loss == pytest.approx(reference, rel=1e-10)
    for got, p in zip(grads, model.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-8, atol=1e-12)


def test_lr_warms_up_then_decays_to_the_final_ratio():
    config = WarmStartConfig(steps=100, warmup_steps=10, final_lr_ratio=0.1)
    factors = [lr_factor(step, config) for step in range(config.steps)]
    assert factors[:10] == [pytest.approx((s + 1) / 10) for s in range(10)]
    assert factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # cosine: never rises again
    assert lr_factor(config.steps, config) == pytest.approx(0.1)


class _CountingCalc:
    """The calc task, counting which kind of response the warm start asked for."""

    def __init__(self):
        self.task = get_task("calc")
        self.demonstrations = self.direct = 0

    def split(self, name):
        return self.task.split(name)

    def demonstration(self, problem, rng):
        self.demonstrations += 1
        return self.task.demonstration(problem, rng)

    def direct_answer(self, problem):
        self.direct += 1
        return self.task.direct_answer(problem)


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_direct_share_mixes_answer_only_demonstrations(share):
    model, tokenizer = load_default()
    task = _CountingCalc()
    warm_start(model, tokenizer, task,
               WarmStartConfig(steps=3, batch_size=16, direct_share=share), progress=False)
    assert task.demonstrations + task.direct == 48
    if share == 0.0:
        assert task.direct == 0
    elif share == 1.0:
        assert task.demonstrations == 0
    else:  # Binomial(48, 0.5): outside [10, 38] has probability < 1e-4 (and the seed is fixed)
        assert 10 <= task.direct <= 38


def test_direct_answer_is_well_formed_and_uses_no_tool():
    task = get_task("calc")
    problem = task.split("eval")[0]
    text = task.direct_answer(problem)
    assert text == f"<answer>{problem.answer}</answer>" and task.reward(text, problem) == 1.0


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_direct_share_out_of_range_is_refused(share):
    with pytest.raises(ValueError, match="direct_share"):
        WarmStartConfig(direct_share=share)
