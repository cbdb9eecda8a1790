"""Code shards: image-text shards encoded once into VQ codes and caption token states.

Training a target re-encoding every image with the VQ and every caption with the text encoder each
epoch wastes most of its time; this module owns doing that once. `preprocess_shards` writes
webdataset shards `{prefix}-NNNNNN.tar` whose samples hold `<key>.codes.npy` (int16, or int32 for
codebooks of 32768 and more), `<key>.text.npy` (float16 states of the valid caption tokens only)
and `<key>.txt`, plus `manifest-{prefix}.json`. Output shard k holds input samples
k*shard_size .. (k+1)*shard_size-1 in reading order, so a rerun skips shards already complete.
`read_code_shards` reads them back left-padded as LlamaGen expects; `collate_code_samples` batches.
`main` is the command line of `python -m data.preprocess`.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset
from tqdm import tqdm

from data.images import image_to_tensor
from data.shards import shard_name, shard_pattern
from data.sources import (
    CorruptCounter,
    CorruptSampleError,
    EmptyDatasetError,
    Sample,
    _check_not_empty,
    read_hf_dataset,
    read_webdataset,
    shard_error_handler,
)
from decode.models.text import load_text_encoder, minilm_path
from decode.models.vq import VQModel, load_vq

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


def _text_encoder_name(text_encoder) -> str:
    name = getattr(text_encoder, "name", None)
    if name is not None:
        return str(name)
    # HFTextEncoder: the model folder's name, not its machine-specific absolute path
    path = getattr(getattr(getattr(text_encoder, "model", None), "config", None), "_name_or_path", "")
    with contextlib.suppress(ImportError):
        if path and Path(path).resolve() == Path(minilm_path()).resolve():
            return "all-MiniLM-L6-v2"  # the bundled folder is just called "model"
    return Path(path).name or type(text_encoder).__name__


def _vq_fingerprint(vq: VQModel) -> str:
    """The codebook's hash: two checkpoints of one architecture must not be mixed in one folder."""
    book = vq.quantize.embedding.weight.detach().float().cpu().numpy()
    return hashlib.sha256(book.tobytes()).hexdigest()[:16]


def _settings(in_urls, vq: VQModel, text_encoder, image_size: int, shard_size: int, prefix: str) -> dict:
    """Everything that decides the content of the shards: a rerun must match it to reuse them."""
    grid = image_size // vq.config.downsample
    settings = {
        "format": FORMAT, "prefix": prefix, "in_urls": in_urls, "image_size": image_size,
        "shard_size": shard_size, "grid": [grid, grid],
        "codes_dtype": "int16" if vq.config.codebook_size < 32768 else "int32",
        "vq": vq.config.to_dict(), "vq_fingerprint": _vq_fingerprint(vq),
        "text_encoder": {"name": _text_encoder_name(text_encoder), "dim": int(text_encoder.dim),
                         "max_length": int(text_encoder.max_length)},
        "text_dtype": "float16",
        "members": {"codes.npy": "VQ codes [h*w]", "text.npy": "valid caption token states [n, C]",
                    "txt": "caption"},
    }
    return json.loads(json.dumps(settings))  # as read back from the manifest (tuples become lists)


def _check_settings(path: Path, settings: dict) -> None:
    """Refuse to resume shards that an earlier run made with other inputs, models or sizes."""
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    changed = sorted(k for k in settings if old.get(k) != settings[k])
    if changed:
        raise ValueError(f"{path.parent} holds {settings['prefix']!r} code shards made with other settings "
                         f"({', '.join(changed)} differ): use another output folder or prefix, or delete them")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _atomic_shard(path: Path) -> Iterator[wds.TarWriter]:
    """A TarWriter on a hidden temporary file, renamed to `path` only once the shard is complete."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:
            # A fixed mtime keeps a rebuilt shard identical bit for bit to the one it replaces.
            writer = wds.TarWriter(f, mtime=0.0)
            yield writer
            writer.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _batches(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


@torch.no_grad()
def _encode(samples: list[Sample], vq: VQModel, text_encoder, image_size: int, codes_dtype: str) -> list[dict]:
    """The webdataset samples (codes, valid text states, caption) of a batch of image-caption samples."""
    param = next(vq.parameters())
    images = torch.stack([image_to_tensor(s.image, image_size) for s in samples])
    codes = vq.encode(images.to(param.device, param.dtype)).cpu().numpy().astype(codes_dtype)
    features = text_encoder.encode([s.caption for s in samples])
    emb, n_valid = features.emb.float().cpu(), features.mask.sum(1).tolist()
    # Left padding puts the valid rows last: keep only those, the reader restores the padding.
    return [{"__key__": s.key, "codes.npy": codes[i],
             "text.npy": emb[i, emb.shape[1] - n_valid[i]:].numpy().astype(np.float16), "txt": s.caption}
            for i, s in enumerate(samples)]


HF_PREFIX = "hf:"


def read_source(source: str | list[str], *, strict: bool, counter: CorruptCounter) -> Iterator[Sample]:
    """`hf:FOLDER[:SPLIT]` reads a local Hugging Face dataset (imagefolder with metadata.jsonl, or
    parquet); anything else is webdataset shards (paths or brace patterns)."""
    if isinstance(source, str) and source.startswith(HF_PREFIX):
        folder, _, split = source[len(HF_PREFIX):].partition("::")
        return read_hf_dataset(folder, split=split or "train", strict=strict, counter=counter)
    return read_webdataset(source, strict=strict, counter=counter)


def preprocess_shards(in_urls: str | list[str], out_dir: str | os.PathLike, *, vq: VQModel, text_encoder,
                      image_size: int, batch_size: int = 64, shard_size: int = 1000, prefix: str = "train",
                      strict: bool = False, progress: bool = True) -> dict:
    """Encode the image-caption shards `in_urls` into code shards in `out_dir`; returns the manifest.

    Resumable: shards already in `out_dir` (complete by construction: written under a temporary name,
    then renamed) are not encoded again. The input is still read in full, because which samples
    belong to which output shard depends on which input samples are corrupt."""
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be at least 1, got {batch_size} and {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(in_urls, vq, text_encoder, image_size, shard_size, prefix)
    manifest_path = out / manifest_name(prefix)
    _check_settings(manifest_path, settings)
    # Written first as incomplete, so a crashed run's shards are still checked against it on resume.
    _atomic_write_text(manifest_path, json.dumps({**settings, "complete": False}, indent=2) + "\n")

    counter = CorruptCounter()
    samples = read_source(in_urls, strict=strict, counter=counter)
    count = written = total_bytes = 0
    paths: list[Path] = []
    with tqdm(desc=f"code shards ({prefix})", unit="sample", disable=not progress) as bar:
        for number, group in itertools.groupby(enumerate(samples), key=lambda t: t[0] // shard_size):
            path = out / shard_name(prefix, number)
            shard = (sample for _, sample in group)
            if path.is_file():
                n = sum(1 for _ in shard)  # complete: only step over its input samples
                bar.update(n)
            else:
                n = _write_shard(path, shard, vq, text_encoder, image_size, batch_size,
                                 settings["codes_dtype"], bar)
                written += 1
            count += n
            total_bytes += path.stat().st_size
            paths.append(path)
            bar.set_postfix(written=written, skipped=len(paths) - written)
    _remove_stale_shards(out, prefix, keep=set(paths))
    manifest = {
        **settings, "complete": True, "count": count, "shards": len(paths),
        "pattern": shard_pattern(prefix, len(paths)), "shards_written": written,
        "shards_skipped": len(paths) - written, "bytes": total_bytes,
        "bytes_per_sample": round(total_bytes / count, 1) if count else None,
        "corrupt_skipped": counter.total_skipped, "read_report": counter.report(),
    }
    _atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _write_shard(path: Path, samples: Iterable[Sample], vq: VQModel, text_encoder, image_size: int,
                 batch_size: int, codes_dtype: str, bar: tqdm) -> int:
    n = 0
    with _atomic_shard(path) as writer:
        for batch in _batches(samples, batch_size):
            for record in _encode(batch, vq, text_encoder, image_size, codes_dtype):
                writer.write(record)
            n += len(batch)
            bar.update(len(batch))
    return n


def _remove_stale_shards(out_dir: Path, prefix: str, keep: set[Path]) -> None:
    """Shards past the end (an earlier run over more input) would otherwise be read with the new ones."""
    for path in out_dir.glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        if path not in keep:
            path.unlink()


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
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False,
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


def _same_world(world: Path, data) -> bool:
    """Whether the world shards under `world` (if any) match today's generator (version, seed, size, texture)."""
    from data.shards import MANIFEST
    from data.world import WORLD_TEXTURE, world_name

    path = world / MANIFEST
    if not path.is_file():
        return True  # nothing built yet
    m = json.loads(path.read_text())
    built = (m.get("world", "v2"), m.get("seed"), m.get("image_size"), m.get("texture", 0.0))
    return built == (world_name(data.get("world")), data.seed, data.image_size, WORLD_TEXTURE)


def _complete_manifests(codes: Path, data, vq) -> tuple[str, str] | None:
    """The patterns of code shards already complete (None when not); codes of another tokenizer are refused."""
    patterns = []
    for split, count in (("train", data.build_train), ("heldout", data.build_heldout)):
        path = codes / manifest_name(split)
        if not path.is_file():
            return None
        m = json.loads(path.read_text())
        if m.get("vq_fingerprint") not in (None, _vq_fingerprint(vq)):
            raise ValueError(f"{path}: these codes were made by another tokenizer (codebook {m['vq_fingerprint']}, "
                             f"this run's is {_vq_fingerprint(vq)}): use another out_dir, or delete {codes}")
        if not m.get("complete") or m.get("count") != count:
            return None
        patterns.append(str(codes / m["pattern"]))
    return patterns[0], patterns[1]


def ensure_code_shards(data, out: Path, vq=None) -> tuple[str, str]:
    """Code shard patterns for train and held-out; built from the world when `data.build` says so.

    `data` is a training task's data config (train_urls, heldout_urls, build, build_train,
    build_heldout, tokenizer, random_tokenizer, image_size, shard_size, seed, max_length; world:
    the world version, absent or null for the default). `vq`: the codes' tokenizer instead of
    data.tokenizer (a transformers target's own VQ, decode.models.target.hf_target.OwnTokenizer).
    """
    if data.train_urls and data.heldout_urls:
        return data.train_urls, data.heldout_urls
    if not data.build:
        raise ValueError("give data.train_urls and data.heldout_urls (code shards from data/preprocess.py), "
                         "or data.build=true to make them from the embedded world")
    from data.shards import split_urls, write_world_shards

    world, codes = out / "world", out / "codes"
    if not _same_world(world, data):  # its codes would be reused as if they were today's world's
        raise ValueError(f"{world} holds scenes of another world (version, seed, image size or texture differ from "
                         f"data/world.py today): use another out_dir, or delete {world} and {codes}")
    if vq is not None:
        log.warning("the target encodes its own images: data.tokenizer and data.random_tokenizer are not used")
    else:
        vq = load_vq(data.tokenizer) if data.tokenizer else load_vq(None, **data.random_tokenizer)
        if not data.tokenizer:
            log.warning("data.tokenizer is null: codes come from a RANDOMLY INITIALISED tokenizer (smoke runs only)")
    done = _complete_manifests(codes, data, vq)
    if done:  # a resumed run, or a DDP rank started after rank 0 built them
        return done
    write_world_shards(world, num_train=data.build_train, num_heldout=data.build_heldout, seed=data.seed,
                       image_size=data.image_size, shard_size=data.shard_size, world=data.get("world"))
    text = load_text_encoder("minilm", max_length=data.max_length)
    patterns = {}
    for split in ("train", "heldout"):
        manifest = preprocess_shards(split_urls(world, split), codes, vq=vq, text_encoder=text,
                                     image_size=data.image_size, shard_size=data.shard_size, prefix=split)
        patterns[split] = str(codes / manifest["pattern"])
    return patterns["train"], patterns["heldout"]


def main(argv: list[str] | None = None) -> dict:
    """`python -m data.preprocess --in SHARDS --out OUT --tokenizer PATH|none --image-size 64 ...`."""
    parser = argparse.ArgumentParser(prog="python -m data.preprocess",
                                     description="Encode image-text shards into VQ-code + caption-state shards.")
    parser.add_argument("--in", dest="in_urls", required=True, help='input: webdataset shards, e.g. "DIR/train-{000000..000003}.tar", or a local Hugging Face '
                             'dataset as "hf:FOLDER" (imagefolder + metadata.jsonl, or parquet; "hf:FOLDER::SPLIT")')
    parser.add_argument("--out", required=True, help="output folder for PREFIX-*.tar and manifest-PREFIX.json")
    parser.add_argument("--tokenizer", required=True,
                        help="VQ model folder or official .pt file; 'none' for a random default VQ (tests only)")
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--prefix", default="train")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per output shard")
    parser.add_argument("--max-length", type=int, default=120, help="caption token slots (LlamaGen: 120)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--strict", action="store_true", help="stop at a corrupt sample instead of skipping it")
    args = parser.parse_args(argv)
    vq = load_vq(None if args.tokenizer.lower() == "none" else args.tokenizer).to(args.device)
    text_encoder = load_text_encoder("minilm", max_length=args.max_length, device=args.device)
    manifest = preprocess_shards(args.in_urls, args.out, vq=vq, text_encoder=text_encoder,
                                 image_size=args.image_size, batch_size=args.batch_size,
                                 shard_size=args.shard_size, prefix=args.prefix, strict=args.strict)
    print(f"{manifest['count']} samples in {manifest['shards']} shards ({manifest['shards_written']} written, "
          f"{manifest['shards_skipped']} already complete), {manifest['bytes_per_sample']} bytes/sample; "
          f"{manifest['read_report']}")
    return manifest


if __name__ == "__main__":
    from decode.resolvers import reporting_input_errors

    reporting_input_errors(main)()
