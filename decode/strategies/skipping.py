"""VVS: partial verification skipping (ALGORITHMS.md 1.3 to 1.7).

On a skipped step the target does not run. The verification-free selector takes tokens from the
draft tree (a uniformly drawn root-to-leaf path, truncated to the tree's mean path length), they
are committed unverified, the drafter continues from stale target features (the feature cache),
and the skipped tokens' KV and fresh features are filled in by the next verification's forward.
A scheduler decides, per row and step, whether to skip:
- never (the base method), uniform interval (VVS-U), path similarity with threshold tau (VVS), or a
  learned policy (`LearnedScheduler`, trained by `python -m train scheduler`).
All of them respect a warm-up (no skip until more than `warmup` tokens precede the pending root,
the released code's `n_gen > warmup`, so the feature cache has entries) and
a cap on consecutive skips (1 in the released code).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from decode.core.trees import HostTree, Tree, leaf_paths


@dataclass(frozen=True)
class StepContext:
    """What a scheduler may look at, per row, before deciding (all cheap at decode time, all on the host)."""
    tree: HostTree
    step: int              # decode steps so far (verified + skipped)
    made: Tensor           # [B] tokens committed so far, the pending root included
    run: Tensor            # [B] consecutive skipped steps just before this one
    num_tokens: int


class Scheduler:
    """Base: warm-up and the consecutive-skip cap; subclasses say which rows want to skip."""

    def __init__(self, max_consecutive: int = 1, warmup: int = 5):
        if max_consecutive < 1:
            raise ValueError(f"the cap on consecutive skips must be >= 1, got {max_consecutive}")
        self.max_consecutive, self.warmup = int(max_consecutive), int(warmup)

    def eligible(self, ctx: StepContext) -> Tensor:
        """[B] bool: rows past the warm-up, under the cap, unfinished, with drafts to take."""
        # made counts the pending root, the released code's n_gen does not: skip once n_gen > warmup
        allowed = (ctx.made - 1 > self.warmup) & (ctx.run < self.max_consecutive) & (ctx.made < ctx.num_tokens)
        return allowed & (ctx.tree.parents >= 0).any(-1)  # a root-only tree has nothing to take

    def decide(self, ctx: StepContext) -> Tensor:
        """[B] bool: skip verification this step."""
        allowed = self.eligible(ctx)
        if not allowed.any():
            return allowed
        return allowed & self.wants_skip(ctx)

    def wants_skip(self, ctx: StepContext) -> Tensor:
        raise NotImplementedError

    def after_step(self, following: Tensor, counts: Tensor) -> None:
        """Told the tokens the step committed after the root: following [B, W] on the device, the
        first counts[b] (host) of row b (traces use it; reading them is theirs to pay for)."""


class NeverSkip(Scheduler):
    def decide(self, ctx: StepContext) -> Tensor:
        return torch.zeros(ctx.made.shape[0], dtype=torch.bool)


class UniformSkip(Scheduler):
    """VVS-U: skip the steps t with t mod interval == 1 (interval 5: 1, 6, 11, ...; 1 never skips)."""

    def __init__(self, interval: int = 5, **kw):
        super().__init__(**kw)
        if interval < 1:
            raise ValueError(f"skip interval must be >= 1, got {interval}")
        self.interval = int(interval)

    def wants_skip(self, ctx: StepContext) -> Tensor:
        return torch.full((ctx.made.shape[0],), ctx.step % self.interval == 1 % self.interval and self.interval > 1)


def path_similarity(tree: Tree | HostTree, latents: Tensor, decay: float = 0.9, stride: int = 2) -> Tensor:
    """VVS's similarity of the tree's candidate paths, per row [B] (ALGORITHMS.md 1.6).

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


class SimilaritySkip(Scheduler):
    """VVS: skip when the candidate paths agree (path similarity >= tau)."""

    def __init__(self, latents: Tensor, tau: float = 0.7, decay: float = 0.9, **kw):
        super().__init__(**kw)
        self.latents, self.tau, self.decay = latents.detach().float().cpu(), float(tau), float(decay)

    def wants_skip(self, ctx: StepContext) -> Tensor:
        return path_similarity(ctx.tree, self.latents, self.decay) >= self.tau


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


class LearnedScheduler(Scheduler):
    """A learned skip policy: `policy(features [B, F]) -> [B]` probability that skipping is safe;
    skips where it is at least `threshold`. The policy is any callable (a test double, or the
    module `load_learned_scheduler` returns)."""

    def __init__(self, policy, latents: Tensor, threshold: float = 0.5, **kw):
        super().__init__(**kw)
        self.policy, self.latents, self.threshold = policy, latents.detach().float().cpu(), float(threshold)

    def wants_skip(self, ctx: StepContext) -> Tensor:
        with torch.no_grad():
            prob = self.policy(step_features(ctx, self.latents))
        return prob.flatten().cpu() >= self.threshold


def select_skip_tokens(tree: Tree | HostTree, row: int, u: float) -> list[int]:
    """VVS's verification-free selector for one row: a uniformly drawn root-to-leaf path (path
    floor(u * paths) for a uniform draw u in [0, 1)), truncated to the tree's mean path length
    (`dynamical truncation`). Returns its first L + 1 nodes: the first L are committed unverified,
    the last becomes the next root (ALGORITHMS.md 1.4)."""
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
