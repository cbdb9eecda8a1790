"""compile=true: the torch.compile'd layer stacks decode the eager tokens, and trace in one graph.

The tests trace with the `aot_eager` backend (the graph capture and functionalization that
inductor also goes through, without generating C++), so they take seconds on a CPU; `inductor`
itself was checked by the benchmark (docs/results.md, "compiled layers")."""
import copy

import pytest
import torch

from decode.strategies.registry import build_method
from decode.models.target import LlamaGenTarget
from decode.core.trees import TreeParams
from tests.decode.test_speculative import GREEDY, SAMPLED, run, world


def compiled_copy(target, drafter, scope="stack"):
    gpt = copy.deepcopy(target.gpt)
    gpt.compile_blocks(scope, backend="aot_eager")
    fast_drafter = copy.deepcopy(drafter)
    fast_drafter.compile_blocks(scope, backend="aot_eager")
    return LlamaGenTarget(gpt, cfg_scale=target.cfg_scale), fast_drafter


@pytest.mark.parametrize("name,sampling,scope", [("ar", GREEDY, "stack"), ("vvs_u", SAMPLED, "stack"),
                                                 ("vvs_u", SAMPLED, "layer")])
def test_compiled_layers_decode_the_eager_tokens(name, sampling, scope):
    """vvs_u with interval 2 makes rows skip, so target passes also run over sub-batches (CacheRows)."""
    torch._dynamo.reset()
    target, drafter, cond, codebook = world(3)
    fast_target, fast_drafter = compiled_copy(target, drafter, scope)
    opts = dict(lantern_k=16, interval=2) if name != "ar" else None

    def decode(t, d):
        method = build_method(name, sampling=sampling, tree=TreeParams(12, 3, 4), drafter=d, codebook=codebook,
                              options=opts)
        return run(t, cond, method, sampling, n=20)

    eager, fast = decode(target, drafter), decode(fast_target, fast_drafter)
    assert torch.equal(fast.tokens, eager.tokens)
    assert torch.equal(fast.nfe, eager.nfe) and torch.equal(fast.skipped, eager.skipped)
    if name == "vvs_u":
        assert int(fast.skipped.sum()) > 0  # the sub-batch path ran


@pytest.mark.parametrize("scope", ["stack", "layer"])
def test_the_layers_trace_without_graph_breaks(scope):
    """fullgraph=True turns a graph break (a host read such as .item() inside the layers) into an error,
    so this fails if one creeps in; and the compiled layers write the same KV as the eager ones."""
    torch._dynamo.reset()
    target, drafter, cond, _ = world(2)
    fast_target, _ = compiled_copy(target, drafter, scope)
    caches = []
    for t in (target, fast_target):
        cache, out = t.start(cond, 8, extra_slots=4)
        t.extend(cache, torch.tensor([[3, 5], [7, 1]]))
        caches.append((cache, out))
    (c_eager, o_eager), (c_fast, o_fast) = caches
    torch.testing.assert_close(o_fast.logits, o_eager.logits)
    torch.testing.assert_close(c_fast.k, c_eager.k)
    torch.testing.assert_close(c_fast.v, c_eager.v)


@pytest.mark.parametrize("scope", ["stack", "layer"])
def test_a_copy_of_a_compiled_model_runs_its_own_layers(scope):
    torch._dynamo.reset()
    target, _, cond, _ = world(1)
    target.gpt.compile_blocks(scope, backend="aot_eager")
    other = copy.deepcopy(target.gpt)
    with torch.no_grad():
        other.layers[0].attention.wo.weight.mul_(3.0)
    first = target.start(cond, 4)[1].logits
    second = LlamaGenTarget(other, cfg_scale=target.cfg_scale).start(cond, 4)[1].logits
    other._compile_scope = other._compiled = None  # the same copy, eager
    eager = LlamaGenTarget(other, cfg_scale=target.cfg_scale).start(cond, 4)[1].logits
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, eager)


def test_an_unknown_compile_scope_is_named():
    target, _, _, _ = world(1)
    with pytest.raises(ValueError, match="compile scope must be one of"):
        target.gpt.compile_blocks("everything")


def test_the_compile_option_names_its_bad_values():
    from decode.api import compile_models

    target, _, _, _ = world(1)
    assert compile_models(False, target.gpt) is None and target.gpt._compiled is None
    with pytest.raises(ValueError, match="compile must be false, true, 'stack' or 'layer'"):
        compile_models("yes", target.gpt)
    assert compile_models(True, target.gpt, None) == "stack"
