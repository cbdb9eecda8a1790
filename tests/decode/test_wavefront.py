"""Next-set decoding (ZipAR, decode/core/wavefront.py): the schedule's pass count, exactness at the
limits (a window of a whole row, one row in flight), no token seeing a later position, per-image
seeding, and the knobs' errors."""
import pytest
import torch

from decode.core.engine import Method
from decode.core.wavefront import NextSet
from decode.models.target import Condition
from decode.strategies.registry import build_method, resolve_method
from tests.decode.test_speculative import GREEDY, SAMPLED, run, world

W = H = 8  # the tiny target's 64 tokens


def zipar(window: int, max_rows: int = H) -> Method:
    return Method("zipar", schedule=NextSet(window, max_rows))


@pytest.mark.parametrize("window,max_rows", [(W, H), (3, 1)])
def test_a_whole_row_window_or_one_row_in_flight_is_greedy_ar(window, max_rows):
    target, _, cond, _ = world(2, block=64)
    ar = run(target, cond, Method(), GREEDY)
    z = run(target, cond, zipar(window, max_rows), GREEDY)
    assert torch.equal(z.tokens, ar.tokens) and torch.equal(z.nfe, ar.nfe)


@pytest.mark.parametrize("window", [1, 2, 4, 7])
def test_rows_start_every_window_passes(window):
    """Row g's first token comes `window` passes after row g - 1's: the last token is made at pass
    (H - 1) * window + W - 1."""
    target, _, cond, _ = world(2, block=64)
    z = run(target, cond, zipar(window), GREEDY)
    assert z.nfe.tolist() == [(H - 1) * window + W - 1] * 2
    assert z.batch_passes == (H - 1) * window + W - 1


def test_fewer_rows_in_flight_take_more_passes_and_the_top_row_is_ar():
    target, _, cond, _ = world(2, block=64)
    ar = run(target, cond, Method(), GREEDY)
    wide, narrow = run(target, cond, zipar(2, H), GREEDY), run(target, cond, zipar(2, 2), GREEDY)
    assert wide.nfe[0] < narrow.nfe[0] < ar.nfe[0]
    for z in (wide, narrow):  # row 0 sees no token of the rows below: it is AR's row 0
        assert torch.equal(z.tokens[:, :W], ar.tokens[:, :W])
    assert not torch.equal(wide.tokens, ar.tokens)  # lossy: the rows below miss context


def test_images_depend_on_their_own_seed_only():
    target, _, cond, _ = world(3, block=64)
    together = run(target, cond, zipar(3), SAMPLED, seeds=[7, 8, 9])
    alone = run(target, Condition(cond.cond[1:2], cond.mask[1:2]), zipar(3), SAMPLED, seeds=[8])
    assert torch.equal(together.tokens[1:2], alone.tokens)


def test_zipar_by_name_and_its_bad_knobs():
    target, _, cond, _ = world(1, block=64)
    cfg = resolve_method("zipar", {"row_window": 3})
    assert cfg.schedule == "next_set" and cfg.knobs == {"row_window": 3, "max_rows": 16, "lane_drafts": 0}
    method = build_method(cfg, sampling=GREEDY)
    with pytest.raises(ValueError, match="max_rows 16 must be in \\[1, 8\\]"):
        run(target, cond, method, GREEDY)  # the tiny grid has 8 rows
    with pytest.raises(ValueError, match="window 9 must be in \\[1, 8\\]"):
        run(target, cond, zipar(9), GREEDY)
    with pytest.raises(ValueError, match="whole grid rows"):
        run(target, cond, zipar(3), GREEDY, n=20)
    with pytest.raises(ValueError, match="drafts each grid row.s guesses itself"):
        resolve_method("zipar", {"drafting": "jacobi"})
    with pytest.raises(ValueError, match="row_window must be >= 1"):
        resolve_method("zipar", {"row_window": 0})


def test_the_cli_checks_the_window_against_the_target_grid_before_loading():
    from omegaconf import OmegaConf

    from decode.__main__ import check_schedule_fits

    target = OmegaConf.create({"block_size": 256})
    check_schedule_fits(resolve_method("zipar"), target)
    with pytest.raises(ValueError, match="window 17 must be in \\[1, 16\\]"):
        check_schedule_fits(resolve_method("zipar", {"row_window": 17}), target)


def lanes(window: int, drafts: int, max_rows: int = H) -> Method:
    return Method("zipar_sjd", schedule=NextSet(window, max_rows, drafts))


def test_rows_verifying_guesses_with_a_whole_row_window_make_greedy_ars_image_in_fewer_passes():
    """window = the grid width: one row at a time, so each row's guesses are SJD on it, exact."""
    target, _, cond, _ = world(2, block=64)
    ar = run(target, cond, Method(), GREEDY)
    z = run(target, cond, lanes(W, 4), GREEDY)
    assert torch.equal(z.tokens, ar.tokens) and (z.nfe < ar.nfe).all()


def test_rows_verifying_guesses_never_take_more_passes_than_zipar_and_make_every_token():
    target, _, cond, _ = world(2, block=64)
    zip3 = run(target, cond, zipar(3), GREEDY)
    none = run(target, cond, lanes(3, 1), GREEDY)
    some = run(target, cond, lanes(3, 7), GREEDY)
    assert (some.nfe <= zip3.nfe).all() and (none.nfe <= zip3.nfe).all()
    assert (some.tokens >= 0).all() and some.tokens.shape == zip3.tokens.shape


def test_rows_verifying_guesses_decode_each_image_on_its_own_seed():
    target, _, cond, _ = world(3, block=64)
    together = run(target, cond, lanes(3, 4), SAMPLED, seeds=[7, 8, 9])
    alone = run(target, Condition(cond.cond[1:2], cond.mask[1:2]), lanes(3, 4), SAMPLED, seeds=[8])
    assert torch.equal(together.tokens[1:2], alone.tokens)


def test_lane_drafts_by_name_and_their_bad_values():
    cfg = resolve_method("zipar_sjd")
    assert cfg.knobs["lane_drafts"] == 4 and build_method(cfg, sampling=GREEDY).schedule.lane_drafts == 4
    target, _, cond, _ = world(1, block=64)
    with pytest.raises(ValueError, match="lane_drafts 8 must be in \\[0, 7\\]"):
        run(target, cond, lanes(3, 8), GREEDY)
    with pytest.raises(ValueError, match="lane_drafts must be >= 0"):
        resolve_method("zipar_sjd", {"lane_drafts": -1})
