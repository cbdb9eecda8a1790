"""Writing the embedded world as webdataset shards: a train and a held-out split, each shard
written under a temporary name and renamed when complete, and a manifest.json written last.

Members of each sample: `<key>.png` (the image), `<key>.txt` (the caption), `<key>.json` (the
attributes). Held-out scene i is generator scene HELDOUT_OFFSET + i, so no held-out index is ever
a training index. Reading them back is data/sources.py. `main` is the command line of `python -m data.shards`.
"""
from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from data.world import ATTRIBUTION, DEFAULT_WORLD, WORLDS, SceneGenerator, preview_grid

HELDOUT_OFFSET = 1 << 40  # far above any training index
SPLITS = ("train", "heldout")
MANIFEST = "manifest.json"


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def shard_pattern(split: str, num_shards: int) -> str | None:
    """The brace pattern webdataset expands to the split's shards, e.g. "train-{000000..000003}.tar"."""
    if num_shards == 0:
        return None
    return f"{split}-{{{0:06d}..{num_shards - 1:06d}}}.tar"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


class _RollingShardWriter:
    """Writes samples to `<split>-NNNNNN.tar`, a new shard every `shard_size` samples. Each shard is
    written as a hidden `.partial` file and renamed when closed, so a reader never sees half a shard."""

    def __init__(self, out_dir: Path, split: str, shard_size: int):
        self.out_dir, self.split, self.shard_size = out_dir, split, shard_size
        self.paths: list[Path] = []
        self._writer, self._file, self._in_shard = None, None, 0

    def write(self, sample: dict) -> None:
        if self._writer is None or self._in_shard == self.shard_size:
            self._roll()
        self._writer.write(sample)
        self._in_shard += 1

    def _roll(self) -> None:
        self.close()
        final = self.out_dir / shard_name(self.split, len(self.paths))
        self._file = open(final.with_name(f".{final.name}.partial"), "wb")  # noqa: SIM115 - closed in close()
        # A fixed mtime keeps shards identical bit for bit between runs with the same arguments.
        self._writer = wds.TarWriter(self._file, mtime=0.0)
        self.paths.append(final)
        self._in_shard = 0

    def close(self) -> list[Path]:
        if self._writer is not None:
            self._writer.close()  # a file object passed in stays open: close it ourselves
            self._file.close()
            os.replace(self._file.name, self.paths[-1])
            self._writer, self._file = None, None
        return self.paths


def _encode_png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _write_split(generator: SceneGenerator, out_dir: Path, split: str, indices: range, shard_size: int,
                 bar: tqdm) -> dict:
    writer = _RollingShardWriter(out_dir, split, shard_size)
    try:
        for index in indices:
            scene = generator.scene(index)
            writer.write({"__key__": scene.key, "png": _encode_png(scene.image), "txt": scene.caption,
                          "json": json.dumps(scene.attributes, sort_keys=True).encode()})
            bar.update(1)
    finally:
        paths = writer.close()
    _remove_stale_shards(out_dir, split, keep=set(paths))
    return {"count": len(indices), "shards": len(paths), "pattern": shard_pattern(split, len(paths)),
            "first_index": indices.start}


def _remove_stale_shards(out_dir: Path, split: str, keep: set[Path]) -> None:
    """Shards of an earlier, larger run in the same folder would otherwise linger beside the new ones."""
    for path in out_dir.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        if path not in keep:
            path.unlink()


def write_world_shards(out_dir: str | os.PathLike, num_train: int, num_heldout: int, seed: int = 0,
                       image_size: int = 64, shard_size: int = 1000, *, progress: bool = True,
                       world: str | None = None) -> dict:
    """Write `num_train` and `num_heldout` world scenes as webdataset shards in `out_dir`; returns
    the manifest (counts, shard patterns, seed, attribution), also written as manifest.json."""
    if num_train < 0 or num_heldout < 0 or num_train + num_heldout == 0:
        raise ValueError(f"need a positive number of scenes, got num_train={num_train}, num_heldout={num_heldout}")
    if num_train >= HELDOUT_OFFSET:
        raise ValueError(f"num_train must stay below {HELDOUT_OFFSET} so held-out indices stay disjoint")
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generator = SceneGenerator(image_size=image_size, seed=seed, world=world)
    ranges = {"train": range(num_train), "heldout": range(HELDOUT_OFFSET, HELDOUT_OFFSET + num_heldout)}
    with tqdm(total=num_train + num_heldout, desc="world shards", unit="scene", disable=not progress) as bar:
        splits = {name: _write_split(generator, out, name, ranges[name], shard_size, bar) for name in SPLITS}
    manifest = {
        "format": "webdataset", "members": {"png": "image", "txt": "caption", "json": "attributes"},
        "generator": "data.world.SceneGenerator", "world": generator.world, "seed": seed, "image_size": image_size,
        "texture": generator.texture,
        "shard_size": shard_size, "heldout_index_offset": HELDOUT_OFFSET, "splits": splits,
        "attribution": ATTRIBUTION, "license": "images made from OpenMoji: CC BY-SA 4.0",
    }
    _atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def split_urls(out_dir: str | os.PathLike, split: str = "train") -> str:
    """The brace pattern of one split of a folder written by `write_world_shards`, for `read_webdataset`."""
    manifest_path = Path(out_dir) / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: write the shards first (python -m data.shards OUT_DIR)")
    splits = json.loads(manifest_path.read_text())["splits"]
    if split not in splits or not splits[split]["pattern"]:
        raise ValueError(f"split {split!r} has no shards in {out_dir}; available: "
                         f"{[s for s, v in splits.items() if v['pattern']]}")
    return str(Path(out_dir) / splits[split]["pattern"])


def main(argv: list[str] | None = None) -> dict:
    """`python -m data.shards OUT_DIR [--train N --heldout N --seed S --image-size 64 ...]`."""
    parser = argparse.ArgumentParser(prog="python -m data.shards",
                                     description="Write the embedded world as webdataset shards. " + ATTRIBUTION)
    parser.add_argument("out_dir", help="folder for train-*.tar, heldout-*.tar and manifest.json")
    parser.add_argument("--train", type=int, default=10_000, help="number of training scenes")
    parser.add_argument("--heldout", type=int, default=1_000, help="number of held-out scenes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world", default=None, choices=WORLDS, help=f"world version (default {DEFAULT_WORLD})")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=1_000, help="scenes per shard")
    parser.add_argument("--preview", default=None, help="also write a 3x3 preview grid to this PNG")
    args = parser.parse_args(argv)
    manifest = write_world_shards(args.out_dir, args.train, args.heldout, seed=args.seed,
                                  image_size=args.image_size, shard_size=args.shard_size, world=args.world)
    if args.preview:
        gen = SceneGenerator(image_size=args.image_size, seed=args.seed, world=args.world)
        preview_grid([gen.scene(i) for i in range(9)]).save(args.preview)
    print(f"wrote {manifest['splits']['train']['count']} train and {manifest['splits']['heldout']['count']} "
          f"held-out scenes to {args.out_dir}")
    return manifest


if __name__ == "__main__":
    main()
