"""Official containers load; bad checkpoints fail with the problem named."""
import pytest
import torch

from decode.models.checkpoint import CheckpointError, read_state_dict, save_model_folder
from decode.models.target import build_gpt
from tests.conftest import tiny_gpt

ARCH = dict(size="tiny", model_type="t2i", vocab_size=64, block_size=16, cls_token_num=8, caption_dim=12)


@pytest.mark.parametrize("container", ["model", "module", "state_dict", None])
def test_official_containers_load(tmp_path, container):
    gpt = tiny_gpt()
    sd = gpt.state_dict()
    obj = sd if container is None else {container: sd, "steps": 10}
    torch.save(obj, tmp_path / "ckpt.pt")
    loaded = build_gpt(str(tmp_path / "ckpt.pt"), init_seed=123, **ARCH)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_truncated_checkpoint_is_named(tmp_path):
    torch.save({"model": tiny_gpt().state_dict()}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_state_dict(tmp_path / "cut.pt")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_state_dict(tmp_path / "nope.pt")


def test_wrong_keys_are_named(tmp_path):
    sd = tiny_gpt().state_dict()
    sd["layers.0.attention.wqkv_renamed.weight"] = sd.pop("layers.0.attention.wqkv.weight")
    torch.save({"model": sd}, tmp_path / "keys.pt")
    with pytest.raises(CheckpointError) as err:
        build_gpt(str(tmp_path / "keys.pt"), **ARCH)
    msg = str(err.value)
    assert "missing keys (1): layers.0.attention.wqkv.weight" in msg
    assert "unexpected keys (1): layers.0.attention.wqkv_renamed.weight" in msg


def test_wrong_shapes_are_named(tmp_path):
    torch.save({"model": tiny_gpt(vocab_size=32).state_dict()}, tmp_path / "shapes.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatch for tok_embeddings.weight: checkpoint \[32, 64\], "
                                              r"model \[64, 64\]"):
        build_gpt(str(tmp_path / "shapes.pt"), **ARCH)


def test_old_checkpoints_with_freqs_cis_load(tmp_path):
    sd = tiny_gpt(seed=3).state_dict()
    sd["freqs_cis"] = torch.zeros(3)  # a buffer older LlamaGen checkpoints saved; recomputed, not loaded
    torch.save({"model": sd}, tmp_path / "old.pt")
    model = build_gpt(str(tmp_path / "old.pt"), **ARCH)
    loaded = model.state_dict()
    for k, v in sd.items():
        if k != "freqs_cis":
            assert torch.equal(loaded[k], v), k


def test_project_folder_roundtrip(tmp_path):
    gpt = tiny_gpt(seed=5)
    save_model_folder(tmp_path / "m", gpt, gpt.config.to_dict(), kind="llamagen_gpt")
    loaded = build_gpt(str(tmp_path / "m"))  # architecture from config.json
    assert loaded.config == gpt.config
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, gpt.state_dict()[k])
    assert not list((tmp_path / "m").glob("*.tmp"))


def test_folder_of_another_kind_is_refused(tmp_path):
    gpt = tiny_gpt()
    save_model_folder(tmp_path / "m", gpt, gpt.config.to_dict(), kind="llamagen_vq")
    with pytest.raises(CheckpointError, match="holds a 'llamagen_vq', expected a 'llamagen_gpt'"):
        build_gpt(str(tmp_path / "m"))


def test_large_model_folders_are_sharded_and_read_back(tmp_path, monkeypatch):
    import json

    import decode.models.checkpoint as ck
    from tests.conftest import tiny_gpt

    gpt = tiny_gpt()
    monkeypatch.setattr(ck, "SHARD_BYTES", 64 * 1024)  # force several shards for a tiny model
    ck.save_model_folder(tmp_path / "m", gpt, gpt.config.to_dict(), kind="llamagen_gpt")
    shards = sorted(p.name for p in (tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "m" / "model.safetensors").exists()
    state = ck.read_state_dict(tmp_path / "m")
    assert state.keys() == gpt.state_dict().keys() and all(torch.equal(state[k], v) for k, v in gpt.state_dict().items())
    # a save that fits one file replaces the shards and the index
    monkeypatch.setattr(ck, "SHARD_BYTES", 1 << 30)
    ck.save_model_folder(tmp_path / "m", gpt, gpt.config.to_dict(), kind="llamagen_gpt")
    assert sorted(p.name for p in (tmp_path / "m").glob("model*")) == ["model.safetensors"]
    # a missing shard is named
    monkeypatch.setattr(ck, "SHARD_BYTES", 64 * 1024)
    ck.save_model_folder(tmp_path / "n", gpt, gpt.config.to_dict(), kind="llamagen_gpt")
    index = json.loads((tmp_path / "n" / ck.INDEX).read_text())
    (tmp_path / "n" / sorted(set(index["weight_map"].values()))[-1]).unlink()
    with pytest.raises(FileNotFoundError, match="model-"):
        ck.read_state_dict(tmp_path / "n")


def test_folder_cast_to_float16_halves_the_weights_and_loads_back_as_float32(tmp_path):
    import json

    from decode.models.checkpoint import cast_model_folder

    gpt = tiny_gpt(seed=3)
    save_model_folder(tmp_path / "m", gpt, gpt.config.to_dict(), kind="llamagen_gpt")
    (tmp_path / "m" / "README.md").write_text("card")
    cast_model_folder(tmp_path / "m", tmp_path / "h", torch.float16)
    size = lambda d: sum(p.stat().st_size for p in d.glob("model*.safetensors"))  # noqa: E731
    assert size(tmp_path / "h") < 0.55 * size(tmp_path / "m")
    assert (tmp_path / "h" / "README.md").read_text() == "card"
    assert json.loads((tmp_path / "h" / "config.json").read_text())["weights_dtype"] == "float16"
    loaded = build_gpt(str(tmp_path / "h"))
    for k, v in gpt.state_dict().items():
        got = loaded.state_dict()[k]
        assert got.dtype == v.dtype, k  # the model keeps its own precision
        assert torch.equal(got, v.half().to(v.dtype)), k  # ... and the float16 value of each weight
    with pytest.raises(CheckpointError, match="not a model folder"):
        cast_model_folder(tmp_path / "nothing", tmp_path / "x", torch.float16)
