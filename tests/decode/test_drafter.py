"""The drafter: cached decoding equals a full pass, teacher-forced inputs line up, misfits fail at load."""
import pytest
import torch

from decode.models.checkpoint import CheckpointError
from decode.models.drafter import Drafter, DrafterConfig, drafter_inputs, load_drafter, save_drafter, target_fingerprint
from decode.models.target import Condition, LlamaGenTarget
from tests.conftest import padded_captions, tiny_gpt


def _drafter(gpt, seed=0, **kw):
    torch.manual_seed(seed)
    return Drafter(DrafterConfig.for_target(gpt, **kw)).eval()


def test_cached_decoding_equals_one_full_pass():
    gpt = tiny_gpt()
    d = _drafter(gpt, n_layer=2)
    b, t, dim = 2, 12, gpt.config.dim
    emb, feat = torch.randn(b, t, dim), torch.randn(b, t, dim)
    pos = torch.arange(t).expand(b, t)
    full = d(emb, feat, pos, torch.ones(t, t, dtype=torch.bool).tril().expand(b, t, t))
    cache = d.new_cache(b, t)
    steps = []
    for i, n in ((0, 5), (5, 1), (6, 6)):  # a prefill, one token, then a chunk
        block = torch.ones(n, n, dtype=torch.bool).tril().expand(b, n, n)
        steps.append(d(emb[:, i:i + n], feat[:, i:i + n], pos[:, i:i + n], cache.attention_mask(block, i + n), cache))
        cache.commit(n)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_teacher_forced_inputs_pair_each_feature_with_the_next_token():
    gpt = tiny_gpt()
    target = LlamaGenTarget(gpt, cfg_scale=1.0)
    text, mask = padded_captions(2)
    tokens = torch.randint(0, 64, (2, 16))
    hidden, valid = target.hidden_states(Condition(text, mask), tokens)
    p, n = gpt.config.cls_token_num, 16
    assert hidden.shape[1] == p + n - 1
    tf = drafter_inputs(gpt, tokens, hidden, valid)
    assert tf.features.shape[1] == p + n - 2 and int(tf.loss_mask[0].sum()) == n - 1
    i = p - 1  # first trained position: feature of the last prefix slot, token 0, target h_P
    torch.testing.assert_close(tf.token_emb[:, i], gpt.embed_tokens(tokens[:, 0]))
    torch.testing.assert_close(tf.next_features[:, i], hidden[:, p])
    # the drafter's targets are the features whose LM head gives the target's own logits
    logits = target.teacher_forced(Condition(text, mask), tokens).logits
    torch.testing.assert_close(gpt.logits(tf.next_features[:, i:]), logits[:, 1:], atol=1e-5, rtol=1e-5)
    pad_cols = ~valid[:, : tf.mask.shape[1]]
    off_diag = tf.mask & ~torch.eye(tf.mask.shape[1], dtype=torch.bool)
    assert not (off_diag & pad_cols[:, None, :]).any()


def test_round_trip_and_misfits_fail_at_load(tmp_path):
    gpt = tiny_gpt()
    d = _drafter(gpt)
    save_drafter(tmp_path / "d", d)
    loaded = load_drafter(tmp_path / "d", gpt)
    assert all(torch.equal(a, b) for a, b in zip(d.state_dict().values(), loaded.state_dict().values()))
    assert "tok_embeddings.weight" not in d.state_dict() and "output.weight" not in d.state_dict()
    with pytest.raises(CheckpointError, match=r"dim \(hidden size\) is 64 but the target's is 128"):
        load_drafter(tmp_path / "d", tiny_gpt(dim=128, n_head=4))
    with pytest.raises(CheckpointError, match="vocab_size is 64 but the target's is 32"):
        load_drafter(tmp_path / "d", tiny_gpt(vocab_size=32))
    other = tiny_gpt(seed=1)  # same shapes, other weights
    assert target_fingerprint(other) != target_fingerprint(gpt)
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_drafter(tmp_path / "d", other)


def test_a_drafter_fits_the_float16_copy_of_its_target_and_older_folders_still_load(tmp_path):
    """The repository ships float16 copies (cast_model_folder) of float32-trained models: the fingerprint
    rounds to float16, so a drafter trained against the float32 target fits the shipped copy."""
    from dataclasses import replace

    from decode.models.checkpoint import cast_model_folder, save_model_folder
    from decode.models.target import build_gpt

    gpt = tiny_gpt()
    save_model_folder(tmp_path / "t32", gpt, gpt.config.to_dict(), kind="llamagen_gpt")
    shipped = build_gpt(str(cast_model_folder(tmp_path / "t32", tmp_path / "t16", torch.float16)))
    assert not torch.equal(shipped.output.weight, gpt.output.weight)  # the copy is rounded
    save_drafter(tmp_path / "d", _drafter(gpt))
    load_drafter(tmp_path / "d", shipped)
    # a folder written before the rounding recorded the float32 bytes' hash: it still fits its own target
    old = _drafter(gpt)
    old.config = replace(old.config, target_fingerprint=target_fingerprint(gpt, legacy=True))
    save_drafter(tmp_path / "old", old)
    load_drafter(tmp_path / "old", gpt)
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_drafter(tmp_path / "old", tiny_gpt(seed=1))


@pytest.mark.parametrize("prefix_token", [None, 0])
def test_prefix_slots_get_the_same_embedding_in_training_and_decoding(prefix_token):
    from decode.strategies.drafting import EagleDrafting
    from decode.core.trees import TreeParams

    gpt = tiny_gpt()
    target = LlamaGenTarget(gpt, cfg_scale=1.0)
    text, mask = padded_captions(1)
    tokens = torch.randint(0, 64, (1, 16))
    hidden, valid = target.hidden_states(Condition(text, mask), tokens)
    p = gpt.config.cls_token_num
    expected = torch.zeros(gpt.config.dim) if prefix_token is None else gpt.embed_tokens(torch.tensor(prefix_token))
    tf = drafter_inputs(gpt, tokens, hidden, valid, prefix_token)
    torch.testing.assert_close(tf.token_emb[0, :p - 1], expected.expand(p - 1, -1))
    drafting = EagleDrafting(_drafter(gpt, prefix_token=prefix_token), target, TreeParams(8, 2, 3), 1, 16)
    cache, out = target.start(Condition(text, mask), 16, extra_slots=64, all_positions=True)
    drafting.begin(out, cache.valid[:, :target.prefix_len], tokens[:, :1])
    emb = drafting.pending.emb  # [G*B, P, D]: prefix slots, then the root (token 0) at the last one
    torch.testing.assert_close(emb[:, :-1], expected.expand_as(emb[:, :-1]))
    torch.testing.assert_close(emb[:, -1], gpt.embed_tokens(tokens[:, 0]).expand(emb.shape[0], -1))
