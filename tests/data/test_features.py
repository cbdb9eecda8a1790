"""Feature shards: what the drafter reads offline equals what the target gives online (to bf16
precision), the null-caption choice is reproducible, and a rerun skips complete shards."""
from __future__ import annotations

import pytest
import torch

from data.code_shards import collate_code_samples, read_code_shards
from data.features import collate_features, dump_features, read_feature_shards
from data.preprocess import preprocess_shards
from data.shards import split_urls, write_world_shards
from decode.models.drafter import drafter_inputs
from decode.models.target import Condition, LlamaGenTarget
from decode.models.text import load_text_encoder
from decode.models.vq import load_vq
from tests.conftest import tiny_gpt

TINY_VQ = {"codebook_size": 64, "codebook_embed_dim": 4, "encoder_ch_mult": [1, 1, 1], "decoder_ch_mult": [1, 1, 1],
           "z_channels": 32, "ch": 32, "num_res_blocks": 1}


@pytest.fixture(scope="module")
def code_urls(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("codes")
    write_world_shards(root / "world", num_train=10, num_heldout=2, image_size=32, shard_size=5, progress=False)
    manifest = preprocess_shards(split_urls(root / "world", "train"), root / "codes", vq=load_vq(None, **TINY_VQ),
                                 text_encoder=load_text_encoder("minilm", max_length=16), image_size=32,
                                 shard_size=5, prefix="train", progress=False)
    return str(root / "codes" / manifest["pattern"])


def test_offline_features_equal_online_ones(code_urls, tmp_path):
    gpt = tiny_gpt(vocab_size=64, block_size=64, cls_token_num=16, caption_dim=384)
    target = LlamaGenTarget(gpt, cfg_scale=1.0)
    manifest = dump_features(code_urls, tmp_path, target=target, max_length=16, batch_size=3, shard_size=4,
                             null_prob=0.0, progress=False)
    assert manifest["count"] == 10 and manifest["shards"] == 3 and manifest["bytes_per_sample"] > 0
    offline = collate_features(list(read_feature_shards(str(tmp_path / manifest["pattern"]))))
    codes = collate_code_samples(list(read_code_shards(code_urls, max_length=16)))
    assert torch.equal(offline.codes, codes.codes)
    hidden, valid = target.hidden_states(Condition(codes.text, codes.mask), codes.codes)
    assert torch.equal(offline.valid, valid)
    torch.testing.assert_close(offline.hidden, hidden, atol=0.02, rtol=0.01)  # stored in bf16
    a = drafter_inputs(gpt, offline.codes, offline.hidden, offline.valid)
    b = drafter_inputs(gpt, codes.codes, hidden, valid)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.loss_mask, b.loss_mask)
    again = dump_features(code_urls, tmp_path, target=target, max_length=16, batch_size=3, shard_size=4,
                          null_prob=0.0, progress=False)
    assert again["shards_written"] == 0 and again["count"] == 10
    with pytest.raises(ValueError, match="null_prob"):
        dump_features(code_urls, tmp_path, target=target, max_length=16, shard_size=4, null_prob=0.5, progress=False)


def test_null_captions_are_chosen_by_key(code_urls, tmp_path):
    target = LlamaGenTarget(tiny_gpt(vocab_size=64, block_size=64, cls_token_num=16, caption_dim=384))
    runs = []
    for name in ("a", "b"):
        m = dump_features(code_urls, tmp_path / name, target=target, max_length=16, shard_size=4, null_prob=0.5,
                          seed=3, progress=False)
        runs.append(collate_features(list(read_feature_shards(str(tmp_path / name / m["pattern"])))).hidden)
    assert torch.equal(runs[0], runs[1])
