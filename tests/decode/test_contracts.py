"""One contract per strategy Protocol (decode/strategies/protocols.py), run over every implementation.

- Drafting: a proposed tree is rooted at the root, parents come before children, the mask is the
  ancestry of the parents; with exact acceptance every drafting decodes greedy AR's tokens.
- Acceptance: an accepted path starts at the root and follows parent links; every exact rule
  equals greedy AR.
- Skipping: a rule that never fires changes nothing (over every base with a tree); when rows skip,
  the selector's nodes are a root-to-leaf path, drawn uniformly among the tree's paths and cut to
  their mean length (docs/algorithms.md 4.1).
"""
import itertools

import pytest
import torch

from decode.core.engine import Method
from decode.core.sampling import row_generators
from decode.core.trees import TreeParams, ancestry_mask, leaf_paths
from decode.strategies.acceptance import GreedyAcceptance, Grouping, Relaxation, SampledAcceptance, latent_neighbours
from decode.strategies.drafting import EagleDrafts
from decode.strategies.jacobi import JacobiDrafts
from decode.strategies.registry import KNOBS, build_method, resolve_method
from decode.strategies.skipping import (LearnedSkip, NeverSkip, Progress, SimilaritySkip, SkipLimits, Skipping,
                                        UniformSkip)
from tests.decode.test_skipping import small_tree
from tests.decode.test_speculative import GREEDY, SAMPLED, run, world

TREE = TreeParams(12, 3, 4)


def draftings(drafter):
    return {"eagle": EagleDrafts(drafter, TREE), "static": EagleDrafts(drafter, TreeParams(static="balanced_25")),
            "jacobi": JacobiDrafts(window=4)}


def test_the_registry_names_every_drafting_acceptance_and_skipping_here():
    assert set(KNOBS["drafting"]) == {"none", "spatial", *draftings(None)}  # spatial: lanes (tests/decode/test_spatial.py)
    assert set(KNOBS["acceptance"]) == {"exact", "lantern", "lantern_pp", "gsd"}
    assert set(KNOBS["skipping"]) == {"never", "uniform", "similarity", "learned"}


@pytest.mark.parametrize("kind", ["eagle", "static", "jacobi"])
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED])
def test_every_drafting_proposes_well_formed_trees(kind, sampling):
    target, drafter, cond, _ = world(2)
    seen = []

    class Spy:
        def __init__(self, inner):
            self.inner = inner

        def start(self, *a):
            run_ = self.inner.start(*a)
            propose = run_.propose

            def spying(root, *rest):
                tree = propose(root, *rest)
                seen.append((root.clone(), tree))
                return tree
            run_.propose = spying
            return run_

    run(target, cond, Method(kind, drafting=Spy(draftings(drafter)[kind])), sampling, n=24)
    assert len(seen) > 3
    for root, tree in seen:
        assert torch.equal(tree.tokens[:, 0], root)
        parents = tree.parents
        assert (parents[:, 0] == -1).all()
        assert (parents[:, 1:] < torch.arange(1, tree.size)).all() and (parents[:, 1:] >= 0).all()
        assert torch.equal(tree.mask, ancestry_mask(parents))
        assert torch.equal(tree.depths[:, 1:], tree.depths.gather(1, parents[:, 1:].clamp_min(0)) + 1)


@pytest.mark.parametrize("kind", ["eagle", "static", "jacobi"])
def test_every_drafting_with_exact_acceptance_is_greedy_ar(kind):
    target, drafter, cond, _ = world(3)
    ar = run(target, cond, Method(), GREEDY)
    sd = run(target, cond, Method(kind, drafting=draftings(drafter)[kind]), GREEDY)
    assert torch.equal(sd.tokens, ar.tokens)
    assert (sd.nfe <= ar.nfe).all()


def _acceptances(codebook):
    nb = latent_neighbours(codebook, 16)
    return {"exact_greedy": GreedyAcceptance(), "exact_sampled": SampledAcceptance(),
            "lantern_greedy": GreedyAcceptance(Relaxation(nb, 0.3)),
            "lantern_sampled": SampledAcceptance(Relaxation(nb, 0.3)),
            "lantern_pp_sampled": SampledAcceptance(Relaxation(nb, 4.0, multiplicative=True)),
            "gsd_greedy": GreedyAcceptance(Grouping(codebook)), "gsd_sampled": SampledAcceptance(Grouping(codebook))}


@pytest.mark.parametrize("name", ["exact_greedy", "exact_sampled", "lantern_greedy", "lantern_sampled",
                                  "lantern_pp_sampled", "gsd_greedy", "gsd_sampled"])
def test_every_acceptance_returns_root_first_paths_along_parent_links(name):
    codebook = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    accept = _acceptances(codebook)[name]
    g = torch.Generator().manual_seed(0)
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2, 3, 3], [-1, 0, 1, 2, 3, 4, 5, 6]])
    tokens = torch.randint(0, 64, (2, 8), generator=g)
    tree = small_tree(tokens[0].tolist(), parents[0].tolist())
    for row in range(2):
        tree = small_tree(tokens[row].tolist(), parents[row].tolist())
        for trial in range(20):
            logits = torch.randn(1, 8, 64, generator=g) * 3
            logits[0, :, tokens[row]] += 2.0  # drafts likely enough to be accepted sometimes
            sampling = GREEDY if name.endswith("greedy") else SAMPLED
            verdict = accept(tree, logits, sampling, row_generators([trial]))
            path = verdict.paths[0]
            assert path[0] == 0
            assert all(parents[row, b] == a for a, b in zip(path, path[1:]))
            assert 0 <= int(verdict.next_tokens[0]) < 64


@pytest.mark.parametrize("name,tree", [("eagle2", TREE), ("eagle2", TreeParams(static="balanced_25")),
                                       ("sjd", TREE)])
def test_every_exact_acceptance_equals_greedy_ar(name, tree):
    target, drafter, cond, _ = world(2, caption_seed=7)
    ar = run(target, cond, Method(), GREEDY)
    opts = {"window": 5} if name == "sjd" else None
    sd = run(target, cond, build_method(name, sampling=GREEDY, tree=tree, drafter=drafter, options=opts), GREEDY)
    assert torch.equal(sd.tokens, ar.tokens)


def _silent_rules(codebook):
    """Each rule, set so that it never fires."""
    return {"uniform": UniformSkip(interval=1), "similarity": SimilaritySkip(codebook, tau=1.5),
            "learned": LearnedSkip(lambda f: torch.zeros(len(f)), codebook, threshold=0.5)}


@pytest.mark.parametrize("base", ["eagle2", "lantern", "lantern_pp", "eagle2+gsd"])
@pytest.mark.parametrize("rule", ["uniform", "similarity", "learned"])
def test_a_skip_rule_that_never_fires_decodes_its_base_method(base, rule):
    target, drafter, cond, codebook = world(2)
    options = {"lantern_k": 16} if base in ("lantern", "lantern_pp") else None
    base, _, acceptance = base.partition("+")
    options = {"acceptance": acceptance} if acceptance else options
    method = build_method(base, sampling=SAMPLED, tree=TREE, drafter=drafter, codebook=codebook, options=options)
    plain = run(target, cond, method, SAMPLED, seeds=[5, 6], n=32)
    silent = Method(base, method.drafting, method.acceptance, Skipping(_silent_rules(codebook)[rule], SkipLimits(1, 2)))
    with_rule = run(target, cond, silent, SAMPLED, seeds=[5, 6], n=32)
    assert torch.equal(with_rule.tokens, plain.tokens) and torch.equal(with_rule.nfe, plain.nfe)
    assert int(with_rule.skipped.sum()) == 0


class _Always:
    def wants_skip(self, ctx, allowed):
        return torch.ones_like(allowed)

    def after_step(self, following, counts):
        pass


@pytest.mark.parametrize("rule", ["always", "uniform", "similarity", "learned"])
def test_skipped_rows_take_a_uniform_root_to_leaf_path_cut_to_the_mean_length(rule):
    """The selector's law: over many draws, each root-to-leaf path equally often, truncated to the
    tree's mean path length (root included); the rule only decides whether a row skips."""
    codebook = torch.eye(8)
    rules = {"always": _Always(), "uniform": UniformSkip(interval=2), "similarity": SimilaritySkip(codebook, tau=0.0),
             "learned": LearnedSkip(lambda f: torch.ones(len(f)), codebook, threshold=0.5)}
    # paths (lexicographic): [0,1,3,6], [0,1,4], [0,2,5], [0,2,7]: lengths 4, 3, 3, 3 -> mean 3 (floor)
    tree = small_tree([0, 1, 2, 3, 4, 5, 6, 7], [-1, 0, 0, 1, 1, 2, 3, 2])
    paths = leaf_paths(tree.parents[0])
    counts = {}
    n = 800
    for seed in range(n):
        skips = Skipping(rules[rule], SkipLimits(max_consecutive=1, warmup=0))
        state = skips.start(_FakeTarget(), 1, 64, row_generators([seed]), torch.float32)
        _, planned = state.plan(tree, Progress(step=1, made=[10], live=[True], num_tokens=64))
        nodes = planned[0]
        assert len(nodes) == 3 and any(p[:3] == nodes for p in paths)
        counts[tuple(nodes)] = counts.get(tuple(nodes), 0) + 1
    expected = {tuple(p[:3]): 0 for p in paths}
    for p in paths:
        expected[tuple(p[:3])] += n / len(paths)
    assert set(counts) == set(expected)
    for key, want in expected.items():
        assert abs(counts[key] - want) < 4 * (want * (1 - want / n)) ** 0.5 + 1, (key, counts[key], want)


def test_never_skip_plans_nothing_and_fetches_nothing():
    tree = small_tree([0, 1, 2], [-1, 0, 1])
    state = NeverSkip().start(_FakeTarget(), 1, 64, None, torch.float32)
    same, planned = state.plan(tree, Progress(1, [10], [True], 64))
    assert planned == {} and same is tree and same.host is None


class _FakeTarget:
    groups, hidden_size, device = 1, 4, torch.device("cpu")


def test_vvs_runs_over_every_base_with_a_tree():
    target, drafter, cond, codebook = world(2)
    for base, skipping in itertools.product(["eagle2", "lantern", "lantern_pp"], ["uniform", "similarity"]):
        overrides = {"base": base, "skipping": skipping, "lantern_k": 16} if base != "eagle2" else \
            {"base": base, "skipping": skipping}
        if skipping == "similarity":
            overrides["tau"] = 0.0
        else:
            overrides["interval"] = 2
        config = resolve_method("vvs", overrides)
        gen = run(target, cond, build_method(config, sampling=SAMPLED, tree=TREE, drafter=drafter,
                                             codebook=codebook), SAMPLED, n=32)
        assert int(gen.skipped.sum()) > 0, (base, skipping)
        assert (gen.nfe + gen.skipped == gen.steps).all()
