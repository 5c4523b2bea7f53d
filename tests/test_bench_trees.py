"""The rollout-tree generators of the tree-attention benchmark (`bench/trees.py`,
bench/README.md)."""

import pytest
import torch

from appo_kernels.tree import TreeLayout
from bench.trees import K, TREES, rollout_tree

# scaled down: N ≤ 2k, so an N×N mask is cheap; at 1/256 some segments are a single token
SMALL = (1 / 256, 1 / 64)
SEEDS = (0, 1)
NAMES = tuple(TREES)


@pytest.fixture(scope="module",
                params=[(n, s, seed) for n in NAMES for s in SMALL for seed in SEEDS],
                ids=lambda p: f"{p[0]}-scale{p[1]:g}-seed{p[2]}")
def small(request):
    name, scale, seed = request.param
    tree = rollout_tree(name, scale, seed)
    return tree, TreeLayout.from_parents(tree.parent)  # raises unless a forest in DFS pre-order


def test_layout_is_valid_pre_order(small):
    tree, layout = small
    assert tree.parent.dtype == torch.int64 and layout.n_tokens == tree.n_tokens
    assert (tree.parent == -1).sum() == 1  # one prompt: one root


def _padded(tree):
    """The paths as rows of one [paths, longest] tensor padded with N, and each row's length
    (one vectorised check for all paths instead of a few small ops per path)."""
    rows = torch.nn.utils.rnn.pad_sequence(tree.paths, batch_first=True,
                                           padding_value=tree.n_tokens)
    lengths = torch.tensor([len(p) for p in tree.paths])
    return rows, lengths


def test_paths_are_root_to_leaf_and_cover_every_token(small):
    tree, layout = small
    rows, lengths = _padded(tree)
    parent = torch.cat([tree.parent, torch.tensor([-2])])  # the padding's parent matches nothing
    assert (parent[rows[:, 0]] == -1).all()
    inner = torch.arange(1, rows.shape[1]) < lengths[:, None]
    assert torch.equal(parent[rows[:, 1:]][inner], rows[:, :-1][inner])
    is_parent = torch.zeros(tree.n_tokens, dtype=torch.bool)
    is_parent[tree.parent[tree.parent >= 0]] = True
    ends = rows[torch.arange(len(rows)), lengths - 1]
    assert sorted(ends.tolist()) == (~is_parent).nonzero().flatten().tolist()  # each leaf once
    covered = torch.zeros(tree.n_tokens + 1, dtype=torch.bool)
    covered[rows] = True
    assert covered[:-1].all()
    assert tree.unrolled_tokens == int(lengths.sum())


def test_pair_counts_match_brute_force(small):
    tree, layout = small
    mask = layout.dense_mask()
    assert tree.tree_pairs == int(mask.sum()) == int((layout.depth + 1).sum())
    # the tree mask restricted to each path is exactly causal attention over that path
    rows, lengths = _padded(tree)
    padded_mask = torch.nn.functional.pad(mask, (0, 1, 0, 1))  # the padding sees nothing
    on_paths = padded_mask[rows[:, :, None], rows[:, None, :]]
    valid = torch.arange(rows.shape[1]) < lengths[:, None]
    causal = torch.ones_like(on_paths[0]).tril() & valid[:, :, None] & valid[:, None, :]
    assert torch.equal(on_paths, causal)
    assert tree.unrolled_pairs == int(on_paths.sum())
    assert tree.pair_saving >= 1.0


def test_same_tree_as_from_sequences(small):
    tree, _ = small
    layout, token_ids, paths = TreeLayout.from_sequences([p.tolist() for p in tree.paths])
    assert torch.equal(token_ids, torch.arange(tree.n_tokens))
    assert torch.equal(layout.parent, tree.parent)
    assert all(torch.equal(a, b) for a, b in zip(paths, tree.paths))


@pytest.mark.parametrize("name", NAMES)
def test_seeded(name):
    a, b = rollout_tree(name, 1 / 16, seed=3), rollout_tree(name, 1 / 16, seed=3)
    assert torch.equal(a.parent, b.parent)
    if name != "C1":  # C1 has no branch points to draw
        assert not torch.equal(a.parent, rollout_tree(name, 1 / 16, seed=4).parent)


def test_full_scale_sizes_follow_the_spec():
    c1, c2, c3, c4, c5 = (rollout_tree(n) for n in NAMES)
    assert c1.n_tokens == K + 16 * 2 * K and len(c1.paths) == 16
    assert c1.unrolled_tokens == 16 * 3 * K
    # ARPO branches continue to the rollout's length: every path is prompt + rollout long
    for tree, prompt, rollout, n_paths in ((c2, 2 * K, 4 * K, 8 * 3), (c4, 2 * K, 4 * K, 3 * 31),
                                           (c5, 4 * K, 12 * K, 4 * 4)):
        assert len(tree.paths) == n_paths
        assert {len(p) for p in tree.paths} == {prompt + rollout}
    assert c3.n_tokens == K + 8 * (2 * K + 8 * 256) and len(c3.paths) == 8 * 9
    assert 0.8 < c4.n_tokens / c2.n_tokens < 1.25  # C4 is sized to be comparable to C2
    assert c4.pair_saving > c2.pair_saving > c1.pair_saving


def test_bad_arguments():
    with pytest.raises(ValueError, match="name"):
        rollout_tree("C6")
    with pytest.raises(ValueError, match="scale"):
        rollout_tree("C1", scale=0)
