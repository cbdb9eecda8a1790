"""Code shards read back: the samples and batches of the shards that data/preprocess.py writes.

`read_code_shards` checks each sample (members, shapes against the shards' manifest, codes inside
the codebook, UTF-8 caption) and re-pads its caption states on the left to `max_length` as LlamaGen
expects; `collate_code_samples` batches them. A corrupt sample is skipped and counted, or fatal
when strict (`Corrupt`, `take_sample`, `report_reads`; shared with data/features.py). `CodeShards`
streams them for training and evaluation, split between DDP ranks by sample (`rank_stream`).
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from data.sources import (
    CorruptCounter,
    CorruptSampleError,
    EmptyDatasetError,
    _check_not_empty,
    expand_shards,
    shard_error_handler,
)

log = logging.getLogger(__name__)

FORMAT = "code-shards"


def manifest_name(prefix: str) -> str:
    return f"manifest-{prefix}.json"


@dataclass(frozen=True)
class CodeSample:
    codes: torch.Tensor  # [N] long
    text: torch.Tensor  # [max_length, C] float32, valid rows at the end, padding rows zero
    mask: torch.Tensor  # [max_length] bool, True for valid slots
    caption: str
    key: str


@dataclass  # not frozen: Lightning moves (and casts) a batch by rebuilding its dataclass fields
class CodeBatch:
    codes: torch.Tensor  # [B, N] long
    text: torch.Tensor  # [B, L, C]
    mask: torch.Tensor  # [B, L] bool
    captions: list[str]
    keys: list[str]


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class Corrupt(Exception):
    """Why one sample of a derived shard cannot be used (caught by the reader: skipped or strict)."""


def load_member(raw: dict, member: str) -> np.ndarray:
    try:
        return _load_npy(raw[member])
    except Exception as err:  # noqa: BLE001 - numpy raises several types for a damaged .npy; all mean the same
        raise Corrupt(f"unreadable {member} ({type(err).__name__})") from None


def check_members(raw: dict, members: tuple[str, ...]) -> None:
    missing = [m for m in members if raw.get(m) is None]
    if missing:
        raise Corrupt(f"missing {', '.join(missing)}")


def take_sample(raw: dict, convert: Callable[[dict], object], *, strict: bool, counter: CorruptCounter):
    """`convert(raw)`, or None after counting why the sample was skipped (CorruptSampleError when strict)."""
    key = raw.get("__key__", "?")
    try:
        sample = convert(raw)
    except Corrupt as err:
        if strict:
            raise CorruptSampleError(f"corrupt sample {key!r} in {raw.get('__url__', 'a shard')}: {err}") from None
        counter.skip(key, str(err))
        return None
    counter.ok()
    return sample


def report_reads(what: str, counter: CorruptCounter) -> None:
    """After a full pass over a set of shards: one log line, a warning when samples were skipped (rank 0)."""
    if rank_and_world()[0] == 0:
        (log.warning if counter.total_skipped else log.info)("%s: %s", what, counter.report())


def report_reads_at_end(*datasets: ShardStream) -> None:
    """At the end of a training run: what each stream's first pass read and skipped (printed like the
    run's summary). A stream read only in DataLoader workers counted there: its log line reported it."""
    for data in datasets:
        if data.counter.read or data.counter.total_skipped:
            print(f"{data.what}: {data.counter.report()}")


def code_shard_manifest(urls: str | list[str]) -> dict | None:
    """The manifest next to the first of the code shards `urls` (DIR/PREFIX-NNNNNN.tar ->
    DIR/manifest-PREFIX.json), when there is one: it gives the shape every sample must have."""
    from braceexpand import braceexpand

    first = next(iter(braceexpand(urls if isinstance(urls, str) else (list(urls) or [""])[0])), "")
    match = re.fullmatch(r"(.+)-\d{6}\.tar", Path(first).name)
    path = Path(first).with_name(manifest_name(match.group(1))) if match else None
    if path is None or "://" in first or not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("%s is unreadable: code shards are checked against their first good sample instead", path)
        return None
    return manifest if manifest.get("format") == FORMAT else None


def _expected_shape(urls: str | list[str]) -> dict:
    """What every sample must match: from the shards' manifest, else (filled in by the first good
    sample) from that sample. Every DDP rank reads the same stream, so every rank expects the same."""
    manifest = code_shard_manifest(urls)
    if manifest is None:
        return {}
    try:
        return {"codes": int(np.prod(manifest["grid"])), "dim": int(manifest["text_encoder"]["dim"]),
                "codebook_size": int(manifest["vq"]["codebook_size"]), "source": "the shards' manifest"}
    except (KeyError, TypeError, ValueError):
        return {}


def _to_code_sample(raw: dict, max_length: int, expect: dict | None = None) -> CodeSample:
    """A checked CodeSample; raises Corrupt for a damaged sample, one that does not match `expect`
    (see `_expected_shape`) included. Too many caption tokens for `max_length` is not a damaged
    sample but reading with the wrong settings: a plain ValueError."""
    expect = expect or {}
    key = raw.get("__key__", "?")
    check_members(raw, ("codes.npy", "text.npy", "txt"))
    valid = load_member(raw, "text.npy")  # [n, C]
    if valid.ndim != 2 or not np.issubdtype(valid.dtype, np.floating) or valid.shape[0] == 0:
        raise Corrupt(f"text.npy is {valid.dtype} {list(valid.shape)}, not [n >= 1, C] floats")
    n = valid.shape[0]
    if n > max_length:
        raise ValueError(f"sample {key!r} has {n} caption tokens, more than max_length={max_length}: "
                         f"read with the max_length the shards were made with (see their manifest)")
    if not np.isfinite(valid).all():
        raise Corrupt("text.npy holds non-finite values")
    codes = load_member(raw, "codes.npy")
    if codes.ndim != 1 or not np.issubdtype(codes.dtype, np.integer):
        raise Corrupt(f"codes.npy is {codes.dtype} {list(codes.shape)}, not [N] integers")
    if "codes" in expect and (len(codes), valid.shape[1]) != (expect["codes"], expect["dim"]):
        raise Corrupt(f"{len(codes)} codes and caption states of width {valid.shape[1]}, "
                      f"{expect['source']} says {expect['codes']} and {expect['dim']}")
    size = expect.get("codebook_size")
    if size is not None and len(codes) and (codes.min() < 0 or codes.max() >= size):
        raise Corrupt(f"codes outside the codebook [0, {size})")
    try:
        caption = raw["txt"].decode("utf-8") if isinstance(raw["txt"], bytes) else str(raw["txt"])
    except UnicodeDecodeError:
        raise Corrupt("caption is not utf-8") from None
    text = torch.zeros(max_length, valid.shape[1])
    text[max_length - n:] = torch.from_numpy(valid.astype(np.float32))
    mask = torch.arange(max_length) >= max_length - n
    return CodeSample(codes=torch.from_numpy(codes.astype(np.int64)), text=text, mask=mask, caption=caption,
                      key=key)


def read_code_shards(urls: str | list[str], *, max_length: int, nodesplitter: Callable | None = None,
                     strict: bool = False, counter: CorruptCounter | None = None) -> Iterator[CodeSample]:
    """The samples of code shards in order, caption states re-padded on the left to `max_length`.
    Under DDP each rank reads its share of the shards (pass `nodesplitter` to choose otherwise).

    A damaged sample (missing or unreadable member, wrong shape, codes outside the codebook,
    caption not UTF-8) is skipped and counted in `counter`, or raises CorruptSampleError naming
    its key when `strict`; shards with no usable sample raise EmptyDatasetError."""
    counter = counter if counter is not None else CorruptCounter()
    before, expect = counter.read, _expected_shape(urls)
    dataset = wds.WebDataset(expand_shards(urls), shardshuffle=False, empty_check=False,
                             handler=shard_error_handler(urls, strict, counter),
                             nodesplitter=nodesplitter or wds.split_by_node)
    for raw in dataset:
        sample = take_sample(raw, lambda r, e=expect: _to_code_sample(r, max_length, e), strict=strict,
                             counter=counter)
        if sample is None:
            continue
        if "codes" not in expect:  # no manifest: the first good sample sets the shape of the rest
            expect = {"codes": len(sample.codes), "dim": sample.text.shape[1],
                      "source": f"the first good sample ({sample.key!r})"}
        yield sample
    _check_not_empty(f"code shards {urls!r}", counter, before)


def collate_code_samples(samples: list[CodeSample]) -> CodeBatch:
    """A DataLoader collate_fn: stacks the tensors, keeps captions and keys as lists."""
    return CodeBatch(codes=torch.stack([s.codes for s in samples]), text=torch.stack([s.text for s in samples]),
                     mask=torch.stack([s.mask for s in samples]), captions=[s.caption for s in samples],
                     keys=[s.key for s in samples])


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def every_rank_reads_all(urls):
    """A webdataset nodesplitter that gives every rank every shard (the split happens per sample)."""
    return urls


def rank_stream(read, rank: int, world: int, repeat: bool, skip: int = 0, what: str = "the shards"):
    """This rank's share (every world-th sample) of the stream `read()`, endless when `repeat`,
    after dropping this rank's first `skip` samples (a resumed run; read, not decoded twice).

    `read()` must give the same samples on every rank and every pass: corrupt samples are dropped
    inside it, before the split, so the split and `skip` count usable samples only and a resumed
    run lines up with the interrupted one. A stream with nothing for this rank is an error."""
    while True:
        count = 0
        for sample in itertools.islice(read(), rank, None, world):
            count += 1
            if skip:
                skip -= 1
                continue
            yield sample
        if count == 0:
            raise EmptyDatasetError(f"{what} hold no usable samples" + (f" for rank {rank} of {world}" if world > 1 else ""))
        if not repeat:
            return


class ShardStream(IterableDataset):
    """Derived shards as a stream (see `CodeShards`), with corrupt samples skipped and counted.

    `counter` counts the first pass over the shards (partial if the run ends before it is done);
    the end of that pass is logged with `report_reads`. Later passes are checked the same way (and
    `strict` still applies) but not counted again. Under DataLoader workers the counting happens in
    the worker's copy: the log line is then the report."""

    kind = "shards"

    def __init__(self, urls: str, repeat: bool, skip: int = 0, *, strict: bool = False,
                 counter: CorruptCounter | None = None):
        self.urls, self.repeat, self.skip, self.strict = urls, repeat, skip, strict
        self.counter = counter if counter is not None else CorruptCounter()
        self._passes = 0

    @property
    def what(self) -> str:
        return f"the {'training' if self.repeat else 'held-out'} {self.kind} {self.urls!r}"

    def read_once(self, counter: CorruptCounter) -> Iterator:
        raise NotImplementedError

    def _read(self) -> Iterator:
        first = self._passes == 0
        self._passes += 1
        counter = self.counter if first else CorruptCounter()
        yield from self.read_once(counter)
        if first:
            report_reads(self.what, counter)

    def __iter__(self):
        rank, world = rank_and_world() if self.repeat else (0, 1)
        yield from rank_stream(self._read, rank, world, self.repeat, self.skip, what=self.what)


class CodeShards(ShardStream):
    """Code shards as a stream of CodeSamples.

    Training (`repeat=True`): an endless stream, split between DDP ranks by sample (i % world),
    so every rank gets the same number of batches whatever the shard count (a split by shard
    leaves a rank with nothing when there are fewer shards than ranks, and uneven batch counts
    deadlock DDP). Evaluation (`repeat=False`): every rank reads the whole set, so the metrics
    are the same on every rank and no rank waits for another. Corrupt samples are dropped before
    the split (every rank reads and checks every sample), so the split and a resume's `skip` stay
    deterministic; `strict=True` stops at the first one instead.
    """

    kind = "code shards"

    def __init__(self, urls: str, max_length: int, repeat: bool, skip: int = 0, *, strict: bool = False,
                 counter: CorruptCounter | None = None):
        super().__init__(urls, repeat, skip, strict=strict, counter=counter)
        self.max_length = max_length

    def read_once(self, counter: CorruptCounter) -> Iterator[CodeSample]:
        return read_code_shards(self.urls, max_length=self.max_length, nodesplitter=every_rank_reads_all,
                                strict=self.strict, counter=counter)
