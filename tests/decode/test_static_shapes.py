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


def decode(target, drafter, cond, codebook, name, seeds, static):
    sampling, options, _ = CASES[name]
    method = build_method(name, sampling=sampling, tree=TreeParams(12, 3, 4), drafter=drafter, codebook=codebook,
                          options=options)
    return generate(target, cond, num_tokens=40, sampling=sampling, generators=row_generators(seeds), method=method,
                    static_shapes=static)


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
    meets a new key length at every step, and runs into dynamo's recompile limit (8) within one decode."""
    torch._dynamo.reset()
    target, drafter, cond, codebook = world(3)
    fast_target, fast_drafter, graphs = traced_copies(target, drafter, "stack")
    with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
        decode(fast_target, fast_drafter, cond, codebook, "eagle2", [0, 1, 2], False)
    assert len(graphs) >= 8


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
        check_static_shapes(resolve_method("vvs"), auto)
