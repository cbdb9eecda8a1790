"""Code shards: what is written reads back as the VQ codes and caption states of the input samples,
left-padded like LlamaGen; reruns skip complete shards and rebuild missing ones atomically."""
from __future__ import annotations

import io
import json

import pytest
import torch
import webdataset as wds
from PIL import Image

from data.code_shards import collate_code_samples, read_code_shards
from data.images import image_to_tensor
from data.preprocess import main, preprocess_shards
from data.shards import split_urls, write_world_shards
from data.sources import read_webdataset
from decode.models.checkpoint import save_model_folder
from decode.models.text import load_text_encoder
from decode.models.vq import load_vq

MAX_LENGTH = 32  # some world captions are longer: truncated ones are covered too
TINY_VQ = {"codebook_size": 64, "codebook_embed_dim": 4, "encoder_ch_mult": [1, 1], "decoder_ch_mult": [1, 1],
           "z_channels": 32, "ch": 32, "num_res_blocks": 1}


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tensors this small gain nothing from threads; on a busy machine waiting for them costs seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world_urls(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("world")
    write_world_shards(out, num_train=12, num_heldout=4, image_size=32, shard_size=5, progress=False)
    return split_urls(out, "train")


@pytest.fixture(scope="module")
def vq():
    return load_vq(None, **TINY_VQ)


@pytest.fixture(scope="module")
def text_encoder():
    return load_text_encoder("minilm", max_length=MAX_LENGTH)


def _run(urls, out, vq, text_encoder, **kw):
    args = {"image_size": 32, "batch_size": 4, "shard_size": 5, "progress": False, **kw}
    return preprocess_shards(urls, out, vq=vq, text_encoder=text_encoder, **args)


def test_codes_and_text_read_back_as_encoded(world_urls, vq, text_encoder, tmp_path):
    manifest = _run(world_urls, tmp_path, vq, text_encoder)
    assert (manifest["count"], manifest["shards"], manifest["shards_written"]) == (12, 3, 3)
    inputs = list(read_webdataset(world_urls))
    read = list(read_code_shards(str(tmp_path / manifest["pattern"]), max_length=MAX_LENGTH))
    assert [s.key for s in read] == [s.key for s in inputs]
    assert [s.caption for s in read] == [s.caption for s in inputs]

    codes = vq.encode(torch.stack([image_to_tensor(s.image, 32) for s in inputs]))
    assert codes.shape == (12, 16 * 16)  # 32 px, one downsampling: a 16x16 grid
    assert torch.equal(torch.stack([s.codes for s in read]), codes)
    assert read[0].codes.dtype == torch.long

    feats = text_encoder.encode([s.caption for s in inputs])
    for i, s in enumerate(read):
        assert s.text.shape == (MAX_LENGTH, text_encoder.dim) and s.text.dtype == torch.float32
        assert torch.equal(s.mask, feats.mask[i])
        assert s.mask[-1] and (s.text[~s.mask] == 0).all()  # valid rows last, padding rows zero
        torch.testing.assert_close(s.text, feats.emb[i], atol=2e-3, rtol=2e-3)  # stored as float16


def test_members_and_manifest(world_urls, vq, text_encoder, tmp_path):
    manifest = _run(world_urls, tmp_path, vq, text_encoder)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["manifest-train.json", "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    raw = next(iter(wds.WebDataset(str(tmp_path / "train-000000.tar"), shardshuffle=False, empty_check=False)))
    assert {k for k in raw if not k.startswith("__")} == {"codes.npy", "text.npy", "txt"}
    arrays = next(iter(wds.WebDataset(str(tmp_path / "train-000000.tar"), shardshuffle=False,
                                      empty_check=False).decode()))
    assert str(arrays["codes.npy"].dtype) == "int16" and arrays["codes.npy"].shape == (256,)
    assert str(arrays["text.npy"].dtype) == "float16" and arrays["text.npy"].shape[1] == text_encoder.dim
    assert 0 < arrays["text.npy"].shape[0] <= MAX_LENGTH  # only the valid token states are stored
    on_disk = json.loads((tmp_path / "manifest-train.json").read_text())
    assert on_disk == manifest and manifest["complete"]
    assert manifest["vq"]["codebook_size"] == 64 and manifest["grid"] == [16, 16]
    assert manifest["text_encoder"] == {"name": "all-MiniLM-L6-v2", "dim": 384, "max_length": MAX_LENGTH}
    assert manifest["corrupt_skipped"] == 0
    assert manifest["bytes_per_sample"] == pytest.approx(manifest["bytes"] / 12, abs=0.1)


def test_rerun_skips_complete_shards_and_rebuilds_a_missing_one(world_urls, vq, text_encoder, tmp_path,
                                                                  monkeypatch):
    _run(world_urls, tmp_path, vq, text_encoder)
    shards = sorted(tmp_path.glob("train-*.tar"))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    encoded = []
    real_encode = vq.encode
    monkeypatch.setattr(vq, "encode", lambda images: encoded.append(len(images)) or real_encode(images))

    manifest = _run(world_urls, tmp_path, vq, text_encoder)
    assert encoded == [] and manifest["shards_skipped"] == 3 and manifest["count"] == 12
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards} == before

    shards[1].unlink()
    manifest = _run(world_urls, tmp_path, vq, text_encoder)
    assert sum(encoded) == 5 and manifest["shards_written"] == 1  # only the missing shard's samples
    assert shards[1].read_bytes() == before[shards[1].name][1]  # rebuilt identical
    assert shards[0].stat().st_mtime_ns == before[shards[0].name][0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_failed_shard_leaves_no_partial_file(world_urls, vq, text_encoder, tmp_path, monkeypatch):
    calls, real_encode = [], vq.encode

    def failing(images):
        calls.append(1)
        if len(calls) == 3:  # batches of 4 in shards of 5: the third batch is inside the second shard
            raise RuntimeError("boom")
        return real_encode(images)

    monkeypatch.setattr(vq, "encode", failing)
    with pytest.raises(RuntimeError, match="boom"):
        _run(world_urls, tmp_path, vq, text_encoder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest-train.json", "train-000000.tar"]
    assert not json.loads((tmp_path / "manifest-train.json").read_text())["complete"]


def test_other_settings_refuse_to_resume(world_urls, vq, text_encoder, tmp_path):
    _run(world_urls, tmp_path, vq, text_encoder)
    with pytest.raises(ValueError, match="shard_size"):
        _run(world_urls, tmp_path, vq, text_encoder, shard_size=4)
    other_vq = load_vq(None, init_seed=1, **TINY_VQ)
    with pytest.raises(ValueError, match="vq_fingerprint"):
        _run(world_urls, tmp_path, other_vq, text_encoder)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_corrupt_samples_are_skipped_and_counted(vq, text_encoder, tmp_path):
    shard = tmp_path / "in.tar"
    with wds.TarWriter(str(shard)) as sink:
        sink.write({"__key__": "a", "png": _png(), "txt": "a green square"})
        sink.write({"__key__": "b", "png": b"not an image", "txt": "broken"})
        sink.write({"__key__": "c", "png": _png(), "txt": "another green square"})
    manifest = _run(str(shard), tmp_path / "out", vq, text_encoder)
    assert manifest["count"] == 2 and manifest["corrupt_skipped"] == 1
    keys = [s.key for s in read_code_shards(str(tmp_path / "out" / manifest["pattern"]), max_length=MAX_LENGTH)]
    assert keys == ["a", "c"]


def test_collate_and_reading_with_too_few_slots(world_urls, vq, text_encoder, tmp_path):
    manifest = _run(world_urls, tmp_path, vq, text_encoder)
    urls = str(tmp_path / manifest["pattern"])
    loader = torch.utils.data.DataLoader(list(read_code_shards(urls, max_length=MAX_LENGTH)), batch_size=5,
                                         collate_fn=collate_code_samples)
    batch = next(iter(loader))
    assert batch.codes.shape == (5, 256) and batch.codes.dtype == torch.long
    assert batch.text.shape == (5, MAX_LENGTH, 384) and batch.mask.shape == (5, MAX_LENGTH)
    assert batch.mask.dtype == torch.bool and len(batch.captions) == len(batch.keys) == 5
    with pytest.raises(ValueError, match="max_length"):
        list(read_code_shards(urls, max_length=2))


def test_command_line(world_urls, vq, text_encoder, tmp_path, monkeypatch):
    folder = save_model_folder(tmp_path / "vq", vq, vq.config.to_dict(), kind="llamagen_vq")
    # The CLI's MiniLM is the module's: loading it again would only cost time.
    monkeypatch.setattr("data.preprocess.load_text_encoder", lambda kind, max_length, device: text_encoder)
    manifest = main(["--in", world_urls, "--out", str(tmp_path / "out"), "--tokenizer", str(folder),
                     "--image-size", "32", "--shard-size", "8", "--batch-size", "8", "--device", "cpu"])
    assert (manifest["count"], manifest["shards"]) == (12, 2)
    assert manifest["vq_fingerprint"] == json.loads((tmp_path / "out" / "manifest-train.json").read_text())[
        "vq_fingerprint"]


def test_hf_imagefolder_gives_the_same_codes_as_its_webdataset(world_urls, vq, text_encoder, tmp_path):
    from data.sources import export_imagefolder

    export_imagefolder(read_webdataset(world_urls), tmp_path / "hf")
    a = _run(world_urls, tmp_path / "a", vq, text_encoder)
    b = _run(f"hf:{tmp_path / 'hf'}", tmp_path / "b", vq, text_encoder)
    assert a["count"] == b["count"] == 12
    read = lambda m, d: {s.key: s for s in read_code_shards(str(d / m["pattern"]), max_length=MAX_LENGTH)}  # noqa: E731
    sa, sb = read(a, tmp_path / "a"), read(b, tmp_path / "b")
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key].codes, sb[key].codes) and sa[key].caption == sb[key].caption


def test_codes_of_another_world_are_refused_not_reused(tmp_path):
    from omegaconf import OmegaConf

    from data.preprocess import ensure_code_shards

    world = tmp_path / "world"
    world.mkdir()
    (world / "manifest.json").write_text(json.dumps({"seed": 0, "image_size": 64, "texture": 0.123}))
    data = OmegaConf.create({"train_urls": None, "heldout_urls": None, "build": True, "seed": 0, "image_size": 64})
    with pytest.raises(ValueError, match="another world"):
        ensure_code_shards(data, tmp_path)


def test_complete_codes_of_another_tokenizer_are_refused_not_reused(tmp_path):
    from omegaconf import OmegaConf

    from data.preprocess import ensure_code_shards

    codes = tmp_path / "codes"
    codes.mkdir()
    for split, count in (("train", 8), ("heldout", 4)):
        (codes / f"manifest-{split}.json").write_text(json.dumps(
            {"complete": True, "count": count, "pattern": f"{split}-000000.tar", "vq_fingerprint": "0123456789abcdef"}))
    data = OmegaConf.create({"train_urls": None, "heldout_urls": None, "build": True, "seed": 0, "image_size": 32,
                             "build_train": 8, "build_heldout": 4, "tokenizer": None,
                             "random_tokenizer": {"codebook_size": 16, "encoder_ch_mult": [1, 1],
                                                  "decoder_ch_mult": [1, 1], "z_channels": 8, "ch": 32,
                                                  "num_res_blocks": 1}})
    with pytest.raises(ValueError, match="made by another tokenizer"):
        ensure_code_shards(data, tmp_path)
