"""LANTERN's sampled acceptance follows the relaxed target distribution (docs/algorithms.md 3.3, 3.6).

A tiny root with deterministic drafted children (q one-hot), a fixed target distribution p at the
root and a hand-written latent-neighbour table: the law of the first committed token (the accepted
child, or the token drawn from the final residual) is computed exactly from the spec, and the
empirical law of many independent rows (one generator each) must match it within a few standard
errors of the sample size."""
import pytest
import torch
from torch import Tensor

from decode.strategies.acceptance import Relaxation, SampledAcceptance
from decode.core.sampling import SamplingParams, row_generators
from decode.core.trees import Tree, ancestry_mask

SAMPLED = SamplingParams(temperature=1.0)
V = 6
P = torch.tensor([0.05, 0.20, 0.15, 0.25, 0.10, 0.25])  # the target's distribution at the root

# each token's other codes, nearest first (a latent-neighbour table as latent_neighbours makes one)
ORDER = {1: [2, 4, 0, 3, 5], 3: [4, 2, 0, 5, 1]}
NEIGHBOURS = torch.tensor([ORDER.get(x, [y for y in range(V) if y != x]) for x in range(V)])


def exact_first_token_law(p: Tensor, children: list[int], neighbours: Tensor, delta: float) -> Tensor:
    """The spec, written out: for each child x in order, A(x) = the longest prefix of x's neighbours
    whose cumulative mass (under the current p) is <= delta (lambda: <= (lambda - 1) p(x)); p~ = p
    with A(x)'s mass moved onto x; accept x w.p. min(1, p~(x)) (q = 1); on rejection p <- p~ with x
    zeroed, renormalised. Nothing accepted: the token is drawn from the final p."""
    p = p.double().clone()
    law, stay = torch.zeros_like(p), 1.0
    for x in children:
        bound = delta if delta <= 1 else (delta - 1) * float(p[x])
        hood, cum = [], 0.0
        for y in neighbours[x].tolist():
            if cum + float(p[y]) > bound + 1e-9:
                break
            cum += float(p[y])
            hood.append(y)
        relaxed = p.clone()
        relaxed[x] += cum
        relaxed[hood] = 0
        accept = min(1.0, float(relaxed[x]))
        law[x] += stay * accept
        stay *= 1 - accept
        relaxed[x] = 0
        p = relaxed / relaxed.sum()
    return law + stay * p


def first_tokens(children: list[int], delta: float, n: int, seed0: int = 0) -> Tensor:
    """The first committed token of n independent rows (root token 0 with `children` below it)."""
    t = 1 + len(children)
    parents = torch.tensor([[-1] + [0] * len(children)]).expand(n, -1)
    tokens = torch.tensor([[0] + children]).expand(n, -1)
    depths = (parents >= 0).long()
    tree = Tree(tokens, parents, depths, ancestry_mask(parents[:1]).expand(n, -1, -1))
    logits = torch.full((n, t, V), 0.0)
    logits[:, 0] = P.log()
    accept = SampledAcceptance(Relaxation(NEIGHBOURS, delta, multiplicative=delta > 1))  # > 1: lambda
    verdict = accept(tree, logits, SAMPLED, row_generators(list(range(seed0, seed0 + n))))
    nxt = verdict.next_tokens.tolist()
    return torch.tensor([children[path[1] - 1] if len(path) > 1 else nxt[r] for r, path in enumerate(verdict.paths)])


def empirical(tokens: Tensor) -> Tensor:
    return torch.bincount(tokens, minlength=V).double() / tokens.numel()


def test_the_exact_law_matches_a_hand_computation():
    """Guards the oracle itself. Child 1, delta 0.28: A(1) = {2, 4} (0.15 + 0.10; adding 0 gives 0.30),
    p~ = [.05, .45, 0, .25, 0, .25]; rejected (0.55): p = [1, 0, 0, 5, 0, 5] / 11. Child 3: A(3) =
    {4, 2, 0} (0, 0, 1/11; adding 5 gives 6/11), p~(3) = 6/11; rejected: p = one-hot at 5."""
    law = exact_first_token_law(P, [1, 3], NEIGHBOURS, 0.28)
    assert law.tolist() == pytest.approx([0, 0.45, 0, 0.55 * 6 / 11, 0, 0.55 * 5 / 11])
    single = exact_first_token_law(P, [1], NEIGHBOURS, 0.28)
    assert single.tolist() == pytest.approx([0.05, 0.45, 0, 0.25, 0, 0.25])  # = p~ itself


@pytest.mark.parametrize("children,delta", [
    ([1], 0.28),      # one child: the law is p~ (TV from p = mass of A(1) <= delta)
    ([1, 3], 0.28),   # the second child is tested against the residual of the first's relaxed p
    ([3], 0.0),       # delta 0: exact speculative sampling, the law is p
    ([1, 3], 2.0),    # LANTERN++, lambda 2: A(1) = {2} (0.15 <= 0.2; 0.25 > 0.2)
])
def test_first_token_follows_the_relaxed_distribution(children, delta):
    n = 12000
    exact = exact_first_token_law(P, children, NEIGHBOURS, delta)
    assert abs(float(exact.sum()) - 1) < 1e-9
    emp = empirical(first_tokens(children, delta, n))
    tol = 5 * (0.25 / n) ** 0.5  # five standard errors of a frequency from n draws
    assert (emp - exact).abs().max() < tol, (emp.tolist(), exact.tolist())
    # tokens the law gives no mass (a rejected child's neighbourhood, never drawn afterwards) never occur
    assert (emp[exact == 0] == 0).all(), (emp.tolist(), exact.tolist())


def test_one_relaxed_child_moves_the_first_token_at_most_delta_in_total_variation():
    delta, n = 0.28, 12000
    exact = exact_first_token_law(P, [1], NEIGHBOURS, delta)
    assert 0.5 * float((exact - P.double()).abs().sum()) <= delta + 1e-9
    emp = empirical(first_tokens([1], delta, n, seed0=50_000))
    tv = 0.5 * float((emp - P.double()).abs().sum())
    assert tv <= delta + V * (0.25 / n) ** 0.5 * 3, tv
    assert tv > 0.1  # the relaxation did move mass (A(1) holds 0.25 of it)


def test_lambda_neighbourhood_is_the_longest_prefix_within_lambda_minus_one_times_p_x():
    """LANTERN++: m = max{j : c_j <= (lambda - 1) p(x)}. Here p(1) = 0.2, lambda = 2: the bound is
    0.2, so A(1) = {2} (c_1 = 0.15; c_2 = 0.25 > 0.2), though c_2 and c_3 are below lambda p(x) = 0.4."""
    relax = Relaxation(NEIGHBOURS, 2.0, multiplicative=True)
    hood, mass = relax.neighbourhood(P, 1)
    assert hood.tolist() == [2] and mass == pytest.approx(0.15)
    # lambda 3: bound 0.4 takes {2, 4, 0} (0.30; adding 3 gives 0.55)
    hood3, mass3 = Relaxation(NEIGHBOURS, 3.0, multiplicative=True).neighbourhood(P, 1)
    assert hood3.tolist() == [2, 4, 0] and mass3 == pytest.approx(0.30)
