"""TreeLayout (docs/ops.md): metadata against brute-force walks of the parent array, the trie built
by from_sequences, and the FlexAttention block mask against the dense mask."""

import random

import pytest
import torch

from appo_kernels.tree import TreeLayout


def random_preorder_parents(n_tokens, max_children=4, n_roots=1, rng=None):
    """A random forest in DFS pre-order: each new token hangs under a node of the current
    root-to-last-token chain (or starts a new root)."""
    rng = rng or random.Random(int(torch.randint(0, 2**31, ())))
    parents, chain = [], []
    roots_left = n_roots
    for i in range(n_tokens):
        if not chain or (roots_left > 1 and rng.random() < 1.0 / max(2, n_tokens // n_roots)):
            if chain:
                roots_left -= 1
            parents.append(-1)
            chain = [i]
            continue
        # branch off at a random ancestor depth, deeper ancestors more likely (long chains)
        keep = len(chain) if rng.random() < 0.7 else rng.randint(1, len(chain))
        chain = chain[:keep]
        parents.append(chain[-1])
        chain.append(i)
    return parents


def brute_ancestors(parents, i):
    out = []
    while i >= 0:
        out.append(i)
        i = parents[i]
    return out


@pytest.mark.parametrize("n_tokens,n_roots", [(1, 1), (2, 1), (37, 1), (300, 1), (200, 5),
                                              (64, 64)])
def test_metadata_matches_brute_force(n_tokens, n_roots):
    parents = random_preorder_parents(n_tokens, n_roots=n_roots)
    layout = TreeLayout.from_parents(parents)
    for i in range(n_tokens):
        chain = brute_ancestors(parents, i)
        assert layout.depth[i] == len(chain) - 1
        descendants = [j for j in range(n_tokens) if i in brute_ancestors(parents, j)]
        assert layout.subtree_end[i] == max(descendants)
    mask = layout.dense_mask()
    for i in range(n_tokens):
        assert mask[i].nonzero().flatten().tolist() == sorted(brute_ancestors(parents, i))


def test_long_chain_and_wide_star():
    chain = TreeLayout.from_parents(list(range(-1, 999)))
    assert chain.depth.tolist() == list(range(1000))
    assert (chain.subtree_end == 999).all()
    star = TreeLayout.from_parents([-1] + [0] * 500)
    assert star.depth.tolist() == [0] + [1] * 500
    assert star.subtree_end[0] == 500 and star.subtree_end[1:].tolist() == list(range(1, 501))


@pytest.mark.parametrize("parents,message", [
    ([0], "parent\\[0\\] = 0"),
    ([-1, 1], "parent\\[1\\] = 1"),
    ([-1, -2], "parent\\[1\\] = -2"),
    ([-1, 0, 0, 1], "not in DFS pre-order: token 3 has parent 1"),
    ([-1, 0, 1, -1, 2], "not in DFS pre-order: token 4 has parent 2"),
])
def test_invalid_parents_raise(parents, message):
    with pytest.raises(ValueError, match=message):
        TreeLayout.from_parents(parents)


def test_bad_parent_types_raise():
    with pytest.raises(TypeError, match="parent must have dtype"):
        TreeLayout.from_parents(torch.tensor([-1.0, 0.0]))
    with pytest.raises(ValueError, match="parent must be 1-D"):
        TreeLayout.from_parents(torch.tensor([[-1, 0]]))
    with pytest.raises(ValueError, match="at least one token"):
        TreeLayout.from_parents([])


def test_from_sequences_merges_prefixes():
    seqs = [[5, 1, 2, 3], [5, 1, 2, 9, 9], [5, 7], [4], [5, 1, 2, 3], [5, 1], []]
    layout, token_ids, paths = TreeLayout.from_sequences(seqs)
    distinct_prefixes = {tuple(s[:i + 1]) for s in seqs for i in range(len(s))}
    assert layout.n_tokens == len(distinct_prefixes)
    for seq, path in zip(seqs, paths):
        assert token_ids[path].tolist() == seq
        if seq:
            assert layout.parent[path[0]] == -1
            assert layout.parent[path[1:]].tolist() == path[:-1].tolist()
            assert layout.depth[path].tolist() == list(range(len(seq)))
    assert torch.equal(paths[0], paths[4])
    assert torch.equal(paths[5], paths[0][:2])
    # first-appearance order of children: the 5-1-2 branch comes before 5-7, root 5 before 4
    assert paths[2][1] > paths[1][-1] and paths[3][0] > paths[2][-1]


def test_from_sequences_random_trie():
    rng = random.Random(int(torch.randint(0, 2**31, ())))
    prompt = [rng.randrange(50) for _ in range(6)]
    seqs = []
    for _ in range(12):
        base = rng.choice(seqs) if seqs and rng.random() < 0.6 else prompt
        cut = rng.randint(1, len(base))
        seqs.append(base[:cut] + [rng.randrange(50) for _ in range(rng.randint(0, 8))])
    layout, token_ids, paths = TreeLayout.from_sequences([torch.tensor(s) for s in seqs])
    for seq, path in zip(seqs, paths):
        assert token_ids[path].tolist() == seq
    covered = torch.cat(paths).unique()
    assert covered.tolist() == list(range(layout.n_tokens))


def test_from_sequences_rejects_non_integers():
    with pytest.raises(TypeError, match="seqs\\[1\\] must hold integer token ids"):
        TreeLayout.from_sequences([[1, 2], [1, 2.5]])
    with pytest.raises(ValueError, match="at least one token"):
        TreeLayout.from_sequences([[], []])


def test_segment_starts():
    layout = TreeLayout.from_parents([-1, 0, 1, 1, 3, 0, -1, 6])
    assert layout.segment_starts().tolist() == [0, 3, 5, 6]


@pytest.mark.parametrize("block_size", [1, 3, 8, 16, 128])
def test_block_mask_matches_dense_mask(block_size):
    parents = random_preorder_parents(90, n_roots=3)
    layout = TreeLayout.from_parents(parents)
    block_mask = layout.to_block_mask(block_size)
    n = layout.n_tokens
    n_blocks = -(-n // block_size)
    dense = torch.zeros(n_blocks * block_size, n_blocks * block_size, dtype=torch.bool)
    dense[:n, :n] = layout.dense_mask()
    tiles = dense.view(n_blocks, block_size, n_blocks, block_size)
    any_visible = tiles.any(3).any(1)
    # a tile counts as full when every real (query, key) pair in it is visible
    real = torch.zeros_like(dense)
    real[:n, :n] = True
    real_tiles = real.view(n_blocks, block_size, n_blocks, block_size)
    all_visible = (tiles | ~real_tiles).all(3).all(1)

    def as_dense(num, idx):
        out = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
        for qb in range(n_blocks):
            out[qb, idx[0, 0, qb, :num[0, 0, qb]].long()] = True
        return out

    partial = as_dense(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = as_dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    assert torch.equal(full, all_visible & any_visible)
    assert torch.equal(partial, any_visible & ~all_visible)
    # the mask_mod reproduces the dense mask on every pair
    q_idx = torch.arange(n)[:, None]
    kv_idx = torch.arange(n)[None, :]
    assert torch.equal(block_mask.mask_mod(0, 0, q_idx, kv_idx), layout.dense_mask())


def test_layout_to_device_keeps_metadata():
    layout = TreeLayout.from_parents([-1, 0, 0])
    moved = layout.to("cpu")
    assert torch.equal(moved.subtree_end, layout.subtree_end) and moved.n_tokens == 3


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_tree_attention_matches_reference():
    from appo_kernels.tree import flex_tree_attention, tree_attention

    layout = TreeLayout.from_parents(random_preorder_parents(70, n_roots=2))
    q = torch.randn(70, 4, 16)
    k, v = torch.randn(70, 2, 16), torch.randn(70, 2, 16)
    out, lse = tree_attention(q, k, v, layout, return_lse=True)
    flex_out, flex_lse = flex_tree_attention(q, k, v, layout, return_lse=True,
                                             block_mask=layout.to_block_mask(16))
    torch.testing.assert_close(flex_out, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex_lse, lse, atol=1e-5, rtol=1e-5)


def test_parents_and_ids_that_are_not_integers():
    with pytest.raises(TypeError, match=r"parent\[1\] must be an integer, got 0.5"):
        TreeLayout.from_parents([-1, 0.5])  # torch.as_tensor would have truncated it to 0
    np = pytest.importorskip("numpy")
    layout, ids, paths = TreeLayout.from_sequences([np.array([5, 6, 7]), [np.int64(5), 8]])
    assert ids.tolist() == [5, 6, 7, 8] and paths[1].tolist() == [0, 3]
    assert TreeLayout.from_parents(np.array([-1, 0, 1])).n_tokens == 3
