"""Acceptance: which drafted nodes of a verified tree become image tokens, and the next token.

Every rule walks each row's tree from the root; at a node it tries the children in drafter order,
descends into the first it accepts, and stops at the first node where none is accepted. The next
token (the next root) is the target's own choice there: a sample of the (residual) distribution,
or its argmax when greedy.

- greedy: a child is accepted iff it is the target's argmax (tokens equal greedy AR).
- sampled (exact, multi-candidate): child x, drawn from q (one-hot for deterministic top-k drafts),
  is accepted with probability min(1, p(x) / q(x)); on rejection p <- norm(max(p - q, 0)) and the
  next sibling is tried. The committed tokens have the target's distribution (ALGORITHMS.md 2.1).
- LANTERN relaxation: before testing x, the mass of its latent neighbourhood A(x) (the longest prefix
  of x's codebook-distance-ordered neighbours whose mass fits the bound) moves onto x. With the
  total-variation bound delta, the relaxed p moves at most delta of mass; with lambda (LANTERN++),
  x's probability grows at most lambda-fold. With delta = 0 this is exact speculative sampling.
  On rejection we zero exactly A(x) (the relaxed distribution's support change); the released code
  zeroes x's k + 1 nearest neighbours whether or not they are in A(x), which no longer bounds the
  distance it moves the distribution (ALGORITHMS.md 2.1, NOTE).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from decode.sampling import SamplingParams, filter_logits, probabilities
from decode.trees import Tree


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
    """LANTERN's latent proximity sets: `neighbours` [V, k]; `delta` <= 1 is a total-variation bound,
    `delta` > 1 is LANTERN++'s multiplicative bound lambda."""
    neighbours: Tensor
    delta: float

    def __post_init__(self):
        if self.delta < 0:
            raise ValueError(f"lantern delta must be >= 0, got {self.delta}")

    def neighbourhood(self, p: Tensor, x: int) -> tuple[Tensor, float]:
        """A(x) and its mass under p [V]."""
        nb = self.neighbours[x]
        cum = p[nb].cumsum(0)  # c_j = mass of x's j nearest neighbours
        bound = self.delta if self.delta <= 1 else (self.delta - 1) * float(p[x])
        m = int((cum <= bound + 1e-12).sum())  # cum is non-decreasing: the qualifying set is a prefix
        return nb[:m], float(cum[m - 1]) if m else 0.0


@dataclass(frozen=True)
class Verdict:
    paths: list[list[int]]  # per row: accepted node indices, root first ([] for rows not asked)
    next_tokens: Tensor     # [B] the next root


class GreedyAcceptance:
    """Accept the target's argmax path (with `relax`: LANTERN's greedy rule, x accepted iff its
    relaxed probability is the largest)."""

    def __init__(self, relax: Relaxation | None = None):
        self.relax = relax

    def __call__(self, tree: Tree, logits: Tensor, sampling: SamplingParams, generators,
                 rows: list[int] | None = None) -> Verdict:
        choice = logits.argmax(-1).cpu()  # [B, T]
        tokens, parents = tree.tokens.cpu(), tree.parents.cpu()
        soft = None
        if self.relax is not None:  # greedy LANTERN compares relaxed probabilities at temperature 1
            plain = SamplingParams(temperature=1.0, top_k=sampling.top_k, top_p=sampling.top_p)
            soft = filter_logits(logits.float(), plain).softmax(-1).cpu()
        paths, nxt = [[] for _ in range(tokens.shape[0])], [-1] * tokens.shape[0]
        for b in range(tokens.shape[0]) if rows is None else rows:
            node, path = 0, [0]
            while True:
                kids = (parents[b] == node).nonzero().flatten().tolist()
                hit = next((c for c in kids if self._accepts(int(tokens[b, c]), int(choice[b, node]),
                                                              None if soft is None else soft[b, node])), None)
                if hit is None:
                    break
                node = hit
                path.append(node)
            paths[b], nxt[b] = path, int(choice[b, node])
        return Verdict(paths, torch.tensor(nxt, device=logits.device))

    def _accepts(self, x: int, best: int, p: Tensor | None) -> bool:
        if x == best:
            return True
        if p is None:
            return False
        _, mass = self.relax.neighbourhood(p, x)
        return float(p[x]) + mass >= float(p.max())


class SampledAcceptance:
    """Multi-candidate speculative sampling (exact without `relax`, LANTERN/LANTERN++ with it)."""

    def __init__(self, relax: Relaxation | None = None):
        self.relax = relax

    def __call__(self, tree: Tree, logits: Tensor, sampling: SamplingParams, generators,
                 rows: list[int] | None = None) -> Verdict:
        if generators is None:
            raise ValueError("sampled acceptance needs one generator per image")
        p_all = probabilities(logits.float(), sampling)  # [B, T, V]
        parents, tokens = tree.parents.cpu(), tree.tokens.cpu()
        paths, nxt = [[] for _ in generators], [-1] * len(generators)
        for b in range(len(generators)) if rows is None else rows:
            gen, node, path = generators[b], 0, [0]
            while True:
                p = p_all[b, node]
                hit, p = self._try_children(b, node, p, tree, parents[b], tokens[b], gen)
                if hit is None:
                    break
                node = hit
                path.append(node)
            paths[b], nxt[b] = path, int(torch.multinomial(p[None], 1, generator=gen)[0])
        return Verdict(paths, torch.tensor(nxt, device=logits.device))

    def _try_children(self, b: int, node: int, p: Tensor, tree: Tree, parents: Tensor, tokens: Tensor,
                      gen: torch.Generator) -> tuple[int | None, Tensor]:
        """Test the children of `node` in order against p [V]; (accepted child or None, the
        distribution the next token is drawn from if none is accepted)."""
        for c in (parents == node).nonzero().flatten().tolist():
            x = int(tokens[c])
            q = tree.q[b, c].float() if tree.q is not None else None
            qx = float(q[x]) if q is not None else 1.0
            if qx <= 0:
                continue
            if self.relax is not None:
                hood, mass = self.relax.neighbourhood(p, x)
                if mass > 0:  # the relaxed distribution: A(x)'s mass moved onto x
                    p = p.clone()
                    p[x] += mass
                    p[hood] = 0
            u = float(torch.rand((), generator=gen, device=gen.device))
            if u * qx <= float(p[x]):  # accept with probability min(1, p(x) / q(x))
                return c, p
            if q is None:
                residual = p.clone()
                residual[x] = 0
            else:
                residual = (p - q).clamp_min(0)
            total = residual.sum()
            p = residual / total if total > 0 else torch.full_like(p, 1.0 / p.numel())
        return None, p


def make_acceptance(sampling: SamplingParams, relax: Relaxation | None = None):
    return GreedyAcceptance(relax) if sampling.greedy else SampledAcceptance(relax)
