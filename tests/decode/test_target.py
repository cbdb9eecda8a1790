"""Cached decoding equals one full forward; a masked many-token forward equals one-by-one decoding."""
import pytest
import torch

from decode.models.target import Condition, LlamaGenTarget
from tests.conftest import padded_captions, tiny_gpt


def _condition(model_type, batch):
    if model_type == "t2i":
        return Condition(*padded_captions(batch))
    return Condition(torch.arange(batch) % 10)


def _decode_one_by_one(target, cond, tokens):
    cache, out = target.start(cond, tokens.shape[1])
    logits, hidden = [out.logits], [out.hidden]
    for j in range(tokens.shape[1] - 1):
        out = target.extend(cache, tokens[:, j:j + 1])
        target.commit(cache, 1)
        logits.append(out.logits)
        hidden.append(out.hidden)
    return torch.cat(logits, 1), torch.cat(hidden, 2)


@pytest.mark.parametrize("model_type", ["t2i", "c2i"])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_kv_cache_decoding_equals_full_forward(model_type, cfg_scale):
    target = LlamaGenTarget(tiny_gpt(model_type), cfg_scale=cfg_scale)
    cond = _condition(model_type, 3)
    tokens = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    logits, hidden = _decode_one_by_one(target, cond, tokens)
    with torch.no_grad():
        full = target.teacher_forced(cond, tokens)
    torch.testing.assert_close(logits, full.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden, full.hidden, atol=1e-5, rtol=1e-5)
    assert hidden.shape[0] == (2 if cfg_scale > 1 else 1)


def test_chain_forward_equals_one_by_one():
    target = LlamaGenTarget(tiny_gpt("t2i"), cfg_scale=2.0)
    cond = _condition("t2i", 2)
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    ref, _ = _decode_one_by_one(target, cond, tokens)
    cache, _ = target.start(cond, 16)
    target.extend(cache, tokens[:, :4])  # 4 tokens in one forward
    target.commit(cache, 4)
    out = target.extend(cache, tokens[:, 4:9])
    torch.testing.assert_close(out.logits, ref[:, 5:10], atol=1e-5, rtol=1e-5)


def test_tree_masked_forward_equals_each_branch_decoded_alone():
    """A tree root -> (a, b), a -> c, verified in one forward, gives each node the logits of its branch."""
    target = LlamaGenTarget(tiny_gpt("t2i"), cfg_scale=3.0)
    cond = _condition("t2i", 2)
    prefix = torch.randint(0, 64, (2, 3), generator=torch.Generator().manual_seed(3))
    root, a, b, c = 5, 6, 7, 8
    nodes = torch.tensor([[root, a, b, c]] * 2)
    parent = [-1, 0, 0, 1]
    depth = torch.tensor([[0, 1, 1, 2]] * 2)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    for i in range(4):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parent[j]
    cache, _ = target.start(cond, 16)
    target.extend(cache, prefix)
    target.commit(cache, 3)
    tree = target.extend(cache, nodes, block_mask=mask.expand(2, 4, 4), depths=depth)
    for branch, idx in (([root, a, c], [0, 1, 3]), ([root, b], [0, 2])):
        full_tokens = torch.cat([prefix, torch.tensor([branch] * 2)], 1)
        ref, ref_h = _decode_one_by_one(target, cond, torch.cat([full_tokens, full_tokens[:, :1]], 1))
        torch.testing.assert_close(tree.logits[:, idx], ref[:, 4:4 + len(branch)], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tree.hidden[:, :, idx], ref_h[:, :, 4:4 + len(branch)], atol=1e-5, rtol=1e-5)


def test_rows_with_different_lengths_decode_independently():
    """Per-row cache lengths (batched speculative decoding): each row matches its own batch-1 run."""
    target = LlamaGenTarget(tiny_gpt("t2i"), cfg_scale=2.0)
    cond = _condition("t2i", 2)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(4))
    cache, _ = target.start(cond, 16)
    target.extend(cache, tokens[:, :3])
    target.commit(cache, torch.tensor([3, 1]))  # row 0 keeps 3 tokens, row 1 keeps 1
    out = target.extend(cache, torch.stack([tokens[0, 3:5], tokens[1, 1:3]]))
    for row, start in ((0, 3), (1, 1)):
        single = Condition(cond.cond[row:row + 1], cond.mask[row:row + 1])
        ref, _ = _decode_one_by_one(target, single, tokens[row:row + 1, :start + 3])
        torch.testing.assert_close(out.logits[row], ref[0, start + 1:start + 3], atol=1e-5, rtol=1e-5)


def test_bad_condition_shape_is_named():
    target = LlamaGenTarget(tiny_gpt("t2i"), cfg_scale=1.0)
    with pytest.raises(ValueError, match=r"\[B, 8, 12\]"):
        target.start(Condition(torch.zeros(1, 5, 12)), 4)
