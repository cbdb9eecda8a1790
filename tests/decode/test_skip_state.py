"""VVS skipped-step state: the feature cache holds the target's own feature of every committed
token, in order, once the deferred fill has run (docs/algorithms.md 4.6); the similarity
scheduler compares every second candidate path (docs/algorithms.md 4.2)."""
import pytest
import torch

from decode.core import engine
from decode.strategies.registry import build_method
from decode.strategies import skipping
from decode.strategies.skipping import FeatureCache, SimilaritySkip, SkipLimits, StepContext
from decode.models.target import Condition
from decode.core.trees import TreeParams, leaf_paths
from tests.decode.test_skipping import small_tree
from decode.core.sampling import row_generators
from tests.decode.test_speculative import SAMPLED, run, world


def test_feature_cache_holds_the_targets_features_of_every_filled_token(monkeypatch):
    """VVS-U (skip every second step) on the tiny world: after decoding, each row's feature cache
    holds one feature per committed token, except the trailing chain a final skip left unfilled,
    and they equal the target's teacher-forced features of the committed tokens (the deferred
    fill's fresh features of skipped tokens included, in generation order)."""
    caches, states = [], []

    class Recording(FeatureCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            caches.append(self)

    real_start = engine._Rows.start

    def spying_start(b, made=1):
        states.append(real_start(b, made))  # the loop's per-row state: committed counts and unfilled chains
        return states[-1]

    monkeypatch.setattr(skipping, "FeatureCache", Recording)
    monkeypatch.setattr(engine._Rows, "start", spying_start)
    target, drafter, cond, codebook = world(2)
    n = 24  # enough steps for several skips, without decoding the whole image
    method = build_method("vvs_u", sampling=SAMPLED, tree=TreeParams(12, 3, 4), drafter=drafter, codebook=codebook,
                          options=dict(lantern_k=16, interval=2, warmup=2))
    gen = run(target, cond, method, SAMPLED, seeds=[3, 4], n=n)
    assert (gen.skipped > 0).all()
    (cache,), rows = caches, states[-1]
    # the teacher-forced feature whose LM head predicts token j + 1 is token j's feature
    tokens = torch.cat([gen.tokens, torch.zeros(2, 1, dtype=torch.long)], 1)
    tf = target.teacher_forced(Condition(cond.cond, cond.mask), tokens).hidden  # [G, B, N + 1, D]
    for r in range(2):
        filled = rows.made[r] - 1 - len(rows.unverified[r])  # committed tokens less the unfilled chain
        assert cache.count[r] == filled, (r, cache.count[r], rows.made[r], rows.unverified[r])
        assert filled >= n - 6
        torch.testing.assert_close(cache.store[:, r, :filled], tf[:, r, 1:filled + 1], atol=1e-4, rtol=1e-4)


def test_a_prefix_fills_the_feature_cache_before_the_first_skip(monkeypatch):
    """GridAR's later stages decode from a given prefix with skipping: the target's features of the
    given tokens are in the cache before the first step, so a row that skips at once continues from
    its real last feature, not from zeros."""
    caches = []

    class Recording(FeatureCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            caches.append(self)

    monkeypatch.setattr(skipping, "FeatureCache", Recording)
    target, drafter, cond, codebook = world(2)
    method = build_method("vvs_u", sampling=SAMPLED, tree=TreeParams(12, 3, 4), drafter=drafter, codebook=codebook,
                          options=dict(lantern_k=16, interval=2, warmup=2))
    prefix = torch.randint(0, target.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    first = []
    real_stale = FeatureCache.stale
    monkeypatch.setattr(Recording, "stale", lambda self, row, n, st=0: first.append(
        (self.count[row], real_stale(self, row, n, st))) or first[-1][1])
    gen = engine.generate(target, cond, num_tokens=16, sampling=SAMPLED, generators=row_generators([3, 4]),
                          method=method, prefix=prefix)
    assert torch.equal(gen.tokens[:, :10], prefix) and (gen.skipped > 0).any()
    given = torch.cat([prefix, torch.zeros(2, 1, dtype=torch.long)], 1)
    tf = target.teacher_forced(Condition(cond.cond, cond.mask), given).hidden  # [G, B, 11, D]
    (cache,) = caches
    for r in range(2):
        torch.testing.assert_close(cache.store[:, r, :10], tf[:, r, 1:11], atol=1e-4, rtol=1e-4)
    count, stale = first[0]
    assert count >= 10 and stale.abs().sum() > 0


@pytest.mark.parametrize("codes,tau,skip", [
    # paths [1], [2], [3], [4] (lexicographic); every second path: [1] and [3]
    ((5, 6, 5, 6), 0.7, True),   # 1 and 3 agree: similarity 1; over all pairs only 2 of 6 agree (1/3)
    ((5, 5, 6, 5), 0.4, False),  # 1 and 3 differ: 0; over all pairs 3 of 6 agree (1/2)
])
def test_similarity_scheduler_compares_every_second_path(codes, tau, skip):
    tree = small_tree((0,) + codes, [-1, 0, 0, 0, 0])
    assert leaf_paths(tree.parents[0]) == [[0, 1], [0, 2], [0, 3], [0, 4]]
    rule = SimilaritySkip(torch.eye(8), tau=tau)
    ctx = StepContext(tree, 7, torch.tensor([20]), torch.tensor([0]), 64)
    allowed = SkipLimits(warmup=2).eligible(ctx)
    assert (allowed & rule.wants_skip(ctx, allowed)).tolist() == [skip]
