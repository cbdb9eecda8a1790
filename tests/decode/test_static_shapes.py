"""Static shapes (generate(static_shapes=True)): every pass of a kind has one shape, so layers compiled
`static` (dynamic=False, fullgraph) trace each kind once, in the first decode, and never again; and the
padded, whole-batch, all-slots passes decode the tokens of the dynamic ones.

Compilation runs through a counting backend (the graph dynamo hands over, run as it is): it counts
traces without generating code, so the test takes seconds on a CPU."""
import copy

import pytest
import torch

from decode.core.cache import pad_block
from decode.core.engine import generate
from decode.core.sampling import row_generators
from decode.core.trees import TreeParams
from decode.models.target import LlamaGenTarget
from decode.strategies.registry import build_method
from tests.decode.test_speculative import GREEDY, SAMPLED, world

CASES = {  # method -> (sampling, options, pass kinds: target prefill + step, drafter prefill + step + expansions)
    "ar": (GREEDY, None, 2),
    "eagle2": (SAMPLED, None, 5),  # a dynamic tree expands top_k nodes at every level: one shape
    "lantern_pp": (SAMPLED, dict(lantern_k=16), 7),  # the static tree's levels have 3 widths
    "vvs_u": (SAMPLED, dict(lantern_k=16, interval=2), 5),  # skipped rows sit passes out: still whole-batch
}


def decode(target, drafter, cond, codebook, name, seeds, static, num_tokens=40):
    sampling, options, _ = CASES[name]
    method = build_method(name, sampling=sampling, tree=TreeParams(12, 3, 4), drafter=drafter, codebook=codebook,
                          options=options)
    return generate(target, cond, num_tokens=num_tokens, sampling=sampling, generators=row_generators(seeds),
                    method=method, static_shapes=static)


@pytest.mark.parametrize("name", list(CASES))
def test_static_shapes_decode_the_dynamic_tokens(name):
    target, drafter, cond, codebook = world(3)
    dynamic = decode(target, drafter, cond, codebook, name, [0, 1, 2], False)
    static = decode(target, drafter, cond, codebook, name, [0, 1, 2], True)
    assert torch.equal(static.tokens, dynamic.tokens)
    assert torch.equal(static.nfe, dynamic.nfe) and torch.equal(static.skipped, dynamic.skipped)
    if name == "vvs_u":
        assert int(static.skipped.sum()) > 0  # rows sat passes out


def traced_copies(target, drafter, scope):
    """Copies of the models compiled static through a backend that counts the graphs it is handed."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(len(example_inputs))
        return gm.forward

    gpt, fast_drafter = copy.deepcopy(target.gpt), copy.deepcopy(drafter)
    gpt.compile_blocks(scope, backend=counting, static=True)
    fast_drafter.compile_blocks(scope, backend=counting, static=True)
    return LlamaGenTarget(gpt, cfg_scale=target.cfg_scale), fast_drafter, graphs


@pytest.mark.parametrize("name,scope", [(n, "stack") for n in CASES] + [("vvs_u", "layer")])
def test_each_pass_kind_traces_once_and_never_again(name, scope):
    """fullgraph=True makes a graph break an error; the counts say no shape traces twice."""
    torch._dynamo.reset()
    target, drafter, cond, codebook = world(3)
    fast_target, fast_drafter, graphs = traced_copies(target, drafter, scope)
    first = decode(fast_target, fast_drafter, cond, codebook, name, [0, 1, 2], True)
    after_first = len(graphs)
    decode(fast_target, fast_drafter, cond, codebook, name, [5, 6, 7], True)
    assert after_first == CASES[name][2]  # one trace per pass kind
    assert len(graphs) == after_first     # the second decode traced nothing
    eager = decode(target, drafter, cond, codebook, name, [0, 1, 2], True)
    assert torch.equal(first.tokens, eager.tokens)


def test_without_static_shapes_specialised_layers_retrace_as_the_cache_grows():
    """The contrast that shows the count can fail: the same static compilation decoding with dynamic shapes
    meets a new key length at every step, and retraces each pass kind at each of them."""
    torch._dynamo.reset()
    target, drafter, cond, codebook = world(3)
    fast_target, fast_drafter, graphs = traced_copies(target, drafter, "stack")
    decode(fast_target, fast_drafter, cond, codebook, "eagle2", [0, 1, 2], False, num_tokens=12)
    assert len(graphs) > 3 * CASES["eagle2"][2]


def test_a_second_batch_size_traces_again_within_the_limit():
    """Static compilation leaves dynamo room for several batch sizes (a run's smaller last batch): no
    recompile-limit failure, and each size traces its own pass kinds once."""
    torch._dynamo.reset()
    target, drafter, _, codebook = world(3)
    fast_target, fast_drafter, graphs = traced_copies(target, drafter, "stack")
    for batch in (3, 2, 1):
        cond = world(batch)[2]
        decode(fast_target, fast_drafter, cond, codebook, "lantern_pp", list(range(batch)), True, num_tokens=16)
    assert len(graphs) == 3 * CASES["lantern_pp"][2]


def test_a_second_decode_reuses_the_static_caches_and_decodes_what_a_fresh_one_does():
    """CUDA graphs replay on fixed addresses: a decode of the same shape gets the same cache tensors back,
    emptied, and what it decodes does not depend on what the cache held before."""
    target, drafter, cond, codebook = world(3)
    made = []

    def spy(model):
        new_cache = model.new_cache
        model.new_cache = lambda *a, **k: made.append(new_cache(*a, **k)) or made[-1]

    spy(target.gpt)
    spy(drafter)
    decode(target, drafter, cond, codebook, "eagle2", [0, 1, 2], True)
    first = [(c.k.data_ptr(), c.v.data_ptr()) for c in made]
    made.clear()
    second = decode(target, drafter, cond, codebook, "eagle2", [5, 6, 7], True)
    assert [(c.k.data_ptr(), c.v.data_ptr()) for c in made] == first and len(first) == 2
    fresh_target, fresh_drafter, _, _ = world(3)
    fresh = decode(fresh_target, fresh_drafter, cond, codebook, "eagle2", [5, 6, 7], True)
    assert torch.equal(second.tokens, fresh.tokens) and torch.equal(second.nfe, fresh.nfe)
    made.clear()
    decode(target, drafter, cond, codebook, "eagle2", [5, 6, 7], False)  # dynamic caches are not pooled
    assert all(c.k.data_ptr() not in {p for p, _ in first} for c in made)


def test_padding_sees_itself_only_and_keeps_the_block():
    block = torch.tensor([[[1, 0], [1, 1]]], dtype=torch.bool)
    mask, tokens, depths = pad_block(4, block, torch.tensor([[7, 8]]), torch.tensor([[0, 1]]))
    assert mask[0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert tokens.tolist() == [[7, 8, 0, 0]] and depths.tolist() == [[0, 1, 0, 0]]
    with pytest.raises(ValueError, match="does not fit the static width 1"):
        pad_block(1, block, torch.tensor([[7, 8]]))


@pytest.mark.parametrize("name", ["sjd", "zipar"])
def test_a_method_without_fixed_widths_is_refused(name):
    target, drafter, cond, codebook = world(1)
    sampling = SAMPLED
    method = build_method(name, sampling=sampling, tree=TreeParams(12, 3, 4), drafter=drafter, codebook=codebook)
    with pytest.raises(ValueError, match=f"static_shapes: method {name} has no fixed pass widths"):
        generate(target, cond, num_tokens=16, sampling=sampling, generators=row_generators([0]), method=method,
                 static_shapes=True)


def test_a_static_cache_refuses_a_sub_batch_view():
    target, _, cond, _ = world(2)
    cache, _ = target.start(cond, 8, extra_slots=4, static=True)
    with pytest.raises(RuntimeError, match="whole-batch passes"):
        cache.rows([0])


def test_the_cli_refuses_what_static_shapes_cannot_run_before_any_load():
    from omegaconf import OmegaConf

    from decode.__main__ import check_static_shapes
    from decode.strategies.registry import resolve_method

    llamagen = OmegaConf.create({"static_shapes": True, "target": {"_target_": "decode.models.target.load_target"}})
    for name in ("ar", "eagle2", "lantern_pp", "vvs", "vvs_u"):
        check_static_shapes(resolve_method(name), llamagen)
    with pytest.raises(ValueError, match=r"method=spatial \(spatial drafting, next_set schedule\) has no fixed"):
        check_static_shapes(resolve_method("spatial"), llamagen)
    janus = OmegaConf.create({"static_shapes": True, "target": {"_target_": "decode.models.target.janus.load_janus"}})
    with pytest.raises(ValueError, match="LlamaGen targets only"):
        check_static_shapes(resolve_method("vvs"), janus)
    auto = OmegaConf.merge(llamagen, {"compile": "layer", "tree": {"auto": True}})
    with pytest.raises(ValueError, match="tree=auto times many tree sizes"):
        check_static_shapes(resolve_method("eagle2"), auto)
    check_static_shapes(resolve_method("ar"), auto)  # AR has no tree to size
    with pytest.raises(ValueError, match="test-time scaling plan"):
        check_static_shapes(resolve_method("vvs"), llamagen, scaling=object())


def test_a_recorded_and_replayed_vvs_run_keeps_its_skip_bound():
    """bench_xl records and replays through wrappers of the skip strategy: they carry its bound on
    consecutive skips, which sizes the verify pass (without it the pass after a skip would not fit)."""
    from decode.evaluation.replay import recording, replaying

    target, drafter, cond, codebook = world(3)
    sampling, options, _ = CASES["vvs_u"]

    def method():
        return build_method("vvs_u", sampling=sampling, tree=TreeParams(12, 3, 4), drafter=drafter,
                            codebook=codebook, options=options)

    recorder, events = recording(method(), 3)
    recorded = generate(target, cond, num_tokens=40, sampling=sampling, generators=row_generators([0, 1, 2]),
                        method=recorder, static_shapes=True)
    assert int(recorded.skipped.sum()) > 0
    replayer, cursor = replaying(method(), events)
    replayed = generate(target, cond, num_tokens=40, sampling=sampling, generators=row_generators([0, 1, 2]),
                        method=replayer, static_shapes=True)
    assert torch.equal(replayed.nfe, recorded.nfe) and cursor.past_end == 0


def test_a_skipping_without_a_bound_is_refused():
    import dataclasses

    target, drafter, cond, codebook = world(1)
    sampling, options, _ = CASES["vvs_u"]
    method = build_method("vvs_u", sampling=sampling, tree=TreeParams(12, 3, 4), drafter=drafter, codebook=codebook,
                          options=options)

    class Unbounded:  # a skip strategy that does not say how long its runs may be
        def start(self, *args, **kwargs):
            return method.skipping.start(*args, **kwargs)

    with pytest.raises(ValueError, match="does not say how many steps it skips in a row"):
        generate(target, cond, num_tokens=16, sampling=sampling, generators=row_generators([0]),
                 method=dataclasses.replace(method, skipping=Unbounded()), static_shapes=True)
