"""The transformers integration (docs/ops.md): one packed tree forward through a Hugging Face model
with attn_implementation="appo_tree" gives every sequence the log-probs and parameter gradients of
running it alone with ordinary causal attention."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from appo_kernels.integrations.transformers import (  # noqa: E402
    ATTN_IMPLEMENTATION, enable_tree_attention, register, tree_attention_forward, tree_token_stats)
from appo_kernels.tree import TreeLayout  # noqa: E402

VOCAB = 64
LOGPROB_TOL = dict(atol=2e-5, rtol=1e-5)  # float32 tree forward against float32 per sequence
GRAD_RTOL = 1e-5  # relative to each parameter's largest gradient entry


def tiny_llama(**overrides):
    """A randomly initialised Llama with GQA (4 query heads, 2 key/value heads, head_dim 16)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        initializer_range=0.2, tie_word_embeddings=False, **overrides)
    return transformers.LlamaForCausalLM(config).float().eval()


def random_tokens(n, avoid=None):
    tokens = torch.randint(0, VOCAB, (n,))
    if avoid is not None and n:
        tokens[0] = (avoid + 1 + torch.randint(0, VOCAB - 1, ())) % VOCAB  # any token but `avoid`
    return tokens


def branch(base, at, length):
    """base[:at] followed by `length` fresh tokens, the first differing from base[at]."""
    avoid = int(base[at]) if at < len(base) else None
    return torch.cat([base[:at], random_tokens(length, avoid)])


def rollout_forest():
    """Shared prompt, branches at several depths, a branch of a branch, a sequence that is a prefix
    of another, a duplicate, a length-1 sequence and a second tree with its own root."""
    s0 = random_tokens(12)
    s1 = branch(s0, 8, 4)
    s2 = branch(s1, 10, 3)
    s3 = branch(s0, 6, 7)
    other_root = torch.cat([random_tokens(1, avoid=int(s0[0])), random_tokens(5)])
    return [s0, s1, s2, s3, s0[:9], s0.clone(), other_root, other_root[:1]]


def sequence_logprobs(model, seq):
    """log p(seq[i] | seq[:i]) for i >= 1, the sequence alone with ordinary causal attention."""
    logits = model(input_ids=seq[None], use_cache=False).logits[0]
    return torch.log_softmax(logits[:-1].double(), dim=-1).gather(-1, seq[1:, None])[:, 0]


def tree_logprobs(model, layout, token_ids):
    logits = model(input_ids=token_ids[None], position_ids=layout.depth[None],
                   appo_tree=layout, use_cache=False).logits
    return tree_token_stats(logits, layout, token_ids).logprob


def parameter_grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("reference", ["eager", "sdpa"])
def test_tree_forward_matches_each_sequence_alone(reference):
    model = tiny_llama()
    seqs = rollout_forest()
    layout, token_ids, paths = TreeLayout.from_sequences(seqs)
    assert layout.n_tokens < sum(len(s) for s in seqs)  # prefixes are shared
    model.set_attn_implementation(reference)
    with torch.no_grad():
        expected = [sequence_logprobs(model, s) for s in seqs]
    enable_tree_attention(model)
    with torch.no_grad():
        logprob = tree_logprobs(model, layout, token_ids)
    for seq, path, want in zip(seqs, paths, expected):
        assert seq.equal(token_ids[path])
        # the logits of token t sit at parent[t]: tree_token_stats gathers them there
        torch.testing.assert_close(logprob[path[1:]].double(), want, **LOGPROB_TOL)
    roots = layout.parent < 0
    assert int(roots.sum()) == 2 and bool((logprob[roots] == 0).all())


def test_tree_gradients_match_unrolled_sequences():
    model = tiny_llama()
    seqs = rollout_forest()
    layout, token_ids, paths = TreeLayout.from_sequences(seqs)

    model.set_attn_implementation("eager")
    sum(sequence_logprobs(model, s).sum() for s in seqs).backward()
    expected = parameter_grads(model)
    model.zero_grad()

    enable_tree_attention(model)
    # a tree token stands for one token of every sequence that passes through it
    paths_through = torch.bincount(torch.cat(paths), minlength=layout.n_tokens)
    (paths_through * tree_logprobs(model, layout, token_ids)).sum().backward()
    grads = parameter_grads(model)

    assert grads.keys() == expected.keys()
    for name, want in expected.items():
        scale = want.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(grads[name], want, rtol=GRAD_RTOL, atol=GRAD_RTOL * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_tree_token_stats_reads_the_parent_row():
    seqs = rollout_forest()
    layout, token_ids, _ = TreeLayout.from_sequences(seqs)
    n, temperature = layout.n_tokens, 0.7
    logits = (torch.randn(n, VOCAB) * 3).requires_grad_(True)
    mask = torch.rand(n) > 0.2
    stats = tree_token_stats(logits, layout, token_ids, temperature=temperature, mask=mask)

    ref = logits.detach().double().requires_grad_(True)
    logp = torch.log_softmax(ref / temperature, dim=-1)
    want_lp = torch.zeros(n, dtype=torch.float64)
    want_ent = torch.zeros(n, dtype=torch.float64)
    for t in range(n):
        p = int(layout.parent[t])
        if p >= 0 and mask[t]:
            want_lp = want_lp.index_put((torch.tensor(t),), logp[p, token_ids[t]])
            want_ent[t] = -(logp[p].exp() * logp[p]).sum().item()
    torch.testing.assert_close(stats.logprob.double(), want_lp.detach(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(stats.entropy.double(), want_ent, atol=2e-5, rtol=1e-5)

    weights = torch.randn(n)
    (weights * stats.logprob).sum().backward()
    (weights.double() * want_lp).sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref.grad, atol=2e-5, rtol=1e-5)


def misuse_cases():
    def no_layout(model, layout, ids):
        model(input_ids=ids[None], position_ids=layout.depth[None])

    def batch_of_two(model, layout, ids):
        model(input_ids=ids[None].expand(2, -1), position_ids=layout.depth[None].expand(2, -1),
              appo_tree=layout)

    def other_layout(model, layout, ids):
        small, _, _ = TreeLayout.from_sequences([ids[:3].tolist()])
        model(input_ids=ids[None], position_ids=layout.depth[None], appo_tree=small)

    def not_a_layout(model, layout, ids):
        model(input_ids=ids[None], position_ids=layout.depth[None], appo_tree=layout.parent)

    def default_positions(model, layout, ids):
        model(input_ids=ids[None], appo_tree=layout)

    def padding_mask(model, layout, ids):
        model(input_ids=ids[None], position_ids=layout.depth[None], appo_tree=layout,
              attention_mask=torch.ones(1, len(ids), dtype=torch.long))

    cases = [
        (no_layout, ValueError, "appo_tree=layout"),
        (batch_of_two, ValueError, "batch size 1"),
        (other_layout, ValueError, "has 3"),
        (not_a_layout, TypeError, "must be a TreeLayout"),
        (default_positions, ValueError, "position_ids must be layout.depth"),
        (padding_mask, ValueError, "attention_mask=None"),
    ]
    return [pytest.param(*case, id=case[0].__name__) for case in cases]


@pytest.mark.parametrize("call, error, message", misuse_cases())
def test_misuse_raises_clearly(call, error, message):
    model = enable_tree_attention(tiny_llama())
    layout, token_ids, _ = TreeLayout.from_sequences(rollout_forest()[:4])
    with torch.no_grad(), pytest.raises(error, match=message):
        call(model, layout, token_ids)


def test_dropout_in_training_raises():
    model = enable_tree_attention(tiny_llama(attention_dropout=0.1)).train()
    layout, token_ids, _ = TreeLayout.from_sequences(rollout_forest()[:3])
    with pytest.raises(ValueError, match="no dropout"):
        model(input_ids=token_ids[None], position_ids=layout.depth[None], appo_tree=layout)
    model.eval()  # dropout is off outside training: the same call runs
    model(input_ids=token_ids[None], position_ids=layout.depth[None], appo_tree=layout)


def test_register_is_idempotent_and_loadable_by_name():
    register()
    register()
    from transformers import AttentionInterface

    assert AttentionInterface()[ATTN_IMPLEMENTATION] is tree_attention_forward
    model = transformers.LlamaForCausalLM._from_config(tiny_llama().config,
                                                       attn_implementation=ATTN_IMPLEMENTATION)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
