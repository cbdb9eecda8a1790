"""Decoding on from given image tokens (GridAR's anchors) and GridAR's 3-way guidance."""
import pytest
import torch

from decode.core.engine import Method, generate
from decode.core.sampling import cfg_combine, cfg_three_way, row_generators
from decode.models.target import Condition
from decode.strategies.registry import build_method
from tests.conftest import padded_captions
from tests.decode.test_speculative import GREEDY, SAMPLED, world


def _run(target, cond, method, sampling, prefix=None, seeds=None):
    seeds = list(seeds if seeds is not None else range(cond.batch))
    return generate(target, cond, num_tokens=target.num_image_tokens, sampling=sampling,
                    generators=row_generators(seeds), method=method, prefix=prefix)


@pytest.mark.parametrize("name", ["ar", "eagle2", "sjd"])
@pytest.mark.parametrize("k", [1, 16, 63])
def test_greedy_decoding_from_a_prefix_continues_the_image_greedy_ar_makes(name, k):
    target, drafter, cond, codebook = world(2)
    full = _run(target, cond, Method(), GREEDY).tokens
    method = build_method(name, sampling=GREEDY, drafter=drafter, codebook=codebook)
    out = _run(target, cond, method, GREEDY, prefix=full[:, :k])
    assert torch.equal(out.tokens, full)
    if name == "ar":
        assert out.nfe.tolist() == [63 - k] * 2  # the prefix costs no step: it is prefilled with the caption


def test_a_prefix_prefill_gives_the_logits_of_teacher_forcing():
    target, _, cond, _ = world(2)
    tokens = torch.randint(64, (2, 10), generator=torch.Generator().manual_seed(0))
    _, out = target.start(cond, 54, image_prefix=tokens)
    forced = target.teacher_forced(cond, torch.cat([tokens, tokens[:, :1]], 1)).logits  # row j predicts token j
    torch.testing.assert_close(out.logits[:, -1], forced[:, 10], rtol=1e-4, atol=1e-5)


def test_sampled_vvs_from_a_prefix_keeps_it_and_decodes_the_rest():
    target, drafter, cond, codebook = world(2)
    prefix = torch.randint(64, (2, 20), generator=torch.Generator().manual_seed(1))
    method = build_method("vvs", sampling=SAMPLED, drafter=drafter, codebook=codebook, options={"warmup": 0})
    out = _run(target, cond, method, SAMPLED, prefix=prefix)
    assert torch.equal(out.tokens[:, :20], prefix) and out.tokens.shape == (2, 64)
    assert (out.steps <= 44).all() and (out.nfe >= 1).all()


def test_a_prefix_that_leaves_nothing_to_decode_is_refused():
    target, _, cond, _ = world(1)
    with pytest.raises(ValueError, match="leaves nothing to decode"):
        _run(target, cond, Method(), GREEDY, prefix=torch.zeros(1, 64, dtype=torch.long))


def test_three_way_guidance_adds_only_the_refined_direction_orthogonal_to_the_original():
    g = torch.Generator().manual_seed(0)
    c, u, r = (torch.randn(3, 50, generator=g) for _ in range(3))
    out = cfg_three_way(c, u, r, 4.0)
    extra = out - cfg_combine(c, u, 4.0)
    assert torch.allclose((extra * (c - u)).sum(-1), torch.zeros(3), atol=1e-4)  # orthogonal to cond - uncond
    torch.testing.assert_close(cfg_three_way(c, u, c, 4.0), cfg_combine(c, u, 4.0))  # refined = original: plain CFG
    # a refined direction orthogonal to the original is added whole, at scale - 1
    d = c - u
    ortho = torch.randn(3, 50, generator=g)
    ortho = ortho - (ortho * d).sum(-1, keepdim=True) / (d * d).sum(-1, keepdim=True) * d
    torch.testing.assert_close(cfg_three_way(c, u, u + ortho, 4.0), cfg_combine(c, u, 4.0) + 3.0 * ortho)


def test_three_way_target_with_the_original_prompt_as_refinement_decodes_like_cfg():
    target, drafter, cond, codebook = world(2)
    three = target.with_refined_prompts()
    assert three.groups == 3
    same = Condition(cond.cond, cond.mask, refined=cond.cond, refined_mask=cond.mask)
    base = _run(target, cond, Method(), SAMPLED, seeds=[5, 6])
    for name in ("ar", "eagle2"):
        method = build_method(name, sampling=SAMPLED, drafter=drafter, codebook=codebook)
        out = _run(three, same, method, SAMPLED, seeds=[5, 6])
        if name == "ar":
            assert torch.equal(out.tokens, base.tokens)
    other, other_mask = padded_captions(2, seed=7)
    refined = Condition(cond.cond, cond.mask, refined=other, refined_mask=other_mask)
    assert not torch.equal(_run(three, refined, Method(), GREEDY).tokens, _run(target, cond, Method(), GREEDY).tokens)


def test_three_way_guidance_needs_refined_prompts_and_cfg():
    target, _, cond, _ = world(1)
    with pytest.raises(ValueError, match="refined prompts"):
        target.with_refined_prompts().start(cond, 4)
    unguided, _, _, _ = world(1, cfg_scale=1.0)
    with pytest.raises(ValueError, match="cfg_scale > 1"):
        unguided.with_refined_prompts()
