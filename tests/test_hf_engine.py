"""The transformers rollout engine (SPEC §3.1, §3.3; issue 5 items 2 and 7).

Log-probs are checked against a teacher-forced forward of the whole sequence (no cache), tool
results against the stub tool's output, forks against generating from the concatenated prefix.
Most tests run the scripted Llama (tests/scripted_model.py), which writes `<e>ab</e>` tool calls;
the embedded default model (random weights) covers the plain sampling path.
"""

import time

import pytest
import torch

pytest.importorskip("transformers")

from appo import models  # noqa: E402
from appo.rollout.base import FINISH_REASONS, SamplingParams  # noqa: E402
from appo.rollout.format import format_tool_result  # noqa: E402
from appo.rollout.hf import HFEngine  # noqa: E402
from conftest import DEVICE  # noqa: E402
from scripted_model import TOOL, scripted_llama  # noqa: E402

LOGPROB_ATOL = 1e-5  # cached decoding against one full float32 forward


def reverse(arguments: str) -> str:
    return f"{arguments[::-1]}!"


@pytest.fixture(scope="module")
def default_model(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APPO_CACHE", str(tmp_path_factory.mktemp("appo-cache")))
        return models.load_default(device=DEVICE)


@pytest.fixture(scope="module")
def scripted():
    return scripted_llama().to(DEVICE), models.char_tokenizer()


def engine(pair, **kwargs):
    kwargs.setdefault("tools", {TOOL: reverse})
    return HFEngine(*pair, **kwargs)


def prompts_of(tok, *texts):
    return [tok.encode(t) for t in texts]


def teacher_forced_logprobs(model, sample, temperature):
    """log softmax(logits / T) of every response token, from one forward over the whole sequence."""
    ids = torch.tensor([sample.prompt_ids + sample.response_ids], device=model.device)
    with torch.no_grad():
        logits = model(ids).logits[0].float().cpu()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    start = len(sample.prompt_ids) - 1  # the logits predicting response token i sit at P - 1 + i
    targets = torch.tensor(sample.response_ids)
    return logp[start:start + len(targets)].gather(1, targets[:, None]).squeeze(1)


def assert_logprobs_match_model(model, samples, temperature):
    for s in samples:
        s.check_aligned()
        mask = torch.tensor(s.response_mask, dtype=torch.bool)
        recorded = torch.tensor(s.response_logprobs)
        expected = teacher_forced_logprobs(model, s, temperature)
        torch.testing.assert_close(recorded[mask], expected[mask], atol=LOGPROB_ATOL, rtol=0)
        assert (recorded[~mask] == 0.0).all()


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


def test_generate_returns_aligned_samples_prompt_major(default_model):
    model, tok = default_model
    prompts = prompts_of(tok, "What is 2+3?", "Compute (1+2)*3:")
    sampling = SamplingParams(max_response_len=40, seed=0)
    samples = HFEngine(model, tok, tools={}).generate(prompts, 3, sampling)
    assert len(samples) == 6
    for i, s in enumerate(samples):
        s.check_aligned()
        assert s.prompt_index == i // 3 and s.prompt_ids == prompts[i // 3]
        assert s.finish_reason in FINISH_REASONS and 1 <= len(s.response_ids) <= 40
        assert set(s.response_mask) == {1} and s.fork_of is None
    assert_logprobs_match_model(model, samples, 1.0)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_match_teacher_forcing_after_several_tool_calls(scripted, temperature):
    model, tok = scripted
    sampling = SamplingParams(temperature=temperature, max_response_len=120, max_tool_calls=4,
                              seed=1)
    samples = engine(scripted).generate(prompts_of(tok, "Q: ab", "go"), 4, sampling)
    assert max(s.n_tool_calls for s in samples) >= 2
    assert_logprobs_match_model(model, samples, temperature)


def test_tool_results_are_masked_tool_output(scripted):
    model, tok = scripted
    sampling = SamplingParams(max_response_len=160, max_tool_calls=3, seed=2)
    samples = engine(scripted).generate(prompts_of(tok, "Q: ab"), 6, sampling)
    assert sum(s.n_tool_calls for s in samples) >= 4
    for s in samples:
        runs = tool_runs(s)
        assert len(runs) == s.n_tool_calls
        for start, end in runs:
            call = tok.decode(s.response_ids[:start])
            arguments = call[call.rindex(f"<{TOOL}>") + len(TOOL) + 2:-len(f"</{TOOL}>")]
            assert call.endswith(f"</{TOOL}>")
            expected = tok.encode(format_tool_result(reverse(arguments)), add_special_tokens=False)
            if end == len(s.response_ids) and s.finish_reason == "length":
                expected = expected[:end - start]  # cut at max_response_len
            assert s.response_ids[start:end] == expected
            assert s.response_logprobs[start:end] == [0.0] * (end - start)


def test_seed_reproduces_and_batching_does_not_change_a_sample(scripted):
    model, tok = scripted
    sampling = SamplingParams(max_response_len=60, seed=7)
    prompts = prompts_of(tok, "Q: ab", "another prompt")
    first = engine(scripted).generate(prompts, 3, sampling)
    again = engine(scripted).generate(prompts, 3, sampling)
    alone = engine(scripted).generate(prompts[:1], 3, sampling)  # same seed, fewer rows beside it
    other = engine(scripted).generate(prompts, 3, SamplingParams(max_response_len=60, seed=8))
    assert [s.response_ids for s in first] == [s.response_ids for s in again]
    assert [s.response_logprobs for s in first] == [s.response_logprobs for s in again]
    assert [s.response_ids for s in first[:3]] == [s.response_ids for s in alone]
    for a, b in zip(first, alone):
        torch.testing.assert_close(a.response_logprobs, b.response_logprobs,
                                   atol=LOGPROB_ATOL, rtol=0)
    assert [s.response_ids for s in first] != [s.response_ids for s in other]


def test_identical_prompts_get_independent_samples(scripted):
    model, tok = scripted
    prompt = tok.encode("Q: ab")
    sampling = SamplingParams(max_response_len=40, seed=6)
    samples = engine(scripted, tools={}).generate([prompt, prompt], 2, sampling)
    assert len({tuple(s.response_ids) for s in samples}) == 4


def test_default_tools_come_from_the_registry(scripted, monkeypatch):
    from appo.rollout import tools

    monkeypatch.setattr(tools._TOOLS, "entries", dict(tools._TOOLS.entries))
    eng = HFEngine(*scripted)
    assert {"calculator", "python"} <= set(eng.tools)
    tools.register_tool(TOOL, reverse)  # registered after the engine was made: still seen
    sampling = SamplingParams(max_response_len=80, max_tool_calls=2, seed=2)
    samples = eng.generate(prompts_of(scripted[1], "Q: ab"), 4, sampling)
    assert any(s.n_tool_calls for s in samples) and eng.stats["tool_calls"] > 0


@pytest.mark.parametrize("max_tool_calls", [0, 1, 2])
def test_max_tool_calls(scripted, max_tool_calls):
    model, tok = scripted
    sampling = SamplingParams(max_response_len=200, max_tool_calls=max_tool_calls, seed=3)
    samples = engine(scripted).generate(prompts_of(tok, "Q: ab"), 8, sampling)
    limited = [s for s in samples if s.finish_reason == "tool_limit"]
    assert limited, "the script should call the tool more often than allowed"
    for s in samples:
        assert s.n_tool_calls == len(tool_runs(s)) <= max_tool_calls
    for s in limited:  # the call beyond the limit ends the sample and is not run
        assert s.n_tool_calls == max_tool_calls and s.response_mask[-1] == 1
        assert tok.decode(s.response_ids).endswith(f"</{TOOL}>")


def test_max_response_len_and_truncated_tool_results(scripted):
    model, tok = scripted
    long_result = engine(scripted, tools={TOOL: lambda a: "x" * 500})
    sampling = SamplingParams(max_response_len=50, max_tool_calls=5, seed=4)
    samples = long_result.generate(prompts_of(tok, "Q: ab"), 6, sampling)
    cut = [s for s in samples if s.response_mask[-1] == 0]
    assert cut, "some tool result should overflow the response"
    for s in samples:
        assert len(s.response_ids) <= 50
        if s.finish_reason == "length":
            assert len(s.response_ids) == 50
    for s in cut:
        assert s.finish_reason == "length" and len(s.response_ids) == 50
    assert_logprobs_match_model(model, samples, 1.0)


def test_a_tool_that_fails_yields_a_result_text(scripted):
    model, tok = scripted

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
        eng = engine(scripted, tools={TOOL: tool}, tool_timeout=0.2)
        sampling = SamplingParams(max_response_len=80, max_tool_calls=1, seed=5)
        samples = eng.generate(prompts_of(tok, "Q: ab"), 4, sampling)
        called = [s for s in samples if s.n_tool_calls]
        assert called, name
        for s in called:
            start, end = tool_runs(s)[0]
            got = tok.decode(s.response_ids[start:end])
            assert format_tool_result(text).startswith(got), (name, got)
            assert len(got) > len("<result>"), (name, got)
            if end < len(s.response_ids):
                assert got == format_tool_result(text), name
        assert_logprobs_match_model(model, samples, 1.0)


def test_engine_leaves_the_training_mode_alone(default_model):
    model, tok = default_model
    model.train()
    try:
        sampling = SamplingParams(max_response_len=4)
        HFEngine(model, tok, tools={}).generate(prompts_of(tok, "1+1="), 2, sampling)
        assert model.training
    finally:
        model.eval()


def test_sliding_window_models_are_refused():
    import transformers

    config = transformers.MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1, sliding_window=16)
    with pytest.raises(ValueError, match="full-attention models only"):
        HFEngine(transformers.MistralForCausalLM(config), models.char_tokenizer(), tools={})


def test_bad_arguments_raise(default_model):
    model, tok = default_model
    eng = HFEngine(model, tok, tools={})
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


# ---- fork


def parents_and_positions(samples, position):
    parents = [s for s in samples if len(s.response_ids) > position + 1]
    assert len(parents) >= 2
    return parents, [position] * len(parents)


@pytest.mark.parametrize("which", ["default", "scripted"])
def test_fork_equals_generate_from_the_concatenated_prefix(default_model, scripted, which):
    pair = default_model if which == "default" else scripted
    model, tok = pair
    max_len, p, n = 60, 12, 3
    eng = HFEngine(*pair, tools={})  # no tool loop: a call straddling the fork point differs
    sampling = SamplingParams(max_response_len=max_len, seed=9)
    samples = eng.generate(prompts_of(tok, "Q: ab", "go"), 4, sampling)
    parents, positions = parents_and_positions(samples, p)

    before = eng.stats["prefill_tokens"]
    forks = eng.fork(parents, positions, n, SamplingParams(max_response_len=max_len, seed=10))
    fork_prefill = eng.stats["prefill_tokens"] - before

    fresh = HFEngine(*pair, tools={})
    prefixes = [s.prompt_ids + s.response_ids[:p + 1] for s in parents]
    direct = fresh.generate(prefixes, n, SamplingParams(max_response_len=max_len - p - 1, seed=10))

    assert len(forks) == len(direct) == n * len(parents)
    for i, (f, d) in enumerate(zip(forks, direct)):
        parent = parents[i // n]
        assert f.fork_of == (i // n, p) and f.prompt_index == parent.prompt_index
        assert f.prompt_ids == parent.prompt_ids
        assert f.response_ids[:p + 1] == parent.response_ids[:p + 1]
        assert f.response_logprobs[:p + 1] == parent.response_logprobs[:p + 1]
        assert f.response_ids[p + 1:] == d.response_ids  # same seed, same sample index
        assert f.finish_reason == d.finish_reason
        torch.testing.assert_close(f.response_logprobs[p + 1:], d.response_logprobs,
                                   atol=LOGPROB_ATOL, rtol=0)
    assert_logprobs_match_model(model, forks, 1.0)
    # the prefix is not run again: one kept token per (parent, position), shared by the n forks
    assert fork_prefill == len(parents) and eng.stats["recomputed_tokens"] == 0
    assert fresh.stats["prefill_tokens"] == sum(len(x) for x in prefixes)


def test_fork_with_tools_continues_the_tool_count(scripted):
    model, tok = scripted
    max_calls = 2
    sampling = SamplingParams(max_response_len=160, max_tool_calls=max_calls, seed=11)
    eng = engine(scripted)
    samples = eng.generate(prompts_of(tok, "Q: ab"), 8, sampling)
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
    assert_logprobs_match_model(model, forks, 1.0)
    assert eng.stats["recomputed_tokens"] == 0
    for i, f in enumerate(forks):
        before = calls_before[i // 2]
        assert f.n_tool_calls == len(tool_runs(f)) and before <= f.n_tool_calls <= max_calls
        if f.finish_reason == "tool_limit":
            assert f.n_tool_calls == max_calls
    assert any(calls_before[i // 2] == max_calls and f.finish_reason == "tool_limit"
               for i, f in enumerate(forks)), "a fork past the limit should stop at its next call"


def test_fork_at_a_closing_tag_runs_the_tool(scripted):
    model, tok = scripted
    eng = engine(scripted)
    sampling = SamplingParams(max_response_len=120, max_tool_calls=4, seed=13)
    samples = [s for s in eng.generate(prompts_of(tok, "Q: ab"), 6, sampling) if s.n_tool_calls]
    parents = samples[:2]
    positions = [tool_runs(s)[0][0] - 1 for s in parents]  # the '>' that closes the first call
    sampling = SamplingParams(max_response_len=120, max_tool_calls=4, seed=14)
    forks = eng.fork(parents, positions, 2, sampling)
    for i, f in enumerate(forks):
        parent, p = parents[i // 2], positions[i // 2]
        start, end = tool_runs(parent)[0]
        assert f.n_tool_calls >= 1 and tool_runs(f)[0] == (start, end)
        assert f.response_ids[:end] == parent.response_ids[:end]  # the same result, run once more
    assert_logprobs_match_model(model, forks, 1.0)


def test_fork_recomputes_a_stale_prefix_once_per_parent(scripted):
    model, tok = scripted
    eng = engine(scripted, tools={})
    sampling = SamplingParams(max_response_len=60, seed=15)
    samples = eng.generate(prompts_of(tok, "Q: ab", "go"), 2, sampling)
    parents, _ = parents_and_positions(samples, 20)
    eng.update_weights(model)  # same weights, but the kept caches count as stale
    twice = [s for s in parents for _ in range(2)]
    positions = [p for _ in parents for p in (5, 20)]
    forks = eng.fork(twice, positions, 2, SamplingParams(max_response_len=60, seed=16))
    assert eng.stats["recomputed_tokens"] == sum(len(s.prompt_ids) + 20 for s in parents)
    assert_logprobs_match_model(model, forks, 1.0)
    # the recomputed prefixes are kept: forking the same parents again recomputes nothing
    before = eng.stats["recomputed_tokens"]
    eng.fork(parents, [3] * len(parents), 1, SamplingParams(max_response_len=60, seed=17))
    assert eng.stats["recomputed_tokens"] == before


def test_forks_of_forks_reuse_their_cache(scripted):
    model, tok = scripted
    eng = engine(scripted, tools={})
    sampling = SamplingParams(max_response_len=60, seed=18)
    samples = eng.generate(prompts_of(tok, "Q: ab"), 4, sampling)
    parents, positions = parents_and_positions(samples, 8)
    children = eng.fork(parents, positions, 1, SamplingParams(max_response_len=60, seed=19))
    grandchildren, at = parents_and_positions(children, 15)
    before = eng.stats["prefill_tokens"]
    leaves = eng.fork(grandchildren, at, 2, SamplingParams(max_response_len=60, seed=20))
    assert eng.stats["prefill_tokens"] - before == len(grandchildren)
    assert eng.stats["recomputed_tokens"] == 0
    assert_logprobs_match_model(model, leaves, 1.0)


def test_update_weights_changes_the_samples(scripted):
    model, tok = scripted
    served = scripted_llama().to(DEVICE)  # a separate copy, as an engine beside a trainer holds
    eng = HFEngine(served, tok, tools={})
    sampling = SamplingParams(max_response_len=30, seed=21)
    prompts = prompts_of(tok, "Q: ab")
    before = eng.generate(prompts, 2, sampling)
    trained = scripted_llama(seed=1).to(DEVICE)  # other embeddings, attention and MLP weights
    eng.update_weights(trained)
    after = eng.generate(prompts, 2, sampling)
    assert [s.response_logprobs for s in after] != [s.response_logprobs for s in before]
    assert_logprobs_match_model(trained, after, 1.0)
    eng.update_weights(model.state_dict())  # a state_dict works too
    assert_logprobs_match_model(model, eng.generate(prompts, 2, sampling), 1.0)
