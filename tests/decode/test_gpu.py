"""The engine on a CUDA device. Deselected by default (`-m gpu`) and skipped without CUDA; run by
scripts/gpu_check.sh on a GPU machine. The same invariants as the CPU tests, on the GPU."""
import copy

import pytest
import torch

from decode.core.engine import generate, generate_ar
from decode.core.host import cuda_syncs
from decode.strategies.registry import build_method
from decode.core.sampling import row_generators
from decode.models.target import LlamaGenTarget
from decode.core.trees import TreeParams
from tests.decode.test_speculative import GREEDY, SAMPLED, run, world

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def cuda_world(batch: int):
    target, drafter, cond, codebook = world(batch)
    target.gpt.to("cuda")
    return target, drafter.to("cuda"), cond, codebook.to("cuda")


def test_greedy_eagle2_makes_the_greedy_ar_tokens_on_the_gpu():
    target, drafter, cond, codebook = cuda_world(3)
    ar = generate_ar(target, cond, num_tokens=target.num_image_tokens, sampling=GREEDY)
    spec = run(target, cond, build_method("eagle2", sampling=GREEDY, tree=TreeParams(12, 3, 4), drafter=drafter,
                                          codebook=codebook), GREEDY)
    assert ar.tokens.device.type == "cuda"
    assert torch.equal(spec.tokens, ar.tokens)
    # this drafter agrees with the target only sometimes: one row of three accepts no draft at all
    assert (spec.nfe <= ar.nfe).all() and spec.nfe.sum() < ar.nfe.sum()


def test_sampled_vvs_runs_with_cuda_generators():
    target, drafter, cond, codebook = cuda_world(3)
    method = build_method("vvs_u", sampling=SAMPLED, tree=TreeParams(12, 3, 4), drafter=drafter, codebook=codebook,
                          options=dict(lantern_k=16, interval=2))
    gen = generate(target, cond, num_tokens=32, sampling=SAMPLED, generators=row_generators([0, 1, 2], "cuda"),
                   method=method)
    assert gen.tokens.shape == (3, 32) and int(gen.tokens.max()) < target.vocab_size
    assert (gen.nfe + gen.skipped == gen.steps).all() and int(gen.skipped.sum()) > 0


@pytest.mark.parametrize("scope", ["stack", "layer"])
def test_compiled_layers_decode_the_eager_tokens_on_the_gpu(scope):
    torch._dynamo.reset()
    target, drafter, cond, codebook = cuda_world(2)
    gpt, fast_drafter = copy.deepcopy(target.gpt), copy.deepcopy(drafter)
    gpt.compile_blocks(scope)
    fast_drafter.compile_blocks(scope)
    fast = LlamaGenTarget(gpt, cfg_scale=target.cfg_scale)

    def decode(t, d):
        method = build_method("eagle2", sampling=GREEDY, tree=TreeParams(12, 3, 4), drafter=d, codebook=codebook)
        return run(t, cond, method, GREEDY, n=24)

    assert torch.equal(decode(fast, fast_drafter).tokens, decode(target, drafter).tokens)


def test_the_loop_synchronizes_at_most_once_a_step_and_ar_never():
    target, drafter, cond, codebook = cuda_world(2)
    gens = lambda: row_generators([0, 1], "cuda")  # noqa: E731
    ar = lambda n: generate_ar(target, cond, num_tokens=n, sampling=SAMPLED, generators=gens())  # noqa: E731
    assert cuda_syncs(lambda: ar(24)) == cuda_syncs(lambda: ar(1))
    method = build_method("lantern", sampling=SAMPLED, tree=TreeParams(12, 3, 4), drafter=drafter, codebook=codebook,
                          options=dict(lantern_k=16))
    spec = lambda n: generate(target, cond, num_tokens=n, sampling=SAMPLED, generators=gens(), method=method)  # noqa: E731
    steps = spec(24).batch_steps
    assert cuda_syncs(lambda: spec(24)) - cuda_syncs(lambda: spec(1)) <= steps


def test_draw_makes_multinomials_draws_on_the_gpu():
    from decode.core.sampling import draw

    probs = torch.softmax(torch.randn(6, 50, device="cuda") * 3, -1)
    for seed in range(10):
        want = torch.multinomial(probs, 1, generator=torch.Generator("cuda").manual_seed(seed))[:, 0]
        assert torch.equal(draw(probs, torch.Generator("cuda").manual_seed(seed)), want)
