"""The transformers rollout engine (docs/algorithm.md; issue 5 items 2 and 7).

The engine contract (tests/engine_contract.py) runs on the scripted Llama; here are the properties
of this engine: forks reuse the parent's KV cache (counted prefilled tokens) and sample the same
tokens as generating from the concatenated prefix, stale prefixes are recomputed once, the
caller's model mode is left alone. The embedded default model (random weights) covers the plain
sampling path.
"""

import copy

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from appo import models  # noqa: E402
from appo.rollout.base import SamplingParams  # noqa: E402
from appo.rollout.hf import HFEngine  # noqa: E402
from conftest import DEVICE  # noqa: E402
from engine_contract import EngineContract, EngineUnderTest, parents_and_positions  # noqa: E402
from scripted_model import scripted_llama  # noqa: E402

LOGPROB_ATOL = 1e-5  # cached decoding against one full float32 forward


def scripted_under_test() -> EngineUnderTest:
    model, tok = scripted_llama().to(DEVICE), models.char_tokenizer(tags=False)
    # each engine serves its own copy: update_weights loads into the served model
    return EngineUnderTest(model, tok, lambda **kw: HFEngine(copy.deepcopy(model), tok, **kw),
                           other_model=scripted_llama(seed=1).to(DEVICE),
                           logprob_atol=LOGPROB_ATOL)


@pytest.fixture(scope="module")
def scripted():
    return scripted_under_test()


class TestHFEngineContract(EngineContract):
    @pytest.fixture
    def rollout(self, scripted):
        return scripted


@pytest.fixture(scope="module")
def default_model(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APPO_CACHE", str(tmp_path_factory.mktemp("appo-cache")))
        model, tok = models.load_default(device=DEVICE)
    return EngineUnderTest(model, tok, lambda **kw: HFEngine(model, tok, **kw), other_model=None,
                           logprob_atol=LOGPROB_ATOL)


def test_engine_leaves_the_training_mode_alone(default_model):
    model = default_model.model
    model.train()
    try:
        sampling = SamplingParams(max_response_len=4)
        default_model.engine(tools={}).generate(default_model.prompts("1+1="), 2, sampling)
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


# ---- fork: KV-cache reuse


@pytest.mark.parametrize("which", ["default", "scripted"])
def test_fork_equals_generate_from_the_concatenated_prefix(default_model, scripted, which):
    rollout = default_model if which == "default" else scripted
    max_len, p, n = 60, 12, 3
    eng = rollout.engine(tools={})  # no tool loop: a call straddling the fork point differs
    samples = eng.generate(rollout.prompts("Q: ab", "go"), 4,
                           SamplingParams(max_response_len=max_len, seed=9))
    parents, positions = parents_and_positions(samples, p)

    before = eng.stats["prefill_tokens"]
    forks = eng.fork(parents, positions, n, SamplingParams(max_response_len=max_len, seed=10))
    fork_prefill = eng.stats["prefill_tokens"] - before

    fresh = rollout.engine(tools={})
    prefixes = [s.prompt_ids + s.response_ids[:p + 1] for s in parents]
    direct = fresh.generate(prefixes, n, SamplingParams(max_response_len=max_len - p - 1, seed=10))

    assert len(forks) == len(direct) == n * len(parents)
    for f, d in zip(forks, direct):
        assert f.response_ids[p + 1:] == d.response_ids  # same seed, same sample index
        assert f.finish_reason == d.finish_reason
        torch.testing.assert_close(f.response_logprobs[p + 1:], d.response_logprobs,
                                   atol=LOGPROB_ATOL, rtol=0)
    rollout.assert_logprobs_match(forks)
    # the prefix is not run again: one kept token per (parent, position), shared by the n forks
    assert fork_prefill == len(parents) and eng.stats["recomputed_tokens"] == 0
    assert fresh.stats["prefill_tokens"] == sum(len(x) for x in prefixes)


def test_forks_with_tools_reuse_the_kept_caches(scripted):
    eng = scripted.engine()
    sampling = SamplingParams(max_response_len=160, max_tool_calls=2, seed=11)
    samples = eng.generate(scripted.prompts("Q: ab"), 8, sampling)
    eng.fork(samples, [len(s.response_ids) - 1 for s in samples], 2,
             SamplingParams(max_response_len=160, max_tool_calls=2, seed=12))
    assert eng.stats["recomputed_tokens"] == 0


def test_fork_recomputes_a_stale_prefix_once_per_parent(scripted):
    eng = scripted.engine(tools={})
    sampling = SamplingParams(max_response_len=60, seed=15)
    samples = eng.generate(scripted.prompts("Q: ab", "go"), 2, sampling)
    parents, _ = parents_and_positions(samples, 20)
    eng.update_weights(scripted.model)  # same weights, but the kept caches count as stale
    twice = [s for s in parents for _ in range(2)]
    positions = [p for _ in parents for p in (5, 20)]
    forks = eng.fork(twice, positions, 2, SamplingParams(max_response_len=60, seed=16))
    assert eng.stats["recomputed_tokens"] == sum(len(s.prompt_ids) + 20 for s in parents)
    scripted.assert_logprobs_match(forks)
    # the recomputed prefixes are kept: forking the same parents again recomputes nothing
    before = eng.stats["recomputed_tokens"]
    eng.fork(parents, [3] * len(parents), 1, SamplingParams(max_response_len=60, seed=17))
    assert eng.stats["recomputed_tokens"] == before


def test_forks_of_forks_reuse_their_cache(scripted):
    eng = scripted.engine(tools={})
    samples = eng.generate(scripted.prompts("Q: ab"), 4,
                           SamplingParams(max_response_len=60, seed=18))
    parents, positions = parents_and_positions(samples, 8)
    children = eng.fork(parents, positions, 1, SamplingParams(max_response_len=60, seed=19))
    grandchildren, at = parents_and_positions(children, 15)
    before = eng.stats["prefill_tokens"]
    leaves = eng.fork(grandchildren, at, 2, SamplingParams(max_response_len=60, seed=20))
    assert eng.stats["prefill_tokens"] - before == len(grandchildren)
    assert eng.stats["recomputed_tokens"] == 0
    scripted.assert_logprobs_match(leaves)


def test_dropping_rows_and_repacking_copy_once_and_keep_the_capacity():
    """select_rows / keep_slots write the kept rows and slots straight into buffers of the same
    capacity: the next appended token lands in them without a regrowth copy."""
    from appo.rollout.hf import _GrowingLayer

    layer = _GrowingLayer()
    k, v = torch.randn(4, 2, 10, 8), torch.randn(4, 2, 10, 8)
    layer.update(k, v)
    capacity = layer._buffers[0].shape[2]
    layer.select_rows(torch.tensor([3, 1]))
    assert torch.equal(layer.keys, k[[3, 1]]) and torch.equal(layer.values, v[[3, 1]])
    order = torch.tensor([[0, 2, 5], [1, 4, 9]])
    layer.keep_slots(order)
    want_k = torch.stack([k[3][:, [0, 2, 5]], k[1][:, [1, 4, 9]]])
    assert torch.equal(layer.keys, want_k)
    buffer = layer._buffers[0]
    assert buffer.shape[2] == capacity
    new_k, new_v = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    keys, values = layer.update(new_k, new_v)
    assert layer._buffers[0] is buffer and keys.data_ptr() == buffer.data_ptr()  # no regrowth
    assert torch.equal(keys[:, :, :3], want_k) and torch.equal(keys[:, :, 3:], new_k)
