"""VVS: partial verification skipping (docs/algorithms.md 4).

On a skipped step the target does not run. The verification-free selector takes tokens from the
draft tree (a uniformly drawn root-to-leaf path, truncated to the tree's mean path length), they
are committed unverified, the drafter continues from stale target features (the feature cache),
and the skipped tokens' KV and fresh features are filled in by the next verification's forward.
`Skipping` is the strategy the engine sees (`NeverSkip` is the base method); inside it a rule
decides, per row and step, whether to skip: uniform interval (VVS-U), path similarity with
threshold tau (VVS), or a learned policy (`LearnedSkip`, trained by `python -m train scheduler`),
within `SkipLimits` (warm-up, cap on consecutive skips). It works over any drafting that grows a
tree and any acceptance rule: the engine only asks it which rows skip and with which nodes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from decode.core.trees import HostTree, StepOutcome, Tree, leaf_paths


@dataclass(frozen=True)
class StepContext:
    """What a skip rule may look at, per row, before deciding (all cheap at decode time, all on the host)."""
    tree: HostTree
    step: int              # decode steps so far (verified + skipped)
    made: Tensor           # [B] tokens committed so far, the pending root included
    run: Tensor            # [B] consecutive skipped steps just before this one
    num_tokens: int


@dataclass(frozen=True)
class Progress:
    """Where the engine stands before a step: what the skipping strategy is told."""
    step: int
    made: list[int]   # per row: committed tokens, the pending root included
    live: list[bool]  # per row: not finished
    num_tokens: int


@dataclass(frozen=True)
class SkipLimits:
    """What every rule respects: a warm-up (no skip until more than `warmup` tokens precede the
    pending root, the released code's `n_gen > warmup`, so the feature cache has entries) and a
    cap on consecutive skips (1 in the released code)."""
    max_consecutive: int = 1
    warmup: int = 5

    def __post_init__(self):
        if self.max_consecutive < 1:
            raise ValueError(f"the cap on consecutive skips must be >= 1, got {self.max_consecutive}")
        if self.warmup < 0:
            raise ValueError(f"the skip warm-up must be >= 0, got {self.warmup}")

    def eligible(self, ctx: StepContext) -> Tensor:
        """[B] bool: rows past the warm-up, under the cap, unfinished, with drafts to take."""
        # made counts the pending root, the released code's n_gen does not: skip once n_gen > warmup
        allowed = (ctx.made - 1 > self.warmup) & (ctx.run < self.max_consecutive) & (ctx.made < ctx.num_tokens)
        return allowed & (ctx.tree.parents >= 0).any(-1)  # a root-only tree has nothing to take


class SkipRule(Protocol):
    """Which eligible rows want to skip this step; told afterwards what the step committed."""

    def wants_skip(self, ctx: StepContext, allowed: Tensor) -> Tensor:
        """[B] bool (only rows in `allowed` [B] can skip; a rule may look at the others)."""

    def after_step(self, following: Tensor, counts: Tensor) -> None:
        """The tokens the step committed after each root: following [B, W] on the device, the first
        counts[b] (host) of row b (traces use them; reading them is theirs to pay for)."""


class UniformSkip:
    """VVS-U: skip the steps t with t mod interval == 1 (interval 5: 1, 6, 11, ...; 1 never skips)."""

    def __init__(self, interval: int = 5):
        if interval < 1:
            raise ValueError(f"skip interval must be >= 1, got {interval}")
        self.interval = int(interval)

    def wants_skip(self, ctx: StepContext, allowed: Tensor) -> Tensor:
        return torch.full((ctx.made.shape[0],), ctx.step % self.interval == 1 % self.interval and self.interval > 1)

    def after_step(self, following: Tensor, counts: Tensor) -> None:
        pass


def path_similarity(tree: Tree | HostTree, latents: Tensor, decay: float = 0.9, stride: int = 2) -> Tensor:
    """VVS's similarity of the tree's candidate paths, per row [B] (docs/algorithms.md 4.2).

    Every `stride`-th root-to-leaf path, root dropped, codes embedded with the raw VQ codebook rows
    `latents` [V, d] and L2-normalised; pairs compared position by position (both valid), weighted
    by decay**l / sum over the longest path; the mean over pairs m < n (0 with fewer than 2 paths).
    """
    out = torch.zeros(tree.tokens.shape[0])
    parents, tokens = tree.parents.cpu(), tree.tokens.cpu()
    for b in range(tokens.shape[0]):
        paths = [p[1:] for p in leaf_paths(parents[b])[::stride] if len(p) > 1]
        if len(paths) < 2:
            continue
        width = max(len(p) for p in paths)
        emb = torch.zeros(len(paths), width, latents.shape[1])
        valid = torch.zeros(len(paths), width, dtype=torch.bool)
        for i, p in enumerate(paths):
            emb[i, :len(p)] = latents[tokens[b, p]].float()
            valid[i, :len(p)] = True
        emb = torch.nn.functional.normalize(emb, dim=-1)
        w = decay ** torch.arange(width, dtype=torch.float32)
        w = w / w.sum()  # not renormalised over valid positions: short overlaps count less
        sim = torch.einsum("mld,nld->mnl", emb, emb) * (valid[:, None] & valid[None, :])  # [P, P, width]
        pair = (sim * w).sum(-1)
        iu = torch.triu_indices(len(paths), len(paths), offset=1)
        out[b] = pair[iu[0], iu[1]].mean()
    return out


class SimilaritySkip:
    """VVS: skip when the candidate paths agree (path similarity >= tau)."""

    def __init__(self, latents: Tensor, tau: float = 0.7, decay: float = 0.9):
        self.latents, self.tau, self.decay = latents.detach().float().cpu(), float(tau), float(decay)

    def wants_skip(self, ctx: StepContext, allowed: Tensor) -> Tensor:
        return path_similarity(ctx.tree, self.latents, self.decay) >= self.tau

    def after_step(self, following: Tensor, counts: Tensor) -> None:
        pass


NUM_STEP_FEATURES = 8


def step_features(ctx: StepContext, latents: Tensor) -> Tensor:
    """The cheap per-row features a learned scheduler sees [B, 8]: path similarity, best and mean
    leaf score of the drafter (cumulative log-probability), mean path length, leaves / nodes,
    progress through the image, tokens committed / num_tokens, and the consecutive-skip run."""
    tree = ctx.tree
    b = tree.tokens.shape[0]
    sim = path_similarity(tree, latents)
    scores = tree.scores.cpu() if tree.scores is not None else torch.zeros(tree.tokens.shape)
    feats = torch.zeros(b, NUM_STEP_FEATURES)
    for r in range(b):
        paths = leaf_paths(tree.parents[r].cpu())
        leaf_scores = torch.stack([scores[r, p[-1]] for p in paths])
        feats[r] = torch.tensor([float(sim[r]), float(leaf_scores.max()), float(leaf_scores.mean()),
                                 sum(len(p) for p in paths) / len(paths), len(paths) / tree.size,
                                 ctx.step / ctx.num_tokens, float(ctx.made[r]) / ctx.num_tokens, float(ctx.run[r])])
    return feats


class LearnedSkip:
    """A learned skip policy: `policy(features [B, F]) -> [B]` probability that skipping is safe;
    skips where it is at least `threshold`. The policy is any callable (a test double, or the
    module `decode.strategies.learned_skip.load_scheduler_policy` returns)."""

    def __init__(self, policy, latents: Tensor, threshold: float = 0.5):
        self.policy, self.latents, self.threshold = policy, latents.detach().float().cpu(), float(threshold)

    def wants_skip(self, ctx: StepContext, allowed: Tensor) -> Tensor:
        with torch.no_grad():
            prob = self.policy(step_features(ctx, self.latents))
        return prob.flatten().cpu() >= self.threshold

    def after_step(self, following: Tensor, counts: Tensor) -> None:
        pass


def select_skip_tokens(tree: Tree | HostTree, row: int, u: float) -> list[int]:
    """VVS's verification-free selector for one row: a uniformly drawn root-to-leaf path (path
    floor(u * paths) for a uniform draw u in [0, 1)), truncated to the tree's mean path length
    (`dynamical truncation`). Returns its first L + 1 nodes: the first L are committed unverified,
    the last becomes the next root (docs/algorithms.md 4.1)."""
    paths = leaf_paths(tree.parents[row].cpu())
    mean_len = sum(len(p) for p in paths) // len(paths)  # root included
    path = paths[min(int(u * len(paths)), len(paths) - 1)]
    take = max(1, min(len(path) - 1, mean_len - 1))  # >= 1: at least the root is committed
    return path[: take + 1]


class FeatureCache:
    """Target features of committed tokens, per row in generation order [G, B, N, D] (VVS module 2)."""

    def __init__(self, groups: int, batch: int, capacity: int, dim: int, device, dtype):
        self.store = torch.zeros(groups, batch, capacity, dim, device=device, dtype=dtype)
        self.count = [0] * batch

    def append(self, row: int, feats: Tensor) -> None:
        """feats [G, n, D] of the next n committed tokens of `row`."""
        n = feats.shape[1]
        self.store[:, row, self.count[row]:self.count[row] + n] = feats
        self.count[row] += n

    def stale(self, row: int, n: int, staleness: int = 0) -> Tensor:
        """The n most recent features, `staleness` positions further back (0: the released code's
        `reuse_prev`); when fewer exist, all of them padded by repeating the last. -> [G, n, D]."""
        end = max(1, self.count[row] - staleness)
        if end >= n:
            return self.store[:, row, end - n:end]
        idx = torch.arange(n, device=self.store.device).clamp_max(end - 1)  # 0 .. end-1, end-1, ...
        return self.store[:, row, idx]


class NeverSkip:
    """The base method: every step is verified (nothing is fetched or cached for skipping)."""

    max_skip_run = 0  # consecutive skipped steps at most (static shapes size the verify pass by it)

    def start(self, target, batch: int, num_tokens: int, generators, dtype, given: Tensor | None = None) -> "NoSkips":
        return NoSkips()


class NoSkips:
    def plan(self, tree: Tree, progress: Progress) -> tuple[Tree, dict[int, list[int]]]:
        return tree, {}

    def stale_features(self, row: int, n: int) -> Tensor:
        raise RuntimeError("no row skips under NeverSkip")

    def observe(self, outcome: StepOutcome, filled: dict[int, Tensor]) -> None:
        pass


@dataclass(frozen=True)
class Skipping:
    """VVS's skipping over any drafting with a tree and any acceptance rule: a rule says which rows
    skip, `limits` bound it, and skipped rows continue from features `staleness` positions
    further back than the latest (0: the released code's `reuse_prev`)."""
    rule: SkipRule
    limits: SkipLimits = SkipLimits()
    staleness: int = 0

    def __post_init__(self):
        if self.staleness < 0:
            raise ValueError(f"skip staleness must be >= 0, got {self.staleness}")

    @property
    def max_skip_run(self) -> int:
        """Consecutive skipped steps at most (static shapes size the verify pass by it)."""
        return self.limits.max_consecutive

    def start(self, target, batch: int, num_tokens: int, generators, dtype, given: Tensor | None = None) -> "SkipRun":
        """`given` [G, B, k, D]: the target's features of k image tokens given before decoding starts
        (GridAR's later stages): a row that skips at once continues from them, not from zeros."""
        cache = FeatureCache(target.groups, batch, num_tokens + 8, target.hidden_size, target.device, dtype)
        for r in range(batch if given is not None else 0):
            cache.append(r, given[:, r])
        return SkipRun(self, cache, _selector_generators(generators))


class SkipRun:
    """One generation's skipping state: consecutive skips per row, the selector's own random
    streams, and the feature cache of committed tokens' target features."""

    def __init__(self, strategy: Skipping, features: FeatureCache, selectors: list[torch.Generator] | None):
        self.strategy, self.features, self.selectors = strategy, features, selectors
        self.run = [0] * len(features.count)

    def plan(self, tree: Tree, progress: Progress) -> tuple[Tree, dict[int, list[int]]]:
        """The rows that skip this step, each with the selector's nodes (root first; the last one
        becomes the next root). One wait: the tree's structure and the selector's draws together."""
        if tree.size == 1:
            return tree, {}
        tree, picks = _fetch_for_selector(tree, self.selectors)
        ctx = StepContext(tree.host, progress.step, torch.tensor(progress.made), torch.tensor(self.run),
                          progress.num_tokens)
        allowed = self.strategy.limits.eligible(ctx)
        if not allowed.any():
            return tree, {}
        want = (allowed & self.strategy.rule.wants_skip(ctx, allowed)).tolist()
        skips = {r: select_skip_tokens(tree.host, r, picks[r]) for r in range(len(want)) if want[r] and progress.live[r]}
        for r in skips:
            self.run[r] += 1
        return tree, skips

    def stale_features(self, row: int, n: int) -> Tensor:
        """[G, n, D] features that stand in for the target's on a skipped step."""
        return self.features.stale(row, n, self.strategy.staleness)

    def observe(self, outcome: StepOutcome, filled: dict[int, Tensor]) -> None:
        """Each verified row's fresh features into the cache: those of its earlier skipped tokens
        (`filled` [G, c, D], the deferred fill) first, then its committed nodes'."""
        for r, chain in filled.items():
            self.features.append(r, chain)
            self.features.append(r, outcome.feats[:, r, :int(outcome.counts[r])])
            self.run[r] = 0
        self.strategy.rule.after_step(outcome.following, outcome.counts)


def _selector_generators(generators) -> list[torch.Generator] | None:
    """The selector's own stream per row, seeded from the row's seed: its path pick is drawn
    before the skip decision, and drawing it from the row's generator would change what a step
    that does not skip samples (skipping that never fires decodes exactly what its base method does)."""
    if generators is None:
        return None
    mix = lambda seed: (seed * 6364136223846793005 + 1442695040888963407) % 2 ** 63  # noqa: E731
    return [torch.Generator(device=gen.device).manual_seed(mix(gen.initial_seed())) for gen in generators]


def _fetch_for_selector(tree: Tree, generators) -> tuple[Tree, list[float]]:
    """One wait before a skip decision: the tree's structure and a uniform draw per row (the
    selector's path pick, should the row skip) come to the host together."""
    b = tree.tokens.shape[0]
    u = (torch.stack([torch.rand((), generator=gen, device=gen.device) for gen in generators])
         if generators else torch.rand(b))
    (picks,), tree = tree.fetch_with(u)
    return tree, picks.tolist()
