"""GridAR's verifier contract and the embedded world's verifier.

A verifier answers three questions (arXiv 2511.21185; PEERS.md 3):
- `prune`: can each partial canvas still become its prompt? GridAR's verifier answers "impossible"
  only when certain (an attribute already visibly wrong), never as a top-k cut.
- `reformulate`: the prompt with a layout clause written from what the canvas shows.
- `rank`: a score per finished image (the final choice of GridAR and Best-of-N alike).
Canvases are [N, 3, H, W] in [-1, 1] whose top `visible` share of rows was generated (the rest is
the visible rows tiled down, GridAR's `pad: repeat`); a verifier reads only the visible part.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from decode.evaluation.world_evaluator import NONE, AlignmentScorer, AttributeEvaluator, CaptionParser


class Verifier(Protocol):
    def prune(self, prompts: list[str], canvases: Tensor, visible: float) -> list[bool]:
        """Per canvas: True if it may still become its prompt (possible), False if certainly not."""

    def reformulate(self, prompts: list[str], canvases: Tensor, visible: float) -> list[str]:
        """Per canvas: its prompt with a layout clause (or unchanged when there is nothing to add)."""

    def rank(self, prompts: list[str], images: Tensor) -> list[float]:
        """Per finished image [N, 3, H, W]: a score, higher is better."""


def visible_cell_rows(visible: float, rows: int = 3) -> int:
    """How many rows of the world's 3 x 3 cell grid lie wholly in the top `visible` share of the image."""
    return int((visible + 1e-9) * rows)


class WorldVerifier:
    """The world evaluator as GridAR's verifier, reading world captions (CaptionParser).

    prune: impossible when the evaluator gives an attribute the caption states (a mentioned object's
    identity, or a shape's colour, in a cell wholly visible; the background's colour or pattern, seen in
    every visible row) a probability below 1 - `certainty`. Partial strips are not what the evaluator was
    trained on, so only a confident contradiction counts (GridAR's "impossible only if certain"): at 0.99,
    real scenes (training seeds) are judged impossible at 0.3-2.3 % of stages, other scenes' captions at
    87-94 % (scripts/calibrate_world_verifier.py).
    reformulate: world captions already fix each object's cell, so the layout clause this verifier can
    write is what is still to be drawn: the caption's objects in cells not yet wholly visible, with the
    background, in the world's grammar (a caption the target was trained on). Nothing visible yet, or
    nothing left to draw: the prompt unchanged.
    rank: the evaluator's alignment with the caption."""

    def __init__(self, evaluator: AttributeEvaluator, certainty: float = 0.99):
        if not 0.5 <= certainty < 1:
            raise ValueError(f"verifier certainty must be in [0.5, 1), got {certainty}")
        self.evaluator, self.certainty = evaluator, certainty
        self.parse = CaptionParser(evaluator.config)
        self.scorer = AlignmentScorer(evaluator)
        self.config = evaluator.config

    def _attributes(self, prompts: list[str]) -> list[dict]:
        parsed = [self.parse(p) for p in prompts]
        bad = [p for p, a in zip(prompts, parsed) if a is None]
        if bad:
            raise ValueError(f"the world verifier reads captions of the world's grammar; not one: {bad[0]!r}")
        return parsed

    @torch.no_grad()
    def prune(self, prompts: list[str], canvases: Tensor, visible: float) -> list[bool]:
        attrs = self._attributes(prompts)
        device = next(self.evaluator.parameters()).device
        logits, _ = self.evaluator.logits(canvases.float().to(device))
        probs = {k: v.softmax(-1).cpu() for k, v in logits.items()}
        targets = self.evaluator.targets(attrs)
        doubt = 1.0 - self.certainty
        seen_cells = 3 * visible_cell_rows(visible)  # row-major cells 0 .. seen_cells - 1
        possible = []
        # padding a partial canvas (tiling its rows down) makes a pattern of its own (a gradient tiled
        # twice is no gradient): the background's pattern is judged on whole images only
        background = ("bg_colour", "bg_pattern") if visible >= 1 else ("bg_colour",)
        for i in range(len(prompts)):
            wrong = any(float(probs[k][i, targets[k][i]]) < doubt for k in background)
            for cell in range(seen_cells):
                if targets["cell_object"][i, cell] > 0:
                    wrong |= float(probs["cell_object"][i, cell, targets["cell_object"][i, cell]]) < doubt
                if targets["cell_colour"][i, cell] > 0:
                    wrong |= float(probs["cell_colour"][i, cell, targets["cell_colour"][i, cell]]) < doubt
            possible.append(not wrong)
        return possible

    def reformulate(self, prompts: list[str], canvases: Tensor, visible: float) -> list[str]:
        seen = set(self.config.cells[:3 * visible_cell_rows(visible)])
        out = []
        for prompt, attrs in zip(prompts, self._attributes(prompts)):
            left = [o for o in attrs["objects"] if o["cell"] not in seen]
            out.append(prompt if not seen or not left or len(left) == len(attrs["objects"])
                       else self.caption(left, attrs["background"]))
        return out

    def caption(self, objects: list[dict], background: dict) -> str:
        """A caption in the world's grammar (its first phrasing of each part): objects, then background."""
        phrases = [f"a {o['size']} {o['colour'] + ' ' if o.get('colour') and o['colour'] != NONE else ''}"
                   f"{o['name']} {self.config.cell_phrases[o['cell']][0]}" for o in objects]
        listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + f" and {phrases[-1]}"
        bg = self.config.pattern_phrases[background["pattern"]][0].format(c=background["colour"])
        return f"{listed} on {'an' if bg[0] in 'aeiou' else 'a'} {bg} background"

    def rank(self, prompts: list[str], images: Tensor) -> list[float]:
        self._attributes(prompts)
        return [float(s) for s in self.scorer(images, prompts)]
