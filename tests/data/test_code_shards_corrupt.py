"""Derived shards (code shards, feature shards): a corrupt sample is skipped, counted and reported,
or fatal with strict=True; an empty held-out set is an error; skipping keeps the DDP split and a
resume's skip deterministic."""
from __future__ import annotations

import io
import itertools
import json
import logging

import numpy as np
import pytest
import torch

from data.code_shards import (
    CodeShards,
    collate_code_samples,
    rank_stream,
    read_code_shards,
    report_reads_at_end,
)
from data.features import FeatureShards, collate_features, read_feature_shards
from data.sources import CorruptCounter, CorruptSampleError, EmptyDatasetError
from tests.data.test_sources import _tar

N, DIM, MAX_LENGTH, P = 16, 8, 6, 6


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _code_record(key: str, i: int = 0, n_text: int = 3, n_codes: int = N) -> dict:
    rng = np.random.default_rng(i)
    return {"__key__": key, "codes.npy": _npy(rng.integers(0, 10, n_codes).astype(np.int16)),
            "text.npy": _npy(rng.standard_normal((n_text, DIM)).astype(np.float16)), "txt": f"caption {key}"}


def _code_shard(tmp_path, extra=()) -> str:
    """good a, truncated codes.npy in b, no text.npy in c, good d, then `extra` records."""
    bad_codes = _code_record("b", 1)
    bad_codes["codes.npy"] = bad_codes["codes.npy"][:-7]
    no_text = _code_record("c", 2)
    del no_text["text.npy"]
    return _tar(tmp_path / "train-000000.tar", [_code_record("a", 0), bad_codes, no_text, _code_record("d", 3),
                                                  *extra])


def test_corrupt_code_samples_are_skipped_and_counted_with_their_keys(tmp_path):
    counter = CorruptCounter()
    samples = list(read_code_shards(_code_shard(tmp_path), max_length=MAX_LENGTH, counter=counter))
    assert [s.key for s in samples] == ["a", "d"]
    assert counter.read == 2 and counter.total_skipped == 2
    assert counter.examples == {"unreadable codes.npy (ValueError)": ["b"], "missing text.npy": ["c"]}
    assert "skipped 2" in counter.report()
    batch = collate_code_samples(samples)
    assert batch.codes.shape == (2, N) and batch.text.shape == (2, MAX_LENGTH, DIM)


def test_strict_code_reading_raises_naming_the_key(tmp_path):
    with pytest.raises(CorruptSampleError, match=r"'b'.*unreadable codes\.npy"):
        list(read_code_shards(_code_shard(tmp_path), max_length=MAX_LENGTH, strict=True))


def test_wrong_shapes_and_bad_captions_are_corrupt_samples(tmp_path):
    short = _code_record("short", 4, n_codes=N - 1)
    latin1 = {**_code_record("latin1", 5), "txt": "caf\xe9".encode("latin-1")}
    flat_text = {**_code_record("flat", 6), "text.npy": _npy(np.zeros(DIM, np.float16))}
    counter = CorruptCounter()
    keys = [s.key for s in read_code_shards(_code_shard(tmp_path, [short, latin1, flat_text]),
                                            max_length=MAX_LENGTH, counter=counter)]
    assert keys == ["a", "d"] and counter.total_skipped == 5
    reasons = {key: reason for reason, keys in counter.examples.items() for key in keys}
    assert "15 codes" in reasons["short"] and "first good sample ('a')" in reasons["short"]
    assert reasons["latin1"] == "caption is not utf-8" and "text.npy" in reasons["flat"]


def test_the_manifest_gives_the_expected_shape_and_codebook(tmp_path):
    url = _code_shard(tmp_path, [{**_code_record("outside", 7), "codes.npy": _npy(np.full(N, 12, np.int16))}])
    (tmp_path / "manifest-train.json").write_text(json.dumps({
        "format": "code-shards", "grid": [4, 4], "text_encoder": {"dim": DIM}, "vq": {"codebook_size": 10}}))
    counter = CorruptCounter()
    assert [s.key for s in read_code_shards(url, max_length=MAX_LENGTH, counter=counter)] == ["a", "d"]
    assert counter.examples["codes outside the codebook [0, 10)"] == ["outside"]
    (tmp_path / "manifest-train.json").write_text(json.dumps({
        "format": "code-shards", "grid": [4, 8], "text_encoder": {"dim": DIM}, "vq": {"codebook_size": 10}}))
    with pytest.raises(CorruptSampleError, match=r"'a'.*manifest says 32"):
        list(read_code_shards(url, max_length=MAX_LENGTH, strict=True))


def test_too_many_caption_tokens_stays_a_settings_error(tmp_path):
    url = _tar(tmp_path / "x-000000.tar", [_code_record("a", 0, n_text=5)])
    with pytest.raises(ValueError, match="max_length=4") as err:
        list(read_code_shards(url, max_length=4))
    assert not isinstance(err.value, CorruptSampleError)


def _feature_record(key: str, i: int = 0) -> dict:
    rng = np.random.default_rng(i)
    hidden = torch.from_numpy(rng.standard_normal((P + N - 1, DIM)).astype(np.float32)).to(torch.bfloat16)
    return {"__key__": key, "codes.npy": _npy(rng.integers(0, 10, N).astype(np.int16)),
            "hidden.bf16": hidden.view(torch.int16).numpy().tobytes(),
            "valid.npy": _npy(np.ones(P + N - 1, bool)),
            "json": json.dumps({"shape": [P + N - 1, DIM], "null_caption": False}).encode()}


def _feature_shard(tmp_path) -> str:
    bad_codes = _feature_record("b", 1)
    bad_codes["codes.npy"] = bad_codes["codes.npy"][:-7]
    no_hidden = _feature_record("c", 2)
    del no_hidden["hidden.bf16"]
    short_hidden = _feature_record("e", 4)
    short_hidden["hidden.bf16"] = short_hidden["hidden.bf16"][:-2]
    return _tar(tmp_path / "feat-000000.tar", [_feature_record("a", 0), bad_codes, no_hidden,
                                                 _feature_record("d", 3), short_hidden])


def test_corrupt_feature_samples_are_skipped_counted_or_fatal(tmp_path):
    url = _feature_shard(tmp_path)
    counter = CorruptCounter()
    batch = collate_features(list(read_feature_shards(url, counter=counter)))
    assert batch.codes.shape == (2, N) and batch.hidden.shape == (2, P + N - 1, DIM)
    assert counter.read == 2 and counter.total_skipped == 3
    assert counter.examples["unreadable codes.npy (ValueError)"] == ["b"]
    assert counter.examples["missing hidden.bf16"] == ["c"]
    with pytest.raises(CorruptSampleError, match=r"'b'.*codes\.npy"):
        list(read_feature_shards(url, strict=True))
    stream = FeatureShards(url, repeat=True, strict=True)
    with pytest.raises(CorruptSampleError, match="'b'"):
        list(itertools.islice(stream, 4))


def test_an_empty_heldout_stream_is_an_error(tmp_path):
    bad = _code_record("b")
    del bad["codes.npy"]
    all_corrupt = _tar(tmp_path / "heldout-000000.tar", [bad])
    with pytest.raises(EmptyDatasetError, match=r"heldout-000000\.tar.*skipped 1"):
        list(CodeShards(all_corrupt, MAX_LENGTH, repeat=False))
    with pytest.raises(ValueError, match="the held-out things 'X' hold no usable samples"):
        list(rank_stream(lambda: iter([]), 0, 1, repeat=False, what="the held-out things 'X'"))
    with pytest.raises(ValueError, match="for rank 1 of 2"):
        list(rank_stream(lambda: iter(["only one"]), 1, 2, repeat=False))


def test_skipping_keeps_the_ddp_split_and_a_resume_deterministic(tmp_path, monkeypatch, caplog):
    url = _code_shard(tmp_path, [_code_record(k, i) for i, k in enumerate("efgh", start=10)])
    good = ["a", "d", "e", "f", "g", "h"]
    shares = {}
    for rank in (0, 1):
        monkeypatch.setattr("data.code_shards.rank_and_world", lambda rank=rank: (rank, 2))
        shares[rank] = [s.key for s in itertools.islice(CodeShards(url, MAX_LENGTH, repeat=True), 6)]
    assert shares == {0: ["a", "e", "g"] * 2, 1: ["d", "f", "h"] * 2}  # split among the good samples only
    resumed = CodeShards(url, MAX_LENGTH, repeat=True, skip=2)  # rank 1 after 2 samples
    assert [s.key for s in itertools.islice(resumed, 4)] == ["h", "d", "f", "h"]

    monkeypatch.setattr("data.code_shards.rank_and_world", lambda: (0, 1))
    heldout = CodeShards(url, MAX_LENGTH, repeat=False)
    with caplog.at_level(logging.INFO, logger="data.code_shards"):
        assert [s.key for s in heldout] == good
        assert [s.key for s in heldout] == good  # a second pass: checked again, not counted again
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # one per stream: the training one on rank 0 only, the held-out one once
    assert "training code shards" in warnings[0] and "held-out code shards" in warnings[1]
    assert "skipped 2" in warnings[1] and "(e.g. b)" in warnings[1]
    assert heldout.counter.read == 6 and heldout.counter.total_skipped == 2


def test_the_end_of_training_report(tmp_path, capsys):
    data = CodeShards(_code_shard(tmp_path), MAX_LENGTH, repeat=False)
    list(data)
    report_reads_at_end(data, CodeShards("never-read-{000000..000001}.tar", MAX_LENGTH, repeat=True))
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "held-out code shards" in out[0] and "skipped 2" in out[0] and "(e.g. b)" in out[0]


def test_a_list_of_brace_patterns_reads_every_shard_of_each(tmp_path):
    first = [_tar(tmp_path / f"a-00000{i}.tar", [_code_record(f"a{i}", i)]) for i in range(2)]
    second = _tar(tmp_path / "b-000000.tar", [_code_record("b0", 5)])
    urls = [str(tmp_path / "a-{000000..000001}.tar"), second]
    keys = [s.key for s in read_code_shards(urls, max_length=MAX_LENGTH)]
    assert keys == ["a0", "a1", "b0"] and len(first) == 2
