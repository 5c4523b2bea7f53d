"""Held-out evaluation (appo/evaluate.py): what it counts, how it batches, greedy decoding.

Counting is checked against an engine with canned responses (every outcome known in advance); the
plumbing through a real engine (prompts, tool results, the EOS left out of the text) against the
scripted Llama of tests/scripted_model.py.
"""

import pytest

from appo.evaluate import GREEDY_TEMPERATURE, EvalResult, evaluate, response_text
from appo.models import char_tokenizer
from appo.rollout.base import Sample, SamplingParams
from appo.rollout.format import format_tool_result
from appo.rollout.hf import HFEngine
from appo.rollout.protocol import PROMPT_END, TagProtocol
from appo.tasks import Problem, Task, get_task
from conftest import DEVICE
from scripted_model import TOOL, scripted_llama


class CannedEngine:
    """Answers each prompt with the response `respond(prompt_text, k)` for its k-th sample, model
    text and tool results marked as the rollout loop marks them, EOS at the end."""

    def __init__(self, tokenizer, respond):
        self.tokenizer, self.respond, self.calls = tokenizer, respond, []
        self.protocol = TagProtocol(tokenizer)

    def generate(self, prompts, n, sampling):
        self.calls.append((len(prompts), n, sampling))
        tok, out = self.tokenizer, []
        for i, prompt in enumerate(prompts):
            text = tok.decode(prompt, skip_special_tokens=True).removesuffix(PROMPT_END)
            for k in range(n):
                sample = Sample(prompt_ids=list(prompt), prompt_index=i, finish_reason="stop")
                for piece, is_model in self.respond(text, k):
                    ids = tok(piece, add_special_tokens=False).input_ids
                    sample.response_ids += ids
                    sample.response_mask += [int(is_model)] * len(ids)
                    sample.n_tool_calls += not is_model
                sample.response_ids.append(tok.eos_token_id)
                sample.response_mask.append(1)
                sample.response_logprobs = [0.0] * len(sample.response_ids)
                out.append(sample)
        return out


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def test_counts_exact_matches_format_errors_and_wrong_answers(tokenizer):
    task = get_task("calc")
    problems = task.split("eval")[:4]
    answers = {p.prompt: p.answer for p in problems}
    call = [("<calculator>1+1</calculator>", True), (format_tool_result("2"), False)]
    # per problem: exact (after one tool call), exact as "15.0", wrong, bad format
    kinds = {p.prompt: kind for p, kind in zip(problems, ("exact", "float", "wrong", "bad"))}

    def respond(prompt, k):
        answer = answers[prompt]
        return {"exact": call + [(f"<answer>{answer}</answer>", True)],
                "float": [(f"<answer>{answer}.0</answer>", True)],
                "wrong": [(f"<answer>{int(answer) + 1}</answer>", True)],
                "bad": call + [(answer, True)]}[kinds[prompt]]

    engine = CannedEngine(tokenizer, respond)
    result = evaluate(engine, task, n_problems=4)
    assert result.n == 4
    assert result.accuracy == 2 / 4 and result.format_error_rate == 1 / 4
    assert result.mean_reward == pytest.approx((1 + 1 + 0 - 1) / 4)
    assert result.mean_tool_calls == 2 / 4
    def n_tokens(text):
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    lengths = [sum(n_tokens(piece) for piece, _ in respond(p.prompt, 0)) + 1  # + EOS
               for p in problems]
    assert result.mean_response_len == pytest.approx(sum(lengths) / 4)


def test_batches_samples_and_seeds(tokenizer):
    task = get_task("calc")
    engine = CannedEngine(tokenizer, lambda prompt, k: [("<answer>0</answer>", True)])
    result = evaluate(engine, task, n_problems=5, n_samples=3, batch_size=2,
                      sampling=SamplingParams(temperature=0.7, seed=11))
    assert result.n == 15
    assert [(rows, n) for rows, n, _ in engine.calls] == [(2, 3), (2, 3), (1, 3)]
    seeds = [s.seed for _, _, s in engine.calls]
    assert len(set(seeds)) == 3  # the chunks draw independent samples
    assert all(s.temperature == 0.7 for _, _, s in engine.calls)


def test_whole_split_by_default(tokenizer):
    task = get_task("calc", n_eval=7)
    engine = CannedEngine(tokenizer, lambda prompt, k: [("<answer>0</answer>", True)])
    assert evaluate(engine, task, batch_size=3).n == 7
    assert evaluate(engine, task, split="train", n_problems=4).n == 4


def test_greedy_overrides_the_temperature(tokenizer):
    task = get_task("calc")
    engine = CannedEngine(tokenizer, lambda prompt, k: [("<answer>0</answer>", True)])
    evaluate(engine, task, n_problems=2, greedy=True,
             sampling=SamplingParams(temperature=1.0, max_response_len=99, seed=3))
    (_, _, sampling), = engine.calls
    assert sampling.temperature == GREEDY_TEMPERATURE and sampling.max_response_len == 99


class ToolCountTask(Task):
    """Problems "p0", "p1", ... whose reward says how many tool calls the response made: 1 for
    exactly one, 0 for more, -1 for none. It fails the test if the EOS reaches the text."""

    name, tool_names = "tool-count", (TOOL,)

    def __init__(self, n):
        self.problems = [Problem(f"p{i}", "") for i in range(n)]

    def split(self, name):
        return list(self.problems)

    def reward(self, response_text, problem):
        assert "<eos>" not in response_text
        calls = response_text.count("<result>")
        return 1.0 if calls == 1 else 0.0 if calls > 1 else -1.0


def reverse(arguments: str) -> str:
    return arguments[::-1]


@pytest.fixture(scope="module")
def scripted_engine():
    return HFEngine(scripted_llama().to(DEVICE), char_tokenizer(tags=False), tools={TOOL: reverse})


def test_real_engine_matches_scoring_its_samples(scripted_engine, tokenizer):
    task = ToolCountTask(6)
    sampling = SamplingParams(max_response_len=80, max_tool_calls=3, seed=5)
    result = evaluate(scripted_engine, task, n_samples=4, sampling=sampling)
    samples = scripted_engine.generate([scripted_engine.protocol.encode_prompt(p.prompt) for p in task.problems],
                                       4, sampling)
    rewards = [task.reward(response_text(scripted_engine.protocol, s), task.problems[s.prompt_index])
               for s in samples]
    assert {-1.0, 0.0, 1.0} <= set(rewards)  # every outcome occurs, so the counts are tested
    n = len(samples)
    assert result == EvalResult(
        accuracy=rewards.count(1.0) / n, format_error_rate=rewards.count(-1.0) / n,
        mean_reward=sum(rewards) / n, mean_tool_calls=sum(s.n_tool_calls for s in samples) / n,
        mean_response_len=sum(len(s.response_ids) for s in samples) / n, n=n)


def test_response_text_leaves_out_the_eos_only(scripted_engine, tokenizer):
    prompts = [scripted_engine.protocol.encode_prompt(f"p{i}") for i in range(6)]
    samples = scripted_engine.generate(prompts, 4, SamplingParams(max_response_len=80, seed=5))
    stopped = [s for s in samples if s.finish_reason == "stop"]
    assert stopped, "the scripted model ends some samples with EOS"
    for s in stopped:
        assert s.response_ids[-1] == tokenizer.eos_token_id
        assert response_text(scripted_engine.protocol, s) == tokenizer.decode(s.response_ids[:-1])


def test_greedy_is_deterministic(scripted_engine, tokenizer):
    task = ToolCountTask(3)
    results = [evaluate(scripted_engine, task, greedy=True, n_samples=2,
                        sampling=SamplingParams(max_response_len=30, seed=seed))
               for seed in (0, 1)]
    assert results[0] == results[1]


def test_bad_arguments_raise(tokenizer):
    task = get_task("calc")
    engine = CannedEngine(tokenizer, lambda prompt, k: [])
    with pytest.raises(ValueError, match="n_problems"):
        evaluate(engine, task, n_problems=0)
    with pytest.raises(ValueError, match="n_samples"):
        evaluate(engine, task, n_samples=0)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(engine, task, batch_size=0)
    with pytest.raises(ValueError, match="split"):
        evaluate(engine, task, split="test")
    with pytest.raises(ValueError, match="no problems"):
        evaluate(engine, get_task("calc", n_eval=0))
