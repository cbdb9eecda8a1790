"""Image tensors for training: from the world generator (endless, deterministic by index) or
from image-text shards. Images become [3, H, W] float tensors in [-1, 1], LlamaGen's range."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from decode.evaluation.image_sets import centre_square


def image_to_tensor(img: Image.Image, size: int | None = None) -> torch.Tensor:
    """PIL image -> [3, H, W] in [-1, 1]; resized (centre-cropped to a square first) when `size` is given."""
    img = img.convert("RGB")
    if size is not None:
        img = centre_square(img, (size, size))
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # [H, W, 3]
    return arr.permute(2, 0, 1).float() / 127.5 - 1.0


class WorldImages(Dataset):
    """Scenes `start .. start + length - 1` of the embedded world's generator (`texture` None: the
    world's default grain; `world` None: the default world version)."""

    def __init__(self, length: int, image_size: int = 64, seed: int = 0, start: int = 0,
                 texture: float | None = None, world: str | None = None):
        from data.world import SceneGenerator

        self.generator = SceneGenerator(image_size=image_size, seed=seed, texture=texture, world=world)
        self.length, self.start = int(length), int(start)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        return image_to_tensor(self.generator.scene(self.start + i).image)


class ShardImages(IterableDataset):
    """Images of webdataset image-text shards (local paths or brace patterns)."""

    def __init__(self, urls: str, image_size: int):
        self.urls, self.image_size = urls, image_size

    def __iter__(self):
        from data.sources import read_webdataset

        for sample in read_webdataset(self.urls):
            yield image_to_tensor(sample.image, self.image_size)


class WorldScenes(Dataset):
    """(image [3, H, W] in [-1, 1], attributes) of scenes `start .. start + length - 1`: the labelled
    view of the world, for the attribute evaluator."""

    def __init__(self, length: int, image_size: int = 64, seed: int = 0, start: int = 0,
                 texture: float | None = None, world: str | None = None):
        from data.world import SceneGenerator

        self.generator = SceneGenerator(image_size=image_size, seed=seed, texture=texture, world=world)
        self.length, self.start = int(length), int(start)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        scene = self.generator.scene(self.start + i)
        return image_to_tensor(scene.image), scene.attributes


def collate_scenes(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    images, attributes = zip(*batch)
    return torch.stack(images), list(attributes)
