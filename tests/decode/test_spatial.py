"""Spatial draft heads on the wavefront (decode/strategies/lane_drafting.py SpatialLanes): with a whole-row
window the image is greedy AR's and the sampled distribution the target's; heads that know the image make it
in a few passes (so their guesses land on the right indices, right and below); bad input is refused."""
import pytest
import torch

from decode.core.engine import Method
from decode.core.sampling import probabilities
from decode.core.wavefront import NextSet
from decode.models.spatial import SpatialConfig, SpatialHeads
from decode.models.target import Condition
from decode.strategies import lane_drafting
from decode.strategies.lane_drafting import SpatialLanes
from decode.strategies.registry import resolve_method
from tests.decode.test_speculative import GREEDY, SAMPLED, _two_token_distribution, run, world

W = H = 8  # the tiny target's 64 tokens


def heads_for(target, right=3, below=True, seed=0) -> SpatialHeads:
    cfg = SpatialConfig(dim=target.hidden_size, vocab_size=target.vocab_size, block_size=target.num_image_tokens,
                        cls_token_num=target.prefix_len, right=right, below=below)
    heads = SpatialHeads(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    for p in heads.parameters():  # not the zero init: guesses that differ from the target's own next token
        p.data = torch.randn(p.shape, generator=g) * 0.3
    return heads


def spatial(heads, window: int, drafts: int = 4, max_rows: int = H) -> Method:
    return Method("spatial", drafting=SpatialLanes(heads), schedule=NextSet(window, max_rows, drafts))


def test_a_whole_row_window_is_greedy_ar():
    target, _, cond, _ = world(2, block=64)
    ar = run(target, cond, Method(), GREEDY)
    sp = run(target, cond, spatial(heads_for(target), W), GREEDY)
    assert torch.equal(sp.tokens, ar.tokens) and (sp.nfe <= ar.nfe).all()


def oracle(monkeypatch, target, cond, tokens):
    """Heads that know the image: each fed feature is matched to its teacher-forced index i, and head `name`
    guesses the image's token at i + 1 + offset."""
    tf = target.teacher_forced(cond, torch.cat([tokens, tokens[:, :1]], 1)).hidden[:, 0]  # [G, N + 1, D]

    def guesses(self, feats, names):
        index = torch.cdist(feats[0].float(), tf[0, 1:].float()).argmin(-1)  # token index of each fed feature
        offsets = self.heads.config.offsets()
        out = {}
        for name in names:
            at = (index + 1 + offsets[name]).clamp_max(tokens.shape[1] - 1)
            out[name] = [(int(tokens[0, i]), None) for i in at]
        return out

    monkeypatch.setattr(lane_drafting.SpatialLaneRun, "_guesses", guesses)


@pytest.mark.parametrize("right,below,drafts,most", [(3, True, 4, 3 * H), (1, True, W - 1, 3 * H)])
def test_heads_that_know_the_image_make_it_in_few_passes(monkeypatch, right, below, drafts, most):
    """Right guesses continue a row; below guesses fill the row under it (with one right head, a row's chain
    past its first guess comes from the row above's below head)."""
    target, _, cond, _ = world(1, block=64)
    ar = run(target, cond, Method(), GREEDY)
    oracle(monkeypatch, target, cond, ar.tokens)
    sp = run(target, cond, spatial(heads_for(target, right, below), W, drafts), GREEDY)
    assert torch.equal(sp.tokens, ar.tokens)
    assert int(sp.nfe[0]) <= most < int(ar.nfe[0]), (int(sp.nfe[0]), int(ar.nfe[0]))


def test_a_whole_row_window_samples_the_targets_distribution():
    """Lossless per row: drafts drawn from the heads' guided distributions, accepted by the exact rule."""
    target, _, cond1, _ = world(1, 2.0, vocab=4, block=16, seed=3, caption_seed=7)
    pairs = torch.cartesian_prod(torch.arange(4), torch.arange(4))
    tf = target.teacher_forced(Condition(cond1.cond.expand(16, -1, -1), cond1.mask.expand(16, -1)),
                               torch.cat([pairs, torch.zeros(16, 2, dtype=torch.long)], 1))
    probs = probabilities(tf.logits, SAMPLED)
    exact = probs[:, 0].gather(1, pairs[:, :1])[:, 0] * probs[:, 1].gather(1, pairs[:, 1:])[:, 0]
    n = 2000
    heads = heads_for(target, right=2)
    emp, gen = _two_token_distribution(target, cond1, spatial(heads, 4, 3, 1), SAMPLED, n, 0)  # the top row
    assert 0.5 * (emp - exact).abs().sum().item() < 0.05
    third = (exact[:, None] * probs[:, 2]).sum(0)  # the third token: a right head's draft when accepted
    emp_third = torch.bincount(gen.tokens[:, 2], minlength=4).float() / n
    assert 0.5 * (emp_third - third).abs().sum().item() < 0.04, (emp_third, third)


def test_heads_for_another_grid_and_a_spatial_method_without_guesses_are_refused():
    target, _, cond, _ = world(1, block=64)
    other, _, _, _ = world(1, block=16)
    with pytest.raises(ValueError, match="spatial heads for a grid 4 tokens wide; this decode's grid is 8 wide"):
        run(target, cond, spatial(heads_for(other), 3), GREEDY)
    with pytest.raises(ValueError, match="lane_drafts"):
        resolve_method("spatial", {"lane_drafts": 0})
    with pytest.raises(ValueError, match="needs method.schedule=next_set"):
        resolve_method("eagle2", {"drafting": "spatial"})
    assert resolve_method("spatial", {"acceptance": "lantern"}).acceptance == "lantern"


def test_skipped_rows_are_fed_by_their_next_pass(monkeypatch):
    """Heads that know the image, every second row-step skipped: the unverified chains are the image's own
    tokens, so the image is still greedy AR's only if the skipped tokens' KV is filled in by the row's next
    pass (a token that missed them would predict differently). Drafts this good gain nothing from skipping
    (a verified pass takes the same chain and adds the target's next token): no more passes either."""
    from decode.strategies.skipping import SkipLimits, Skipping, UniformSkip

    target, _, cond, _ = world(1, block=64)
    ar = run(target, cond, Method(), GREEDY)
    oracle(monkeypatch, target, cond, ar.tokens)
    heads = heads_for(target)
    plain = run(target, cond, spatial(heads, W), GREEDY)
    skipping = Skipping(UniformSkip(2), SkipLimits(max_consecutive=1, warmup=2))
    method = Method("spatial", drafting=SpatialLanes(heads), schedule=NextSet(W, H, 4), skipping=skipping)
    sk = run(target, cond, method, GREEDY)
    assert torch.equal(sk.tokens, ar.tokens)
    assert int(sk.skipped[0]) > 0 and int(sk.nfe[0]) <= int(plain.nfe[0])


def test_spatial_vvs_skips_where_its_two_drafts_agree():
    from decode.strategies.registry import build_method

    target, _, cond, codebook = world(2, block=64)
    heads = heads_for(target)
    never = build_method("spatial_vvs", sampling=SAMPLED, drafter=heads, codebook=codebook,
                         options=dict(row_window=3, max_rows=H, tau=1.01))
    always = build_method("spatial_vvs", sampling=SAMPLED, drafter=heads, codebook=codebook,
                          options=dict(row_window=3, max_rows=H, tau=-1.0, warmup=0))
    a, b = run(target, cond, never, SAMPLED, seeds=[1, 2]), run(target, cond, always, SAMPLED, seeds=[1, 2])
    assert (a.skipped == 0).all() and (b.skipped > 0).all()
    assert (a.verified_tokens == 63).all() and (b.verified_tokens < 63).all()  # skipped chains: unverified
    assert (b.tokens >= 0).all() and (b.tokens < target.vocab_size).all()
    with pytest.raises(ValueError, match="skipping=learned reads an EAGLE draft tree"):
        resolve_method("spatial", {"skipping": "learned"})
    with pytest.raises(ValueError, match="staleness=2 is not read by spatial heads"):
        resolve_method("spatial_vvs", {"staleness": 2})


@pytest.mark.parametrize("seeds", [True, False])
def test_the_below_head_seeds_new_rows_beside_their_stand_in(monkeypatch, seeds):
    """A new row's first tokens are guessed (and verified beside ZipAR's stand-in) only when the drafting
    seeds new rows; either way every token of the image is made."""
    monkeypatch.setattr(lane_drafting.SpatialLaneRun, "seeds_new_rows", seeds)
    starts = []
    real = lane_drafting.SpatialLaneRun.propose

    def spy(self, row, first, room, made):
        if first % W == 0:
            starts.append((row, first, room))
        return real(self, row, first, room, made)

    monkeypatch.setattr(lane_drafting.SpatialLaneRun, "propose", spy)
    target, _, cond, _ = world(1, block=64)
    sp = run(target, cond, spatial(heads_for(target), 3), SAMPLED, seeds=[4])
    assert ((sp.tokens >= 0) & (sp.tokens < target.vocab_size)).all() and sp.tokens.shape == (1, 64)
    assert bool(starts) == seeds and all(room >= 1 for _, _, room in starts)


def test_the_skip_rule_compares_the_right_heads_tokens_with_the_below_heads_only():
    """spatial_vvs's two drafts: the right heads' guesses against the below head's for the same indices. Past
    the right heads the chain is the below head's own guesses, which are not compared with themselves."""
    target, _, _, _ = world(1, block=64)
    lanes = SpatialLanes(heads_for(target)).start(target, W, GREEDY, None)
    lanes.kept[1] = [(11, None), (12, None)]
    lanes.below.update({9: (21, None), 10: (22, None), 11: (23, None), 12: (24, None)})
    chain = lanes.propose(1, 9, 4, [0] * 64)
    assert [t for t, _ in chain] == [11, 12, 23, 24] and lanes.alternative(1) == [21, 22]
    lanes.below.update({9: (21, None), 10: (22, None)})
    assert [t for t, _ in lanes.propose(1, 9, 2, [0] * 64)] == [21, 22] and lanes.alternative(1) == []
