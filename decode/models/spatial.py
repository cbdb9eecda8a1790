"""Spatial draft heads (SSD, arXiv 2606.20543; shared/spec/ALGORITHMS.md 10): light heads on the frozen
target's last-layer features that predict tokens to the right and one grid row below.

The target's feature f_t at input token t predicts token t + 1 through its LM head. Head `right_j`
maps f_t to a feature whose LM head gives token t + 1 + j (j = 1 .. right); head `below` to one that
gives token t + 1 + W, the token under t + 1 (W the grid width). Each head is a residual block
(Medusa's: f + W2 silu(W1 f), W2 zero at init, so an untrained head starts as the target's own next
token prediction). They are stateless: a row of the wavefront drafts from the features of its
newest verified token, with no cache of its own (decode/core/lanes.py; the LaneDrafting contract).
SSD's code is not released: the head shape and the offsets are our reading of its abstract.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from decode.models.checkpoint import FolderConfig, load_state_dict_strict, read_model_folder, save_model_folder

KIND = "spatial_heads"


@dataclass(frozen=True)
class SpatialConfig(FolderConfig):
    dim: int
    vocab_size: int
    block_size: int            # image tokens of the target (a square grid: the width is its root)
    cls_token_num: int         # the target's prefix slots
    right: int = 3             # heads for tokens +2 .. +right + 1 after the feature's position
    below: bool = True         # a head for the token one grid row below the next one
    target_fingerprint: str = ""

    @property
    def width(self) -> int:
        return math.isqrt(self.block_size)

    def offsets(self) -> dict[str, int]:
        """Head name -> how many tokens past the target's own next token it predicts."""
        heads = {f"right{j}": j for j in range(1, self.right + 1)}
        if self.below:
            heads["below"] = self.width
        return heads



class ResidualHead(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.up, self.down = nn.Linear(dim, dim), nn.Linear(dim, dim)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, f: Tensor) -> Tensor:
        return f + self.down(nn.functional.silu(self.up(f)))


class SpatialHeads(nn.Module):
    def __init__(self, cfg: SpatialConfig):
        super().__init__()
        if cfg.right < 0 or (cfg.right == 0 and not cfg.below):
            raise ValueError(f"spatial heads need right >= 1 or below, got right={cfg.right}, below={cfg.below}")
        if cfg.width ** 2 != cfg.block_size:
            raise ValueError(f"spatial heads need a square token grid; the target makes {cfg.block_size} tokens")
        self.config = cfg
        self.heads = nn.ModuleDict({name: ResidualHead(cfg.dim) for name in cfg.offsets()})

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        """Target features [..., D] -> each head's predicted feature [..., D] (read out by the target's head)."""
        return {name: head(features) for name, head in self.heads.items()}


def save_spatial(folder: str | Path, heads: SpatialHeads, extra: dict | None = None) -> Path:
    return save_model_folder(folder, heads, heads.config.to_dict(), kind=KIND, extra=extra)


def load_spatial(folder: str | Path, target) -> SpatialHeads:
    """Heads from a folder; refused when they were trained for a target of another shape or weights."""
    from decode.models.drafter import target_fingerprint
    from decode.models.checkpoint import CheckpointError, fingerprint_matches

    meta, state = read_model_folder(folder, kind=KIND)
    cfg = SpatialConfig.from_dict(meta["config"])
    source = getattr(target, "gpt", target)
    theirs = (target.hidden_size, target.vocab_size, target.num_image_tokens)
    if (cfg.dim, cfg.vocab_size, cfg.block_size) != theirs:
        raise CheckpointError(f"{folder}: spatial heads for (width, vocabulary, grid tokens) "
                              f"{(cfg.dim, cfg.vocab_size, cfg.block_size)}, the target has {theirs}")
    fingerprint = functools.partial(target_fingerprint, source)
    if cfg.target_fingerprint and not fingerprint_matches(cfg.target_fingerprint, fingerprint):
        raise CheckpointError(f"{folder}: spatial heads were trained for a target with fingerprint "
                              f"{cfg.target_fingerprint}, this target's gives {fingerprint()}")
    heads = SpatialHeads(cfg)
    load_state_dict_strict(heads, state, source=str(folder))
    return heads.to(device=target.device, dtype=target.dtype).eval()
