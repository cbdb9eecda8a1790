"""Target features on disk, for offline drafter distillation.

Each sample of a code shard (data/preprocess.py) is run through the frozen target once,
teacher-forced, and its post-norm features at every input position are stored in bf16 with the
image codes and the attendable-position mask: the drafter then trains without the target in the
loop. As in EAGLE/LANTERN data generation, `null_prob` of the captions are replaced by the
target's null caption; which ones depends only on (seed, key), so a resumed dump is identical.

Written like the code shards: one tar per `shard_size` samples under a temporary name, renamed
when complete; a rerun skips complete shards; a manifest records the settings and bytes/sample.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from data.code_shards import (
    CodeSample,
    Corrupt,
    ShardStream,
    check_members,
    collate_code_samples,
    every_rank_reads_all,
    load_member,
    read_code_shards,
    report_reads,
    take_sample,
)
from data.preprocess import _atomic_shard, _atomic_write_text, _batches, _remove_stale_shards
from data.shards import shard_name, shard_pattern
from data.sources import CorruptCounter, _check_not_empty, expand_shards, shard_error_handler
from decode.models.target import Condition, LlamaGenTarget


@dataclass
class FeatureBatch:
    codes: torch.Tensor   # [B, N] long
    hidden: torch.Tensor  # [B, P+N-1, D] float32 (stored bf16)
    valid: torch.Tensor   # [B, P+N-1] bool


def _is_null(seed: int, key: str, null_prob: float) -> bool:
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0 ** 64 < null_prob


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@torch.no_grad()
def _records(target: LlamaGenTarget, samples: list[CodeSample], seed: int, null_prob: float) -> list[dict]:
    batch = collate_code_samples(samples)
    device = target.device
    text = batch.text.to(device)
    null = torch.tensor([_is_null(seed, s.key, null_prob) for s in samples], device=device)
    text = torch.where(null[:, None, None], target.gpt.cls_embedding.uncond_embedding[None].to(text.dtype), text)
    hidden, valid = target.hidden_states(Condition(text, batch.mask.to(device)), batch.codes.to(device))
    bf16 = hidden.to(torch.bfloat16).cpu()
    return [{"__key__": s.key, "codes.npy": _npy(s.codes.numpy().astype(np.int16)),
             "hidden.bf16": bf16[i].contiguous().view(torch.int16).numpy().tobytes(),
             "valid.npy": _npy(valid[i].cpu().numpy()),
             "json": json.dumps({"shape": list(bf16.shape[1:]), "null_caption": bool(null[i])}).encode()}
            for i, s in enumerate(samples)]


def dump_features(code_urls: str, out_dir: str | os.PathLike, *, target: LlamaGenTarget, max_length: int,
                  batch_size: int = 16, shard_size: int = 500, null_prob: float = 0.1, seed: int = 0,
                  prefix: str = "train", target_name: str = "", strict: bool = False, progress: bool = True) -> dict:
    """Write feature shards for the code shards `code_urls`; returns (and writes) the manifest.
    Corrupt code samples are skipped and counted in the manifest (`read_report`), or fatal when `strict`."""
    if target.guided:
        raise ValueError("dump features with cfg_scale=1 (one row per sample); CFG rows come from null_prob")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"codes": str(code_urls), "target": target_name, "max_length": max_length, "shard_size": shard_size,
                "null_prob": null_prob, "seed": seed, "prefix": prefix, "dtype": "bfloat16"}
    manifest_path = out / f"manifest-{prefix}.json"
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        changed = sorted(k for k in settings if old.get(k) != settings[k])
        if changed:
            raise ValueError(f"{out} holds {prefix!r} feature shards made with other settings ({', '.join(changed)}"
                             f" differ): use another folder or prefix, or delete them")
    _atomic_write_text(manifest_path, json.dumps({**settings, "complete": False}, indent=2) + "\n")
    counter = CorruptCounter()
    samples = read_code_shards(code_urls, max_length=max_length, nodesplitter=lambda urls: urls, strict=strict,
                               counter=counter)
    count = written = total = 0
    paths: list[Path] = []
    with tqdm(desc=f"feature shards ({prefix})", unit="sample", disable=not progress) as bar:
        for number, group in itertools.groupby(enumerate(samples), key=lambda t: t[0] // shard_size):
            path = out / shard_name(prefix, number)
            shard = [s for _, s in group]
            if not path.is_file():
                with _atomic_shard(path) as writer:
                    for chunk in _batches(shard, batch_size):
                        for record in _records(target, chunk, seed, null_prob):
                            writer.write(record)
                written += 1
            bar.update(len(shard))
            count += len(shard)
            total += path.stat().st_size
            paths.append(path)
    _remove_stale_shards(out, prefix, keep=set(paths))
    manifest = {**settings, "complete": True, "count": count, "shards": len(paths),
                "pattern": shard_pattern(prefix, len(paths)), "shards_written": written, "bytes": total,
                "bytes_per_sample": round(total / count, 1) if count else None,
                "corrupt_skipped": counter.total_skipped, "read_report": counter.report()}
    _atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    report_reads(f"code shards {code_urls!r}", counter)
    return manifest


FEATURE_MEMBERS = ("codes.npy", "hidden.bf16", "valid.npy", "json")


def _to_features(raw: dict, expect: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, hidden, valid) of a checked feature sample; raises Corrupt for a damaged one. Every
    sample must have the shapes of the first good one (`expect`, when known)."""
    expect = expect or {}
    check_members(raw, FEATURE_MEMBERS)
    try:
        shape = [int(d) for d in json.loads(raw["json"])["shape"]]
    except Exception as err:  # noqa: BLE001 - bad bytes, bad json or no shape: all mean the same
        raise Corrupt(f"unreadable json ({type(err).__name__})") from None
    if len(shape) != 2 or min(shape) < 1 or len(raw["hidden.bf16"]) != 2 * shape[0] * shape[1]:
        raise Corrupt(f"hidden.bf16 holds {len(raw['hidden.bf16'])} bytes, not the bf16 {shape} its json says")
    codes, valid = load_member(raw, "codes.npy"), load_member(raw, "valid.npy")
    if codes.ndim != 1 or not np.issubdtype(codes.dtype, np.integer) or not 0 < len(codes) <= shape[0]:
        raise Corrupt(f"codes.npy is {codes.dtype} {list(codes.shape)}, not [N] integers for {shape[0]} positions")
    if valid.shape != (shape[0],) or valid.dtype != np.bool_:
        raise Corrupt(f"valid.npy is {valid.dtype} {list(valid.shape)}, not bool [{shape[0]}]")
    if "shape" in expect and (len(codes), shape) != (expect["codes"], expect["shape"]):
        raise Corrupt(f"{len(codes)} codes and hidden states {shape}, the first good sample "
                      f"({expect['key']!r}) has {expect['codes']} and {expect['shape']}")
    hidden = torch.frombuffer(bytearray(raw["hidden.bf16"]), dtype=torch.int16).view(torch.bfloat16)
    hidden = hidden.view(*shape).float()
    if not torch.isfinite(hidden).all():
        raise Corrupt("hidden.bf16 holds non-finite values")
    return torch.from_numpy(codes.astype(np.int64)), hidden, torch.from_numpy(valid)


def read_feature_shards(urls: str, nodesplitter: Callable | None = None, *, strict: bool = False,
                        counter: CorruptCounter | None = None) -> Iterator[tuple]:
    """(codes, hidden, valid) of feature shards in order. A damaged sample is skipped and counted in
    `counter` (CorruptSampleError naming its key when `strict`); no usable sample: EmptyDatasetError."""
    counter = counter if counter is not None else CorruptCounter()
    before, expect = counter.read, {}
    for raw in wds.WebDataset(expand_shards(urls), shardshuffle=False, empty_check=False,
                              handler=shard_error_handler(urls, strict, counter),
                              nodesplitter=nodesplitter or wds.split_by_node):
        sample = take_sample(raw, lambda r, e=expect: _to_features(r, e), strict=strict, counter=counter)
        if sample is None:
            continue
        if not expect:  # the first good sample sets the shapes of the rest
            codes, hidden, _ = sample
            expect = {"codes": len(codes), "shape": list(hidden.shape), "key": raw.get("__key__", "?")}
        yield sample
    _check_not_empty(f"feature shards {urls!r}", counter, before)


def collate_features(samples: list[tuple]) -> FeatureBatch:
    codes, hidden, valid = zip(*samples)
    return FeatureBatch(torch.stack(codes), torch.stack(hidden), torch.stack(valid))


class FeatureShards(ShardStream):
    """Feature shards as a stream, split between DDP ranks by sample like `CodeShards` (corrupt
    samples dropped before the split, so a resume's `skip` lines up)."""

    kind = "feature shards"

    def read_once(self, counter: CorruptCounter) -> Iterator[tuple]:
        return read_feature_shards(self.urls, every_rank_reads_all, strict=self.strict, counter=counter)
