"""Sampling filters, per-row seeding, and the KV cache bookkeeping."""
import torch

from decode.core.cache import KVCache
from decode.core.engine import generate_ar
from decode.core.sampling import SamplingParams, draw, filter_logits, row_generators, sample
from decode.models.target import Condition, LlamaGenTarget
from tests.conftest import padded_captions, tiny_gpt


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, SamplingParams(top_k=2))).tolist() == [[False, False, True, True]]
    # top-p 0.6: 0.5 alone is below, 0.5 + 0.3 crosses it -> keep the first two
    assert torch.isinf(filter_logits(logits, SamplingParams(top_p=0.6))).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, SamplingParams(top_p=0.4))).tolist() == [[False, True, True, True]]


def test_greedy_ignores_generators():
    logits = torch.randn(3, 10)
    assert torch.equal(sample(logits, SamplingParams(temperature=0), None), logits.argmax(-1))


def test_image_does_not_depend_on_its_batch():
    """Row seeds make an image the same whether it is decoded alone or beside others."""
    target = LlamaGenTarget(tiny_gpt(), cfg_scale=3.0)
    emb, mask = padded_captions(3, seed=7)
    params = SamplingParams(temperature=1.0, top_k=20)
    together = generate_ar(target, Condition(emb, mask), num_tokens=16, sampling=params,
                           generators=row_generators([11, 12, 13])).tokens
    alone = generate_ar(target, Condition(emb[1:2], mask[1:2]), num_tokens=16, sampling=params,
                        generators=row_generators([12])).tokens
    assert torch.equal(together[1:2], alone)
    assert not torch.equal(together[0], together[2])  # different seeds, different images


def test_cache_keep_compacts_accepted_slots():
    cache = KVCache.allocate(num_layers=1, batch=2, num_heads=1, head_dim=1, max_len=10)
    cache.k[0, :, 0, :, 0] = torch.arange(10.0)
    cache.commit(2)
    cache.keep(torch.tensor([[3, 5, 6], [2, 4, 9]]), torch.tensor([3, 1]))
    assert cache.length.tolist() == [5, 3]
    assert cache.k[0, 0, 0, :5, 0].tolist() == [0, 1, 3, 5, 6]
    assert cache.k[0, 1, 0, :3, 0].tolist() == [0, 1, 2]
    assert cache.valid[0, :5].all() and cache.valid[1, :3].all() and not cache.valid[1, 3:].any()


def test_cache_mask_hides_padding_and_uncommitted_slots():
    cache = KVCache.allocate(num_layers=1, batch=1, num_heads=1, head_dim=1, max_len=8)
    cache.commit(3, key_valid=torch.tensor([[False, True, True]]))
    cache.commit(1)
    mask = cache.attention_mask(torch.ones(1, 2, 2, dtype=torch.bool).tril(), upto=6)
    assert mask[0].tolist() == [[False, True, True, True, True, False], [False, True, True, True, True, True]]


def test_a_pass_over_some_rows_matches_the_full_pass_and_leaves_the_others_alone():
    torch.manual_seed(0)
    target = LlamaGenTarget(tiny_gpt(), cfg_scale=3.0)  # CFG: both halves of a row must be selected
    text, mask = padded_captions(3, seed=5)
    cache, _ = target.start(Condition(text, mask), max_new_tokens=8, extra_slots=4)
    tokens = torch.randint(target.vocab_size, (3, 4))
    before = cache.k.clone()
    rows = torch.tensor([0, 2])
    part = target.extend(cache, tokens[rows], rows=rows)
    touched = cache.k.clone()
    full = target.extend(cache, tokens)
    torch.testing.assert_close(part.logits, full.logits[rows], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(part.hidden, full.hidden[:, rows], rtol=1e-4, atol=1e-5)
    sat_out = torch.tensor([1, 4])  # row 1 in both CFG halves (batch 3)
    assert torch.equal(touched[:, sat_out], before[:, sat_out])
    assert not torch.equal(touched[:, rows], before[:, rows])


def test_draw_makes_torch_multinomials_draws():
    """`draw` is multinomial's one-sample method without its host-side checks: same generator state,
    same tokens (so seeded images did not change when the engine switched to it)."""
    probs = torch.softmax(torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 3, -1)
    probs[2, :25] = 0
    probs[2] /= probs[2].sum()
    for seed in range(20):
        want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed))[:, 0]
        assert torch.equal(draw(probs, torch.Generator().manual_seed(seed)), want)
