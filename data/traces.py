"""Skip-scheduler traces on disk (decode.strategies.learned_skip.TraceRecorder), as webdataset shards.

One sample per decoded image: `features.npy` float32 [S, F] (decode.strategies.skipping.step_features per
step) and `labels.npy` float32 [S, 4] (step, tokens the selector would commit, how many of them
verification kept, their mean latent cosine with the verified tokens). Shards are written whole under temporary names and renamed; a manifest
records the settings. `load_traces` reads them back into tensors for training.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from data.features import _npy
from data.preprocess import _atomic_shard, _atomic_write_text
from data.shards import shard_name, shard_pattern
from decode.strategies.learned_skip import TraceStep
from decode.strategies.skipping import NUM_STEP_FEATURES

MANIFEST = "traces.json"


@dataclass
class Traces:
    features: torch.Tensor  # [S, F]
    proposed: torch.Tensor  # [S]
    kept: torch.Tensor      # [S]
    similarity: torch.Tensor  # [S]
    image: torch.Tensor     # [S] image index (a split keeps whole images together)

    @property
    def safe(self) -> torch.Tensor:
        return (self.kept >= self.proposed).float()

    def target(self, label: str) -> torch.Tensor:
        """Training target in [0, 1]: exact (all tokens kept), kept (share kept), latent (similarity)."""
        if label == "exact":
            return self.safe
        if label == "kept":
            return self.kept.float() / self.proposed.float().clamp_min(1)
        if label == "latent":
            return self.similarity.clamp(0, 1)
        raise ValueError(f"trace label must be exact, kept or latent; got {label!r}")

    def __len__(self) -> int:
        return self.features.shape[0]


def image_records(steps: list[TraceStep], first_image: int, num_rows: int) -> list[dict]:
    """A batch's recorded steps -> one webdataset record per image."""
    out = []
    for row in range(num_rows):
        mine = [s for s in steps if s.image == row]
        feats = np.array([s.features for s in mine], dtype=np.float32).reshape(len(mine), NUM_STEP_FEATURES)
        labels = np.array([[s.step, s.proposed, s.kept, s.similarity] for s in mine],
                          dtype=np.float32).reshape(len(mine), 4)
        out.append({"__key__": f"{first_image + row:08d}", "features.npy": _npy(feats), "labels.npy": _npy(labels)})
    return out


def write_shard(out_dir: Path, split: str, number: int, records: list[dict]) -> Path:
    path = out_dir / shard_name(split, number)
    with _atomic_shard(path) as sink:
        for rec in records:
            sink.write(rec)
    return path


def write_manifest(out_dir: Path, meta: dict) -> None:
    _atomic_write_text(out_dir / MANIFEST, json.dumps(meta, indent=2) + "\n")


def read_manifest(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def load_traces(out_dir: str | Path, split: str) -> Traces:
    """Every step of a split's shards, in image order."""
    meta = read_manifest(out_dir)
    if meta is None:
        raise FileNotFoundError(f"{out_dir}: no {MANIFEST} (build traces with python -m train scheduler)")
    n = meta["shards"][split]
    pattern = shard_pattern(split, n)
    if pattern is None:
        raise ValueError(f"{out_dir}: the {split} split has no shards")
    feats, labels, images = [], [], []
    for sample in wds.WebDataset(str(Path(out_dir) / pattern), shardshuffle=False, empty_check=False).decode():
        f, lab = sample["features.npy"], sample["labels.npy"]
        feats.append(torch.from_numpy(f))
        labels.append(torch.from_numpy(lab))
        images.append(torch.full((len(f),), int(sample["__key__"])))
    lab = torch.cat(labels)
    return Traces(torch.cat(feats), lab[:, 1].long(), lab[:, 2].long(), lab[:, 3], torch.cat(images))
