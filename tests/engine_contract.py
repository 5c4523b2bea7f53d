"""The tests every rollout engine passes: the Engine protocol of appo.rollout.base
(docs/algorithm.md,
issue 5 item 7).

An engine's test module subclasses `EngineContract` and gives it a fixture `rollout` returning an
`EngineUnderTest`: engines serving the scripted Llama (tests/scripted_model.py, which writes
`<e>ab</e>` tool calls), the transformers model they serve (log-probs are checked against its
teacher-forced forward) and a model with other weights (for the weight push). Engine-specific
properties (KV reuse counts, prefix-cache hits) stay in the engine's own module.
"""

import time
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from appo.rollout.base import FINISH_REASONS, SamplingParams
from appo.rollout.format import format_tool_result
from scripted_model import TOOL


def reverse(arguments: str) -> str:
    return f"{arguments[::-1]}!"


@dataclass
class EngineUnderTest:
    model: torch.nn.Module  # the weights the engines serve, as a transformers model
    tokenizer: object
    make: Callable  # make(tools=..., tool_timeout=...) -> a new engine serving `model`'s weights
    other_model: torch.nn.Module  # same architecture, other weights
    logprob_atol: float  # recorded log-probs against one full float32 forward

    def engine(self, **kwargs):
        kwargs.setdefault("tools", {TOOL: reverse})
        return self.make(**kwargs)

    def prompts(self, *texts):
        return [self.tokenizer.encode(t) for t in texts]

    def assert_logprobs_match(self, samples, temperature=1.0, model=None):
        for s in samples:
            s.check_aligned()
            mask = torch.tensor(s.response_mask, dtype=torch.bool)
            recorded = torch.tensor(s.response_logprobs)
            expected = teacher_forced_logprobs(model or self.model, s, temperature)
            torch.testing.assert_close(recorded[mask], expected[mask], atol=self.logprob_atol,
                                       rtol=0)
            assert (recorded[~mask] == 0.0).all()


def teacher_forced_logprobs(model, sample, temperature):
    """log softmax(logits / T) of every response token, from one forward over the whole sequence."""
    ids = torch.tensor([sample.prompt_ids + sample.response_ids], device=model.device)
    with torch.no_grad():
        logits = model(ids).logits[0].float().cpu()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    start = len(sample.prompt_ids) - 1  # the logits predicting response token i sit at P - 1 + i
    targets = torch.tensor(sample.response_ids)
    return logp[start:start + len(targets)].gather(1, targets[:, None]).squeeze(1)


def tool_runs(sample):
    """(start, end) of each run of tool tokens (mask 0) in the response."""
    runs, start = [], None
    for i, m in enumerate(sample.response_mask + [1]):
        if m == 0 and start is None:
            start = i
        elif m == 1 and start is not None:
            runs.append((start, i))
            start = None
    return runs


def parents_and_positions(samples, position):
    parents = [s for s in samples if len(s.response_ids) > position + 1]
    assert len(parents) >= 2
    return parents, [position] * len(parents)


class EngineContract:
    """Subclass with a `rollout` fixture (an EngineUnderTest) to run these against an engine."""

    # ---- generate

    def test_generate_returns_aligned_samples_prompt_major(self, rollout):
        prompts = rollout.prompts("What is 2+3?", "Compute (1+2)*3:")
        samples = rollout.engine(tools={}).generate(prompts, 3,
                                                    SamplingParams(max_response_len=40, seed=0))
        assert len(samples) == 6
        for i, s in enumerate(samples):
            s.check_aligned()
            assert s.prompt_index == i // 3 and s.prompt_ids == prompts[i // 3]
            assert s.finish_reason in FINISH_REASONS and 1 <= len(s.response_ids) <= 40
            assert set(s.response_mask) == {1} and s.fork_of is None and s.n_tool_calls == 0
        rollout.assert_logprobs_match(samples)

    @pytest.mark.parametrize("temperature", [1.0, 0.6])
    def test_logprobs_match_teacher_forcing_after_several_tool_calls(self, rollout, temperature):
        sampling = SamplingParams(temperature=temperature, max_response_len=120, max_tool_calls=4,
                                  seed=1)
        samples = rollout.engine().generate(rollout.prompts("Q: ab", "go"), 4, sampling)
        assert max(s.n_tool_calls for s in samples) >= 2
        rollout.assert_logprobs_match(samples, temperature)

    def test_tool_results_are_masked_tool_output(self, rollout):
        tok = rollout.tokenizer
        sampling = SamplingParams(max_response_len=160, max_tool_calls=3, seed=2)
        samples = rollout.engine().generate(rollout.prompts("Q: ab"), 6, sampling)
        assert sum(s.n_tool_calls for s in samples) >= 4
        for s in samples:
            runs = tool_runs(s)
            assert len(runs) == s.n_tool_calls
            for start, end in runs:
                # special tokens sampled inside a call are not part of its text
                call = tok.decode(s.response_ids[:start], skip_special_tokens=True)
                arguments = call[call.rindex(f"<{TOOL}>") + len(TOOL) + 2:-len(f"</{TOOL}>")]
                assert call.endswith(f"</{TOOL}>")
                expected = tok.encode(format_tool_result(reverse(arguments)),
                                      add_special_tokens=False)
                if end == len(s.response_ids) and s.finish_reason == "length":
                    expected = expected[:end - start]  # cut at max_response_len
                assert s.response_ids[start:end] == expected
                assert s.response_logprobs[start:end] == [0.0] * (end - start)

    def test_seed_reproduces_and_batching_does_not_change_a_sample(self, rollout):
        sampling = SamplingParams(max_response_len=60, seed=7)
        prompts = rollout.prompts("Q: ab", "another prompt")
        first = rollout.engine().generate(prompts, 3, sampling)
        again = rollout.engine().generate(prompts, 3, sampling)
        alone = rollout.engine().generate(prompts[:1], 3, sampling)  # fewer rows beside it
        other = rollout.engine().generate(prompts, 3, SamplingParams(max_response_len=60, seed=8))
        assert [s.response_ids for s in first] == [s.response_ids for s in again]
        assert [s.response_logprobs for s in first] == [s.response_logprobs for s in again]
        assert [s.response_ids for s in first[:3]] == [s.response_ids for s in alone]
        for a, b in zip(first, alone):
            torch.testing.assert_close(a.response_logprobs, b.response_logprobs,
                                       atol=rollout.logprob_atol, rtol=0)
        assert [s.response_ids for s in first] != [s.response_ids for s in other]

    def test_identical_prompts_get_independent_samples(self, rollout):
        prompt = rollout.tokenizer.encode("Q: ab")
        sampling = SamplingParams(max_response_len=40, seed=6)
        samples = rollout.engine(tools={}).generate([prompt, prompt], 2, sampling)
        assert len({tuple(s.response_ids) for s in samples}) == 4

    def test_default_tools_come_from_the_registry(self, rollout, monkeypatch):
        from appo.rollout import tools

        monkeypatch.setattr(tools._TOOLS, "entries", dict(tools._TOOLS.entries))
        eng = rollout.engine(tools=None)
        assert {"calculator", "python"} <= set(eng.tools)
        tools.register_tool(TOOL, reverse)  # registered after the engine was made: still seen
        sampling = SamplingParams(max_response_len=80, max_tool_calls=2, seed=2)
        samples = eng.generate(rollout.prompts("Q: ab"), 4, sampling)
        assert any(s.n_tool_calls for s in samples) and eng.stats["tool_calls"] > 0

    @pytest.mark.parametrize("max_tool_calls", [0, 1, 2])
    def test_max_tool_calls(self, rollout, max_tool_calls):
        sampling = SamplingParams(max_response_len=200, max_tool_calls=max_tool_calls, seed=3)
        samples = rollout.engine().generate(rollout.prompts("Q: ab"), 8, sampling)
        limited = [s for s in samples if s.finish_reason == "tool_limit"]
        assert limited, "the script should call the tool more often than allowed"
        for s in samples:
            assert s.n_tool_calls == len(tool_runs(s)) <= max_tool_calls
        for s in limited:  # the call beyond the limit ends the sample and is not run
            assert s.n_tool_calls == max_tool_calls and s.response_mask[-1] == 1
            assert rollout.tokenizer.decode(s.response_ids).endswith(f"</{TOOL}>")

    def test_max_response_len_and_truncated_tool_results(self, rollout):
        long_result = rollout.engine(tools={TOOL: lambda a: "x" * 500})
        sampling = SamplingParams(max_response_len=50, max_tool_calls=5, seed=4)
        samples = long_result.generate(rollout.prompts("Q: ab"), 6, sampling)
        cut = [s for s in samples if s.response_mask[-1] == 0]
        assert cut, "some tool result should overflow the response"
        for s in samples:
            assert len(s.response_ids) <= 50
            if s.finish_reason == "length":
                assert len(s.response_ids) == 50
        for s in cut:
            assert s.finish_reason == "length" and len(s.response_ids) == 50
        rollout.assert_logprobs_match(samples)

    def test_a_tool_that_fails_yields_a_result_text(self, rollout):
        tok = rollout.tokenizer

        def raises(arguments):
            raise ZeroDivisionError("division by zero")

        def hangs(arguments):
            time.sleep(5)
            return "late"

        cases = {"raises": (raises, "error: ZeroDivisionError: division by zero"),
                 "returns None": (lambda a: None, "None"),
                 "returns an int": (lambda a: 42, "42"),
                 "returns special-token text": (lambda a: "<eos>é", "<eos>" + tok.unk_token),
                 "hangs": (hangs, "error: tool timed out after 0.2 s")}
        for name, (tool, text) in cases.items():
            eng = rollout.engine(tools={TOOL: tool}, tool_timeout=0.2)
            sampling = SamplingParams(max_response_len=80, max_tool_calls=1, seed=5)
            samples = eng.generate(rollout.prompts("Q: ab"), 4, sampling)
            called = [s for s in samples if s.n_tool_calls]
            assert called, name
            for s in called:
                start, end = tool_runs(s)[0]
                got = tok.decode(s.response_ids[start:end])
                assert format_tool_result(text).startswith(got), (name, got)
                assert len(got) > len("<result>"), (name, got)
                if end < len(s.response_ids):
                    assert got == format_tool_result(text), name
            rollout.assert_logprobs_match(samples)

    def test_bad_arguments_raise(self, rollout):
        eng = rollout.engine(tools={})
        sampling = SamplingParams(max_response_len=8, seed=0)
        with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
            eng.generate([[1, 5], []], 1, sampling)
        with pytest.raises(ValueError, match=r"prompts\[0\] has token ids outside"):
            eng.generate([[1, 10**6]], 1, sampling)
        with pytest.raises(ValueError, match="n must be a positive int"):
            eng.generate([[1, 5]], 0, sampling)
        parent = eng.generate([[1, 5]], 1, sampling)[0]
        with pytest.raises(ValueError, match=r"positions\[0\] = .* outside"):
            eng.fork([parent], [len(parent.response_ids)], 1, sampling)
        with pytest.raises(ValueError, match="one entry per sample"):
            eng.fork([parent], [0, 0], 1, sampling)
        with pytest.raises(ValueError, match="temperature must be > 0"):
            SamplingParams(temperature=0.0)

    # ---- fork

    def test_fork_keeps_the_prefix_and_continues_it(self, rollout):
        max_len, p, n = 60, 12, 3
        eng = rollout.engine(tools={})
        samples = eng.generate(rollout.prompts("Q: ab", "go"), 4,
                               SamplingParams(max_response_len=max_len, seed=9))
        parents, positions = parents_and_positions(samples, p)
        forks = eng.fork(parents, positions, n, SamplingParams(max_response_len=max_len, seed=10))
        assert len(forks) == n * len(parents)
        for i, f in enumerate(forks):
            parent = parents[i // n]
            f.check_aligned()
            assert f.fork_of == (i // n, p) and f.prompt_index == parent.prompt_index
            assert f.prompt_ids == parent.prompt_ids
            assert f.response_ids[:p + 1] == parent.response_ids[:p + 1]
            assert f.response_logprobs[:p + 1] == parent.response_logprobs[:p + 1]
            assert f.finish_reason in FINISH_REASONS and p + 1 <= len(f.response_ids) <= max_len
        assert len({tuple(f.response_ids) for f in forks}) > len(parents)  # forks differ
        rollout.assert_logprobs_match(forks)
        again = eng.fork(parents, positions, n, SamplingParams(max_response_len=max_len, seed=10))
        assert [f.response_ids for f in again] == [f.response_ids for f in forks]

    def test_fork_with_tools_continues_the_tool_count(self, rollout):
        max_calls = 2
        sampling = SamplingParams(max_response_len=160, max_tool_calls=max_calls, seed=11)
        eng = rollout.engine()
        samples = eng.generate(rollout.prompts("Q: ab"), 8, sampling)
        # fork every sample right after each of its tool results, and inside its model text
        parents, positions, calls_before = [], [], []
        for s in samples:
            for k, (start, end) in enumerate(tool_runs(s)):
                if end < len(s.response_ids):
                    parents.append(s), positions.append(end), calls_before.append(k + 1)
            parents.append(s), positions.append(0), calls_before.append(0)
        assert max(calls_before) == max_calls
        sampling = SamplingParams(max_response_len=160, max_tool_calls=max_calls, seed=12)
        forks = eng.fork(parents, positions, 2, sampling)
        rollout.assert_logprobs_match(forks)
        for i, f in enumerate(forks):
            before = calls_before[i // 2]
            assert f.n_tool_calls == len(tool_runs(f)) and before <= f.n_tool_calls <= max_calls
            if f.finish_reason == "tool_limit":
                assert f.n_tool_calls == max_calls
        assert any(calls_before[i // 2] == max_calls and f.finish_reason == "tool_limit"
                   for i, f in enumerate(forks)), "a fork past the limit should stop at its call"

    def test_fork_at_a_closing_tag_runs_the_tool(self, rollout):
        eng = rollout.engine()
        sampling = SamplingParams(max_response_len=120, max_tool_calls=4, seed=13)
        samples = [s for s in eng.generate(rollout.prompts("Q: ab"), 6, sampling)
                   if s.n_tool_calls]
        parents = samples[:2]
        positions = [tool_runs(s)[0][0] - 1 for s in parents]  # the '>' closing the first call
        forks = eng.fork(parents, positions, 2,
                         SamplingParams(max_response_len=120, max_tool_calls=4, seed=14))
        for i, f in enumerate(forks):
            parent = parents[i // 2]
            start, end = tool_runs(parent)[0]
            assert f.n_tool_calls >= 1 and tool_runs(f)[0] == (start, end)
            assert f.response_ids[:end] == parent.response_ids[:end]  # the same result, run again
        rollout.assert_logprobs_match(forks)

    def test_fork_inside_a_closing_tag_runs_the_tool_when_the_tag_completes(self, rollout):
        eng = rollout.engine()
        sampling = SamplingParams(max_response_len=120, max_tool_calls=4, seed=15)
        parents = [s for s in eng.generate(rollout.prompts("Q: ab"), 8, sampling)
                   if s.n_tool_calls]
        positions = [tool_runs(s)[0][0] - 3 for s in parents]  # the '/' of the closing '</e>'
        forks = eng.fork(parents, positions, 4,
                         SamplingParams(max_response_len=120, max_tool_calls=4, seed=16))
        completed = 0
        for i, f in enumerate(forks):
            start = tool_runs(parents[i // 4])[0][0]
            if f.response_ids[:start] == parents[i // 4].response_ids[:start]:  # '</e>' again
                completed += 1
                assert tool_runs(f) and tool_runs(f)[0][0] == start, \
                    rollout.tokenizer.decode(f.response_ids)
        assert completed >= len(forks) // 2  # the script completes the tag most of the time

    # ---- weights

    def test_update_weights_changes_the_samples(self, rollout):
        eng = rollout.engine(tools={})
        sampling = SamplingParams(max_response_len=30, seed=21)
        prompts = rollout.prompts("Q: ab")
        before = eng.generate(prompts, 2, sampling)
        try:
            eng.update_weights(rollout.other_model)
            after = eng.generate(prompts, 2, sampling)
            assert [s.response_logprobs for s in after] != [s.response_logprobs for s in before]
            rollout.assert_logprobs_match(after, model=rollout.other_model)
        finally:
            eng.update_weights(rollout.model.state_dict())  # a state_dict works too
        rollout.assert_logprobs_match(eng.generate(prompts, 2, sampling))

