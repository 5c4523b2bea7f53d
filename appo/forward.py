"""The training pass over packed rollout trees (docs/ops.md, tree attention; docs/training.md).

All sequences of a micro-batch (prompts, their rollouts and branches; several prompts share a
call) are merged into one trie (`TreeLayout.from_sequences`): every shared prefix is one run of
tokens, computed once, with `"appo_tree"` attention. The statistics of the token that follows row
`parent[t]` come from `tree_token_stats`; each sequence then *gathers* its response tokens from
the tree by its path. The gather is the whole trick that keeps the loss exact: a shared token
appears once in the forward pass but once per sequence in the loss, and autograd sums its
gradient over the sequences that gather it, exactly as the unrolled computation would.

`unrolled=True` runs the same statistics on right-padded sequences with the model's ordinary
attention (the `--unrolled` check): same values, same gradients, more work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from appo.distributed import fused_forward
from appo_kernels import (TreeLayout, linear_token_stats, token_stats, tree_linear_token_stats,
                          tree_token_stats)
from appo_kernels.integrations.transformers import ATTN_IMPLEMENTATION, attention

FALLBACK_ATTENTION = "sdpa"  # the unrolled pass when the model was loaded with "appo_tree"


@dataclass
class ResponseStats:
    """Per response token of every sequence, packed sequence after sequence."""

    logprob: Tensor  # float32 [N], log p(token | everything before it) at the given temperature
    entropy: Tensor  # float32 [N], of the distribution that token was drawn from
    cu_seqlens: Tensor  # int64 [S+1], response offsets
    forward_tokens: int  # positions the model computed (tree tokens, or padded rows × width)


def response_token_stats(model, prompts: Sequence[Sequence[int]],
                         responses: Sequence[Sequence[int]], *, temperature: float = 1.0,
                         unrolled: bool = False, pad_id: int = 0,
                         fused: bool = True) -> ResponseStats:
    """Log-prob and entropy of every response token of `prompts[i] + responses[i]` under `model`
    (differentiable when grad is enabled). Tree-packed unless `unrolled`. `fused`: take the
    statistics from the last hidden states and the lm_head (`linear_token_stats`, no
    [tokens × V] logits) where the model's head allows it (`fused_head`)."""
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses must pair up: {len(prompts)} prompts, "
                         f"{len(responses)} responses")
    if not prompts:
        raise ValueError("response_token_stats needs at least one sequence")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{i}] is empty: the first response token needs a context")
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.long)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    device = next(model.parameters()).device
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    if unrolled:
        logprob, entropy, work = _unrolled(model, seqs, [len(p) for p in prompts], temperature,
                                           pad_id, device, fused)
    else:
        logprob, entropy, work = _tree(model, seqs, [len(p) for p in prompts], temperature,
                                       device, fused)
    return ResponseStats(logprob, entropy, cu_seqlens.to(device), work)


def fused_head(model):
    """The model's output layer as (weight, bias) when its logits are exactly hidden @ weight.T
    + bias (no soft-capping, scaling or other post-processing), so that `linear_token_stats` can
    take the statistics without the logits; None otherwise. Checked once per model on a few
    tokens against the model's own logits, and remembered."""
    head, base = model.get_output_embeddings(), getattr(model, "base_model", None)
    ok = getattr(model, "_appo_fused_head", None)
    if ok is None:
        ok = (isinstance(head, torch.nn.Linear) and base is not None and base is not model
              and _head_reproduces_logits(model, base, head))
        model._appo_fused_head = ok
    return (head.weight, head.bias) if ok else None


def _head_reproduces_logits(model, base, head) -> bool:
    """Whether hidden @ head.weight.T + head.bias equals the model's logits on a few tokens."""
    ids = torch.arange(3, device=head.weight.device)[None] % head.weight.shape[0]
    name = model.config._attn_implementation
    training = model.training
    model.eval()  # no dropout between the two passes
    with torch.no_grad(), attention(model, FALLBACK_ATTENTION if name == ATTN_IMPLEMENTATION
                                    else name):
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
        hidden = base(input_ids=ids, use_cache=False).last_hidden_state[0]
        again = torch.nn.functional.linear(hidden, head.weight, head.bias).float()
    model.train(training)
    return torch.allclose(logits, again, rtol=1e-3, atol=1e-3 * float(logits.abs().max()))


def _tree(model, seqs, prompt_lens, temperature, device, fused):
    layout, token_ids, paths = TreeLayout.from_sequences(seqs)
    # each sequence's response tokens, as indices into the packed tree
    index = torch.cat([path[n:] for path, n in zip(paths, prompt_lens)]).to(device)
    layout, token_ids = layout.to(device), token_ids.to(device)
    scored = torch.zeros(layout.n_tokens, dtype=torch.bool, device=device)
    scored[index] = True
    head = fused_head(model) if fused else None
    with attention(model, ATTN_IMPLEMENTATION):
        inputs = dict(input_ids=token_ids[None], position_ids=layout.depth[None],
                      appo_tree=layout, use_cache=False)
        if head is None:
            logprob, entropy = _pair(tree_token_stats(model(**inputs).logits[0], layout,
                                                      token_ids, temperature=temperature,
                                                      mask=scored))
        else:  # never the [tokens × V] logits: statistics from the last hidden states
            logprob, entropy = fused_forward(model, inputs, lambda hidden, weight, bias: _pair(
                tree_linear_token_stats(hidden[0], weight, bias, layout, token_ids,
                                        temperature=temperature, mask=scored)))
    return logprob[index], entropy[index], layout.n_tokens


def _unrolled(model, seqs, prompt_lens, temperature, pad_id, device, fused):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    # target[b, t] is scored when token t + 1 of row b is a response token
    scored = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
    for b, (seq, n) in enumerate(zip(seqs, prompt_lens)):
        ids[b, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[b, :len(seq)] = 1
        scored[b, n - 1:len(seq) - 1] = True
    ids, attention_mask, scored = ids.to(device), attention_mask.to(device), scored.to(device)
    name = model.config._attn_implementation
    head = fused_head(model) if fused else None
    with attention(model, FALLBACK_ATTENTION if name == ATTN_IMPLEMENTATION else name):
        inputs = dict(input_ids=ids, attention_mask=attention_mask, use_cache=False)
        if head is None:
            logprob, entropy = _pair(token_stats(model(**inputs).logits[:, :-1], ids[:, 1:],
                                                 temperature=temperature, mask=scored))
        else:
            logprob, entropy = fused_forward(model, inputs, lambda hidden, weight, bias: _pair(
                linear_token_stats(hidden[:, :-1], weight, ids[:, 1:], bias=bias,
                                   temperature=temperature, mask=scored)))
    # row-major boolean indexing keeps each row's response tokens in order, rows in order
    return logprob[scored], entropy[scored], ids.numel()


def _pair(stats) -> tuple[Tensor, Tensor]:
    # plain tensors out of the head's forward: FSDP hooks the backward on the outputs it sees
    return stats.logprob, stats.entropy


@dataclass
class RolloutStats:
    """`response_token_stats` of many rollouts, packed response after response."""

    logprob: Tensor
    entropy: Tensor
    forward_tokens: int  # what the model computed
    sequence_tokens: int  # what unrolled sequences would have been


def rollout_token_stats(model, prompts: Sequence[Sequence[int]],
                        responses: Sequence[Sequence[int]], group: Tensor, *, token_budget: int,
                        temperature: float = 1.0, unrolled: bool = False,
                        pad_id: int = 0, fused: bool = True) -> RolloutStats:
    """Log-prob and entropy of every response token of `prompts[i] + responses[i]`, in
    micro-batches of whole prompt groups (`group[i]`, see `micro_batches`)."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.long)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    device = next(model.parameters()).device
    logprob = torch.zeros(int(cu_seqlens[-1]), device=device)
    entropy = torch.zeros(int(cu_seqlens[-1]), device=device)
    work = 0
    for batch in micro_batches(by_group(group), seqs, token_budget):
        stats = response_token_stats(model, [prompts[i] for i in batch],
                                     [responses[i] for i in batch], temperature=temperature,
                                     unrolled=unrolled, pad_id=pad_id, fused=fused)
        index = token_index(cu_seqlens, batch).to(device)
        logprob[index], entropy[index] = stats.logprob, stats.entropy
        work += stats.forward_tokens
    return RolloutStats(logprob, entropy, work, sum(len(s) for s in seqs))


def by_group(group: Tensor) -> list[list[int]]:
    """Sequence indices per group id, groups in order of first appearance."""
    out: dict[int, list[int]] = {}
    for i, g in enumerate(group.tolist()):
        out.setdefault(g, []).append(i)
    return list(out.values())


def token_index(cu_seqlens: Tensor, seqs: list[int]) -> Tensor:
    """The packed token indices of sequences `seqs` (in that order)."""
    bounds = cu_seqlens.tolist()
    return torch.cat([torch.arange(bounds[s], bounds[s + 1]) for s in seqs]).to(
        cu_seqlens.device)


def tree_size(seqs: Sequence[Sequence[int]]) -> int:
    """The number of tokens of the trie of `seqs` (the tree-packed forward's length)."""
    root: dict = {}
    count = 0
    for seq in seqs:
        node = root
        for tok in seq:
            nxt = node.get(tok)
            if nxt is None:
                nxt = node[tok] = {}
                count += 1
            node = nxt
    return count


def micro_batches(groups: Sequence[Sequence[int]], seqs: Sequence[Sequence[int]],
                  token_budget: int) -> list[list[int]]:
    """Split groups of sequence indices (one group per prompt, kept whole) into micro-batches
    whose packed trees hold at most `token_budget` tokens; a group larger than the budget on its
    own forms a micro-batch by itself (it is never cut)."""
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for group in groups:
        size = tree_size([seqs[i] for i in group])
        if current and used + size > token_budget:
            batches.append(current)
            current, used = [], 0
        current = current + list(group)
        used += size
    if current:
        batches.append(current)
    return batches
