"""The built-in rollout engine on transformers, with KV-cache reuse for forks (docs/algorithm.md;
docs/training.md).

Design, in the order a rollout meets it:

- **One batch cache, holes instead of left padding.** All live samples share one `DynamicCache`
  `[rows, kv_heads, T, head_dim]` and a boolean `attention` `[rows, T]` marking the cache slots
  that hold real tokens. Each forward feeds every live row its *pending* tokens (the token it just
  sampled, or a prompt, a tool result, a fork's kept token) as a chunk `[rows, c]`, real tokens
  first and holes after; a hole is masked for every later query and never becomes real. Position
  ids are per row (the count of its real tokens), so RoPE sees each sample as one contiguous
  sequence however many holes sit in the cache. Every row's first slot is real, so no query row is
  ever fully masked (which would put NaNs in the cache). Holes come from chunks of unequal length
  (a tool result fed while the other rows decode one token); once the cache is 1.5x wider than the
  longest row's real tokens it is re-packed (each row's real slots moved to the front), so the
  holes stay bounded for an amortised O(1) copy per token. Finished rows leave the batch at once.
  The cache layers append into buffers grown by doubling (`_GrowingLayer`), not by `torch.cat`;
  dropping rows and re-packing write straight into fresh buffers of the same capacity (one copy).
- **Prompts and fork prefixes are prefilled once per group.** `generate` feeds each distinct
  prompt once and repeats its cache rows n times; `fork` feeds each (parent, position) pair once
  (only the kept token, on top of the parent's cached prefix), then repeats it n times.
- **Kept caches, for forks.** When a sample finishes, the keys/values of its real slots are copied
  out compactly (`_PrefixKV`) and kept, keyed by the Sample object through a weak reference (the
  entry goes when the trainer drops the sample). A fork slices the parent's kept prefix, feeds the
  kept token and continues. The keep lasts until the next `generate()` call (forks made in between
  are kept too, so branches of branches reuse theirs); `update_weights()` drops it, as the keys are
  stale under new weights, and so does `release_kv()`. Memory: the real tokens of one rollout
  phase, once (no holes, no n-fold copies). A parent without a valid entry (from an earlier phase,
  weights updated since, `keep_kv=False`) is recomputed by one forward over its longest needed
  prefix, shared by all its positions and forks.
- **Seeding.** Sample i of a call (prompt-major for `generate`, parent-major for `fork`) draws its
  uniforms from its own CPU `torch.Generator` seeded from `(sampling.seed, i)` (numpy
  SeedSequence), one uniform per sampled token, turned into a token by inverting the float64 CDF
  of softmax(logits / temperature). A sample's stream depends only on (seed, i) and its own
  logits, not on the batch around it nor the device, so `fork(samples, positions, n, seed)`
  samples the same tokens as `generate([prompt + response[:p + 1] of each parent], n, seed)` (up
  to the float rounding of the logits, and unless a tool call straddles the fork point). Use
  distinct seeds for independent calls; seed None draws one from torch's global generator.
- **Log-probs.** log_softmax(logits / temperature) over the full vocabulary in float32, the
  quantity the trainer recomputes; tool tokens get mask 0 and log-prob 0.0.
- **Tool loop and limits.** After each model token the rules of `toolloop` (shared with the vLLM
  engine) decide: stop, run a tool call (its result fed as the row's next pending tokens), or go on.
- Models with sliding-window or other non-full attention layers are refused (holes would shift
  their windows).
"""

from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .base import Sample, SamplingParams, weights_of
from .protocol import AUTO, ToolProtocol
from .toolloop import (DEFAULT_TOOL_TIMEOUT_S, LiveSample, ToolLoop, Tools, call_seed, check_n,
                       copy_sample, stop_ids_of, stream_seed)

# re-pack the batch cache when its width reaches RATIO x the longest row's real tokens + MIN_HOLES:
# the amortised cost of re-packing stays O(1) per token and the holes never exceed about a third
COMPACT_RATIO, COMPACT_MIN_HOLES = 1.5, 32
MIN_CACHE_CAPACITY = 64  # cache slots allocated at least, per row


def _row_generator(seed: int, index: int) -> torch.Generator:
    """The uniform stream of sample `index` of a call seeded with `seed`."""
    return torch.Generator().manual_seed(stream_seed(seed, index))


@dataclass
class _PrefixKV:
    """Keys/values of the first len(ids) tokens of a sample (prompt + response), compact."""

    ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, [kv_heads, len(ids), head_dim]
    version: int  # the engine's weights version they were computed with


@dataclass
class _Row(LiveSample):
    pending: list[int] = field(default_factory=list)  # tokens decided, not yet fed to the model
    fed: int = 0  # real tokens in the cache = position id of the next token fed
    sampled_pending: bool = False  # pending[0] is the token just sampled (a decode, not a prefill)
    rng: Optional[torch.Generator] = None


class _GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views of buffers grown by doubling: appending a token
    costs amortised O(1) instead of DynamicLayer's O(length) torch.cat, which dominated decoding."""

    _layer_type = None  # not registered as a layer type of transformers' cache mappings

    def __init__(self):
        super().__init__()
        self._buffers: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, add = self.get_seq_length(), key_states.shape[-2]
        buffers = self._buffers
        # row selection, repetition and compaction replace self.keys with a new tensor: regrow then
        if (buffers is None or n + add > buffers[0].shape[-2] or n == 0
                or self.keys.data_ptr() != buffers[0].data_ptr()
                or buffers[0].shape[0] != key_states.shape[0]):
            capacity = max(2 * (n + add), MIN_CACHE_CAPACITY)
            buffers = tuple(new.new_empty(*new.shape[:2], capacity, new.shape[3])
                            for new in (key_states, value_states))
            if n:
                buffers[0][:, :, :n], buffers[1][:, :, :n] = self.keys, self.values
            self._buffers = buffers
        buffers[0][:, :, n:n + add], buffers[1][:, :, n:n + add] = key_states, value_states
        self.keys, self.values = buffers[0][:, :, :n + add], buffers[1][:, :, :n + add]
        return self.keys, self.values

    def _refill(self, rows: int, length: int, fill) -> None:
        """New buffers of the current capacity, their first `length` slots written by
        fill(source, out) straight from the old keys/values: one copy, and the next append needs
        no regrowth (select and compact used to copy twice)."""
        capacity = max(self._buffers[0].shape[2] if self._buffers else 0, length,
                       MIN_CACHE_CAPACITY)
        buffers = tuple(t.new_empty(rows, t.shape[1], capacity, t.shape[3])
                        for t in (self.keys, self.values))
        for source, buffer in zip((self.keys, self.values), buffers):
            fill(source, buffer[:, :, :length])
        self._buffers = buffers
        self.keys, self.values = buffers[0][:, :, :length], buffers[1][:, :, :length]

    def select_rows(self, index: torch.Tensor) -> None:
        self._refill(len(index), self.keys.shape[2],
                     lambda source, out: torch.index_select(source, 0, index, out=out))

    def keep_slots(self, order: torch.Tensor) -> None:
        """Row b keeps the slots order[b] (in that order): [rows, length]."""
        index = order[:, None, :, None].expand(-1, self.keys.shape[1], -1, self.keys.shape[3])
        self._refill(order.shape[0], order.shape[1],
                     lambda source, out: torch.gather(source, 2, index, out=out))


def _new_cache(model) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    cache.layers = [_GrowingLayer() for _ in cache.layers]  # full attention only (HFEngine checks)
    return cache


class _Batch:
    """Live rows, their shared cache and slot mask; see the module docstring."""

    def __init__(self, engine: "HFEngine", rows: list[_Row],
                 prefixes: list[Optional[tuple[_PrefixKV, int]]]):
        self.engine, self.rows = engine, rows
        device = engine.device
        width = max((n for _, n in filter(None, prefixes)), default=0)
        self.attention = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
        self.cache = _new_cache(engine.model)
        if width == 0:
            return
        some = next(kv for kv, _ in filter(None, prefixes))
        for layer, (k0, v0) in enumerate(some.layers):
            k = k0.new_zeros(len(rows), k0.shape[0], width, k0.shape[2])  # holes hold finite zeros
            v = v0.new_zeros(len(rows), v0.shape[0], width, v0.shape[2])
            for b, prefix in enumerate(prefixes):
                if prefix is not None:
                    kv, n = prefix
                    k[b, :, :n] = kv.layers[layer][0][:, :n]
                    v[b, :, :n] = kv.layers[layer][1][:, :n]
            self.cache.layers[layer].update(k, v)
        for b, prefix in enumerate(prefixes):
            if prefix is not None:
                self.attention[b, :prefix[1]] = True

    def feed(self) -> torch.Tensor:
        """Run every row's pending tokens through the model; the logits after each row's last."""
        rows, device, stats = self.rows, self.engine.device, self.engine.stats
        counts = [len(r.pending) for r in rows]
        width = max(counts)
        ids, positions, real = [], [], []
        for r, k in zip(rows, counts):
            holes = width - k
            ids.append(r.pending + [self.engine.pad_id] * holes)
            # a hole repeats the row's last position: any in-range value does, it is never attended
            positions.append(list(range(r.fed, r.fed + k)) + [r.fed + k - 1] * holes)
            real.append([True] * k + [False] * holes)
            stats["decode_tokens"] += int(r.sampled_pending)
            stats["prefill_tokens"] += k - int(r.sampled_pending)
            stats["hole_slots"] += holes
            r.fed += k
            r.pending, r.sampled_pending = [], False
        stats["forward_calls"] += 1
        ids = torch.tensor(ids, dtype=torch.long, device=device)
        positions = torch.tensor(positions, dtype=torch.long, device=device)
        self.attention = torch.cat([self.attention, torch.tensor(real, device=device)], dim=1)
        last = sorted(set(k - 1 for k in counts))
        keep = 1 if last == [width - 1] else torch.tensor(last, device=device)
        out = self.engine.model(input_ids=ids, attention_mask=self.attention,
                                position_ids=positions, past_key_values=self.cache,
                                use_cache=True, logits_to_keep=keep)
        if isinstance(keep, int):
            return out.logits[:, -1]
        which = torch.tensor([last.index(k - 1) for k in counts], device=device)
        return out.logits[torch.arange(len(rows), device=device), which]

    def prefix_kv(self, b: int) -> _PrefixKV:
        """A compact copy of row b's real slots."""
        slots = self.attention[b].nonzero().squeeze(1)
        r = self.rows[b]
        full = r.sample.prompt_ids + r.sample.response_ids
        layers = [(layer.keys[b][:, slots], layer.values[b][:, slots])  # indexing copies
                  for layer in self.cache.layers]
        return _PrefixKV(full[:r.fed], layers, self.engine._version)

    def select(self, keep: list[int]) -> None:
        """Keep these rows only."""
        if len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.engine.device)
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.attention = None, None
            return
        for layer in self.cache.layers:
            layer.select_rows(index)
        self.attention = self.attention[index]

    def compact(self) -> None:
        """Squeeze out the holes once they outweigh the real tokens: each row's real slots move to
        the front, in order (causality between them is kept, RoPE is already in the keys)."""
        counts = self.attention.sum(1)
        longest, width = int(counts.max()), self.attention.shape[1]
        if width < COMPACT_RATIO * longest + COMPACT_MIN_HOLES:
            return
        # stable sort of "is hole": the real slots of each row first, in their order
        order = torch.sort(~self.attention, dim=1, stable=True).indices[:, :longest]
        for layer in self.cache.layers:
            layer.keep_slots(order)
        self.attention = torch.arange(longest, device=counts.device) < counts[:, None]
        self.engine.stats["compactions"] += 1

    def repeat(self, n: int) -> None:
        if n > 1:
            self.cache.batch_repeat_interleave(n)
            self.attention = self.attention.repeat_interleave(n, dim=0)


class HFEngine:
    """The `Engine` protocol (appo.rollout.base) on a transformers causal LM.

    tools: mapping name -> callable(arguments: str) -> str; None uses the registry of
    `appo.rollout.tools`, read at each call so tools registered later are seen.
    stats: counters of tokens run through the model — `prefill_tokens` (prompts, tool results,
    fork kept tokens, recomputed prefixes), `decode_tokens` (sampled tokens fed back),
    `recomputed_tokens` (prefixes of fork parents without a kept cache), `hole_slots` (padding
    slots fed), `compactions`, `forward_calls`, `tool_calls`.
    keep_kv: keep the finished samples' caches for forks (see the module docstring).
    stop_token_ids: tokens that end a sample; default the tokenizer's and generation config's EOS.
    tool_timeout: seconds a tool may run before its result becomes an error text (None: no limit).
    protocol: the tool-call format (`appo.rollout.protocol`): a ToolProtocol, or "tags", "chat",
    "auto" (chat when the tokenizer has a chat template).
    """

    def __init__(self, model, tokenizer, tools: Optional[Tools] = None, *, keep_kv: bool = True,
                 stop_token_ids: Optional[Sequence[int]] = None,
                 tool_timeout: Optional[float] = DEFAULT_TOOL_TIMEOUT_S,
                 protocol: Union[ToolProtocol, str] = AUTO):
        self.model, self.tokenizer, self.keep_kv = model, tokenizer, keep_kv
        self.stats: Counter = Counter()
        self._kept: dict[int, tuple[weakref.ref, _PrefixKV]] = {}
        self._version = 0
        kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
        if kinds - {DynamicLayer.__name__}:
            raise ValueError(f"HFEngine supports full-attention models only; this model's cache "
                             f"has {sorted(kinds)} layers")
        if stop_token_ids is None:  # the EOS of the tokenizer and generation config (maybe several)
            config = getattr(model, "generation_config", None)
            stop_token_ids = stop_ids_of(tokenizer, getattr(config, "eos_token_id", None))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.loop = ToolLoop(tokenizer, self.vocab_size, tools, stop_token_ids, tool_timeout,
                             protocol)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tools(self) -> Tools:
        return self.loop.tools

    @property
    def protocol(self) -> ToolProtocol:
        return self.loop.protocol

    # ---- the Engine protocol

    def generate(self, prompts: Sequence[Sequence[int]], n: int,
                 sampling: SamplingParams) -> list[Sample]:
        prompts = [self.loop.check_ids(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
        check_n(n)
        self.release_kv()  # a new rollout phase: the previous one's samples are not forked any more
        groups = [(_Row(Sample(prompt_ids=p, prompt_index=i), pending=list(p), segment=[]), None)
                  for i, p in enumerate(prompts)]
        return self._rollout(groups, n, sampling)

    def fork(self, samples: Sequence[Sample], positions: Sequence[int], n: int,
             sampling: SamplingParams) -> list[Sample]:
        check_n(n)
        positions = self.loop.check_fork(samples, positions)
        prefixes = self._parent_prefixes(samples, positions)
        groups = []
        for s, (parent, p) in enumerate(zip(samples, positions)):
            full = parent.prompt_ids + parent.response_ids
            kv = prefixes[s]
            cached = min(len(kv.ids), len(parent.prompt_ids) + p)
            row = _Row.start_fork(parent, s, p, pending=full[cached:len(parent.prompt_ids) + p + 1],
                               fed=cached)
            groups.append((row, (kv, cached)))
        return self._rollout(groups, n, sampling, decide_first=True)

    def update_weights(self, model) -> None:
        """Load the training model's weights (a module or a state_dict); kept caches go stale."""
        if model is not self.model:
            with torch.no_grad():
                self.model.load_state_dict(weights_of(model))
        self._version += 1
        self.release_kv()

    def release_kv(self) -> None:
        """Drop the kept caches of earlier samples (forks of them will recompute their prefix)."""
        self._kept.clear()

    # ---- internals

    def _keep(self, sample: Sample, kv: _PrefixKV) -> None:
        key, kept = id(sample), self._kept

        def forget(ref):
            if kept.get(key, (None,))[0] is ref:
                del kept[key]

        kept[key] = (weakref.ref(sample, forget), kv)

    def _kept_for(self, sample: Sample, length: int) -> Optional[_PrefixKV]:
        entry = self._kept.get(id(sample))
        if entry is None or entry[0]() is not sample:
            return None
        kv = entry[1]
        n = min(len(kv.ids), length)
        full = sample.prompt_ids + sample.response_ids
        if kv.version != self._version or kv.ids[:n] != full[:n]:
            return None  # stale weights, or the sample was edited since
        return kv

    def _parent_prefixes(self, samples: Sequence[Sample],
                         positions: Sequence[int]) -> list[_PrefixKV]:
        """Each parent's prefix keys/values: kept ones, else recomputed once per parent."""
        need: dict[int, int] = {}  # parent id -> longest prefix its positions need
        for parent, p in zip(samples, positions):
            need[id(parent)] = max(need.get(id(parent), 0), len(parent.prompt_ids) + p)
        found = {id(s): self._kept_for(s, need[id(s)]) for s in samples}
        missing = list({id(s): s for s in samples if found[id(s)] is None}.values())
        if missing:
            rows = [_Row(s, pending=(s.prompt_ids + s.response_ids)[:need[id(s)]], segment=[])
                    for s in missing]
            for r in rows:
                self.stats["recomputed_tokens"] += len(r.pending)
            with torch.inference_mode(), _eval(self.model):
                batch = _Batch(self, rows, [None] * len(rows))
                batch.feed()
                for b, s in enumerate(missing):
                    found[id(s)] = batch.prefix_kv(b)
                    if self.keep_kv:
                        self._keep(s, found[id(s)])
        return [found[id(s)] for s in samples]

    def _decide(self, rows: list[_Row], sampling: SamplingParams, tools: Tools) -> None:
        """Stop rules and the tool loop for the rows whose last token was just decided."""
        appended = self.loop.decide(rows, sampling, tools)
        self.stats["tool_calls"] += len(appended)
        for row, ids in appended:
            row.pending += ids

    def _sample(self, logits: torch.Tensor, rows: list[_Row], temperature: float):
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        cdf = logp.double().exp().cumsum(-1)
        u = torch.cat([torch.rand(1, generator=r.rng, dtype=torch.float64) for r in rows])
        # inverse CDF; right=True never picks a zero-probability token
        x = u.to(cdf.device)[:, None] * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, x, right=True).clamp_max(cdf.shape[1] - 1)
        return tokens.squeeze(1).tolist(), logp.gather(1, tokens).squeeze(1).tolist()

    def _rollout(self, groups: list[tuple[_Row, Optional[tuple[_PrefixKV, int]]]], n: int,
                 sampling: SamplingParams, decide_first: bool = False) -> list[Sample]:
        tools = self.tools
        seed = call_seed(sampling)
        if decide_first:  # a fork's kept token may end the sample or close a tool call
            self._decide([g for g, _ in groups], sampling, tools)
        out: list[Optional[Sample]] = [None] * (len(groups) * n)
        for g, (row, _) in enumerate(groups):
            if row.finished:
                for j in range(n):
                    out[g * n + j] = copy_sample(row.sample)
        live = [(g, row, prefix) for g, (row, prefix) in enumerate(groups) if not row.finished]
        if not live:
            return out
        with torch.inference_mode(), _eval(self.model):
            batch = _Batch(self, [row for _, row, _ in live], [prefix for _, _, prefix in live])
            logits = batch.feed().repeat_interleave(n, dim=0)
            batch.repeat(n)
            batch.rows = [_Row(copy_sample(row.sample), pending=[], segment=list(row.segment),
                               fed=row.fed, rng=_row_generator(seed, g * n + j), index=g * n + j)
                          for g, row, _ in live for j in range(n)]
            while True:
                tokens, logprobs = self._sample(logits, batch.rows, sampling.temperature)
                for r, t, lp in zip(batch.rows, tokens, logprobs):
                    r.sample.response_ids.append(t)
                    r.sample.response_mask.append(1)
                    r.sample.response_logprobs.append(lp)
                    r.segment.append(t)
                    r.pending, r.sampled_pending = [t], True
                self._decide(batch.rows, sampling, tools)
                keep = []
                for b, r in enumerate(batch.rows):
                    if r.finished:
                        out[r.index] = r.sample
                        if self.keep_kv:
                            self._keep(r.sample, batch.prefix_kv(b))
                    else:
                        keep.append(b)
                batch.select(keep)
                if not batch.rows:
                    return out
                batch.compact()
                logits = batch.feed()


class _eval:
    """Eval mode for the rollout, then the caller's mode back (the model may be the trainer's)."""

    def __init__(self, model):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
