"""Code shards: image-text shards encoded once into VQ codes and caption token states.

Training a target re-encoding every image with the VQ and every caption with the text encoder each
epoch wastes most of its time; this module owns doing that once. `preprocess_shards` writes
webdataset shards `{prefix}-NNNNNN.tar` whose samples hold `<key>.codes.npy` (int16, or int32 for
codebooks of 32768 and more), `<key>.text.npy` (float16 states of the valid caption tokens only)
and `<key>.txt`, plus `manifest-{prefix}.json`. Output shard k holds input samples
k*shard_size .. (k+1)*shard_size-1 in reading order, so a rerun skips shards already complete.
`ensure_code_shards` builds them from the embedded world for a training run when asked to.
data/code_shards.py reads them back. `main` is the command line of `python -m data.preprocess`.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from data.code_shards import FORMAT, manifest_name
from data.images import image_to_tensor
from data.shards import shard_name, shard_pattern
from data.sources import CorruptCounter, Sample, read_hf_dataset, read_webdataset
from decode.models.text import load_text_encoder, minilm_path
from decode.models.vq import VQModel, load_vq

log = logging.getLogger(__name__)


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
