"""Readers of image-caption data: webdataset shards and local Hugging Face datasets folders give
the same samples; corrupt samples are skipped and counted, or fatal with strict=True."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data.shards import split_urls, write_world_shards
from data.sources import (
    CorruptCounter,
    CorruptSampleError,
    EmptyDatasetError,
    export_imagefolder,
    read_hf_dataset,
    read_webdataset,
)
from data.world import SceneGenerator


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    import datasets

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)  # read once at import time


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    write_world_shards(out, num_train=7, num_heldout=2, seed=5, image_size=64, shard_size=3, progress=False)
    return out


def _by_key(samples) -> dict:
    return {s.key: s for s in samples}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(
        a[k].caption == b[k].caption and np.array_equal(np.asarray(a[k].image), np.asarray(b[k].image)) for k in a)


def _png(color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


def test_webdataset_reads_the_generated_scenes(world_dir):
    samples = list(read_webdataset(split_urls(world_dir, "train")))
    generator = SceneGenerator(image_size=64, seed=5)
    assert [s.key for s in samples] == [generator.scene(i).key for i in range(7)]  # in shard order
    for i, sample in enumerate(samples):
        scene = generator.scene(i)
        assert sample.caption == scene.caption and sample.image.mode == "RGB"
        assert np.array_equal(np.asarray(sample.image), np.asarray(scene.image))  # PNG is lossless


def test_brace_pattern_and_list_of_paths_agree(world_dir):
    by_pattern = [s.key for s in read_webdataset(str(world_dir / "train-{000000..000002}.tar"))]
    by_list = [s.key for s in read_webdataset([str(p) for p in sorted(world_dir.glob("train-*.tar"))])]
    assert by_pattern == by_list and len(by_pattern) == 7


def test_webdataset_and_imagefolder_give_the_same_samples(world_dir, tmp_path):
    from_tars = _by_key(read_webdataset(split_urls(world_dir, "train")))
    assert export_imagefolder(from_tars.values(), tmp_path / "folder") == 7
    counter = CorruptCounter()
    from_folder = _by_key(read_hf_dataset(tmp_path / "folder", counter=counter))
    assert _same(from_tars, from_folder)
    assert counter.read == 7 and counter.total_skipped == 0


def test_parquet_folder_gives_the_same_samples(world_dir, tmp_path):
    import datasets

    from_tars = _by_key(read_webdataset(split_urls(world_dir, "heldout")))
    table = datasets.Dataset.from_dict(
        {"image": [s.image for s in from_tars.values()], "caption": [s.caption for s in from_tars.values()],
         "key": list(from_tars)}, features=datasets.Features(
            {"image": datasets.Image(), "caption": datasets.Value("string"), "key": datasets.Value("string")}))
    (tmp_path / "pq" / "data").mkdir(parents=True)
    table.to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    assert _same(from_tars, _by_key(read_hf_dataset(tmp_path / "pq")))


def test_corrupt_tar_samples_are_skipped_and_counted(tmp_path):
    url = _tar(tmp_path / "bad.tar", [
        {"__key__": "good-1", "png": _png(), "txt": "a green square"},
        {"__key__": "garbage", "png": b"this is not a png at all", "txt": "a broken image"},
        {"__key__": "no-caption", "png": _png()},
        {"__key__": "good-2", "png": _png((200, 0, 0)), "txt": "a red square"},
    ])
    counter = CorruptCounter()
    assert [s.key for s in read_webdataset(url, counter=counter)] == ["good-1", "good-2"]
    assert counter.read == 2 and counter.total_skipped == 2
    assert counter.skipped["missing caption"] == 1
    report = counter.report()
    assert "garbage" in report and "no-caption" in report and "undecodable image" in report
    with pytest.raises(CorruptSampleError, match="garbage"):
        list(read_webdataset(url, strict=True))


def test_unreadable_shard_is_counted_and_the_rest_is_read(world_dir, tmp_path):
    (tmp_path / "broken.tar").write_bytes(b"\x00garbage" * 200)
    urls = [str(tmp_path / "broken.tar"), str(world_dir / "heldout-000000.tar")]
    counter = CorruptCounter()
    assert len(list(read_webdataset(urls, counter=counter))) == 2
    assert counter.skipped["unreadable shard data"] >= 1
    with pytest.raises(CorruptSampleError, match="unreadable"):
        list(read_webdataset(urls, strict=True))


def test_corrupt_imagefolder_sample_is_skipped_and_counted(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "ok.png").write_bytes(_png())
    (folder / "bad.png").write_bytes(b"\x89PNG but then nothing useful")
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{k}.png", "text": f"caption {k}"}) + "\n" for k in ("ok", "bad")))
    counter = CorruptCounter()
    assert [s.key for s in read_hf_dataset(folder, counter=counter)] == ["ok"]
    assert counter.total_skipped == 1 and "bad" in counter.report()
    with pytest.raises(CorruptSampleError, match="'bad'"):
        list(read_hf_dataset(folder, strict=True))


def test_empty_datasets_are_errors(tmp_path):
    only_bad = _tar(tmp_path / "bad.tar", [{"__key__": "x", "png": b"nope", "txt": "broken"}])
    with pytest.raises(EmptyDatasetError, match="no usable samples"):
        list(read_webdataset(only_bad))
    empty = _tar(tmp_path / "empty.tar", [])
    with pytest.raises(EmptyDatasetError):
        list(read_webdataset(empty))
    with pytest.raises(FileNotFoundError, match="not found"):
        list(read_webdataset(str(tmp_path / "missing-{000000..000001}.tar")))
    with pytest.raises(FileNotFoundError):
        list(read_hf_dataset(tmp_path / "no-such-folder"))


def test_hf_folder_without_a_caption_column_is_named(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png())
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "label_text": "x"}) + "\n")
    with pytest.raises(ValueError, match="caption"):
        list(read_hf_dataset(folder))
