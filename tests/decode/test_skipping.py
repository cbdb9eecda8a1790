"""VVS invariants: never skipping is the base method; the deferred fill writes the same KV and
features as a direct pass; the selector, similarity and schedulers follow docs/algorithms.md 4.1-4.5."""
import pytest
import torch

from decode.core.engine import _with_chain
from decode.strategies.registry import build_method
from decode.strategies.skipping import FeatureCache, SkipLimits, StepContext, UniformSkip, path_similarity, select_skip_tokens
from decode.core.trees import Tree, TreeParams, ancestry_mask, leaf_paths
from tests.decode.test_speculative import GREEDY, SAMPLED, run, world


def small_tree(tokens, parents):
    parents = torch.tensor([parents])
    depths = torch.zeros_like(parents)
    for i in range(1, parents.shape[1]):
        depths[0, i] = depths[0, parents[0, i]] + 1
    return Tree(torch.tensor([tokens]), parents, depths, ancestry_mask(parents))


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED])
def test_vvs_that_never_skips_is_its_base_method(sampling):
    target, drafter, cond, codebook = world(3)
    kw = dict(sampling=sampling, tree=TreeParams(12, 3, 4), drafter=drafter, codebook=codebook)
    base = run(target, cond, build_method("lantern", **kw, options=dict(lantern_k=16)), sampling)
    for name, opts in [("vvs", dict(base="lantern", lantern_k=16, tau=2.0)),          # similarity never reaches 2
                       ("vvs_u", dict(lantern_k=16, interval=1))]:   # interval 1 never skips
        vvs = run(target, cond, build_method(name, **kw, options=opts), sampling)
        assert torch.equal(vvs.tokens, base.tokens) and torch.equal(vvs.nfe, base.nfe)
        assert int(vvs.skipped.sum()) == 0


def test_skipping_saves_target_passes_and_respects_the_cap():
    target, drafter, cond, codebook = world(2)
    kw = dict(sampling=SAMPLED, tree=TreeParams(12, 3, 4), drafter=drafter, codebook=codebook)
    base = run(target, cond, build_method("lantern", **kw, options=dict(lantern_k=16)), SAMPLED)
    vvs_u = run(target, cond, build_method("vvs_u", **kw, options=dict(lantern_k=16, interval=2)), SAMPLED)
    assert (vvs_u.skipped > 0).all()
    assert (vvs_u.nfe + vvs_u.skipped == vvs_u.steps).all()
    # interval 2 alternates: never two skips in a row, so at most about half the steps are skipped
    assert (vvs_u.skipped <= (vvs_u.steps + 1) // 2).all()
    assert vvs_u.nfe.float().mean() < base.nfe.float().mean()


def test_deferred_fill_gives_the_kv_and_features_of_a_direct_pass():
    """[chain ; tree] in one pass == chain committed first, then the tree: same tree logits, same
    chain features, and after compaction the same KV, with rows of different chain lengths."""
    target, _, cond, _ = world(2, 3.0)
    tree = small_tree([5, 9, 3, 7], [-1, 0, 0, 1])
    tree = Tree(tree.tokens.expand(2, -1), tree.parents.expand(2, -1), tree.depths.expand(2, -1),
                tree.mask.expand(2, -1, -1))
    chains = [[11, 12, 13], []]

    def prefix_and_two_tokens():
        cache, _ = target.start(cond, 32, extra_slots=16)
        target.extend(cache, torch.tensor([[1, 2], [1, 2]]))
        target.commit(cache, 2)
        return cache

    # one pass over [chain ; tree]
    fused = prefix_and_two_tokens()
    tokens, mask, depths, w = _with_chain(tree, chains)
    out = target.extend(fused, tokens, block_mask=mask, depths=depths)
    keep = torch.tensor([[fused.length[0] + i for i in range(3)] + [fused.length[0] + w + n for n in (0, 1, 3)],
                         [fused.length[1] + w + n for n in (0, 1, 3)] + [0, 0, 0]])
    fused.keep(keep.repeat(target.groups, 1), torch.tensor([6, 3]).repeat(target.groups))
    # direct: row 0's chain as its own pass, committed; then the tree
    direct = prefix_and_two_tokens()
    chain_out = target.extend(direct, torch.tensor([[11, 12, 13], [0, 0, 0]]))
    target.commit(direct, torch.tensor([3, 0]))
    tree_out = target.extend(direct, tree.tokens, block_mask=tree.mask, depths=tree.depths)
    direct.keep((direct.length.view(-1, 1) + torch.tensor([0, 1, 3])).repeat(1, 1), torch.tensor([3, 3]).repeat(target.groups))
    torch.testing.assert_close(out.logits[:, w:], tree_out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.hidden[:, 0, :3], chain_out.hidden[:, 0], atol=1e-5, rtol=1e-5)
    assert torch.equal(fused.length, direct.length)
    n = int(fused.length.max())
    for row in range(fused.batch):
        upto = int(fused.length[row])
        torch.testing.assert_close(fused.k[:, row, :, :upto], direct.k[:, row, :, :upto], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused.v[:, row, :, :upto], direct.v[:, row, :, :upto], atol=1e-5, rtol=1e-5)
    assert n > 0


def test_selector_truncates_to_the_mean_path_length():
    # paths: [0,1,3,4] (len 4), [0,2] (len 2) -> mean 3 -> take at most 2 tokens + the next root
    tree = small_tree([5, 9, 3, 7, 8], [-1, 0, 0, 1, 3])
    # the uniform draw picks a path, in lexicographic order: [0, 0.5) leaf 4's, [0.5, 1) leaf 2's
    assert [tuple(select_skip_tokens(tree, 0, u)) for u in (0.0, 0.49, 0.5, 0.999)] == \
        [(0, 1, 3), (0, 1, 3), (0, 2), (0, 2)]


def test_similarity_takes_every_second_path_in_lexicographic_order():
    # leaves 2, 3, 4; paths sorted: [0, 1, 4], [0, 2], [0, 3] -> stride 2 compares [1, 4] with [3]
    tree = small_tree([0, 5, 6, 5, 7], [-1, 0, 0, 0, 1])
    assert leaf_paths(tree.parents[0]) == [[0, 1, 4], [0, 2], [0, 3]]
    # nodes 1 and 3 hold the same code: the pair agrees at depth 0 (weight 1 / 1.9 of a width-2 path);
    # in leaf order the pair would be [2] and [1, 4], codes 6 and 5, orthogonal: 0
    assert path_similarity(tree, torch.eye(8))[0] == pytest.approx(1 / 1.9)


def test_path_similarity_is_one_for_identical_paths_and_lower_otherwise():
    latents = torch.eye(8)
    same = small_tree([0, 1, 1, 1, 2, 2], [-1, 0, 0, 0, 1, 2])  # leaves 3, 4, 5
    # stride 1: compare all paths; [1], [1, 2], [1, 2] -> the short path only overlaps at depth 0
    s = path_similarity(same, latents, stride=1)[0]
    assert 0 < s < 1
    identical = small_tree([0, 1, 2, 1, 2], [-1, 0, 1, 0, 3])  # two paths [1, 2]
    assert path_similarity(identical, latents, stride=1)[0] == pytest.approx(1.0)
    different = small_tree([0, 1, 2, 3, 4], [-1, 0, 1, 0, 3])
    assert path_similarity(different, latents, stride=1)[0] == pytest.approx(0.0)


def test_uniform_schedule_and_warmup():
    tree = small_tree([5, 9, 3], [-1, 0, 1])
    rule, limits = UniformSkip(interval=5), SkipLimits(max_consecutive=1, warmup=5)

    def decide(step, made, run=0):
        ctx = StepContext(tree, step, torch.tensor([made]), torch.tensor([run]), 64)
        allowed = limits.eligible(ctx)
        return bool((allowed & rule.wants_skip(ctx, allowed))[0])

    assert [decide(t, 20) for t in range(12)] == [t % 5 == 1 for t in range(12)]
    # warm-up: no skip until more than 5 tokens are committed (made also counts the pending root)
    assert not decide(1, 6) and decide(1, 7)
    assert not decide(6, 20, run=1)  # the cap of one consecutive skip


def test_learned_scheduler_interface_with_a_test_double():
    target, drafter, cond, codebook = world(2)
    calls = []

    def always_safe(features):
        calls.append(features.shape)
        return torch.ones(features.shape[0])

    kw = dict(sampling=SAMPLED, tree=TreeParams(12, 3, 4), drafter=drafter, codebook=codebook)
    opts = dict(base="lantern", lantern_k=16, skipping="learned", threshold=0.5)
    gen = run(target, cond, build_method("vvs", **kw, options=opts, learned_policy=always_safe), SAMPLED)
    assert calls and calls[0][1] == 8
    assert (gen.skipped > 0).all()
    never = run(target, cond, build_method("vvs", **kw, options=opts, learned_policy=lambda f: torch.zeros(len(f))),
                SAMPLED)
    base = run(target, cond, build_method("lantern", **kw, options=dict(lantern_k=16)), SAMPLED)
    assert torch.equal(never.tokens, base.tokens)
    with pytest.raises(ValueError, match="scheduler.ckpt"):
        build_method("vvs", **kw, options=opts)


def test_feature_cache_reuses_the_most_recent_features():
    fc = FeatureCache(2, 1, 16, 3, "cpu", torch.float32)
    fc.append(0, torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3))
    assert torch.equal(fc.stale(0, 2), fc.store[:, 0, 2:4])
    assert torch.equal(fc.stale(0, 2, staleness=1), fc.store[:, 0, 1:3])
    too_few = fc.stale(0, 6)  # 4 cached: all of them, then the last repeated
    assert torch.equal(too_few[:, :4], fc.store[:, 0, :4])
    assert torch.equal(too_few[:, 4:], fc.store[:, 0, 3:4].expand(2, 2, 3))


def test_a_batch_runs_a_pass_whenever_any_row_verifies():
    target, drafter, cond, codebook = world(3)
    kw = dict(sampling=SAMPLED, tree=TreeParams(12, 3, 4), drafter=drafter, codebook=codebook)
    vvs = run(target, cond, build_method("vvs", **kw, options=dict(base="lantern", lantern_k=16, tau=0.2)), SAMPLED)
    assert vvs.batch_passes >= int(vvs.nfe.max())  # per-row NFE never exceeds the batch's passes
    uniform = run(target, cond, build_method("vvs_u", **kw, options=dict(lantern_k=16, interval=2)),
                  SAMPLED)
    assert uniform.batch_passes < int(uniform.steps.max())  # synchronous skips save whole passes
