"""Acceptance: which drafted nodes of a verified tree become image tokens, and the next token.

Every rule walks each row's tree from the root; at a node it tries the children in drafter order,
descends into the first it accepts (greedy LANTERN, which can accept several siblings: into the one
that leads to the longest accepted path), and stops at the first node where none is accepted. The next
token (the next root) is the target's own choice there: a sample of the (residual) distribution,
or its argmax when greedy.

- greedy: a child is accepted iff it is the target's argmax (tokens equal greedy AR).
- sampled (exact, multi-candidate): child x, drawn from q (one-hot for deterministic top-k drafts),
  is accepted with probability min(1, p(x) / q(x)); on rejection p <- norm(max(p - q, 0)) and the
  next sibling is tried. The committed tokens have the target's distribution (docs/algorithms.md 3.2).
- LANTERN relaxation: before testing x, the mass of its latent neighbourhood A(x) (the longest prefix
  of x's codebook-distance-ordered neighbours whose mass fits the bound) moves onto x. With the
  total-variation bound delta, the relaxed p moves at most delta of mass; with lambda (LANTERN++),
  x's probability grows at most lambda-fold. With delta = 0 this is exact speculative sampling.
  On rejection we zero exactly A(x) (the relaxed distribution's support change); the released code
  zeroes x's k + 1 nearest neighbours whether or not they are in A(x), which no longer bounds the
  distance it moves the distribution (docs/algorithms.md 3.6). The residual is likewise taken from
  the relaxed distribution, max(p~ - q, 0), for the static tree's sampled drafts too (the released
  LANTERN++ code subtracts q from p with x's k + 1 neighbours zeroed in q), so that each child's test
  is exact speculative sampling against the relaxed distribution it was tested under.
- GSD grouping (grouped speculative decoding): x is accepted with probability
  min(1, p(G(x)) / q(G(x))), G(x) the tokens near x in the target's ranking that are also near it in
  probability and in embedding (`Grouping`); on rejection the usual residual norm(max(p - q, 0)).

A relaxation is an object with `test(p, q, x) -> (numerator, denominator, p')` (accept when a uniform
draw times the denominator is below the numerator; p' is what the residual is taken from) and
`greedy_accepts(p, x)`; None is exact acceptance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from decode.core.host import to_device
from decode.core.sampling import SamplingParams, draw, probabilities
from decode.core.trees import Tree


def latent_neighbours(codebook: Tensor, k: int, chunk: int = 4096) -> Tensor:
    """[V, D] VQ codebook -> [V, k] indices of each code's k nearest other codes (L2, raw rows)."""
    e = codebook.float()
    v = e.shape[0]
    k = min(k, v - 1)
    out = []
    for s in range(0, v, chunk):
        d = torch.cdist(e[s:s + chunk], e)  # [c, V]
        d[torch.arange(d.shape[0]), torch.arange(s, s + d.shape[0])] = float("inf")  # not itself
        out.append(d.topk(k, dim=-1, largest=False).indices)
    return torch.cat(out)


@dataclass(frozen=True)
class Relaxation:
    """LANTERN's latent proximity sets: `neighbours` [V, k] (kept on the host, where acceptance walks
    the tree) and the bound on the mass moved onto a draft x: at most `bound` (LANTERN's total
    variation delta) or, `multiplicative`, x's probability grows at most `bound`-fold (LANTERN++'s
    lambda)."""
    neighbours: Tensor
    bound: float
    multiplicative: bool = False

    def __post_init__(self):
        if self.multiplicative and self.bound < 1:
            raise ValueError(f"LANTERN++'s lambda must be >= 1 (1: exact), got {self.bound}")
        if not self.multiplicative and not 0 <= self.bound <= 1:
            raise ValueError(f"LANTERN's delta (a total-variation bound) must be in [0, 1], got {self.bound}")
        object.__setattr__(self, "neighbours", self.neighbours.cpu())

    def neighbourhood(self, p: Tensor, x: int) -> tuple[Tensor, float]:
        """A(x) and its mass under p [V] (host tensors)."""
        nb = self.neighbours[x]
        cum = p[nb].cumsum(0)  # c_j = mass of x's j nearest neighbours
        bound = (self.bound - 1) * float(p[x]) if self.multiplicative else self.bound
        m = int((cum <= bound + 1e-12).sum())  # cum is non-decreasing: the qualifying set is a prefix
        return nb[:m], float(cum[m - 1]) if m else 0.0

    def test(self, p: Tensor, q: Tensor | None, x: int) -> tuple[float, float, Tensor]:
        """Speculative sampling against the relaxed p~ (A(x)'s mass moved onto x)."""
        hood, mass = self.neighbourhood(p, x)
        if mass > 0:
            p = p.clone()
            p[x] += mass
            p[hood] = 0
        return float(p[x]), float(q[x]) if q is not None else 1.0, p

    def greedy_accepts(self, p: Tensor, x: int) -> bool:
        """Greedy LANTERN: x's relaxed probability is the largest."""
        _, mass = self.neighbourhood(p, x)
        return float(p[x]) + mass >= float(p.max())


@dataclass(frozen=True)
class Grouping:
    """GSD's groups (arXiv 2508.07747; ALGORITHMS.md 7.1): G(x) holds the tokens within `ranks`
    places of x in the target's ranking at that position whose probability differs from x's by
    less than `p_gap` and whose embedding lies within squared L2 distance `max_sq_dist` of x's.

    `embeddings` [V, d] are the VQ codebook rows, L2-normalised (the released code uses Lumina-mGPT's
    input embedding rows, whose scale is the model's; unit rows make the published 0.5 mean cosine
    similarity above 0.75 for every target). The released window is [rank - 7, rank + 7), which
    wraps to the bottom of the ranking for x among the top 7; here it is symmetric and clipped."""
    embeddings: Tensor
    ranks: int = 7
    p_gap: float = 0.15
    max_sq_dist: float = 0.5

    def __post_init__(self):
        if self.ranks < 0 or self.p_gap < 0 or self.max_sq_dist < 0:
            raise ValueError(f"GSD's ranks, p_gap and max_sq_dist must be >= 0; got {self.ranks}, {self.p_gap}, "
                             f"{self.max_sq_dist}")
        unit = torch.nn.functional.normalize(self.embeddings.detach().float().cpu(), dim=-1)
        object.__setattr__(self, "embeddings", unit)

    def group(self, p: Tensor, x: int) -> Tensor:
        """G(x) (host tensor of token ids, x included) under p [V]."""
        order = p.argsort(descending=True, stable=True)
        at = int((order == x).nonzero()[0])
        near = order[max(0, at - self.ranks): at + self.ranks + 1]
        close_p = (p[near] - p[x]).abs() < self.p_gap
        close_e = (self.embeddings[near] - self.embeddings[x]).pow(2).sum(-1) < self.max_sq_dist
        return near[(close_p & close_e) | (near == x)]

    def test(self, p: Tensor, q: Tensor | None, x: int) -> tuple[float, float, Tensor]:
        g = self.group(p, x)
        # deterministic drafts put all of q on x, which is in its own group
        return float(p[g].sum()), float(q[g].sum()) if q is not None else 1.0, p

    def greedy_accepts(self, p: Tensor, x: int) -> bool:
        """Greedy GSD: the target's argmax is in x's group."""
        return bool((self.group(p, x) == int(p.argmax())).any())


@dataclass(frozen=True)
class Verdict:
    paths: list[list[int]]  # per row, on the host: accepted node indices, root first ([] for rows not asked)
    next_tokens: Tensor     # [B] on the device: the next root (unspecified for rows not asked)


def _asked(tree: Tree, rows) -> list[int]:
    return list(range(tree.tokens.shape[0])) if rows is None else list(rows)


def _root_only(rows: list[int], batch: int, next_tokens: Tensor) -> Verdict:
    """A tree without drafts (AR): nothing to walk, the next token stays on the device."""
    asked = set(rows)
    return Verdict([[0] if r in asked else [] for r in range(batch)], next_tokens)


class GreedyAcceptance:
    """Accept the target's argmax path (with `relax`: LANTERN's greedy rule, x accepted iff its
    relaxed probability is the largest). One wait for the device per call (none without drafts)."""

    def __init__(self, relax: Relaxation | Grouping | None = None):
        self.relax = relax

    def __call__(self, tree: Tree, logits: Tensor, sampling: SamplingParams, generators,
                 rows: list[int] | None = None) -> Verdict:
        asked, b = _asked(tree, rows), tree.tokens.shape[0]
        choice = logits.argmax(-1)  # [B, T]
        if tree.size == 1:
            return _root_only(asked, b, choice[:, 0])
        parts = [choice]
        if self.relax is not None:  # greedy LANTERN: the plain softmax, no logits processor (docs/algorithms.md
            parts.append(logits.float().softmax(-1))  # 3.3); a top_k=1 filter would leave nothing to relax
        fetched, tree = tree.fetch_with(*parts)
        choice, soft = fetched[0], fetched[1] if self.relax is not None else None
        tokens, parents = tree.host.tokens, tree.host.parents
        paths, nxt = [[] for _ in range(b)], [0] * b
        for r in asked:
            accepts = lambda node, c: self._accepts(  # noqa: E731
                int(tokens[r, c]), int(choice[r, node]), None if soft is None else soft[r, node])
            paths[r] = self._longest_path(0, parents[r], accepts)
            nxt[r] = int(choice[r, paths[r][-1]])
        return Verdict(paths, to_device(nxt, logits.device))

    def _longest_path(self, node: int, parents: Tensor, accepts) -> list[int]:
        """The longest all-accepted path from `node` (the first in drafter order among equals). Exact
        greedy accepts at most one child per node; LANTERN's relaxed rule can accept several."""
        best = [node]
        for c in (parents == node).nonzero().flatten().tolist():
            if accepts(node, c):
                path = [node] + self._longest_path(c, parents, accepts)
                if len(path) > len(best):
                    best = path
        return best

    def _accepts(self, x: int, best: int, p: Tensor | None) -> bool:
        return x == best or (p is not None and self.relax.greedy_accepts(p, x))


class SampledAcceptance:
    """Multi-candidate speculative sampling (exact without `relax`, LANTERN/LANTERN++ with it).

    One wait for the device per call: the target's distributions over the tree, the drafts' q and
    each row's uniform draws (drawn up front on the row's generator: one per child test, one for
    the next token) come to the host together, and the tree is walked there."""

    def __init__(self, relax: Relaxation | Grouping | None = None):
        self.relax = relax

    def __call__(self, tree: Tree, logits: Tensor, sampling: SamplingParams, generators,
                 rows: list[int] | None = None) -> Verdict:
        if generators is None:
            raise ValueError("sampled acceptance needs one generator per image")
        asked, b, t = _asked(tree, rows), tree.tokens.shape[0], tree.size
        p_all = probabilities(logits.float(), sampling)  # [B, T, V]
        if t == 1:  # AR: draw on the device, only from the asked rows' generators
            nxt = torch.zeros(b, dtype=torch.long, device=logits.device)
            for r in asked:
                nxt[r] = draw(p_all[r, 0], generators[r])
            return _root_only(asked, b, nxt)
        pick = None if len(asked) == b else to_device(asked, logits.device)
        sub = (lambda x: x) if pick is None else (lambda x: x[pick])  # noqa: E731
        u = torch.stack([torch.rand(t + 1, generator=generators[r], device=generators[r].device) for r in asked])
        parts = [sub(p_all), u] + ([sub(tree.q)] if tree.q is not None else [])
        fetched, tree = tree.fetch_with(*parts)
        p_host, u_host = fetched[0], fetched[1].tolist()
        q_host = fetched[2] if tree.q is not None else None
        tokens, parents = tree.host.tokens, tree.host.parents
        paths, nxt = [[] for _ in range(b)], [0] * b
        for i, r in enumerate(asked):
            draws, node, path = iter(u_host[i]), 0, [0]
            p = p_host[i, 0]
            while True:
                q = None if q_host is None else q_host[i]
                hit, p = self._try_children(node, p, q, parents[r], tokens[r], draws)
                if hit is None:
                    break
                node = hit
                path.append(node)
                p = p_host[i, node]
            paths[r], nxt[r] = path, _inverse_cdf(p, u_host[i][-1])
        return Verdict(paths, to_device(nxt, logits.device))

    def _try_children(self, node: int, p: Tensor, q: Tensor | None, parents: Tensor, tokens: Tensor,
                      draws) -> tuple[int | None, Tensor]:
        """Test the children of `node` in order against p [V] (host tensors; q [T, V] the drafts'
        distributions or None for deterministic drafts); (accepted child or None, the distribution
        the next token is drawn from if none is accepted)."""
        for c in (parents == node).nonzero().flatten().tolist():
            x = int(tokens[c])
            qc = q[c].float() if q is not None else None
            qx = float(qc[x]) if qc is not None else 1.0
            if qx <= 0:
                continue
            num, den, p = (float(p[x]), qx, p) if self.relax is None else self.relax.test(p, qc, x)
            if next(draws) * den < num:  # u in [0, 1): accept with probability min(1, num / den)
                return c, p
            if qc is None:
                residual = p.clone()
                residual[x] = 0
            else:
                residual = (p - qc).clamp_min(0)
            total = residual.sum()
            p = residual / total if total > 0 else torch.full_like(p, 1.0 / p.numel())
        return None, p


def _inverse_cdf(p: Tensor, u: float) -> int:
    """The token a uniform draw u in [0, 1) picks from p [V] (host): the first whose cumulative mass
    exceeds u times the total. A zero-probability token is never picked."""
    cum = p.double().cumsum(0)
    i = int(torch.searchsorted(cum, torch.tensor([u * float(cum[-1])], dtype=torch.float64), right=True)[0])
    return min(i, int(p.nonzero()[-1]))  # u * total rounded up to the total: the last token with mass


def make_acceptance(sampling: SamplingParams, relax: Relaxation | Grouping | None = None):
    return GreedyAcceptance(relax) if sampling.greedy else SampledAcceptance(relax)
