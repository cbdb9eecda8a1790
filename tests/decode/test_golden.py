"""Behaviour is kept: every method decodes the golden grids recorded before the decode redesign
(tests/golden.py: world prompts, fixed seeds, greedy and sampled), token for token."""
import pytest
import torch

from tests import golden

RECORDED = golden.load()


@pytest.fixture(scope="module")
def decoded():
    # One thread, as when recorded: a CPU's thread count changes float reduction order, and on the
    # world's uncertain target a similarity near tau can fall on either side of it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return golden.decode_runs()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("key", sorted(RECORDED))
def test_method_decodes_its_recorded_grid(decoded, key):
    want, got = RECORDED[key], decoded[key]
    assert got["tokens"] == want["tokens"], f"{key}: tokens differ from the recorded grid"
    assert (got["nfe"], got["skipped"]) == (want["nfe"], want["skipped"])


def test_the_record_covers_every_method_in_both_modes():
    methods = {m for _, m, _ in golden.RUNS}
    assert methods >= {"ar", "eagle2", "lantern", "lantern_pp", "vvs_u", "vvs", "sjd", "sjd_vp"}
    assert set(RECORDED) == {f"{label}/{mode}" for label, _, _ in golden.RUNS for mode in golden.MODES}
