"""tree=auto (decode.budget): the acceptance a smaller tree would have had, the choice against AR,
the cache, and the configuration's errors."""
import pytest
import torch

from decode.budget import AutoTree, BudgetChoice, _choose, choose_tree, expected_static_tokens, expected_tokens
from decode.core.engine import Method
from decode.core.trees import TreeParams, prune_static, static_shape
from decode.strategies.registry import build_method
from tests.decode.test_speculative import GREEDY, world


def _step(depths, scores, path):
    return torch.tensor(depths), torch.tensor(scores, dtype=torch.float), path


def test_a_smaller_tree_keeps_the_accepted_prefix_that_lies_inside_it():
    # root; level 1: nodes 1 (-0.1), 2 (-1.0); level 2: node 3 under 1 (-0.5), node 4 under 2 (-1.5)
    step = _step([0, 1, 1, 2, 2], [0, -0.1, -1.0, -0.5, -1.5], [0, 1, 3])
    assert expected_tokens([step], size=5, depth=1) == 3.0   # the whole path: 2 drafts + the next token
    assert expected_tokens([step], size=3, depth=1) == 3.0   # nodes 1 and 3 are the two best
    assert expected_tokens([step], size=2, depth=1) == 2.0   # node 1 only
    assert expected_tokens([step], size=5, depth=0) == 2.0   # depth 0: level 1 only
    miss = _step([0, 1, 1, 2, 2], [0, -0.1, -1.0, -0.5, -1.5], [0])
    assert expected_tokens([step, miss], size=5, depth=1) == 2.0  # means over steps


def test_no_tree_that_pays_means_ar():
    rows = [dict(size=8, depth=1, tokens_per_pass=2.0, step_s=0.3, tokens_per_s=2.0 / 0.3)]
    assert _choose(rows, ar_tokens_per_s=10.0, top_k=4).tree is None
    chosen = _choose(rows, ar_tokens_per_s=5.0, top_k=4)
    assert chosen.tree == TreeParams(8, 1, 4)
    assert "chose AR" in BudgetChoice(None, 10.0, rows).describe()
    assert BudgetChoice(None, 10.0, rows).method(Method("vvs")).drafting is None


def test_auto_measures_once_and_reads_its_cache(tmp_path):
    target, drafter, cond, codebook = world(2)
    method = build_method("eagle2", sampling=GREEDY, tree=TreeParams(9, 1, 4), drafter=drafter)
    auto = AutoTree(sizes=(2, 5, 9), depths=(0, 1), top_k=4, timing_tokens=4, calibration_tokens=24,
                    cache_dir=str(tmp_path))
    first = choose_tree(target, drafter, method, cond, [0, 1], GREEDY, auto, {"model": "tiny"})
    assert not first.cached and len(first.rows) == 5  # size 9 needs depth 1 with top-k 4 (4 drafts at depth 0)
    assert all(r["step_s"] > 0 and 1.0 <= r["tokens_per_pass"] <= r["size"] for r in first.rows)
    again = choose_tree(target, drafter, method, cond, [0, 1], GREEDY, auto, {"model": "tiny"})
    assert again.cached and again.tree == first.tree and again.rows == first.rows
    other = choose_tree(target, drafter, method, cond, [0, 1], GREEDY, auto, {"model": "another"})
    assert not other.cached  # another identity is measured afresh


@pytest.mark.parametrize("bad,match", [
    (dict(sizes=(1, 4)), "sizes >= 2"),
    (dict(sizes=(59,), depths=(0,), top_k=10), "more drafts than depth 0"),
    (dict(timing_tokens=1), "timing_tokens"),
    (dict(sizes=(2,), depths=(0,), top_k=1, timing_tokens=0), "timing_tokens"),
])
def test_bad_auto_settings_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        AutoTree(**bad)
    with pytest.raises(ValueError, match="unknown key"):
        AutoTree.from_config({"auto": True, "sizez": [2]})


def test_a_fixed_size_under_auto_points_to_tree_fixed():
    with pytest.raises(ValueError, match="tree=fixed"):
        AutoTree.from_config({"auto": True, "total_tokens": 20, "depth": None})
    assert AutoTree.from_config({"auto": True, "total_tokens": None, "depth": None, "top_k": 4}).top_k == 4


def test_a_pruned_static_shape_is_a_tree_of_its_cheapest_paths():
    shape = static_shape("naive_extend_57")
    assert prune_static(shape, shape.size) == (shape, list(range(shape.size)))
    for size in (2, 4, 9, 30):
        pruned, kept = prune_static(shape, size)
        assert pruned.size == size and len(kept) == size and kept[0] == 0
        for i in range(1, size):  # every kept node's parent is kept, earlier, and the same node as in the shape
            assert 0 <= pruned.parents[i] < i and kept[pruned.parents[i]] == shape.parents[kept[i]]
    assert prune_static(shape, 4)[0].parents == (-1, 0, 1, 2)  # the first picks' chain comes first
    assert TreeParams(static="naive_extend_57", static_size=9).nodes == 9
    assert TreeParams(static="naive_extend_57").nodes == shape.size
    with pytest.raises(ValueError, match="static_size"):
        TreeParams(static="naive_extend_57", static_size=shape.size + 1)
    with pytest.raises(ValueError, match="at least 2"):
        TreeParams(static_size=1)  # the shape comes from the method (method.static_tree); the floor is checked here


def test_a_pruned_static_tree_keeps_the_accepted_prefix_inside_it():
    step = _step([0, 1, 2, 1], [0, -0.1, -0.3, -1.0], [0, 1, 2])
    assert expected_static_tokens([step], [0, 1, 2, 3]) == 3.0
    assert expected_static_tokens([step], [0, 1]) == 2.0
    assert expected_static_tokens([step], [0, 3]) == 1.0  # its first draft is not kept: only the next token


def test_auto_sizes_a_static_tree(tmp_path):
    target, drafter, cond, codebook = world(2)
    method = build_method("lantern_pp", sampling=GREEDY, drafter=drafter, codebook=codebook)
    auto = AutoTree(sizes=(2, 5, 9), depths=(0, 1), top_k=4, timing_tokens=4, calibration_tokens=24,
                    cache_dir=str(tmp_path))
    choice = choose_tree(target, drafter, method, cond, [0, 1], GREEDY, auto, {"model": "tiny"})
    full = static_shape("naive_extend_57").size
    assert [r["size"] for r in choice.rows] == [2, 5, 9, full]  # the budget's sizes that fit, and the whole shape
    assert all(r["step_s"] > 0 and 1.0 <= r["tokens_per_pass"] <= r["size"] for r in choice.rows)
    assert [r["depth"] for r in choice.rows] == [0, 3, 4, 4]  # the cheapest nodes: the first picks' chain first
    if choice.tree is not None:
        assert choice.tree.static == "naive_extend_57" and choice.tree.static_size in (2, 5, 9, full)
        assert "static naive_extend_57" in choice.describe()
    again = choose_tree(target, drafter, method, cond, [0, 1], GREEDY, auto, {"model": "tiny"})
    assert again.cached and again.tree == choice.tree


def test_a_tree_must_beat_ar_by_the_margin():
    rows = [dict(size=4, depth=1, tokens_per_pass=1.5, step_s=0.1, tokens_per_s=15.0)]
    assert _choose(rows, ar_tokens_per_s=14.0, top_k=4).tree is not None      # faster at all
    chosen = _choose(rows, ar_tokens_per_s=14.0, top_k=4, min_gain=1.1)
    assert chosen.tree is None and "1.10 x AR's" in chosen.describe()        # but not by 10 %
    assert _choose(rows, ar_tokens_per_s=13.0, top_k=4, min_gain=1.1).tree is not None
    with pytest.raises(ValueError, match="min_gain"):
        AutoTree(min_gain=0.9)


def test_steady_state_is_the_median_step_past_the_first():
    """The first step (the drafter's round over the whole prompt) and a burst of interference do not count."""
    from decode.budget import steady_state
    from types import SimpleNamespace
    steps = [(5.0, 1.0, 9.0), (0.1, 0.2, 0.3), (0.1, 0.2, 0.3), (0.1, 9.0, 9.5), (0.1, 0.2, 0.3)]
    calls = []

    def decode(method, n):
        calls.append(n)
        return SimpleNamespace(step_times=steps)
    t = steady_state(decode, Method(), 8)
    assert calls == [8, 8]  # one untimed decode, one timed
    assert (t.draft, t.verify, t.loop) == (0.1, 0.2, 0.3)
