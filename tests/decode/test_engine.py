"""The engine's AR path equals a plain reference loop; Jacobi and acceptance details."""
import pytest
import torch

from decode.strategies.acceptance import GreedyAcceptance, Relaxation, SampledAcceptance, latent_neighbours
from decode.core.engine import generate, generate_ar
from decode.core.sampling import SamplingParams, row_generators, sample
from decode.core.trees import Tree, ancestry_mask
from tests.decode.test_speculative import GREEDY, SAMPLED, world


@torch.no_grad()
def reference_ar(target, cond, n, sampling, generators):
    """The textbook loop: prefill, then one forward per token."""
    cache, out = target.start(cond, n)
    token = sample(out.logits[:, -1], sampling, generators)
    tokens = [token]
    for _ in range(n - 1):
        out = target.extend(cache, token[:, None])
        target.commit(cache, 1)
        token = sample(out.logits[:, -1], sampling, generators)
        tokens.append(token)
    return torch.stack(tokens, 1)


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=1.0, top_k=10)])
def test_engine_ar_equals_the_reference_loop(sampling):
    target, _, cond, _ = world(3)
    ref = reference_ar(target, cond, 64, sampling, row_generators([4, 5, 6]))
    gen = generate_ar(target, cond, num_tokens=64, sampling=sampling, generators=row_generators([4, 5, 6]))
    assert torch.equal(gen.tokens, ref)
    assert gen.nfe.tolist() == [63] * 3 and gen.skipped.sum() == 0


def test_neighbourhood_respects_the_tvd_and_lambda_bounds():
    codebook = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    nb = latent_neighbours(codebook, 31)
    d = torch.cdist(codebook, codebook)
    assert (d.gather(1, nb).diff(dim=1) >= 0).all()  # ordered by latent distance
    assert (nb != torch.arange(32)[:, None]).all()  # never itself
    p = torch.softmax(torch.randn(32, generator=torch.Generator().manual_seed(1)), 0)
    for delta in (0.0, 0.1, 0.3):
        hood, mass = Relaxation(nb, delta).neighbourhood(p, 3)
        assert mass <= delta + 1e-9 and mass == pytest.approx(float(p[hood].sum()))
        # the longest prefix: one more neighbour would break the bound
        if len(hood) < 31:
            assert float(p[nb[3, :len(hood) + 1]].sum()) > delta
    hood, mass = Relaxation(nb, 3.0, multiplicative=True).neighbourhood(p, 3)  # lambda: p~(x) <= 3 p(x)
    assert float(p[3]) + mass <= 3 * float(p[3]) + 1e-9


def test_relaxed_greedy_accepts_a_near_miss_that_plain_greedy_rejects():
    # target logits at the root prefer token 1; token 2 is token 1's nearest latent neighbour
    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.1, 0.0], [5.0, 5.0]])
    tree = Tree(torch.tensor([[0, 2]]), torch.tensor([[-1, 0]]), torch.tensor([[0, 1]]),
                ancestry_mask(torch.tensor([[-1, 0]])))
    logits = torch.log(torch.tensor([[[0.05, 0.5, 0.4, 0.05], [0.25, 0.25, 0.25, 0.25]]]))
    assert GreedyAcceptance()(tree, logits, GREEDY, None).paths == [[0]]
    relaxed = GreedyAcceptance(Relaxation(latent_neighbours(codebook, 3), 0.5))
    assert relaxed(tree, logits, GREEDY, None).paths == [[0, 1]]


def test_relaxed_greedy_takes_the_longest_accepted_path_and_ignores_the_sampling_filter():
    # root's children: 1 (the argmax, a leaf) then 2 -> 3; relaxed, both 1 and 2 are accepted at the
    # root, and only the near-miss 2 leads on: a relaxation that saw a one-hot would stop at [0, 1]
    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.1, 0.0], [5.0, 5.0]])
    parents = torch.tensor([[-1, 0, 0, 2]])
    tree = Tree(torch.tensor([[0, 1, 2, 3]]), parents, torch.tensor([[0, 1, 1, 2]]), ancestry_mask(parents))
    root = [0.05, 0.5, 0.4, 0.05]
    logits = torch.log(torch.tensor([[root, [0.25] * 4, [0.1, 0.1, 0.1, 0.7], [0.25] * 4]]))
    relaxed = GreedyAcceptance(Relaxation(latent_neighbours(codebook, 3), 0.5))
    assert relaxed(tree, logits, GREEDY, None).paths == [[0, 2, 3]]
    # greedy set by top_k=1: the relaxation still sees the plain softmax, not a one-hot
    assert relaxed(tree, logits, SamplingParams(temperature=1.0, top_k=1), None).paths == [[0, 2, 3]]
    assert GreedyAcceptance()(tree, logits, GREEDY, None).paths == [[0, 1]]  # exact: 1 is the argmax, a leaf


def test_sampled_acceptance_rows_only_touch_their_own_generator():
    tree = Tree(torch.tensor([[0, 2], [0, 1]]), torch.tensor([[-1, 0], [-1, 0]]), torch.tensor([[0, 1], [0, 1]]),
                ancestry_mask(torch.tensor([[-1, 0], [-1, 0]])))
    logits = torch.randn(2, 2, 4)
    gens = row_generators([1, 2])
    before = gens[0].get_state().clone()
    verdict = SampledAcceptance()(tree, logits, SAMPLED, gens, rows=[1])
    assert verdict.paths[0] == [] and verdict.paths[1][0] == 0
    assert torch.equal(gens[0].get_state(), before)


def test_jacobi_window_and_inits():
    from decode.strategies.jacobi import JacobiDrafting

    target, _, cond, _ = world(1)
    with pytest.raises(ValueError, match="init"):
        JacobiDrafting(target, 1, 64, init="diagonal")
    d = JacobiDrafting(target, 1, 64, window=4, init="repeat_horizon")
    d.begin(None, None, torch.tensor([[7]]))  # the engine's call after the prefill: the first root
    tree = d.propose(torch.tensor([7]), SAMPLED, row_generators([0]))
    assert tree.tokens.tolist() == [[7, 7, 7, 7, 7]]  # each guess copies its left neighbour
    assert tree.q[0, 1:].argmax(-1).tolist() == [7] * 4 and tree.parents.tolist() == [[-1, 0, 1, 2, 3]]


def test_every_method_runs_in_bfloat16():
    from decode.core.trees import TreeParams
    from decode.strategies.registry import METHODS, build_method, resolve_method

    from tests.decode.test_spatial import heads_for

    target, drafter, cond, codebook = world(2, block=64)  # an 8 x 8 grid (zipar: 8 rows at most)
    heads = heads_for(target).to(torch.bfloat16)
    target.gpt.to(torch.bfloat16)
    drafter.to(torch.bfloat16)
    for name in METHODS:
        drafts = heads if resolve_method(name).needs_spatial else drafter
        method = build_method(name, sampling=SAMPLED, tree=TreeParams(12, 3, 4), drafter=drafts, codebook=codebook,
                              options={k: v for k, v in dict(lantern_k=16, tau=0.3, window=4, max_rows=8).items()
                                       if k in resolve_method(name).knobs})
        out = generate(target, cond, num_tokens=64, sampling=SAMPLED, generators=row_generators([1, 2]), method=method)
        assert out.tokens.shape == (2, 64) and (out.tokens >= 0).all() and (out.tokens < 64).all(), name


def test_inverse_cdf_draws_follow_p_and_never_pick_a_zero():
    from decode.strategies.acceptance import _inverse_cdf

    p = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3, 0.0])
    us = torch.rand(20000, generator=torch.Generator().manual_seed(0)).tolist()
    counts = torch.bincount(torch.tensor([_inverse_cdf(p, u) for u in us]), minlength=6).float() / len(us)
    assert counts[[0, 2, 5]].sum() == 0
    assert (counts - p).abs().max() < 0.015
    assert _inverse_cdf(p, 0.0) == 1 and _inverse_cdf(p, 1.0 - 1e-12) == 4 and _inverse_cdf(p, 1.0) == 4


def test_dynamic_tree_scores_follow_the_sampling_processor():
    # EAGLE-2 ranks candidates by log-probabilities after the logits processor (docs/algorithms.md 2.2)
    from decode.strategies.drafting import EagleDrafting
    from decode.core.trees import TreeParams

    target, drafter, cond, _ = world(1)

    def first_level(sampling):
        d = EagleDrafting(drafter, target, TreeParams(12, 3, 4), 1, 64)
        cache, out = target.start(cond, 64, extra_slots=256, all_positions=True)
        d.begin(out, cache.valid[:, :target.prefix_len], torch.tensor([[7]]))
        tree = d.propose(torch.tensor([7]), sampling, row_generators([0]))
        level = (tree.depths[0] == 1).nonzero().flatten()
        return dict(zip(tree.tokens[0, level].tolist(), tree.scores[0, level].exp().tolist()))

    plain, greedy = first_level(SamplingParams(temperature=1.0)), first_level(GREEDY)
    assert plain == pytest.approx(greedy)  # greedy: no processor
    top4 = first_level(SamplingParams(temperature=1.0, top_k=4))  # renormalised over the 4 kept codes
    assert sum(top4.values()) == pytest.approx(1.0) and sum(plain.values()) < 0.99
    assert first_level(SamplingParams(temperature=0.5)) != pytest.approx(plain)


def test_tree_selection_keeps_every_parent_when_scores_tie():
    # After top-k / top-p filtering, the pool holds many -inf scores that tie; the kept nodes must
    # still include every kept node's parent (torch's topk breaks such ties arbitrarily).
    from decode.strategies.drafting import EagleDrafting
    from decode.core.trees import TreeParams

    target, drafter, _, _ = world(1)
    d = EagleDrafting(drafter, target, TreeParams(59, 4, 10), 1, 64)
    n = 410  # EAGLE-2's pool: 10 + 4 x 100 candidates
    scores = torch.full((1, n), float("-inf"))
    scores[0, :5] = torch.tensor([-0.1, -0.2, -0.3, -0.4, -0.5])
    parents = (torch.arange(n) - 1)[None]  # a chain: each node's parent is the one before it
    depth = torch.arange(1, n + 1)[None]
    tree = d._select(torch.tensor([7]), torch.arange(n)[None] % 64, scores, parents, depth)
    assert tree.parents[0, 0] == -1 and (tree.parents[0, 1:] == torch.arange(58)).all()
