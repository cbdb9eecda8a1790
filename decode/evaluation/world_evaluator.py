"""The embedded world's attribute evaluator: a small CNN that says what is in each cell of the
3x3 grid (empty, a shape, or an emoji; the shape's colour; the object's size) and what the
background is (pattern, colour). It gives prompt alignment, the CLIP-score analogue of the world:
the share of the caption's attributes that the evaluator recognises in the image.

The evaluator folder is self-describing: its config holds the label spaces and the caption
grammar's phrase tables, so decode/ can parse a world caption without importing data/.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NONE = "none"  # label of an empty cell, of an emoji's colour, of an empty cell's size


@dataclass
class EvaluatorConfig:
    objects: list[str]          # shapes then emoji names; cell label 0 is "none" (empty)
    shapes: list[str]
    colours: list[str]
    sizes: list[str]
    cells: list[str]
    patterns: list[str]
    cell_phrases: dict[str, list[str]]       # cell -> every way a caption says it
    pattern_phrases: dict[str, list[str]]    # pattern -> templates with {c} for the colour
    image_size: int = 64
    width: int = 64
    world: str = "v2"     # the world version whose labels these are (folders written before v3 lack it)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Prediction:
    cell_object: Tensor   # [B, 9] index into ["none", *objects]
    cell_colour: Tensor   # [B, 9] index into ["none", *colours]
    cell_size: Tensor     # [B, 9] index into ["none", *sizes]
    bg_pattern: Tensor    # [B]
    bg_colour: Tensor     # [B]
    features: Tensor = field(repr=False)  # [B, F] embedding for precision / recall


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, 1, 1), nn.GroupNorm(8, cout), nn.SiLU())


class AttributeEvaluator(nn.Module):
    def __init__(self, cfg: EvaluatorConfig):
        super().__init__()
        self.config = cfg
        w = cfg.width
        # 64 px -> 32 -> 16 -> 8; the 8x8 map is pooled to the 3x3 grid of the world.
        self.trunk = nn.Sequential(_block(3, w, 1), _block(w, w, 2), _block(w, 2 * w, 2), _block(2 * w, 4 * w, 2))
        c = 4 * w
        self.cell_embed = nn.Parameter(torch.zeros(9, c))
        self.cell_mlp = nn.Sequential(nn.Linear(2 * c, 2 * c), nn.SiLU())
        self.object_head = nn.Linear(2 * c, 1 + len(cfg.objects))
        self.colour_head = nn.Linear(2 * c, 1 + len(cfg.colours))
        self.size_head = nn.Linear(2 * c, 1 + len(cfg.sizes))
        self.pattern_head = nn.Linear(c, len(cfg.patterns))
        self.bg_colour_head = nn.Linear(c, len(cfg.colours))

    def logits(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """images [B, 3, H, W] in [-1, 1] -> (logits per head, features [B, 10 * C])."""
        if images.shape[-1] != self.config.image_size:
            images = F.interpolate(images, size=self.config.image_size, mode="bilinear", antialias=True,
                                   align_corners=False)
        h = self.trunk(images)                                           # [B, C, 8, 8]
        glob = h.mean((2, 3))                                            # [B, C]
        cells = F.adaptive_avg_pool2d(h, 3).flatten(2).transpose(1, 2)   # [B, 9, C], row-major cells
        z = self.cell_mlp(torch.cat([cells + self.cell_embed, glob[:, None].expand_as(cells)], -1))
        out = {"cell_object": self.object_head(z), "cell_colour": self.colour_head(z),
               "cell_size": self.size_head(z), "bg_pattern": self.pattern_head(glob),
               "bg_colour": self.bg_colour_head(glob)}
        return out, torch.cat([glob, cells.flatten(1)], 1)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        logits, feats = self.logits(images)
        return Prediction(**{k: v.argmax(-1) for k, v in logits.items()}, features=feats)

    # --- labels -------------------------------------------------------------------------------
    def targets(self, attributes: list[dict]) -> dict[str, Tensor]:
        """Scene attributes (the generator's or a parsed caption's) -> label tensors per head."""
        cfg = self.config
        obj = torch.zeros(len(attributes), 9, dtype=torch.long)
        colour, size = torch.zeros_like(obj), torch.zeros_like(obj)
        pattern = torch.zeros(len(attributes), dtype=torch.long)
        bg = torch.zeros_like(pattern)
        for i, a in enumerate(attributes):
            for o in a["objects"]:
                c = cfg.cells.index(o["cell"])
                obj[i, c] = 1 + cfg.objects.index(o["name"])
                colour[i, c] = 1 + cfg.colours.index(o["colour"]) if o.get("colour") else 0
                size[i, c] = 1 + cfg.sizes.index(o["size"])
            pattern[i] = cfg.patterns.index(a["background"]["pattern"])
            bg[i] = cfg.colours.index(a["background"]["colour"])
        return {"cell_object": obj, "cell_colour": colour, "cell_size": size, "bg_pattern": pattern,
                "bg_colour": bg}


# --- alignment ------------------------------------------------------------------------------------
def _attribute_hits(pred: Prediction, targets: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """Per attribute: (recognised [B, ...] bool, counted [B, ...] bool). Cells the caption leaves empty
    do not count (a caption says what is there, not what is not)."""
    mentioned = targets["cell_object"] > 0                                  # [B, 9]
    coloured = targets["cell_colour"] > 0
    every = torch.ones_like(targets["bg_pattern"], dtype=torch.bool)
    return {"object": (pred.cell_object == targets["cell_object"], mentioned),
            "size": (pred.cell_size == targets["cell_size"], mentioned),
            "colour": (pred.cell_colour == targets["cell_colour"], coloured),
            "bg_pattern": (pred.bg_pattern == targets["bg_pattern"], every),
            "bg_colour": (pred.bg_colour == targets["bg_colour"], every)}


def alignment_scores(pred: Prediction, targets: dict[str, Tensor]) -> Tensor:
    """[B] share of the caption's attributes recognised: each mentioned object's identity and size
    in its cell (and a shape's colour), the background's pattern and colour."""
    hits, total = 0, 0
    for ok, counted in _attribute_hits(pred, targets).values():
        hits = hits + (ok & counted).reshape(len(ok), -1).sum(1)
        total = total + counted.reshape(len(ok), -1).sum(1)
    return hits.float() / total.float()


def attribute_accuracy(pred: Prediction, targets: dict[str, Tensor]) -> dict[str, float]:
    """Over a set of images, the share of each attribute recognised (what alignment is made of), and
    `object_anywhere`: a mentioned object drawn in any cell (identity without its position)."""
    acc = {name: float((ok & counted).sum()) / max(1, int(counted.sum()))
           for name, (ok, counted) in _attribute_hits(pred, targets).items()}
    mentioned = targets["cell_object"] > 0
    anywhere = (targets["cell_object"][:, :, None] == pred.cell_object[:, None, :]).any(-1) & mentioned
    acc["object_anywhere"] = float(anywhere.sum()) / max(1, int(mentioned.sum()))
    return acc


class CaptionParser:
    """Reads a caption of the world's grammar back into attributes; None when it is not one."""

    def __init__(self, cfg: EvaluatorConfig):
        alt = lambda words: "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # noqa: E731
        emoji = [o for o in cfg.objects if o not in cfg.shapes]
        cell_of = {p: cell for cell, phrases in cfg.cell_phrases.items() for p in phrases}
        self._cell_of, self._cells = cell_of, list(cfg.cells)
        self._object = re.compile(
            rf"\b(?:a|one|some) (?P<size>{alt(cfg.sizes)}) (?:(?P<colour>{alt(cfg.colours)}) "
            rf"(?P<shape>{alt(cfg.shapes)})|(?P<emoji>{alt(emoji)})) (?P<cell>{alt(cell_of)})(?=$|[ ,])")
        self._backgrounds = [
            (pattern, re.compile(r"\ban? " + re.escape(t).replace(re.escape("{c}"), rf"(?P<c>{alt(cfg.colours)})")
                                 + r" background\b"))
            for pattern, templates in cfg.pattern_phrases.items() for t in templates]

    def __call__(self, caption: str) -> dict | None:
        text = " ".join(caption.lower().split())
        objects = [{"kind": "shape" if m["shape"] else "emoji", "name": m["shape"] or m["emoji"],
                    "colour": m["colour"], "size": m["size"], "cell": self._cell_of[m["cell"]]}
                   for m in self._object.finditer(text)]
        background = next(({"pattern": p, "colour": m["c"]} for p, rx in self._backgrounds
                           if (m := rx.search(text))), None)
        if not objects or background is None or len({o["cell"] for o in objects}) != len(objects):
            return None
        return {"objects": sorted(objects, key=lambda o: self._cells.index(o["cell"])),
                "background": background}


def evaluator_world(folder: str | Path) -> str:
    """The world version an evaluator folder reads (its labels are that world's; folders before v3: v2)."""
    from decode.models.checkpoint import read_model_meta

    return read_model_meta(folder, kind="world_evaluator")["config"].get("world", "v2")


def load_evaluator(folder: str | Path, device: str | torch.device = "cpu") -> AttributeEvaluator:
    from decode.models.checkpoint import load_state_dict_strict, read_model_folder

    meta, state = read_model_folder(folder, kind="world_evaluator")
    model = AttributeEvaluator(EvaluatorConfig(**meta["config"]))
    load_state_dict_strict(model, state, source=str(folder))
    return model.eval().to(device)


@torch.no_grad()
def score_images(evaluator: "AttributeEvaluator", images_u8: Tensor, attributes: list[dict],
                 chunk: int = 128) -> tuple[Tensor, Tensor]:
    """(alignment [N], evaluator features [N, F]) of uint8 images against their prompts' attributes."""
    aligns, feats = [], []
    for start in range(0, len(images_u8), chunk):
        pred = evaluator.predict(images_u8[start:start + chunk].float() / 127.5 - 1.0)
        aligns.append(alignment_scores(pred, evaluator.targets(attributes[start:start + chunk])))
        feats.append(pred.features)
    return torch.cat(aligns), torch.cat(feats)


def object_hits(pred: Prediction, targets: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Per image [N]: the mentioned objects recognised in their cells, and the objects mentioned."""
    ok, counted = _attribute_hits(pred, targets)["object"]  # [N, 9] each
    return (ok & counted).sum(1), counted.sum(1)


def attributes_recognised(evaluator: "AttributeEvaluator", images_u8: Tensor, attributes: list[dict]
                          ) -> tuple[dict[str, float], tuple[Tensor, Tensor]]:
    """`attribute_accuracy` of uint8 images [N, 3, H, W] against their prompts' attributes, and the
    per-image `object_hits` behind its object share (one evaluator pass for both)."""
    pred = evaluator.predict(images_u8.float() / 127.5 - 1.0)
    targets = evaluator.targets(attributes)
    accuracy = {k: round(v, 4) for k, v in attribute_accuracy(pred, targets).items()}
    return accuracy, object_hits(pred, targets)


class AlignmentScorer:
    """Alignment of generated images with their prompts; None for a prompt outside the world's grammar."""

    def __init__(self, evaluator: AttributeEvaluator):
        self.evaluator, self.parse = evaluator, CaptionParser(evaluator.config)

    def __call__(self, images: Tensor, prompts: list[str]) -> list[float | None]:
        """images [B, 3, H, W] in [-1, 1], prompts [B]."""
        parsed = [self.parse(p) for p in prompts]
        keep = [i for i, a in enumerate(parsed) if a is not None]
        scores: list[float | None] = [None] * len(prompts)
        if keep:
            device = next(self.evaluator.parameters()).device
            pred = self.evaluator.predict(images[keep].float().to(device))
            targets = {k: v.to(device) for k, v in self.evaluator.targets([parsed[i] for i in keep]).items()}
            for i, s in zip(keep, alignment_scores(pred, targets).tolist()):
                scores[i] = s
        return scores


def load_alignment_scorer(ckpt: str | Path, device: str | torch.device = "cpu") -> AlignmentScorer:
    return AlignmentScorer(load_evaluator(ckpt, device))
