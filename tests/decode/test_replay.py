"""Replaying a method's decisions on another model (decode/evaluation/replay.py, make bench-xl): the
replay makes exactly the recorded passes and skips on trees of the recorded shapes, and a trace of
another tree is refused."""
import pytest
import torch

from decode.core.trees import TreeParams
from decode.evaluation.replay import SKIP, VERIFY, Trace, recording, replaying
from decode.strategies.registry import build_method
from tests.decode.test_speculative import SAMPLED, run, world


@pytest.mark.parametrize("name,options", [("eagle2", {}), ("vvs", {"base": "lantern", "lantern_k": 16, "tau": 0.2})])
def test_a_replay_on_another_model_makes_the_recorded_passes_and_skips(name, options):
    small, drafter, cond, codebook = world(2, seed=0)
    other, other_drafter, _, _ = world(2, seed=5)  # other weights: its own decisions would differ
    tree = TreeParams(12, 3, 4)
    recorded, events = recording(build_method(name, sampling=SAMPLED, tree=tree, drafter=drafter, codebook=codebook,
                                              options=options), 2)
    original = run(small, cond, recorded, SAMPLED)
    assert all(e[0] in (VERIFY, SKIP) for image in events for e in image)
    free = run(other, cond, build_method(name, sampling=SAMPLED, tree=tree, drafter=other_drafter,
                                         codebook=codebook, options=options), SAMPLED)
    method, cursor = replaying(build_method(name, sampling=SAMPLED, tree=tree, drafter=other_drafter,
                                            codebook=codebook, options=options), events)
    replayed = run(other, cond, method, SAMPLED)
    assert torch.equal(replayed.nfe, original.nfe) and torch.equal(replayed.skipped, original.skipped)
    assert cursor.past_end == 0 and cursor.at == [len(e) for e in events]
    assert not torch.equal(free.nfe, original.nfe)  # the other model alone decides otherwise
    if name == "vvs":
        assert int(original.skipped.sum()) > 0


def test_a_trace_of_another_tree_or_method_is_refused(tmp_path):
    small, drafter, cond, codebook = world(1)
    recorded, events = recording(build_method("eagle2", sampling=SAMPLED, tree=TreeParams(12, 3, 4), drafter=drafter), 1)
    run(small, cond, recorded, SAMPLED)
    method, _ = replaying(build_method("eagle2", sampling=SAMPLED, tree=TreeParams(8, 3, 4), drafter=drafter), events)
    with pytest.raises(ValueError, match="12 nodes, this method's 8"):
        run(small, cond, method, SAMPLED)
    trace = Trace("eagle2", 64, events)
    trace.save(tmp_path / "t.json")
    assert Trace.load(tmp_path / "t.json", "eagle2", 64).step_compression() == trace.step_compression()
    with pytest.raises(ValueError, match="a trace of eagle2 over 64 tokens; this replay needs vvs"):
        Trace.load(tmp_path / "t.json", "vvs", 64)


def test_a_wavefront_of_spatial_heads_replays_its_passes_on_another_model():
    """method=spatial (rows verifying head chains) recorded on one tiny target and replayed on another: the
    chains follow the schedule, the replayed acceptances fix their lengths, so the passes are the recorded."""
    from decode.core.engine import Method
    from decode.core.wavefront import NextSet
    from decode.strategies.acceptance import make_acceptance
    from decode.strategies.lane_drafting import SpatialLanes
    from tests.decode.test_spatial import heads_for

    small, _, cond, _ = world(1, seed=0, block=64)
    other, _, _, _ = world(1, seed=5, block=64)

    def spatial(target, seed):
        return Method("spatial", drafting=SpatialLanes(heads_for(target, seed=seed)), schedule=NextSet(2, 8, 4),
                      acceptance=make_acceptance(SAMPLED))

    recorded, events = recording(spatial(small, 0), 1)
    original = run(small, cond, recorded, SAMPLED)
    free = run(other, cond, spatial(other, 3), SAMPLED)
    method, cursor = replaying(spatial(other, 3), events)
    replayed = run(other, cond, method, SAMPLED)
    assert torch.equal(replayed.nfe, original.nfe) and cursor.past_end == 0 and cursor.at == [len(events[0])]
    assert not torch.equal(free.nfe, original.nfe)


def test_a_wavefront_with_skipping_is_not_replayed():
    from decode.core.engine import Method
    from decode.core.wavefront import NextSet
    from decode.strategies.lane_drafting import SpatialLanes
    from decode.strategies.skipping import SkipLimits, Skipping, UniformSkip
    from tests.decode.test_spatial import heads_for

    small, _, _, _ = world(1, block=64)
    method = Method("spatial_vvs", drafting=SpatialLanes(heads_for(small)), schedule=NextSet(2, 8, 4),
                    skipping=Skipping(UniformSkip(2), SkipLimits()))
    with pytest.raises(ValueError, match="replay it without skipping"):
        recording(method, 1)
