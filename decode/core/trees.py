"""Draft trees: the candidate tokens one verification checks, and the fixed shapes of static trees.

A tree is stored flat per image row: node 0 is the root (the token the target chose last), every
parent precedes its children, and siblings appear in the order the drafter ranked them. The target
verifies all nodes in one pass with an ancestry mask; node positions are root position + depth.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from decode.core.host import fetch


@dataclass(frozen=True)
class TreeParams:
    total_tokens: int = 59  # root + drafted nodes verified per step (LANTERN/VVS on LlamaGen: 59)
    depth: int = 4          # expansion rounds after the first level: up to depth + 1 draft levels
    top_k: int = 10
    static: str | None = None  # a name in STATIC_SHAPES: fixed shape, children sampled from the drafter
    static_size: int | None = None  # nodes kept of the static shape, root included (None: all; tree=auto sets it)

    def __post_init__(self):
        if self.total_tokens < 2 or self.depth < 0 or self.top_k < 1:
            raise ValueError(f"tree needs total_tokens >= 2, depth >= 0, top_k >= 1; got {self}")
        if self.static is not None and self.static not in STATIC_SHAPES:
            raise ValueError(f"tree.static={self.static!r} is not a known shape; known: {', '.join(STATIC_SHAPES)}")
        if self.static_size is not None:  # without `static` yet: the method names its shape (method.static_tree)
            full = shape_nodes(self.static) if self.static else None
            if self.static_size < 2 or (full is not None and self.static_size > full):
                raise ValueError(f"tree.static_size={self.static_size} keeps nodes of a static shape: it needs "
                                 f"2 <= size <= the shape's nodes ({self.static}: {full})" if full else
                                 f"tree.static_size={self.static_size}: a tree keeps at least 2 nodes")

    @property
    def nodes(self) -> int:
        """Nodes a verification checks, the root included (a dynamic tree's most)."""
        if self.static is None:
            return self.total_tokens
        return self.static_size or shape_nodes(self.static)

    @property
    def rounds(self) -> int:
        """Drafter expansion rounds after the first level (a static shape's: its levels - 1)."""
        if self.static is None:
            return self.depth
        return max(static_shape(self.static, self.static_size).depths()) - 1


@dataclass
class Tree:
    tokens: Tensor   # [B, T] root first, parents before children
    parents: Tensor  # [B, T] index of the parent node (-1 for the root)
    depths: Tensor   # [B, T]
    mask: Tensor     # [B, T, T] bool: node i attends to node j (j an ancestor of i, or i itself)
    q: Tensor | None = None       # [B, T, V] sampled drafts: the distribution each node was drawn from
    scores: Tensor | None = None  # [B, T] drafter cumulative log-probability of each node (root 0)
    host: "HostTree | None" = None  # the host's copy of the structure, once the engine has fetched it

    @property
    def size(self) -> int:
        return self.tokens.shape[1]

    def fetch_with(self, *tensors: Tensor) -> tuple[tuple[Tensor, ...], "Tree"]:
        """Host copies of `tensors` and of the tree's structure, behind one wait for the device (the
        structure is not fetched again once the tree carries it). Returns the copies and the tree
        with its `host` set."""
        if self.host is not None:
            return fetch(*tensors), self
        parts = [self.tokens, self.parents] + ([] if self.scores is None else [self.scores])
        copies = fetch(*tensors, *parts)
        n = len(tensors)
        return copies[:n], dataclasses.replace(self, host=HostTree(*copies[n:]))


@dataclass(frozen=True)
class HostTree:
    """A tree's structure on the host, where the engine, the skip schedulers and acceptance walk it."""
    tokens: Tensor   # [B, T]
    parents: Tensor  # [B, T]
    scores: Tensor | None = None  # [B, T]

    @property
    def size(self) -> int:
        return self.tokens.shape[1]


def ancestry_mask(parents: Tensor) -> Tensor:
    """[B, T] parent pointers (-1: none) -> [B, T, T] self-or-ancestor mask.

    By repeated squaring of "self or parent" (a reach of 1 step, then 2, 4, ...): ceil(log2(T - 1))
    batched products, where a walk node by node launched several kernels per node. A drafter round's
    profiler events went from 4516 to 3220 (`scripts/profile_round.py --device cpu --size B`)."""
    b, t = parents.shape
    step = torch.zeros(b, t, t, device=parents.device)
    step.scatter_(2, parents.clamp_min(0)[:, :, None], (parents >= 0).to(step.dtype)[:, :, None])
    reach = step + torch.eye(t, device=parents.device)  # [B, T, T] 0/1: a path of at most 1 step
    for _ in range(max(t - 2, 0).bit_length()):  # a path is at most T - 1 steps long
        reach = (reach @ reach).clamp_max(1)  # entries count paths, so clamp them back to 0/1
    return reach.bool()


def root_only(root: Tensor) -> Tree:
    """The tree of plain AR decoding: the root alone, nothing drafted."""
    b = root.shape[0]
    z = torch.zeros(b, 1, dtype=torch.long, device=root.device)
    return Tree(root[:, None], z - 1, z, torch.ones(b, 1, 1, dtype=torch.bool, device=root.device))


def leaf_paths(parents: Tensor) -> list[list[int]]:
    """Root-to-leaf node paths of one row's tree, sorted lexicographically by node index (the
    released EAGLE-2 code's `retrieve_indices` order in sampling mode, which VVS's every-second-path
    similarity depends on). parents: [T] (cpu)."""
    par = parents.tolist()
    has_child = set(p for p in par if p >= 0)
    paths = []
    for leaf in range(len(par)):
        if leaf in has_child:
            continue
        path, node = [], leaf
        while node >= 0:
            path.append(node)
            node = par[node]
        paths.append(path[::-1])
    return sorted(paths)  # no path is a prefix of another (leaves have no children)


@dataclass(frozen=True)
class StaticShape:
    """A fixed tree: parent of each drafted node (0 = root) and its rank among its siblings."""
    parents: tuple[int, ...]  # per node, root included as -1
    ranks: tuple[int, ...]    # child rank under its parent (0 = the drafter's first pick)

    @property
    def size(self) -> int:
        return len(self.parents)

    def depths(self) -> list[int]:
        d = [0] * self.size
        for i in range(1, self.size):
            d[i] = d[self.parents[i]] + 1
        return d

    def children(self, node: int) -> list[int]:
        return [i for i, p in enumerate(self.parents) if p == node]


def shape_from_widths(widths: tuple[int, ...], top_k: int = 10) -> StaticShape:
    """A static tree with `widths[l]` nodes at level l + 1.

    Each level takes the (parent, rank) pairs with the smallest rank sum along the path: the paths
    a well-calibrated drafter finds most likely. (EAGLE's hand-written `tree_choices` lists were not
    available to us; this reproduces the level widths of LANTERN++'s default `naive_extend_57`.)
    """
    parents, ranks, cost = [-1], [0], [0]
    level = [0]
    for width in widths:
        pairs = sorted(((cost[p] + r, level.index(p), r, p) for p in level for r in range(top_k)))[:width]
        if len(pairs) < width:
            raise ValueError(f"level width {width} exceeds {len(level)} parents x top_k {top_k}")
        pairs.sort(key=lambda x: (x[1], x[2]))  # group by parent, parents in order, ranks ascending
        new = []
        for c, _, r, p in pairs:
            parents.append(p)
            ranks.append(r)
            cost.append(c)
            new.append(len(parents) - 1)
        level = new
    return StaticShape(tuple(parents), tuple(ranks))


STATIC_SHAPES = {
    "naive_extend_57": (5, 13, 16, 14, 9),  # LANTERN++'s LlamaGen default: 57 drafts over 5 levels
    "balanced_25": (4, 8, 8, 3, 2),         # the widths of mc_sim_7b_63 (LANTERN++'s Lumina default)
    "chain": (1, 1, 1, 1, 1),
}


def shape_nodes(name: str) -> int:
    """Nodes of a named static shape, the root included."""
    return 1 + sum(STATIC_SHAPES[name])


def static_shape(name: str, size: int | None = None) -> StaticShape:
    """A named static shape, or its `size` cheapest nodes (`prune_static`)."""
    shape = shape_from_widths(STATIC_SHAPES[name])
    return shape if size is None else prune_static(shape, size)[0]


def prune_static(shape: StaticShape, size: int) -> tuple[StaticShape, list[int]]:
    """The root and the size - 1 drafted nodes of least rank sum along their path (the paths a
    well-calibrated drafter finds most likely; ties: shallower, then earlier), in the shape's own
    order, and which of the shape's nodes they are. A child's rank sum is at least its parent's and it
    is deeper, so every kept node keeps its parent: the result is a tree."""
    depths, cost = shape.depths(), [0] * shape.size
    for i in range(1, shape.size):
        cost[i] = cost[shape.parents[i]] + shape.ranks[i]
    best = sorted(range(1, shape.size), key=lambda i: (cost[i], depths[i], i))[:max(0, size - 1)]
    kept = [0] + sorted(best)
    where = {old: new for new, old in enumerate(kept)}
    parents = tuple(-1 if i == 0 else where[shape.parents[i]] for i in kept)
    return StaticShape(parents, tuple(shape.ranks[i] for i in kept)), kept


@dataclass
class StepOutcome:
    """What one step committed, per row: `counts[b]` nodes (root first), the target feature of
    each (fresh after a verification, stale on a skipped step) and the token after each."""
    feats: Tensor      # [G, B, W, D]
    following: Tensor  # [B, W] the token after each committed node (the last one: the next root)
    counts: Tensor     # [B] on the host: committed nodes this step (0: the row did nothing)
    tree: Tree
    logits: Tensor | None = None  # [B, T, V] the target's logits over the tree (rows that verified)
    verified: Tensor | None = None  # [B] bool
