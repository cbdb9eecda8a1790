"""Classifier-free guidance as every target adapter applies it: the batch runs as G groups of rows
(cond; null under CFG; GridAR's refined prompt under 3-way guidance), whose logits combine into one
distribution. The groups are the adapters' business alone: the engine sees combined logits and
features [G, B, T, D]."""
from __future__ import annotations

from torch import Tensor

from decode.core.sampling import cfg_combine, cfg_three_way


class Guided:
    """What an adapter with `cfg_scale` and `three_way` gets: its groups and how logits combine."""
    cfg_scale: float = 1.0
    three_way: bool = False

    def _check_guidance(self) -> None:
        if self.three_way and not self.guided:
            raise ValueError(f"3-way guidance needs cfg_scale > 1 (got {self.cfg_scale}): it adds a direction to CFG's")

    @property
    def guided(self) -> bool:
        return self.cfg_scale > 1.0  # guidance applies only above 1 (LlamaGen, Janus)

    @property
    def groups(self) -> int:
        return 3 if self.three_way else 2 if self.guided else 1

    def combine(self, logits: Tensor) -> Tensor:
        """[G, B, T, V] per-group logits -> [B, T, V] guided logits."""
        if self.three_way:
            return cfg_three_way(logits[0], logits[1], logits[2], self.cfg_scale)
        return cfg_combine(logits[0], logits[1], self.cfg_scale) if self.guided else logits[0]

    def group_rows(self, batch: int, rows: list[int]) -> list[int]:
        """Cache rows of image rows `rows` in every group (the cache holds G * batch rows, group-major)."""
        return [r + i * batch for i in range(self.groups) for r in rows]
