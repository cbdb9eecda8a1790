"""Speculative decoding invariants: greedy EAGLE-2 equals greedy AR token for token."""
import pytest
import torch

from decode.drafter import Drafter, DrafterConfig
from decode.engine import generate_ar
from decode.sampling import SamplingParams
from decode.speculative import TreeParams, ancestry_mask, generate_eagle
from decode.target import Condition, LlamaGenTarget
from tests.conftest import padded_captions, tiny_gpt


def test_ancestry_mask_follows_parent_pointers():
    parents = torch.tensor([[-1, 0, 0, 1, 3]])
    m = ancestry_mask(parents)[0]
    assert m[4].tolist() == [True, True, False, True, True]
    assert m[2].tolist() == [True, False, True, False, False]


@pytest.mark.parametrize("batch,cfg_scale,tree", [
    (1, 1.0, TreeParams(total_tokens=8, depth=3, top_k=3)),
    (4, 4.0, TreeParams(total_tokens=12, depth=4, top_k=4)),
    (3, 2.0, TreeParams(total_tokens=2, depth=0, top_k=1)),  # a chain of one draft
])
def test_greedy_eagle_equals_greedy_ar(batch, cfg_scale, tree):
    gpt = tiny_gpt(block_size=64)
    # a drafter that agrees with the target sometimes: random weights, a copy of a target layer
    torch.manual_seed(1)
    drafter = Drafter(DrafterConfig.for_target(gpt)).eval()
    drafter.layers[0].load_state_dict(gpt.layers[-1].state_dict(), strict=False)
    target = LlamaGenTarget(gpt, cfg_scale=cfg_scale)
    text, mask = padded_captions(batch)
    cond = Condition(text, mask)
    greedy = SamplingParams(temperature=0.0)
    ar = generate_ar(target, cond, num_tokens=64, sampling=greedy, generators=None)
    sd = generate_eagle(target, cond, drafter=drafter, num_tokens=64, sampling=greedy, tree=tree)
    assert torch.equal(sd.tokens, ar.tokens)
    assert (sd.nfe <= 63).all() and (sd.nfe >= 1).all()


def test_sampled_acceptance_is_refused_clearly():
    gpt = tiny_gpt(block_size=16)
    drafter = Drafter(DrafterConfig.for_target(gpt)).eval()
    text, mask = padded_captions(1)
    with pytest.raises(NotImplementedError, match="temperature=0"):
        generate_eagle(LlamaGenTarget(gpt), Condition(text, mask), drafter=drafter, num_tokens=16,
                       sampling=SamplingParams(temperature=1.0), tree=TreeParams())


@pytest.mark.parametrize("batch", [1, 4])
def test_full_trees_accept_many_tokens_and_stay_exact(batch):
    """Vocabulary 4, top_k 4, every candidate kept: the target's path is in the tree down to the
    first unexpanded node, so steps accept several drafts (KV compaction and drafter bookkeeping
    are exercised), and the tokens still equal greedy AR."""
    gpt = tiny_gpt(block_size=64, vocab_size=4)
    torch.manual_seed(2)
    drafter = Drafter(DrafterConfig.for_target(gpt)).eval()
    target = LlamaGenTarget(gpt, cfg_scale=3.0)
    text, mask = padded_captions(batch, seed=5)
    cond = Condition(text, mask)
    greedy = SamplingParams(temperature=0.0)
    ar = generate_ar(target, cond, num_tokens=64, sampling=greedy, generators=None)
    sd = generate_eagle(target, cond, drafter=drafter, num_tokens=64, sampling=greedy,
                        tree=TreeParams(total_tokens=4 + 16 * 3 + 1, depth=3, top_k=4))
    assert torch.equal(sd.tokens, ar.tokens)
    assert (sd.nfe < 40).all(), sd.nfe  # at least ~1.6 tokens per verification


def test_sampled_chain_speculation_has_the_targets_distribution():
    """Exact speculative sampling: the first two tokens' joint distribution matches the target's
    exact one (enumerated) as closely as plain AR sampling does, with drafts both accepted and
    rejected along the way."""
    from decode.sampling import probabilities, row_generators

    gpt = tiny_gpt(block_size=4, vocab_size=4, seed=3)
    torch.manual_seed(4)
    drafter = Drafter(DrafterConfig.for_target(gpt)).eval()
    target = LlamaGenTarget(gpt, cfg_scale=2.0)
    text, mask = padded_captions(1, seed=7)
    n = 4000
    cond = Condition(text.expand(n, -1, -1), mask.expand(n, -1))
    params = SamplingParams(temperature=1.0)
    # exact joint p(t0, t1) by enumeration
    pairs = torch.cartesian_prod(torch.arange(4), torch.arange(4))  # [16, 2]
    tf = target.teacher_forced(Condition(text.expand(16, -1, -1), mask.expand(16, -1)),
                               torch.cat([pairs, torch.zeros(16, 2, dtype=torch.long)], 1))
    probs = probabilities(tf.logits, params)
    exact = probs[:, 0].gather(1, pairs[:, :1])[:, 0] * probs[:, 1].gather(1, pairs[:, 1:])[:, 0]

    def tv(tokens):
        idx = tokens[:, 0] * 4 + tokens[:, 1]
        emp = torch.bincount(idx, minlength=16).float() / len(idx)
        return 0.5 * (emp - exact).abs().sum().item()

    ar = generate_ar(target, cond, num_tokens=4, sampling=params, generators=row_generators(range(n)))
    sd = generate_eagle(target, cond, drafter=drafter, num_tokens=4, sampling=params,
                        tree=TreeParams(total_tokens=4, depth=2, top_k=1),
                        generators=row_generators(range(n, 2 * n)))
    assert abs(exact.sum().item() - 1) < 1e-5
    assert tv(ar.tokens) < 0.05 and tv(sd.tokens) < 0.05, (tv(ar.tokens), tv(sd.tokens))
    assert 1.0 < sd.nfe.float().mean() < 3.0  # drafts were accepted and rejected
