"""Seeded rollout trees C1–C5 for the tree-attention benchmark (bench/README.md).

A tree is built from *segments* (chains of tokens: a prompt, a rollout, a branch); a branch hangs
off one token of its parent segment and, as in ARPO, continues from there to the same total length
as the rollout it leaves (C3's branches are the exception: short, fixed length). Packing emits a
segment's tokens contiguously, then its branches in decreasing branch-point order: the branches
hanging deeper in a segment belong to the subtrees of every earlier token, so that order is DFS
pre-order (the continuation of a segment is each token's first child). Work is a loop over
segments; tokens are only touched by `torch.arange`.

`scale` multiplies every length (rounded, at least one token) for CPU smoke runs. Branch points are
drawn inside the scaled segments, so a scaled tree keeps its shape, except that a branch whose
parent segment is too short to hold one (a single token) is left out.

Counts, all exact and in closed form per segment:
  N                packed tokens
  unrolled tokens  Σ over root-to-leaf paths of the path length
  tree pairs       visible (query, key) pairs in the tree, Σ_i (depth_i + 1)
  unrolled pairs   the same over the unrolled paths run as causal sequences, Σ_p L_p (L_p + 1) / 2
The pair-count saving, unrolled pairs / tree pairs, is the speed-up that skipping repeated prefixes
can buy at equal FLOP/s.

    python -m bench.trees                    # the table in bench/README.md
    python -m bench.trees --scale 0.0078125  # the scaled-down trees of the CPU smoke run
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from appo_kernels.tree import TreeLayout

K = 1024
# Branch points are drawn uniformly from this fraction of the segment they leave: a tool call
# neither in the first nor in the last tokens of a turn.
BRANCH_SPAN = (0.1, 0.9)
SEED = 0


@dataclass
class _Segment:
    """A chain of `length` tokens; `branches` holds (offset of the parent token, child segment)."""

    length: int
    branches: list[tuple[int, "_Segment"]] = field(default_factory=list)


@dataclass(frozen=True, eq=False)
class RolloutTree:
    """A packed rollout tree: parent array in DFS pre-order and its root-to-leaf paths."""

    name: str
    parent: Tensor  # int64 [N], −1 for a root; `TreeLayout.from_parents` accepts it
    paths: list[Tensor]  # int64 packed indices of each root-to-leaf path, root first
    tree_pairs: int  # Σ_i (depth_i + 1)
    unrolled_pairs: int  # Σ_p L_p (L_p + 1) / 2

    @property
    def n_tokens(self) -> int:
        return self.parent.numel()

    @property
    def unrolled_tokens(self) -> int:
        return sum(p.numel() for p in self.paths)

    @property
    def longest_path(self) -> int:
        return max(p.numel() for p in self.paths)

    @property
    def pair_saving(self) -> float:
        return self.unrolled_pairs / self.tree_pairs

    def layout(self, device=None) -> TreeLayout:
        return TreeLayout.from_parents(self.parent.to(device))


def _scaled(tokens: int, scale: float) -> int:
    return max(1, round(tokens * scale))


def _branch_offsets(gen: torch.Generator, length: int, count: int) -> list[int]:
    """`count` branch points in a segment of `length` tokens, distinct where there is room.

    A branch point is never the segment's last token: a branch continuing to the same total length
    would be empty, and the segment's end must stay a leaf. Segments of one token get no branch.
    """
    if length < 2 or count == 0:
        return []
    lo = int(BRANCH_SPAN[0] * length)
    hi = max(lo, min(int(BRANCH_SPAN[1] * length), length - 2))
    if hi - lo + 1 >= count:
        offsets = torch.randperm(hi - lo + 1, generator=gen)[:count] + lo
    else:  # tiny scaled-down segments: branch points may coincide (a token with several branches)
        offsets = torch.randint(lo, hi + 1, (count,), generator=gen)
    return sorted(offsets.tolist())


def _branch_to_end(gen: torch.Generator, segment: _Segment, count: int,
                   levels: int = 1) -> None:
    """ARPO branching: `count` branches leave `segment`, each continuing to the segment's end
    (same total length); with `levels` > 1 each branch branches again, recursively."""
    if levels == 0:
        return
    for offset in _branch_offsets(gen, segment.length, count):
        child = _Segment(segment.length - offset - 1)
        segment.branches.append((offset, child))
        _branch_to_end(gen, child, count, levels - 1)


def _pack(name: str, roots: list[_Segment]) -> RolloutTree:
    parents: list[Tensor] = []
    paths: list[list[tuple[int, int]]] = []
    n_tokens = tree_pairs = 0

    def emit(segment: _Segment, parent: int, prefix: list[tuple[int, int]], depth: int) -> None:
        nonlocal n_tokens, tree_pairs
        start, length = n_tokens, segment.length
        chain = torch.arange(start - 1, start + length - 1)
        chain[0] = parent
        parents.append(chain)
        n_tokens += length
        # tokens at depths depth .. depth + length − 1 each see depth_i + 1 keys
        tree_pairs += length * depth + length * (length + 1) // 2
        if all(offset != length - 1 for offset, _ in segment.branches):
            paths.append(prefix + [(start, start + length)])  # the segment's last token is a leaf
        # pre-order: the branches hanging deepest in the segment first (sorted is stable on ties)
        for offset, child in sorted(segment.branches, key=lambda b: -b[0]):
            emit(child, start + offset, prefix + [(start, start + offset + 1)],
                 depth + offset + 1)

    for root in roots:
        emit(root, -1, [], 0)
    path_tensors = [torch.cat([torch.arange(a, b) for a, b in ranges]) for ranges in paths]
    unrolled_pairs = sum(p.numel() * (p.numel() + 1) // 2 for p in path_tensors)
    return RolloutTree(name, torch.cat(parents), path_tensors, tree_pairs, unrolled_pairs)


def _prompt_with_rollouts(prompt: int, rollouts: int, length: int, scale: float,
                          branch: Optional[Callable[[_Segment], None]] = None) -> _Segment:
    root = _Segment(_scaled(prompt, scale))
    for _ in range(rollouts):
        rollout = _Segment(_scaled(length, scale))
        if branch is not None:
            branch(rollout)
        root.branches.append((root.length - 1, rollout))
    return root


def c1(scale: float = 1.0, seed: int = SEED) -> RolloutTree:
    """Plain GRPO: prompt 1k, 16 independent rollouts of 2k (no branch points: `seed` is unused)."""
    return _pack("C1", [_prompt_with_rollouts(1 * K, 16, 2 * K, scale)])


def c2(scale: float = 1.0, seed: int = SEED) -> RolloutTree:
    """ARPO-light: prompt 2k, 8 rollouts of 4k, each branched at 2 points to the same length."""
    gen = torch.Generator().manual_seed(seed)
    return _pack("C2", [_prompt_with_rollouts(2 * K, 8, 4 * K, scale,
                                              lambda r: _branch_to_end(gen, r, 2))])


C3_BRANCH = 256


def c3(scale: float = 1.0, seed: int = SEED) -> RolloutTree:
    """Prompt 1k, 8 rollouts of 2k, 8 branch points each with a short 256-token branch."""
    gen = torch.Generator().manual_seed(seed)
    branch = _scaled(C3_BRANCH, scale)

    def short_branches(rollout: _Segment) -> None:
        rollout.branches += [(o, _Segment(branch)) for o in _branch_offsets(gen, rollout.length, 8)]

    return _pack("C3", [_prompt_with_rollouts(1 * K, 8, 2 * K, scale, short_branches)])


C4_LEVELS = 4


def c4(scale: float = 1.0, seed: int = SEED) -> RolloutTree:
    """Recursive: prompt 2k, 3 rollouts of 4k; every rollout and every branch branches at 2
    points, to depth 4 (branches of branches of branches of branches), each continuing to the
    rollout's total length: 1 + 2 + 4 + 8 + 16 = 31 leaves per rollout. Three rollouts keep N
    close to C2's (a level adds about one rollout length per rollout), with far more sharing."""
    gen = torch.Generator().manual_seed(seed)
    return _pack("C4", [_prompt_with_rollouts(2 * K, 3, 4 * K, scale,
                                              lambda r: _branch_to_end(gen, r, 2, C4_LEVELS))])


def c5(scale: float = 1.0, seed: int = SEED) -> RolloutTree:
    """Long agentic: prompt 4k, 4 rollouts of 12k, 3 branches each to the same length."""
    gen = torch.Generator().manual_seed(seed)
    return _pack("C5", [_prompt_with_rollouts(4 * K, 4, 12 * K, scale,
                                              lambda r: _branch_to_end(gen, r, 3))])


TREES: dict[str, Callable[..., RolloutTree]] = {"C1": c1, "C2": c2, "C3": c3, "C4": c4, "C5": c5}


def rollout_tree(name: str, scale: float = 1.0, seed: int = SEED) -> RolloutTree:
    if name not in TREES:
        raise ValueError(f"name must be one of {tuple(TREES)}, got {name!r}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale!r}")
    return TREES[name](scale=scale, seed=seed)


def markdown_table(scale: float = 1.0, seed: int = SEED) -> str:
    lines = ["| tree | N (packed) | paths | unrolled tokens | longest path | visible pairs, tree | "
             "visible pairs, unrolled | pair-count saving |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in TREES:
        t = rollout_tree(name, scale, seed)
        lines.append(f"| {name} | {t.n_tokens:,} | {len(t.paths)} | {t.unrolled_tokens:,} | "
                     f"{t.longest_path:,} | {t.tree_pairs:,} | {t.unrolled_pairs:,} | "
                     f"{t.pair_saving:.2f}× |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Sizes of the rollout trees C1-C5 "
                                                 "(bench/README.md)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every length")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    print(markdown_table(args.scale, args.seed))


if __name__ == "__main__":
    main()
