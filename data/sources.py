"""Image-caption samples from webdataset shards and local Hugging Face datasets folders.

Both readers give the same typed `Sample`s. A corrupt sample (an image that does not decode, a
missing image or caption) is skipped and counted in a `CorruptCounter`, or raises
`CorruptSampleError` naming its key when `strict=True`; a dataset with no usable sample raises
`EmptyDatasetError`. `export_imagefolder` writes samples as an imagefolder + metadata.jsonl.
"""
from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp")
CAPTION_FIELDS = ("txt", "text", "caption")


@dataclass(frozen=True)
class Sample:
    image: Image.Image  # RGB
    caption: str
    key: str


class CorruptSampleError(ValueError):
    """A sample that cannot be used, raised instead of skipped when strict=True."""


class EmptyDatasetError(ValueError):
    """A dataset with no usable sample."""


class CorruptCounter:
    """Counts the samples read and the samples skipped, by reason, with a few example keys each."""

    def __init__(self, examples_per_reason: int = 3):
        self.read = 0
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self._keep = examples_per_reason

    def ok(self) -> None:
        self.read += 1

    def skip(self, key: str, reason: str) -> None:
        self.skipped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self._keep:
            examples.append(key)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def report(self) -> str:
        if not self.skipped:
            return f"read {self.read} samples, none skipped"
        parts = [f"{reason}: {n} (e.g. {', '.join(self.examples[reason])})" for reason, n in sorted(self.skipped.items())]
        return f"read {self.read} samples, skipped {self.total_skipped}: " + "; ".join(parts)

    def __repr__(self) -> str:
        return f"CorruptCounter({self.report()})"


def _decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # decode now: a truncated file fails here, not later in a training step
        return img.convert("RGB")


def _to_sample(key: str, image_bytes: bytes | None, caption, strict: bool,
               counter: CorruptCounter) -> Sample | None:
    """A checked Sample, or None after counting why it was skipped (raises instead when strict)."""
    problem, image = None, None
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            problem = "caption is not utf-8"
    if image_bytes is None:
        problem = "missing image"
    elif caption is None or not str(caption).strip():
        problem = problem or "missing caption"
    if problem is None:
        try:
            image = _decode_image(image_bytes)
        except Exception as err:  # noqa: BLE001 - PIL raises many types for bad data; all mean the same
            problem = f"undecodable image ({type(err).__name__})"
    if problem is not None:
        if strict:
            raise CorruptSampleError(f"corrupt sample {key!r}: {problem}")
        counter.skip(key, problem)
        return None
    counter.ok()
    return Sample(image=image, caption=str(caption).strip(), key=key)


def _may_be_partitioned() -> bool:
    """True in a DataLoader worker or a multi-process run, where one part may hold no shard at all."""
    try:
        import torch.distributed as dist
        from torch.utils.data import get_worker_info
    except ImportError:
        return False
    info = get_worker_info()
    return (info is not None and info.num_workers > 1) or (
        dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def _check_not_empty(what: str, counter: CorruptCounter, reads_before: int) -> None:
    if counter.read == reads_before and not _may_be_partitioned():
        raise EmptyDatasetError(f"no usable samples in {what} ({counter.report()})")


def expand_shards(urls: str | list[str]) -> list[str]:
    """The shards of a brace pattern or of a list of them (webdataset expands a single pattern only)."""
    from braceexpand import braceexpand

    return [u for pattern in ([urls] if isinstance(urls, str) else list(urls)) for u in braceexpand(pattern)]


def local_shards(urls: str | list[str]) -> list[str]:
    """Expand brace patterns and check that local shards exist (a missing shard is a config error)."""
    expanded = expand_shards(urls)
    if not expanded:
        raise EmptyDatasetError(f"no shards given: {urls!r}")
    missing = [u for u in expanded if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(expanded)} shards not found, e.g. {missing[:3]}")
    return expanded


def _first_present(sample: dict, fields: Iterable[str]):
    return next((sample[f] for f in fields if sample.get(f) is not None), None)


def shard_error_handler(urls, strict: bool, counter: CorruptCounter) -> Callable[[Exception], bool]:
    """A webdataset `handler` for tar data it cannot read at all (a truncated or damaged shard):
    counted as one skip named by its shard, or CorruptSampleError when strict."""
    def on_error(exn: Exception) -> bool:
        if strict:
            raise CorruptSampleError(f"unreadable shard data in {urls!r}: {exn}") from exn
        # webdataset appends the shard's url to the exception's args: name the shard, not a key
        where = next((a for a in reversed(exn.args) if isinstance(a, str)), "?")
        counter.skip(where[:200], "unreadable shard data")
        return True

    return on_error


def read_webdataset(urls: str | list[str], *, strict: bool = False, counter: CorruptCounter | None = None,
                    nodesplitter: Callable | None = None) -> Iterator[Sample]:
    """Samples of webdataset shards: local paths, brace patterns ("dir/train-{000000..000003}.tar")
    or URLs. Shards are read in order; under DDP each rank reads its share of the shards."""
    import webdataset as wds

    shards = local_shards(urls)
    counter = counter if counter is not None else CorruptCounter()
    before = counter.read
    dataset = wds.WebDataset(shards, shardshuffle=False, handler=shard_error_handler(urls, strict, counter),
                             empty_check=False,
                             nodesplitter=nodesplitter or wds.split_by_node)
    for raw in dataset:
        key = raw.get("__key__", "?")
        sample = _to_sample(key, _first_present(raw, IMAGE_EXTENSIONS), _first_present(raw, CAPTION_FIELDS),
                            strict, counter)
        if sample is not None:
            yield sample
    _check_not_empty(f"webdataset {urls!r}", counter, before)


def _image_bytes(value) -> bytes | None:
    """The encoded image of a `datasets` Image cell read with decode=False."""
    if value is None:
        return None
    if value.get("bytes") is not None:
        return value["bytes"]
    path = value.get("path")
    return Path(path).read_bytes() if path and os.path.isfile(path) else None


def _hf_key(row: dict, image_cell: dict | None, split: str, position: int) -> str:
    for column in ("key", "__key__", "id"):
        if row.get(column) is not None:
            return str(row[column])
    if image_cell and image_cell.get("path"):
        return Path(image_cell["path"]).stem
    return f"{split}-{position:09d}"


def read_hf_dataset(path: str | os.PathLike, *, split: str = "train", strict: bool = False,
                    counter: CorruptCounter | None = None) -> Iterator[Sample]:
    """Samples of a local Hugging Face datasets folder: an imagefolder with metadata.jsonl (caption
    column "text" or "caption") or parquet files. Read offline and streamed: nothing is cached."""
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    dataset = load_dataset(str(root), split=split, streaming=True)
    features = dataset.features or {}
    image_column = next((c for c, f in features.items() if isinstance(f, ImageFeature)), None)
    caption_column = next((c for c in ("text", "caption", "txt") if c in features), None)
    if image_column is None or caption_column is None:
        raise ValueError(f"{root} needs an image column and a caption column ('text' or 'caption'); "
                         f"it has {list(features)}")
    # Decode ourselves, so that one bad image is a counted skip, not an exception inside `datasets`.
    dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    counter = counter if counter is not None else CorruptCounter()
    before = counter.read
    for position, row in enumerate(dataset):
        cell = row.get(image_column)
        key = _hf_key(row, cell, split, position)
        try:
            image_bytes = _image_bytes(cell)
        except OSError:
            image_bytes = None
        sample = _to_sample(key, image_bytes, row.get(caption_column), strict, counter)
        if sample is not None:
            yield sample
    _check_not_empty(f"{root} (split {split!r})", counter, before)


def export_imagefolder(samples: Iterable[Sample], out_dir: str | os.PathLike) -> int:
    """Write samples as `<key>.png` + metadata.jsonl (file_name, text, key): a folder that
    `datasets.load_dataset(out_dir)` and `read_hf_dataset` read back. Returns the count written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for sample in samples:
        file_name = sample.key.replace("/", "__").replace(os.sep, "__") + ".png"
        sample.image.save(out / file_name, format="PNG")
        lines.append(json.dumps({"file_name": file_name, "text": sample.caption, "key": sample.key}))
    # metadata.jsonl last and atomically: a half-written folder has no metadata and reads as no dataset.
    tmp = out / ".metadata.jsonl.partial"
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, out / "metadata.jsonl")
    return len(lines)
