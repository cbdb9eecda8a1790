"""Speculative decoding invariants: greedy methods equal greedy AR token for token; exact sampled
methods have the target's distribution; LANTERN with delta 0 is exact SD."""
import pytest
import torch

from decode.models.drafter import Drafter, DrafterConfig
from decode.core.engine import Method, generate
from decode.strategies.registry import build_method
from decode.core.sampling import SamplingParams, probabilities, row_generators
from decode.models.target import Condition, LlamaGenTarget
from decode.core.trees import TreeParams, ancestry_mask, shape_from_widths, static_shape
from tests.conftest import padded_captions, tiny_gpt

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=1.0)


def world(batch=1, cfg_scale=3.0, vocab=64, block=64, seed=0, caption_seed=0):
    """A tiny target, a drafter that agrees with it sometimes (a copy of the target's last layer), a
    condition and a random codebook."""
    gpt = tiny_gpt(block_size=block, vocab_size=vocab, seed=seed)
    torch.manual_seed(1)
    drafter = Drafter(DrafterConfig.for_target(gpt)).eval()
    drafter.layers[0].load_state_dict(gpt.layers[-1].state_dict(), strict=False)
    text, mask = padded_captions(batch, seed=caption_seed)
    codebook = torch.randn(vocab, 8, generator=torch.Generator().manual_seed(3))
    return LlamaGenTarget(gpt, cfg_scale=cfg_scale), drafter, Condition(text, mask), codebook


def run(target, cond, method: Method, sampling, seeds=None, n=None):
    seeds = seeds if seeds is not None else range(cond.batch)
    return generate(target, cond, num_tokens=n or target.num_image_tokens, sampling=sampling,
                    generators=row_generators(list(seeds)), method=method)


def test_ancestry_mask_follows_parent_pointers():
    parents = torch.tensor([[-1, 0, 0, 1, 3]])
    m = ancestry_mask(parents)[0]
    assert m[4].tolist() == [True, True, False, True, True]
    assert m[2].tolist() == [True, False, True, False, False]


@pytest.mark.parametrize("size", [1, 2, 3, 17, 59])
def test_ancestry_mask_equals_a_walk_up_the_parents(size):
    g = torch.Generator().manual_seed(size)
    # random trees, three rows: each node's parent is an earlier node (node 0, or a chain: deepest)
    parents = torch.stack([torch.tensor([-1] + [int(torch.randint(i, (1,), generator=g)) for i in range(1, size)]),
                           torch.arange(-1, size - 1),
                           torch.tensor([-1] + [0] * (size - 1))])
    m = ancestry_mask(parents)
    for row, par in enumerate(parents.tolist()):
        for node in range(size):
            seen, a = set(), node
            while a >= 0:
                seen.add(a)
                a = par[a]
            assert [j for j in range(size) if m[row, node, j]] == sorted(seen)


def test_static_shapes_have_their_level_widths_and_parents_first():
    shape = static_shape("naive_extend_57")
    depths = shape.depths()
    assert [depths.count(d) for d in range(1, 6)] == [5, 13, 16, 14, 9]
    assert all(p < i for i, p in enumerate(shape.parents) if i)
    with pytest.raises(ValueError, match="exceeds"):
        shape_from_widths((2, 30), top_k=10)


@pytest.mark.parametrize("batch,cfg_scale,tree", [
    (1, 1.0, TreeParams(total_tokens=8, depth=3, top_k=3)),
    (4, 4.0, TreeParams(total_tokens=12, depth=4, top_k=4)),
    (3, 2.0, TreeParams(total_tokens=2, depth=0, top_k=1)),  # a chain of one draft
    (4, 3.0, TreeParams(static="naive_extend_57")),         # a static tree, greedy children
    (2, 3.0, TreeParams(static="naive_extend_57", static_size=9)),  # its 9 cheapest nodes (tree=auto's)
])
def test_greedy_speculation_equals_greedy_ar(batch, cfg_scale, tree):
    target, drafter, cond, _ = world(batch, cfg_scale)
    ar = run(target, cond, Method(), GREEDY)
    sd = run(target, cond, build_method("eagle2", sampling=GREEDY, tree=tree, drafter=drafter), GREEDY)
    assert torch.equal(sd.tokens, ar.tokens)
    assert (sd.nfe <= 63).all() and (sd.nfe >= 1).all()


@pytest.mark.parametrize("batch", [1, 4])
def test_full_trees_accept_many_tokens_and_stay_exact(batch):
    """Vocabulary 4, top_k 4, every candidate kept: the target's path is in the tree down to the
    first unexpanded node, so steps accept several drafts (KV compaction and drafter bookkeeping
    are exercised), and the tokens still equal greedy AR."""
    target, drafter, cond, _ = world(batch, 3.0, vocab=4, caption_seed=5)
    ar = run(target, cond, Method(), GREEDY)
    tree = TreeParams(total_tokens=4 + 16 * 3 + 1, depth=3, top_k=4)
    sd = run(target, cond, build_method("eagle2", sampling=GREEDY, tree=tree, drafter=drafter), GREEDY)
    assert torch.equal(sd.tokens, ar.tokens)
    assert (sd.nfe < 40).all(), sd.nfe  # at least ~1.6 tokens per verification


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED])
def test_lantern_with_delta_zero_is_exact_speculative_decoding(sampling):
    target, drafter, cond, codebook = world(3)
    tree = TreeParams(12, 3, 4)
    exact = run(target, cond, build_method("eagle2", sampling=sampling, tree=tree, drafter=drafter), sampling)
    lantern = run(target, cond, build_method("lantern", sampling=sampling, tree=tree, drafter=drafter,
                                             codebook=codebook, options=dict(lantern_k=16, delta=0.0)),
                  sampling)
    assert torch.equal(lantern.tokens, exact.tokens) and torch.equal(lantern.nfe, exact.nfe)
    relaxed = run(target, cond, build_method("lantern", sampling=sampling, tree=tree, drafter=drafter,
                                             codebook=codebook, options=dict(lantern_k=16, delta=0.5)),
                  sampling)
    assert relaxed.nfe.sum() < exact.nfe.sum()  # relaxation accepts more per pass


def test_rows_do_not_depend_on_their_batch():
    """Each image depends on its own seed only: decoded alone or beside others, same tokens."""
    target, drafter, cond, codebook = world(3)
    method = build_method("vvs", sampling=SAMPLED, tree=TreeParams(12, 3, 4), drafter=drafter, codebook=codebook,
                          options=dict(base="lantern", lantern_k=16, tau=0.2))
    together = run(target, cond, method, SAMPLED, seeds=[7, 8, 9])
    alone = run(target, Condition(cond.cond[1:2], cond.mask[1:2]), method, SAMPLED, seeds=[8])
    assert torch.equal(together.tokens[1:2], alone.tokens)
    assert together.skipped.sum() > 0


def _two_token_distribution(target, cond1, method, sampling, n, seed0):
    cond = Condition(cond1.cond.expand(n, -1, -1), cond1.mask.expand(n, -1))
    gen = run(target, cond, method, sampling, seeds=range(seed0, seed0 + n), n=4)
    idx = gen.tokens[:, 0] * 4 + gen.tokens[:, 1]
    return torch.bincount(idx, minlength=16).float() / n, gen


@pytest.mark.parametrize("name,tree", [
    ("eagle2", TreeParams(total_tokens=4, depth=2, top_k=1)),   # chain, deterministic drafts
    ("eagle2", TreeParams(total_tokens=7, depth=2, top_k=2)),   # multi-candidate tree (q = 1)
    ("eagle2", TreeParams(static="balanced_25", top_k=2)),      # static tree, drafts sampled (q)
    ("sjd", None),                                              # Jacobi window, q from the last pass
    ("sjd_vp", None),
    ("mc_sjd", None),                                           # Jacobi window, coupled redraws
    ("sjd_pac", None),                                          # + proactive candidates (3 at 2 slots)
])
def test_exact_sampled_methods_have_the_targets_distribution(name, tree):
    """The first two tokens' joint distribution matches the target's exact one (enumerated) as
    closely as plain AR sampling does, with drafts both accepted and rejected along the way."""
    target, drafter, cond1, _ = world(1, 2.0, vocab=4, block=4, seed=3, caption_seed=7)
    pairs = torch.cartesian_prod(torch.arange(4), torch.arange(4))  # [16, 2]
    tf = target.teacher_forced(Condition(cond1.cond.expand(16, -1, -1), cond1.mask.expand(16, -1)),
                               torch.cat([pairs, torch.zeros(16, 2, dtype=torch.long)], 1))
    probs = probabilities(tf.logits, SAMPLED)
    exact = probs[:, 0].gather(1, pairs[:, :1])[:, 0] * probs[:, 1].gather(1, pairs[:, 1:])[:, 0]
    assert abs(exact.sum().item() - 1) < 1e-5
    n = 3000
    opts = dict(window=3, init="random") if "sjd" in name else None
    method = build_method(name, sampling=SAMPLED, tree=tree or TreeParams(), drafter=drafter, options=opts)
    emp_ar, _ = _two_token_distribution(target, cond1, Method(), SAMPLED, n, 0)
    emp_sd, gen = _two_token_distribution(target, cond1, method, SAMPLED, n, n)
    tv = lambda emp: 0.5 * (emp - exact).abs().sum().item()  # noqa: E731
    assert tv(emp_ar) < 0.05 and tv(emp_sd) < 0.05, (tv(emp_ar), tv(emp_sd))
    assert 1.0 < gen.nfe.float().mean() < 3.0  # drafts were accepted and rejected
    # the third token's marginal: for SJD it is often a draft redrawn from an earlier pass's
    # prediction (q not one-hot), which the first two tokens rarely are
    third = (exact[:, None] * probs[:, 2]).sum(0)  # [4]: sum over (t0, t1) of p(t0, t1) p(t2 | t0, t1)
    emp_third = torch.bincount(gen.tokens[:, 2], minlength=4).float() / n
    assert 0.5 * (emp_third - third).abs().sum().item() < 0.03, (emp_third, third)


def test_an_always_accepting_rule_fails_the_distribution_test():
    """The statistical test can fail: accepting every draft (a broken rule) moves the joint
    distribution far from the target's."""
    from decode.strategies.acceptance import Verdict

    target, drafter, cond1, _ = world(1, 2.0, vocab=4, block=4, seed=3, caption_seed=7)

    def accept_all(tree, logits, sampling, generators, rows=None):
        rows = range(tree.tokens.shape[0]) if rows is None else rows
        paths = [[] for _ in range(tree.tokens.shape[0])]
        for r in rows:
            paths[r] = list(range(tree.size))
        return Verdict(paths, logits[:, -1].argmax(-1))

    base = build_method("eagle2", sampling=SAMPLED, tree=TreeParams(4, 2, 1), drafter=drafter)
    broken = Method("broken", drafting=base.drafting, acceptance=accept_all)
    pairs = torch.cartesian_prod(torch.arange(4), torch.arange(4))
    tf = target.teacher_forced(Condition(cond1.cond.expand(16, -1, -1), cond1.mask.expand(16, -1)),
                               torch.cat([pairs, torch.zeros(16, 2, dtype=torch.long)], 1))
    probs = probabilities(tf.logits, SAMPLED)
    exact = probs[:, 0].gather(1, pairs[:, :1])[:, 0] * probs[:, 1].gather(1, pairs[:, 1:])[:, 0]
    emp, _ = _two_token_distribution(target, cond1, broken, SAMPLED, 1000, 0)
    assert 0.5 * (emp - exact).abs().sum().item() > 0.1


def test_sampled_methods_need_generators():
    target, drafter, cond, _ = world(1)
    with pytest.raises(ValueError, match="generator"):
        generate(target, cond, num_tokens=8, sampling=SAMPLED, generators=None,
                 method=build_method("eagle2", sampling=SAMPLED, drafter=drafter))


@pytest.mark.parametrize("name", ["mc_sjd", "sjd_pac"])
def test_a_broken_coupling_fails_the_distribution_test(monkeypatch, name):
    """MC-SJD's coupling (SJD-PAC's adaptive continuation) must leave each redrawn draft's marginal at q:
    one that always keeps the previous draft, rejected or not, does not, and the distribution test catches it."""
    from decode.strategies import jacobi

    monkeypatch.setattr(jacobi, "coupled_draw", lambda q, previous, q_previous, generator:
                        torch.tensor([previous], device=q.device))
    with pytest.raises(AssertionError):
        test_exact_sampled_methods_have_the_targets_distribution(name, None)


def test_proactive_candidates_are_distinct_draws_with_renormalised_q():
    """SJD-PAC's tree: at each of the first pac_depth slots, pac_width - 1 siblings of the chain's draft,
    distinct from it and from each other, each with q renormalised without the tokens tried before it."""
    target, _, cond, _ = world(2, vocab=16, block=16)
    method = build_method("sjd_pac", sampling=SAMPLED, options=dict(window=4, pac_width=3, pac_depth=2))
    drafting = method.drafting.start(target, 2, 16)
    cache, out = target.start(cond, 16, extra_slots=16)
    gens = row_generators([0, 1])
    root = torch.tensor([3, 5])
    drafting.begin(out, cache.valid, root[:, None], gens)
    drafting.q = [[torch.softmax(torch.randn(16, generator=torch.Generator().manual_seed(r * 4 + j)), -1)
                   for j in range(4)] for r in range(2)]  # drafts redrawn from a prediction: q known
    tree = drafting.propose(root, SAMPLED, gens)
    assert tree.size == 1 + 4 + 2 * 2
    assert tree.parents[0, 5:].tolist() == [0, 0, 1, 1] and tree.depths[0, 5:].tolist() == [1, 1, 2, 2]
    for r in range(2):
        for slot, sibs in ((1, (5, 6)), (2, (7, 8))):
            tried = [int(tree.tokens[r, slot])]
            for n in sibs:
                x = int(tree.tokens[r, n])
                assert x not in tried
                want = drafting.q[r][slot - 1].clone()
                want[tried] = 0
                torch.testing.assert_close(tree.q[r, n], want / want.sum())
                tried.append(x)
