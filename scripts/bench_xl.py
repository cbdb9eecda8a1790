"""`make bench-xl`: speed at LlamaGen-XL size, each method replaying its own decisions on world prompts.

1. On `trace_prompts` held-out world prompts, each method decodes with the shipped world target and
   drafter and records its decisions (decode/evaluation/replay.py); the world run's quality
   (alignment, target NLL) is kept beside them.
2. A LlamaGen t2i model at `size` (random weights in the official layout, `num_tokens` image tokens,
   CFG `cfg_scale`, caption features of the official width) and a drafter of its width decode the
   same number of images, each method replaying its trace: every pass is real work at real size.
3. `auto` is tree=auto at that size: the acceptance each tree would have had, from a world
   calibration of `auto_method`; the cost of each tree, timed at that size; then `auto_method`
   decodes the world prompts with the chosen tree (or plain AR) and is replayed like the others.

Writes results.csv, results.md, results.json and results.png into out_dir.

python scripts/bench_xl.py                     # XL, batch 1, 256 tokens
python scripts/bench_xl.py size=B batch_size=2 out_dir=outputs/bench_b
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.shards import HELDOUT_OFFSET  # noqa: E402
from data.world import SceneGenerator  # noqa: E402
from decode.api import DTYPES, build_components, condition_for, decode_batch, make_method, pick_device  # noqa: E402
from decode.budget import AutoTree, calibrate, decide, time_candidates  # noqa: E402
from decode.core.engine import Method, generate  # noqa: E402
from decode.core.sampling import SamplingParams, row_generators  # noqa: E402
from decode.core.trees import TreeParams  # noqa: E402
from decode.evaluation.metrics import write_tables  # noqa: E402
from decode.evaluation.quality import to_uint8  # noqa: E402
from decode.evaluation.replay import Trace, recording, replaying  # noqa: E402
from decode.evaluation.world_evaluator import evaluator_world, load_evaluator, score_images  # noqa: E402
from decode.models.drafter import Drafter, DrafterConfig  # noqa: E402
from decode.models.spatial import SpatialConfig, SpatialHeads  # noqa: E402
from decode.models.target import Condition, LlamaGenTarget, build_gpt, gpt_config  # noqa: E402
from decode.models.target.llamagen_gpt import LlamaGenGPT  # noqa: E402
from decode.pipeline import image_seed  # noqa: E402
from decode.resolvers import register_resolvers, reporting_input_errors  # noqa: E402
from decode.strategies.registry import build_method, resolve_method  # noqa: E402

COLUMNS = ["label", "method", "step_compression", "world_step_compression", "speedup_vs_ar", "latency_s", "nfe",
           "tree_size", "tree_depth", "steps_past_trace", "world_alignment", "world_target_nll", "device", "dtype",
           "batch_size", "size"]
REPLAYED = ("eagle2", "lantern_pp", "vvs", "spatial")


def check(cfg: DictConfig) -> None:
    """Bad input before any model loads."""
    unknown = sorted(set(cfg.runs) - {"ar", "auto", *REPLAYED})
    if unknown or "ar" not in cfg.runs:
        raise ValueError(f"runs must include ar and be among ar, auto, {', '.join(REPLAYED)}; got {list(cfg.runs)}")
    for key in ("batch_size", "trace_prompts", "num_tokens"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {cfg[key]!r}")
    if "spatial" in cfg.runs and cfg.batch_size != 1:
        raise ValueError(f"the spatial row decodes one image at a time (rows accept different lengths): batch_size "
                         f"must be 1, got {cfg.batch_size}")
    for row, why in (("spatial", "its wavefront passes change shape every step"),
                     ("auto", "tree=auto times many tree sizes")):
        if cfg.static_shapes and cfg.compile and row in cfg.runs:
            raise ValueError(f"static_shapes with compile specialises each graph to one shape, and {why} (it would "
                             f"recompile each time): leave {row} out of runs")
    if cfg.trace_prompts % cfg.batch_size:
        raise ValueError(f"trace_prompts ({cfg.trace_prompts}) must be a multiple of batch_size ({cfg.batch_size})")
    gpt_config(cfg.size)  # an unknown size names the known ones
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {cfg.dtype!r}")


def big_config(cfg: DictConfig):
    return gpt_config(cfg.size, model_type="t2i", vocab_size=cfg.vocab_size, block_size=cfg.num_tokens,
                      cls_token_num=cfg.cls_token_num, caption_dim=cfg.caption_dim)


def check_memory(cfg: DictConfig, device: torch.device) -> None:
    """The target's and drafter's weights, counted without allocating them, against the device's memory."""
    with torch.device("meta"):
        gpt = LlamaGenGPT(big_config(cfg))
        drafter = Drafter(DrafterConfig.for_target(gpt, target_fingerprint="meta"))
    params = sum(p.numel() for m in (gpt, drafter) for p in m.parameters())
    need = params * DTYPES[cfg.dtype].itemsize * 1.2  # + activations, KV cache, the world models
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > free:
        raise MemoryError(f"size={cfg.size} in {cfg.dtype} needs about {need / 2**30:.1f} GiB "
                          f"({params / 1e6:.0f} M parameters), {free / 2**30:.1f} GiB is free on {device}")


def world_runs(cfg: DictConfig, device) -> tuple[dict, dict, object]:
    """Each replayed method's trace and quality on the world prompts, and what auto needs."""
    configs = {name: resolve_method(name) for name in REPLAYED if name in cfg.runs or name == cfg.auto_method}
    world_cfg = OmegaConf.create({**OmegaConf.to_container(cfg, resolve=True), "drafter": {"ckpt": cfg.drafter_ckpt}})
    parts = build_components(world_cfg, device, methods=list(configs.values()))
    evaluator = load_evaluator(cfg.evaluator_ckpt)
    gen = SceneGenerator(image_size=64, seed=0, world=evaluator_world(cfg.evaluator_ckpt))
    scenes = [gen.scene(HELDOUT_OFFSET + i) for i in range(cfg.trace_prompts)]
    return parts, configs, (scenes, evaluator)


def trace_world(parts, method: Method, name: str, scenes, evaluator, cfg, sampling) -> tuple[Trace, dict]:
    trace, images, nll, passes = Trace(name, cfg.num_tokens), [], [], []
    for start in range(0, len(scenes), cfg.batch_size):
        batch = scenes[start:start + cfg.batch_size]
        recorded, events = recording(method, len(batch))
        out = decode_batch(parts, [s.caption for s in batch], recorded,
                           [image_seed(0, start + i, 0) for i in range(len(batch))], sampling,
                           num_tokens=cfg.num_tokens, nll=True)
        trace.images.extend(events)
        images.append(to_uint8(out.images).cpu())
        nll.extend(out.nll.tolist())
        passes.extend(out.generation.nfe.tolist())
    align, _ = score_images(evaluator, torch.cat(images), [s.attributes for s in scenes])
    return trace, {"world_alignment": float(align.mean()), "world_target_nll": sum(nll) / len(nll),
                   # the run's own passes (a wavefront verifies several rows' acceptances in one pass)
                   "world_step_compression": cfg.num_tokens * len(passes) / max(1, sum(passes))}


def decoded_tree(config) -> TreeParams | None:
    """The tree a replayed method decodes with at its defaults: EAGLE-2's dynamic one, a static shape
    (LANTERN++'s, VVS's default), or None (the wavefront's chains)."""
    if config.drafting == "static":
        return TreeParams(static=config.knobs["static_tree"])
    return TreeParams() if config.drafting == "eagle" else None


def big_models(cfg: DictConfig, device, dtype):
    gpt = build_gpt(None, size=cfg.size, model_type="t2i", vocab_size=cfg.vocab_size, block_size=cfg.num_tokens,
                    cls_token_num=cfg.cls_token_num, caption_dim=cfg.caption_dim).to(device=device, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        drafter = Drafter(DrafterConfig.for_target(gpt, target_fingerprint="meta")).eval().to(device=device, dtype=dtype)
    codebook = torch.randn(cfg.vocab_size, 8, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)  # right / below heads of the world's shape at this size (method=spatial)
        heads = SpatialHeads(SpatialConfig(gpt.config.dim, cfg.vocab_size, cfg.num_tokens, cfg.cls_token_num,
                                           right=4)).eval().to(device=device, dtype=dtype)
    if cfg.compile:
        from decode.api import compile_models

        compile_models(cfg.compile, gpt, drafter, static=cfg.static_shapes)
    return LlamaGenTarget(gpt, cfg_scale=cfg.cfg_scale), drafter, codebook, heads


def big_conditions(cfg: DictConfig, n: int, device, dtype) -> list[Condition]:
    """Caption features of the official width (random: the replay needs their shape, not their meaning)."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(n, cfg.cls_token_num, cfg.caption_dim, generator=g).to(device=device, dtype=dtype)
    return [Condition(feats[s:s + cfg.batch_size]) for s in range(0, n, cfg.batch_size)]


def timed_decode(target, cond: Condition, method: Method, seeds: list[int], sampling, num_tokens: int,
                 static_shapes: bool = False):
    return generate(target, cond, num_tokens=num_tokens, sampling=sampling, method=method,
                    generators=row_generators(seeds, target.device), static_shapes=static_shapes)


def replay_row(label: str, big, conds, method_of, trace: Trace | None, cfg, sampling) -> dict:
    """Decode every condition batch at size, replaying `trace` (None: the method as it is, e.g. AR)."""
    target = big[0]
    warm = method_of() if trace is None else replaying(method_of(), trace.images[:cfg.batch_size])[0]
    static = bool(cfg.static_shapes) and warm.schedule is None  # a wavefront's passes have no fixed widths
    # warm-up, untimed: 16 tokens; a wavefront needs its whole grid, so its first image, replayed once; with
    # static shapes the whole image too (the caches' sizes, hence every pass's shape, follow the image length)
    warm_tokens = min(16, cfg.num_tokens) if warm.schedule is None and not static else cfg.num_tokens
    timed_decode(target, conds[0], warm, list(range(cfg.batch_size)), sampling, warm_tokens, static)
    latency, nfe, past_end = [], [], 0
    for i, cond in enumerate(conds):
        seeds = [image_seed(1, i * cfg.batch_size + j, 0) for j in range(cond.batch)]
        method, cursor = (method_of(), None) if trace is None else replaying(
            method_of(), trace.images[i * cfg.batch_size:(i + 1) * cfg.batch_size])
        t0 = time.perf_counter()
        gen = timed_decode(target, cond, method, seeds, sampling, cfg.num_tokens, static)
        latency.append(time.perf_counter() - t0)
        nfe.extend(gen.nfe.tolist())
        past_end += cursor.past_end if cursor else 0
        print(f"  {label} batch {i}: {latency[-1]:.2f} s, NFE {gen.nfe.tolist()}", flush=True)
    mean_nfe = sum(nfe) / len(nfe)
    return {"label": label, "latency_s": sum(latency) / len(latency), "nfe": mean_nfe,
            "step_compression": cfg.num_tokens / max(mean_nfe, 1e-9), "steps_past_trace": past_end}


@hydra.main(version_base="1.3", config_path=str(REPO / "conf"), config_name="bench_xl")
@reporting_input_errors
def main(cfg: DictConfig) -> None:
    check(cfg)
    device, dtype = pick_device(cfg.device), DTYPES[cfg.dtype]
    check_memory(cfg, device)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.set_grad_enabled(False)
    sampling = SamplingParams(**cfg.sampling)
    parts, configs, (scenes, evaluator) = world_runs(cfg, device)
    traces, quality = {}, {}
    for name in REPLAYED:
        if name in cfg.runs:
            print(f"world trace: {name}", flush=True)
            traces[name], quality[name] = trace_world(parts, make_method(parts, configs[name], sampling), name,
                                                       scenes, evaluator, cfg, sampling)
    big = big_models(cfg, device, dtype)
    conds = big_conditions(cfg, cfg.trace_prompts, device, dtype)
    auto = AutoTree.from_config(OmegaConf.to_container(cfg.auto, resolve=True))
    rows, trees = [], {name: decoded_tree(config) for name, config in configs.items()}
    if "auto" in cfg.runs:
        base = configs[cfg.auto_method]
        first = scenes[:cfg.batch_size]
        world_cond = condition_for(parts.target, parts.text, [s.caption for s in first])
        seeds = [image_seed(0, i, 0) for i in range(len(first))]
        steps = calibrate(parts.target, parts.drafter, make_method(parts, base, sampling,
                          TreeParams(max(auto.sizes), max(auto.depths), auto.top_k)), world_cond, seeds, sampling,
                          auto, cfg.num_tokens)
        big_method = build_method(base, sampling=sampling, drafter=big[1], codebook=big[2])
        costs = time_candidates(big[0], big[1], big_method, conds[0], list(range(cfg.batch_size)), sampling, auto,
                                context=cfg.num_tokens // 2)
        choice = decide(steps, costs, auto)
        print(choice.describe() + "\n" + choice.table(), flush=True)
        trees["auto"] = choice.tree
        if choice.tree is not None:
            traces["auto"], quality["auto"] = trace_world(parts, make_method(parts, base, sampling, choice.tree),
                                                          cfg.auto_method, scenes, evaluator, cfg, sampling)
    for label in cfg.runs:
        print(f"{cfg.size}: {label}", flush=True)
        name = cfg.auto_method if label == "auto" else label
        tree = trees.get(label)
        if label == "ar" or (label == "auto" and tree is None):
            row = replay_row(label, big, conds, lambda: Method(), None, cfg, sampling)
        else:
            drafts = big[3] if configs[name].needs_spatial else big[1]
            row = replay_row(label, big, conds, lambda: build_method(configs[name], sampling=sampling,
                                                                     tree=tree or TreeParams(), drafter=drafts,
                                                                     codebook=big[2]),
                             traces[label], cfg, sampling)
        lanes = configs[name].knobs.get("lane_drafts") if label in configs else None
        row.update(method=name, device=str(device), dtype=cfg.dtype, batch_size=cfg.batch_size, size=cfg.size,
                   tree_size=tree.nodes if tree else 1 + (lanes or 0),
                   tree_depth=tree.rounds if tree else 0, **quality.get(label, {}))
        rows.append(row)
    ar = next(r for r in rows if r["label"] == "ar")
    for r in rows:
        r["speedup_vs_ar"] = ar["latency_s"] / r["latency_s"]
    write_results(Path(cfg.out_dir), rows, cfg, device)


def write_results(out: Path, rows: list[dict], cfg: DictConfig, device) -> None:
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    how = (f"compiled ({cfg.compile}), " if cfg.compile else "eager, ") + ("static shapes, " if cfg.static_shapes else "")
    lines = [f"# Speed at LlamaGen-{cfg.size} size ({where}, {cfg.dtype}, {how}batch {cfg.batch_size}, "
             f"{cfg.num_tokens} tokens, CFG {cfg.cfg_scale}; decisions replayed from {cfg.trace_prompts} world prompts)",
             "", "| run | step compression (world) | speed-up vs AR | latency s | NFE | tree | world alignment | "
                 "world target NLL |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        world = r.get("world_step_compression")
        lines.append(f"| {r['label']} | {r['step_compression']:.2f} ({world:.2f}) | {r['speedup_vs_ar']:.3f} | "
                     f"{r['latency_s']:.2f} | {r['nfe']:.1f} | {r['tree_size']}/{r['tree_depth']} | "
                     f"{r.get('world_alignment', float('nan')):.3f} | {r.get('world_target_nll', float('nan')):.3f} |"
                     if world else
                     f"| {r['label']} | {r['step_compression']:.2f} | {r['speedup_vs_ar']:.3f} | {r['latency_s']:.2f} | "
                     f"{r['nfe']:.1f} | {r['tree_size']}/{r['tree_depth']} | | |")
    lines += ["", "Step compression: image tokens / target passes at this size (in brackets: the world run it "
              "replays); speed-up: AR's latency over the run's, same process, same warm-up. Quality: the world "
              "run's (the large model has random weights)."]
    write_tables(out, "results", "\n".join(lines), {"rows": rows, "config": OmegaConf.to_container(cfg, resolve=True)},
                 rows, COLUMNS)
    plot(rows, out / "results.png", cfg)
    print("\n".join(lines))
    print(f"results in {out}")


def plot(rows: list[dict], path: Path, cfg) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["step_compression"], r["speedup_vs_ar"])
        ax.annotate(r["label"], (r["step_compression"], r["speedup_vs_ar"]), textcoords="offset points", xytext=(4, 4))
    lim = max(max(r["step_compression"] for r in rows), 1.5)
    ax.plot([1, lim], [1, lim], "k:", lw=0.8, label="speed-up = step compression")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("step compression (tokens / target pass)")
    ax.set_ylabel("wall-clock speed-up over AR")
    ax.set_title(f"LlamaGen-{cfg.size}, batch {cfg.batch_size}, {cfg.dtype}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    register_resolvers()
    main()
