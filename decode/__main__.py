"""`python -m decode prompt="..."`: generate images with a target, a VQ tokenizer and a text encoder.

Hydra composes conf/decode.yaml; `python -m decode --help` lists the groups and options.
Prompts work as typed: `prompt="a cat face, on a blue background"` is quoted for Hydra here.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from decode import distributed
from decode.api import (DTYPES, Components, build_components, method_from_choice, method_with_tree, pick_device,
                        tree_setting)
from decode.budget import AutoTree, BudgetChoice
from decode.core.engine import Method
from decode.core.sampling import SamplingParams
from decode.core.trees import TreeParams
from decode.distributed import Ranks, ranks_from_env
from decode.evaluation.metrics import append_jsonl, summary_table, write_summary
from decode.pipeline import check_run_folder, plan_jobs, record_run_folder, run_jobs, run_scaled_jobs
from decode.resolvers import REPO, register_resolvers, reporting_input_errors
from decode.scaling.config import ScalingPlan, make_verifier, split_scaling
from decode.strategies.registry import TREE_DRAFTING, MethodConfig, resolve_method

CONF_DIR = str(REPO / "conf")
QUOTED_KEYS = ("prompt", "+prompt", "++prompt")
log = logging.getLogger("decode")


def quote_prompt_args(argv: list[str]) -> list[str]:
    """Quote `prompt=` values for Hydra, whose grammar rejects unquoted commas and '='."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in QUOTED_KEYS and value and not (value[0] == value[-1] and value[0] in "'\"" and len(value) > 1):
            value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
            arg = f"{key}={value}"
        out.append(arg)
    return out


def read_prompts(cfg: DictConfig) -> list[str]:
    if (cfg.prompt is None) == (cfg.prompts is None):
        raise ValueError('give exactly one of prompt="..." or prompts=FILE (one prompt per line)')
    if cfg.prompt is not None:
        return [str(cfg.prompt)]
    path = Path(cfg.prompts)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts")
    return prompts


def integer(cfg: DictConfig, key: str, least: int | None = None) -> int:
    """An integer option, named in the error when it is not one (or below `least`)."""
    try:
        value = int(cfg[key])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{key} must be an integer, got {cfg[key]!r}") from err
    if least is not None and value < least:
        raise ValueError(f"{key} must be >= {least}, got {value}")
    return value


def run_settings(cfg: DictConfig, method: MethodConfig, prompts: list[str]) -> dict:
    """What decides the images of a run folder: a rerun with other settings must not resume it. Not
    the batch size, device or n (images are seeded and named by prompt, sample and seed), nor knobs
    the method does not read; model paths as seen from the repository, so a moved checkout resumes."""
    part = lambda key: _portable(OmegaConf.to_container(cfg[key], resolve=True)) if cfg.get(key) else None  # noqa: E731
    return {"prompts": prompts, "seed": integer(cfg, "seed"), "method": method.name,
            "strategies": [method.drafting, method.acceptance, method.skipping], "knobs": _portable(method.knobs),
            "sampling": part("sampling"), "tree": part("tree") if method.uses_tree else None,
            "target": part("target"), "tokenizer": part("tokenizer"), "text_encoder": part("text_encoder"),
            "drafter": part("drafter") if method.needs_drafter else None, "dtype": cfg.dtype}


def _portable(value):
    """Paths that exist, relative to the repository when inside it (settings compare across checkouts)."""
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v) for v in value]
    if isinstance(value, str) and value and Path(value).exists():
        real = Path(value).resolve()
        return str(real.relative_to(REPO)) if real.is_relative_to(REPO) else str(real)
    return value


def check_schedule_fits(method: MethodConfig, target: DictConfig) -> None:
    """A next-set schedule's knobs against the target's token grid, read from its config (no weights
    loaded): a window wider than a row or more rows than the grid has fail here."""
    if method.schedule != "next_set":
        return
    block = target.get("block_size")
    ckpt = target.get("ckpt")
    if block is None and ckpt and Path(str(ckpt)).is_dir():
        from decode.models.checkpoint import read_model_meta

        block = read_model_meta(ckpt, kind="llamagen_gpt")["config"].get("block_size")
    if block is not None:
        from decode.core.wavefront import NextSet, grid_shape

        width, height = grid_shape(int(block), int(block))
        NextSet(method.knobs["row_window"], method.knobs["max_rows"], method.knobs["lane_drafts"]).check(width, height)


def check_draft_checkpoints(method: MethodConfig, cfg: DictConfig) -> None:
    """The checkpoint a method drafts with is of the kind it reads (config.json only, before any load):
    spatial heads given as an EAGLE drafter, or an EAGLE drafter as spatial heads, fail naming both."""
    from decode.models import drafter, spatial
    from decode.models.checkpoint import CheckpointError, read_model_meta

    wanted = []
    if method.needs_drafter and cfg.get("drafter") and cfg.drafter.get("ckpt"):
        wanted.append(("drafter.ckpt", str(cfg.drafter.ckpt), drafter.KIND))
    if method.needs_spatial:
        wanted.append(("method.spatial_ckpt", str(method.knobs["spatial_ckpt"]), spatial.KIND))
    for key, folder, kind in wanted:
        if not Path(folder).is_dir():
            continue  # a single-file drafter or a missing folder: the loader says what is wrong
        try:
            read_model_meta(folder, kind=kind)
        except CheckpointError as err:
            raise ValueError(f"{key}: {err}; method={method.name} drafts with {kind.replace('_', ' ')} "
                             f"({'python -m train drafter drafter.kind=spatial' if kind == spatial.KIND else 'python -m train drafter'})") from None


def check_static_shapes(method: MethodConfig, cfg: DictConfig, scaling=None) -> None:
    """static_shapes=true: for a LlamaGen target and a method whose passes have fixed widths, before any load."""
    if not cfg.get("static_shapes"):
        return
    if scaling is not None:
        raise ValueError("static_shapes=true: a test-time scaling plan (gridar, best_of_n) decodes stages of other "
                         "lengths and prefixes, each its own shapes; leave static_shapes off")
    if method.schedule != "raster" or method.drafting not in ("none", *TREE_DRAFTING):
        raise ValueError(f"static_shapes=true: method={method.name} ({method.drafting} drafting, {method.schedule} "
                         f"schedule) has no fixed pass widths; ar and the EAGLE-drafted methods (eagle2, lantern, "
                         f"lantern_pp, vvs, ...) have")
    if any(name in str(cfg.target.get("_target_", "")) for name in ("janus", "chameleon")):
        raise ValueError("static_shapes=true: LlamaGen targets only (a transformers target runs its own cache)")
    if cfg.get("compile") and method.uses_tree and isinstance(cfg.get("tree"), DictConfig) and cfg.tree.get("auto"):
        raise ValueError("static_shapes=true with compile specialises each graph to one shape; tree=auto times many "
                         "tree sizes (each a retrace): pick the tree (tree.total_tokens, tree.depth) or compile=false")


def check_static_size(method: MethodConfig, cfg: DictConfig) -> None:
    """tree.static_size (tree=fixed) against the method's static shape, before any load."""
    size = (cfg.get("tree") or {}).get("static_size")
    if size is None:
        return
    if method.drafting != "static":
        raise ValueError(f"tree.static_size={size} keeps nodes of a static shape; method={method.name} drafts with "
                         f"{method.drafting} (static shapes: lantern_pp, and vvs by default)")
    TreeParams(static=method.knobs["static_tree"], static_size=int(size))  # its range, named


def run(cfg: DictConfig) -> dict[str, float]:
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {cfg.dtype!r}")
    prompts = read_prompts(cfg)
    jobs = plan_jobs(prompts, integer(cfg, "n"), integer(cfg, "seed"))
    integer(cfg, "batch_size", least=1)
    scaling, name, options = split_scaling(OmegaConf.to_container(cfg.method, resolve=True))
    method = resolve_method(name, options)                 # bad knobs fail
    check_schedule_fits(method, cfg.target)                # before any load
    check_draft_checkpoints(method, cfg)
    check_static_shapes(method, cfg, scaling)
    check_static_size(method, cfg)
    settings = run_settings(cfg, method, prompts)
    if scaling is not None:
        settings["scaling"] = _portable(dataclasses.asdict(scaling))
    ranks = ranks_from_env()
    device = distributed.start(ranks, pick_device(cfg.device))
    with distributed.group_left_at_end():
        return _run_rank(cfg, jobs, method, settings, ranks, device, scaling)


def _run_rank(cfg: DictConfig, jobs, method: MethodConfig, settings: dict, ranks: Ranks,
              device: torch.device, scaling: ScalingPlan | None = None) -> dict[str, float]:
    out_dir = Path(distributed.share(str(cfg.out_dir or HydraConfig.get().runtime.output_dir), ranks))
    check_run_folder(out_dir, settings)
    if ranks.main:  # before any rank writes an image: a crash later must not leave images unrecorded
        record_run_folder(out_dir, settings)
    distributed.share(None, ranks)  # every rank waits for the record
    parts = build_components(cfg, device, DTYPES[cfg.dtype], methods=[method], evaluator=True)
    sampling = SamplingParams(**cfg.sampling)
    if cfg.get("note") and ranks.main:
        log.warning(cfg.note)
    stats_name = f"stats.rank{ranks.rank}.jsonl" if ranks.distributed else "stats.jsonl"
    t0 = time.perf_counter()
    if ranks.main:
        log.info("method %s%s", method.describe(), f", searched by {scaling.describe()}" if scaling else "")
    engine_method, choice = method_for_run(cfg, parts, method, sampling, jobs[: int(cfg.batch_size)], ranks)
    if scaling is not None:
        rows = run_scaled_jobs(jobs[ranks.rank::ranks.world], parts=parts, method=engine_method, sampling=sampling,
                               plan=scaling, verifier=make_verifier(scaling, parts), out_dir=out_dir,
                               progress=ranks.main, stats_name=stats_name)
    else:
        rows = run_jobs(jobs[ranks.rank::ranks.world], parts=parts, method=engine_method, sampling=sampling,
                        batch_size=int(cfg.batch_size), out_dir=out_dir, stats_name=stats_name, progress=ranks.main,
                        nll=bool(cfg.get("target_nll", True)))
    rows = distributed.gather(rows, ranks)
    if not ranks.main:
        return {"images": 0.0}
    if ranks.distributed:  # one stats.jsonl for the run, in job order
        rows.sort(key=lambda r: (r.prompt_index, r.sample_index))
        append_jsonl(out_dir / "stats.jsonl", rows)
    if not rows:  # a finished run folder: its summary stays
        print(f"nothing to do: all {len(jobs)} images are already in {out_dir} (a summary.txt there is from "
              f"the run that made them)")
        return {"images": 0.0}
    summary = summary_table(rows, time.perf_counter() - t0)
    if choice is not None:
        summary += f"\ntree                {choice.describe()}"
    if scaling is not None and scaling.verifier == "world":
        summary += ("\nselection           the world verifier chose each image by the evaluator that scores "
                    "alignment: the alignment above is the selection criterion, not an independent measure")
    if len(rows) < len(jobs):
        summary += (f"\nresumed             this run made {len(rows)} of {len(jobs)} images; the other "
                    f"{len(jobs) - len(rows)} were already there (their stats: stats.jsonl, or stats.rank*.jsonl "
                    f"from an interrupted multi-process run)")
    if ranks.distributed:
        summary += f"\nranks               {ranks.world} (each decoded every {ranks.world}-th image)"
    write_summary(out_dir / "summary.txt", summary)
    print(summary)
    print(f"images and stats.jsonl in {out_dir}")
    return {"images": float(len(rows))}


def method_for_run(cfg: DictConfig, parts: Components, method: MethodConfig, sampling: SamplingParams, first_jobs,
                   ranks: Ranks) -> tuple[Method, BudgetChoice | None]:
    """The engine's Method with the run's tree. tree=auto is measured on the main rank over the run's
    first batch (decode.budget; cached per device) and shared, so every rank decodes with the same tree."""
    tree = tree_setting(cfg.tree)
    if not (isinstance(tree, AutoTree) and method.uses_tree):
        if isinstance(tree, AutoTree) and method.drafting != "none" and ranks.main:
            # say it: tree=auto sizes draft trees only; this method's drafts keep their own size
            log.info(f"tree=auto sizes draft trees (EAGLE-2's dynamic, LANTERN++'s static) only: method "
                     f"{method.name} drafts with {method.drafting}, which keeps its own size")
        return method_with_tree(parts, method, sampling, tree, [], [])
    choice = None
    if ranks.main:
        _, choice = method_with_tree(parts, method, sampling, tree, [j.prompt for j in first_jobs],
                                     [j.seed for j in first_jobs], {"compile": cfg.get("compile")})
        print(choice.table() if not choice.cached else "tree=auto: the cached choice for this device, models and batch")
        log.info(choice.describe())
    choice = distributed.share(choice, ranks)
    return method_from_choice(parts, method, sampling, choice), choice


def main() -> None:
    register_resolvers()
    sys.argv = quote_prompt_args(sys.argv)
    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="decode")(reporting_input_errors(run))()


if __name__ == "__main__":
    main()
