"""The tool loop every engine runs (docs/algorithm.md): stop rules, tool calls, fork starts, seeds.

An engine samples model tokens; whenever it has appended some to a sample (and to the sample's
`LiveSample.segment`) it hands the sample to `ToolLoop.decide`, which applies these rules to the
last response token, in this order:

- EOS (any of the stop ids) or a text ending in `</answer>` finishes with "stop".
- A completed call (in the protocol's format, `appo.rollout.protocol`: `<name>args</name>` for a
  name in the tool mapping, or a chat model's `<tool_call>{...}</tool_call>`) runs the tool if
  fewer than
  `max_tool_calls` calls ran so far; the call beyond the limit is not run and finishes the sample
  with "tool_limit"; a call completed on the last allowed response token is not run and finishes
  with "length". A tool result is appended as mask-0 tokens with log-prob 0.0; one that does not
  fit in `max_response_len` is cut at the limit and finishes with "length".
- A response that reaches `max_response_len` tokens finishes with "length".

`n_tool_calls` counts the calls that ran (each leaves one run of mask-0 tokens), and a fork starts
from the count in its prefix. A fork's kept token goes through the same rules, so a fork at the `>`
closing a call runs that call. Inline tools (the calculator: fast, ending by itself) run on the
rollout's thread; other calls closed in the same step run in parallel threads; a tool that
raises or returns a non-string yields an error or str() text, one that runs past `tool_timeout`
seconds an error text (its thread is abandoned).

A malformed chat call (bad JSON, an unknown tool) counts as a call and gets the error as its
result, so the model sees what went wrong.

Tool-call detection: the decoded text of the model tokens since the last tool result must *end*
with the closing tag (trailing whitespace allowed), so with BPE tokenizers a tag merged with the
next non-space characters into one token is not seen (exact for the character tokenizer).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from appo._deprecated import renamed

from .base import Sample, SamplingParams
from .protocol import AUTO, ToolCall, ToolProtocol, make_protocol
from .tools import runs_inline

DEFAULT_TOOL_TIMEOUT_S = 60.0
Tools = Mapping[str, Callable[[str], str]]


def stream_seed(seed: int, *keys: int) -> int:
    """A 62-bit seed for the random stream named by (seed, *keys), independent across keys."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def call_seed(sampling: SamplingParams) -> int:
    """The seed of one generate/fork call: the given one, else one from torch's global RNG."""
    if sampling.seed is not None:
        return sampling.seed
    import torch

    return int(torch.randint(2**62, ()).item())


def run_tool(fn: Callable[[str], str], arguments: str) -> str:
    """The tool's result as text: errors and junk come back as text, never as an exception."""
    try:
        result = fn(arguments)
        return result if isinstance(result, str) else str(result)
    except Exception as e:  # a tool must never crash the rollout
        return f"error: {type(e).__name__}: {e}"


def run_tools(calls: list[tuple[Callable[[str], str], str]],
              timeout: Optional[float]) -> list[str]:
    """Each call's result text, in order. Inline tools (`register_tool(inline=True)`: fast, and
    they end on their own) run on this thread; the others run in parallel daemon threads, each
    abandoned after `timeout` seconds (None: waited for)."""
    results: list[Optional[str]] = [None] * len(calls)
    watched = [i for i, (fn, _) in enumerate(calls) if not runs_inline(fn)]
    if len(watched) == 1 and timeout is None and len(calls) == 1:
        watched = []  # one call, waited for: no thread needed

    def work(i):
        results[i] = run_tool(*calls[i])

    # daemon threads: a hung tool is abandoned instead of blocking the rollout or interpreter exit
    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in watched]
    deadline = None if timeout is None else time.monotonic() + timeout
    for t in threads:
        t.start()
    for i in sorted(set(range(len(calls))) - set(watched)):
        work(i)
    for t in threads:
        t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    return [r if r is not None else f"error: tool timed out after {timeout} s" for r in results]


def tool_results_in(mask: list[int]) -> int:
    """The runs of tool tokens (mask 0) in a response: one per tool call that ran."""
    return sum(1 for i, m in enumerate(mask) if m == 0 and (i == 0 or mask[i - 1] == 1))


def copy_sample(s: Sample, **changes) -> Sample:
    fields = dict(prompt_ids=list(s.prompt_ids), response_ids=list(s.response_ids),
                  response_mask=list(s.response_mask), response_logprobs=list(s.response_logprobs),
                  n_tool_calls=s.n_tool_calls, finish_reason=s.finish_reason,
                  prompt_index=s.prompt_index, fork_of=s.fork_of)
    fields.update(changes)
    return Sample(**fields)


def stop_ids_of(tokenizer, *config_eos) -> frozenset[int]:
    """The tokenizer's EOS and the model's (generation) config EOS ids, each an int or a list."""
    ids = [tokenizer.eos_token_id]
    for eos in config_eos:
        ids += eos if isinstance(eos, (list, tuple)) else [eos]
    return frozenset(int(t) for t in ids if t is not None)


def check_n(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")


@dataclass
class LiveSample:
    """One sample while an engine generates it: what the tool loop needs to know."""

    sample: Sample
    segment: list[int] = field(default_factory=list)  # model tokens since the last tool result
    index: int = 0  # position in the call's output, which also names its random stream
    finished: bool = False

    def finish(self, reason: str) -> None:
        self.sample.finish_reason = reason
        self.finished = True

    @classmethod
    def start_fork(cls, parent: Sample, s: int, p: int, **fields) -> "LiveSample":
        """The start of a fork of `parent` (fork input s) at response position p, token p kept."""
        mask = parent.response_mask[:p + 1]
        last_tool = max((i for i, m in enumerate(mask) if m == 0), default=-1)
        sample = copy_sample(parent, response_ids=parent.response_ids[:p + 1], response_mask=mask,
                             response_logprobs=parent.response_logprobs[:p + 1],
                             n_tool_calls=tool_results_in(mask), finish_reason="",
                             fork_of=(s, p))
        return cls(sample, segment=list(parent.response_ids[last_tool + 1:p + 1]), **fields)


class ToolLoop:
    """The rules above for one engine: its tokenizer, vocabulary, stop ids, tools and protocol.

    tools: mapping name -> callable(arguments: str) -> str; None uses the registry of
    `appo.rollout.tools`, read at each call so tools registered later are seen.
    protocol: a `ToolProtocol` or a name (`tags`, `chat`, `auto`: chat when the tokenizer has
    a chat template).
    """

    def __init__(self, tokenizer, vocab_size: int, tools: Optional[Tools],
                 stop_ids: Iterable[int], tool_timeout: Optional[float],
                 protocol: Union[ToolProtocol, str] = AUTO):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._tools, self.tool_timeout = tools, tool_timeout
        self.stop_ids = frozenset(stop_ids)
        self.protocol = (protocol if isinstance(protocol, ToolProtocol)
                         else make_protocol(protocol, tokenizer))
        # which tokens can end a closing tag (every pause text ends with ">"), maybe followed by
        # white space: only then is the segment decoded and searched
        texts = tokenizer.batch_decode([[i] for i in range(min(len(tokenizer), vocab_size))])
        self._ends_tag = [t.rstrip().endswith(">") for t in texts] + \
            [False] * (vocab_size - len(texts))

    @property
    def tools(self) -> Tools:
        if self._tools is not None:
            return self._tools
        from . import tools as registry

        return {name: registry.get_tool(name) for name in registry.tool_names()}

    def closing_tags(self, tools: Tools) -> list[str]:
        """The texts whose end may end a sample or call a tool: where generation must pause."""
        return self.protocol.pause_texts(tools)

    # ---- argument checks at the engines' public boundary

    def check_ids(self, ids, name: str) -> list[int]:
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError(f"{name} is empty: a prompt needs at least one token")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{name} has token ids outside [0, {self.vocab_size}): {bad[:5]}")
        return ids

    def check_fork(self, samples: Sequence[Sample], positions: Sequence[int]) -> list[int]:
        positions = [int(p) for p in positions]
        if len(positions) != len(samples):
            raise ValueError(f"positions must have one entry per sample: {len(positions)} "
                             f"positions for {len(samples)} samples")
        for s, (sample, p) in enumerate(zip(samples, positions)):
            if not 0 <= p < len(sample.response_ids):
                raise ValueError(f"positions[{s}] = {p} is outside sample {s}'s response "
                                 f"(length {len(sample.response_ids)})")
            self.check_ids(sample.prompt_ids, f"samples[{s}].prompt_ids")
            sample.check_aligned()
        return positions

    # ---- the rules

    def after_token(self, row: LiveSample, sampling: SamplingParams,
                    tools: Tools) -> Optional[ToolCall]:
        """Apply the stop rules to the row's last response token (already in `row.segment` if the
        model wrote it); the tool call to run, if any."""
        s = row.sample
        token = s.response_ids[-1]
        full = len(s.response_ids) >= sampling.max_response_len
        if s.response_mask[-1]:  # a fork kept inside a tool result has no call open
            if token in self.stop_ids:
                row.finish("stop")
                return None
            if token < len(self._ends_tag) and self._ends_tag[token]:
                text = self.tokenizer.decode(row.segment, skip_special_tokens=True)
                if self.protocol.ends_answer(text):
                    row.finish("stop")
                    return None
                call = self.protocol.call_at_end(text, tools) if tools else None
                if call is not None and s.n_tool_calls >= sampling.max_tool_calls:
                    row.finish("tool_limit")
                    return None
                if call is not None and not full:
                    return call
        if full:
            row.finish("length")
        return None

    def append_tool_result(self, row: LiveSample, result: str, sampling: SamplingParams) -> list[int]:
        """Append the result as tool tokens (cut at max_response_len); the ids appended."""
        s = row.sample
        ids = self.protocol.result_ids(result)[:sampling.max_response_len - len(s.response_ids)]
        s.response_ids += ids
        s.response_mask += [0] * len(ids)
        s.response_logprobs += [0.0] * len(ids)
        s.n_tool_calls += 1
        row.segment = []
        if len(s.response_ids) >= sampling.max_response_len:
            row.finish("length")
        return ids

    def decide(self, rows: Sequence[LiveSample], sampling: SamplingParams,
               tools: Tools) -> list[tuple[LiveSample, list[int]]]:
        """Stop rules and tool calls for rows whose last token was just decided; the rows that
        got a tool result, with its token ids."""
        calls = []
        for r in rows:
            call = self.after_token(r, sampling, tools)
            if call is not None:
                calls.append((r, call))
        if not calls:
            return []
        results = run_tools([(tools[call.name] if call.error is None else _fixed(call.error),
                              call.argument) for _, call in calls], self.tool_timeout)
        return [(r, self.append_tool_result(r, result, sampling))
                for (r, _), result in zip(calls, results)]


def _fixed(text: str) -> Callable[[str], str]:
    """A stand-in tool for a malformed call: its result is the error text (run inline)."""
    def error(_arguments: str) -> str:
        return text

    error.inline = True
    return error


# the old name, for one release
__getattr__ = renamed(__name__, {'Rollout': ('LiveSample', LiveSample)})
