"""The quality measures (decode.evaluation.measures): FD-world's formula, target NLL against the
decode loop's own probabilities, seeded bootstrap intervals, bad input named; and the instrument
separates a lossy method from AR where two AR seeds agree."""
import numpy as np
import pytest
import torch

from decode.core.engine import Method
from decode.core.sampling import SamplingParams, row_generators, sample
from decode.core.trees import TreeParams
from decode.evaluation.measures import (Interval, fd_interval, frechet_distance, mean_interval, share_interval,
                                       target_nll)
from decode.models.target import Condition
from decode.strategies.registry import build_method
from tests.decode.test_speculative import GREEDY, SAMPLED, run, world


def _reference_fd(x, y):
    from scipy.linalg import sqrtm

    x, y = x.double().numpy(), y.double().numpy()
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = sqrtm(s1 @ s2).real
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("n,d", [(40, 6), (12, 30)])  # more images than features, and fewer
def test_frechet_distance_equals_the_textbook_formula(n, d):
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) * 1.5 + 0.3
    assert frechet_distance(x, y) == pytest.approx(_reference_fd(x, y), rel=1e-4, abs=1e-6)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_intervals_are_seeded_contain_the_value_and_narrow_with_more_images():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(400, generator=g)
    small, large = mean_interval(values[:40]), mean_interval(values)
    assert small.lo <= small.value <= small.hi and large.lo <= large.value <= large.hi
    assert (large.hi - large.lo) < (small.hi - small.lo)
    assert mean_interval(values[:40]) == small and mean_interval(values[:40], seed=1) != small
    fake, real = torch.randn(32, 5, generator=g), torch.randn(32, 5, generator=g)
    fd = fd_interval(fake, real)
    assert fd.lo <= fd.value <= fd.hi and fd.value == pytest.approx(frechet_distance(fake, real))


def test_a_share_is_pooled_over_the_images_that_mention_the_attribute():
    hits = torch.tensor([1, 0, 2, 0, 1, 0, 0, 1, 0, 1])
    counted = torch.tensor([1, 1, 3, 0, 1, 1, 2, 1, 1, 1])  # image 3 mentions nothing: it weighs nothing
    share = share_interval(hits, counted)
    assert share.value == pytest.approx(6 / 12) and share.lo < share.value < share.hi
    assert share_interval(torch.ones(10), torch.ones(10)) == Interval(1.0, 1.0, 1.0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="at least 8 images, got 5"):
        mean_interval(torch.zeros(5), name="alignment")
    with pytest.raises(ValueError, match=r"pairs each generated image.*\(10, 4\) generated and \(12, 4\) real"):
        fd_interval(torch.zeros(10, 4), torch.zeros(12, 4))
    with pytest.raises(ValueError, match="at least 2 images"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(4, 3))


@pytest.mark.parametrize("sampling", [SAMPLED, SamplingParams(temperature=0.8, top_k=10)])
def test_target_nll_is_the_decode_loops_own_log_probability(sampling):
    """Step through AR with the KV cache, summing -log p(token) of the distribution each token was
    drawn from; the teacher-forced measure must give the same number."""
    target, _, cond, _ = world(2)
    gens = row_generators([3, 4])
    cache, out = target.start(cond, 16)
    total = torch.zeros(2)
    tokens = []
    from decode.core.sampling import probabilities
    for step in range(16):
        logits = out.logits[:, -1]
        tok = sample(logits, sampling, gens)
        total -= probabilities(logits.float(), sampling).gather(1, tok[:, None])[:, 0].log()
        tokens.append(tok)
        if step < 15:
            out = target.extend(cache, tok[:, None])
            target.commit(cache, 1)
    nll = target_nll(target, cond, torch.stack(tokens, 1), sampling)
    torch.testing.assert_close(nll, total / 16, atol=1e-4, rtol=1e-4)


def test_greedy_ar_has_zero_nll_and_any_other_token_costs_the_floor():
    target, _, cond, _ = world(2)
    ar = run(target, cond, Method(), GREEDY, n=16)
    assert target_nll(target, cond, ar.tokens, GREEDY).tolist() == [0.0, 0.0]
    other = ar.tokens.clone()
    other[:, 5] = (other[:, 5] + 1) % target.vocab_size
    assert target_nll(target, cond, other, GREEDY)[0] > 1.0


def test_the_instrument_separates_lossy_lantern_from_ar_where_two_ar_seeds_agree():
    """64 images of 16 tokens on the tiny world, its LM head scaled 8x so that next-token
    distributions are peaked (NLL ~2.3 nats of log 64 = 4.2) as a trained target's are: two AR
    seeds' target-NLL intervals overlap; LANTERN with delta 0.9 (it may move 90 % of the mass onto
    a draft's latent neighbours) falls outside AR's."""
    target, drafter, _, codebook = world(1)
    with torch.no_grad():
        target.gpt.output.weight.mul_(8.0)
    n = 64
    g = torch.Generator().manual_seed(0)
    cond = Condition(torch.randn(n, 8, 12, generator=g), torch.ones(n, 8, dtype=torch.bool))

    def nll(method, seed0):
        gen = run(target, cond, method, SAMPLED, seeds=range(seed0, seed0 + n), n=16)
        return mean_interval(target_nll(target, cond, gen.tokens, SAMPLED), name="target NLL")

    lossy = build_method("lantern", sampling=SAMPLED, tree=TreeParams(12, 3, 4), drafter=drafter,
                         codebook=codebook, options={"lantern_k": 16, "delta": 0.9})
    ar1, ar2, relaxed = nll(Method(), 0), nll(Method(), 1000), nll(lossy, 2000)
    assert ar1.overlaps(ar2), (ar1, ar2)
    assert not relaxed.overlaps(ar1) and not relaxed.overlaps(ar2), (relaxed, ar1)  # two-sided: any side
    assert isinstance(relaxed, Interval) and str(relaxed).count("[") == 1
