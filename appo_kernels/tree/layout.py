"""`TreeLayout`: a forest of tokens packed once, in DFS pre-order (docs/ops.md, tree attention).

Key j is visible to query i iff j is i or an ancestor of i; in DFS pre-order every subtree is the
contiguous range [j, subtree_end[j]], so visibility is the interval test j ≤ i ≤ subtree_end[j].
All metadata is computed with vectorised tensor ops on the parent array's device: depths by
pointer jumping, and the pre-order check and subtree ends from a sparse table of range minima
over the depths (O(N log N) work, log N steps, no loop over tokens).
"""

from __future__ import annotations

import numbers

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from appo_kernels._checks import INDEX_DTYPES, tensor_arg


def _log2_steps(n: int) -> int:
    return max(1, (n - 1).bit_length())


def _depths(parent: Tensor) -> Tensor:
    """depth[i] = number of ancestors of i, by pointer jumping (each step doubles the reach)."""
    ancestor = parent.clone()
    depth = (parent >= 0).long()
    for _ in range(_log2_steps(parent.numel()) + 1):
        has = ancestor >= 0
        safe = ancestor.clamp_min(0)
        depth = torch.where(has, depth + depth[safe], depth)
        ancestor = torch.where(has, ancestor[safe], ancestor)
    return depth


def _range_min_table(values: Tensor) -> list[Tensor]:
    """table[l][i] = min(values[i : i + 2^l]) (entries past the end see only what exists)."""
    table = [values]
    width = 1
    while 2 * width <= values.numel():
        prev = table[-1]
        shifted = torch.cat([prev[width:], prev.new_full((width,), torch.iinfo(prev.dtype).max)])
        table.append(torch.minimum(prev, shifted))
        width *= 2
    return table


def _range_min(table: list[Tensor], lo: Tensor, hi: Tensor) -> Tensor:
    """min(values[lo .. hi]) inclusive, for hi ≥ lo."""
    length = hi - lo + 1
    level = torch.floor(torch.log2(length.double())).long()
    stacked = torch.stack(table)  # [levels, N]
    left = stacked[level, lo]
    right = stacked[level, hi - (1 << level) + 1]
    return torch.minimum(left, right)


def _next_not_deeper(table: list[Tensor], depth: Tensor) -> Tensor:
    """For every j, the first k > j with depth[k] ≤ depth[j] (N if none): binary lifting over the
    range-minimum table, largest jumps first."""
    n = depth.numel()
    pos = torch.arange(1, n + 1, device=depth.device)
    for level in range(len(table) - 1, -1, -1):
        width = 1 << level
        can = pos + width <= n
        block_min = table[level][pos.clamp_max(n - 1)]
        jump = can & (block_min > depth)
        pos = torch.where(jump, pos + width, pos)
    return pos


def _kth_ancestor(parent: Tensor, node: Tensor, k: Tensor) -> Tensor:
    """The k-th ancestor of each node (k ≤ depth), by binary lifting over the bits of k."""
    up = parent
    for level in range(int(k.max()).bit_length() if k.numel() else 0):
        node = torch.where((k >> level) & 1 == 1, up[node], node)
        up = torch.where(up >= 0, up[up.clamp_min(0)], up)
    return node


def _ragged_ranks(counts: Tensor) -> tuple[Tensor, Tensor]:
    """For counts c_g: the owner g and rank r of every item (g, r < c_g), in order."""
    owner = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    first = torch.cumsum(counts, 0) - counts
    return owner, torch.arange(owner.numel(), device=counts.device) - first[owner]


@dataclass(frozen=True, eq=False)
class TreeLayout:
    """A packed token forest in DFS pre-order.

    parent:      int64 [N], parent index (< own index), −1 for a root.
    depth:       int64 [N], number of ancestors: the position id of each token.
    subtree_end: int64 [N], last index of the token's subtree (inclusive).
    n_tokens:    N.
    """

    parent: Tensor
    depth: Tensor
    subtree_end: Tensor
    n_tokens: int
    # per-backend metadata (tile or unit lists), computed once per layout on first use
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_parents(cls, parent) -> "TreeLayout":
        """Build from a parent array (a tensor or a list); raises ValueError unless it is a forest
        in DFS pre-order. Checking reads the data on the host once."""
        if not isinstance(parent, Tensor):
            values = list(parent)
            bad = next((i for i, v in enumerate(values)
                        if isinstance(v, bool) or not isinstance(v, numbers.Integral)), None)
            if bad is not None:  # as_tensor would truncate 0.5 to 0 without a word
                raise TypeError(f"parent[{bad}] must be an integer, got {values[bad]!r}")
            parent = torch.as_tensor([int(v) for v in values], dtype=torch.int64)
        tensor_arg("parent", parent, dtypes=INDEX_DTYPES, ndim=1)
        parent = parent.long()
        n = parent.numel()
        if n == 0:
            raise ValueError("parent must hold at least one token")
        index = torch.arange(n, device=parent.device)
        bad = (parent < -1) | (parent >= index)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"parent[{i}] = {int(parent[i])}: a parent must precede its child "
                             f"(−1 <= parent[i] < i)")
        depth = _depths(parent)
        table = _range_min_table(depth)
        # pre-order: every token between a node and its child lies inside the node's subtree,
        # i.e. is deeper than the node
        gap = (parent >= 0) & (parent < index - 1)
        if bool(gap.any()):
            child = index[gap]
            node = parent[gap]
            between = _range_min(table, node + 1, child - 1)
            broken = between <= depth[node]
            if bool(broken.any()):
                i = int(child[broken][0])
                raise ValueError(
                    f"parent is not in DFS pre-order: token {i} has parent {int(parent[i])}, "
                    f"but a token between them lies outside that parent's subtree")
        subtree_end = _next_not_deeper(table, depth) - 1
        return cls(parent=parent, depth=depth, subtree_end=subtree_end, n_tokens=n)

    @classmethod
    def from_sequences(cls, seqs: Sequence) -> tuple["TreeLayout", Tensor, list[Tensor]]:
        """Merge the common prefixes of token sequences into a trie packed in DFS pre-order.

        Returns (layout, token_ids int64 [N], paths) with paths[i] the packed indices of sequence
        i, in order. Children keep the order in which they first appear. Sequences that are
        identical, or prefixes of others, share their nodes; an empty sequence gets an empty path.
        """
        roots: dict[int, int] = {}
        children: list[dict[int, int]] = []
        tokens: list[int] = []
        parents: list[int] = []
        trie_paths: list[list[int]] = []
        for s, seq in enumerate(seqs):
            ids = seq.tolist() if isinstance(seq, Tensor) else list(seq)
            node, path = -1, []
            for tok in ids:
                if isinstance(tok, bool) or not isinstance(tok, numbers.Integral):
                    raise TypeError(f"seqs[{s}] must hold integer token ids, got {tok!r}")
                tok = int(tok)  # numpy integers too
                level = roots if node < 0 else children[node]
                nxt = level.get(tok)
                if nxt is None:
                    nxt = len(tokens)
                    level[tok] = nxt
                    children.append({})
                    tokens.append(tok)
                    parents.append(node)
                node = nxt
                path.append(node)
            trie_paths.append(path)
        if not tokens:
            raise ValueError("seqs must hold at least one token")
        # number the trie in DFS pre-order
        order = torch.empty(len(tokens), dtype=torch.long)
        stack = list(reversed(roots.values()))
        next_id = 0
        while stack:
            node = stack.pop()
            order[node] = next_id
            next_id += 1
            stack.extend(reversed(children[node].values()))
        parent_old = torch.tensor(parents, dtype=torch.long)
        parent = torch.full((len(tokens),), -1, dtype=torch.long)
        has = parent_old >= 0
        parent[order[has]] = order[parent_old[has]]
        token_ids = torch.empty(len(tokens), dtype=torch.long)
        token_ids[order] = torch.tensor(tokens, dtype=torch.long)
        paths = [order[torch.tensor(p, dtype=torch.long)] for p in trie_paths]
        return cls.from_parents(parent), token_ids, paths

    def prepare(self, dtype: Optional[torch.dtype] = None) -> "TreeLayout":
        """Build the metadata (tile or unit lists) of the backend that will run tree_attention on
        inputs of `dtype` (None: any but float64) on this layout's device now, so that later calls,
        also inside torch.compile, only read it."""
        from appo_kernels.tree import _impl, _select_backend

        _impl(_select_backend(dtype, self.device)).metadata(self)
        return self

    def to(self, device) -> "TreeLayout":
        return TreeLayout(self.parent.to(device), self.depth.to(device),
                          self.subtree_end.to(device), self.n_tokens)

    @property
    def device(self) -> torch.device:
        return self.parent.device

    def dense_mask(self) -> Tensor:
        """bool [N, N], True where query i sees key j (tests and small inputs only)."""
        i = torch.arange(self.n_tokens, device=self.device)
        return (i[None, :] <= i[:, None]) & (i[:, None] <= self.subtree_end[None, :])

    def segment_starts(self) -> Tensor:
        """Indices where a chain segment begins: a token whose parent is not the token before it.
        Within a segment attention is causal; queries of one segment share all outer ancestors."""
        index = torch.arange(self.n_tokens, device=self.device)
        return index[(self.parent != index - 1) | (index == 0)]

    def to_block_mask(self, block_size: int = 128):
        """A FlexAttention `BlockMask` for this tree, built from the ancestor intervals.

        For query block Q = [q0, q1) and key block K = [k0, k1): some key of K is visible from Q
        iff K is Q's own block, or K precedes Q and max(subtree_end over K) ≥ q0; every pair is
        visible iff K precedes Q and min(subtree_end over K) ≥ q1 − 1 (or K = Q holds one token). Only per-block minima and
        maxima are computed, never an N×N mask.
        """
        from appo_kernels.tree.flex import block_mask_from_layout

        return block_mask_from_layout(self, block_size)
