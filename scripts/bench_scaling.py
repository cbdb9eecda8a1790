"""GridAR against Best-of-N on held-out prompts of the embedded world, side by side in one process.

Each run decodes one image per held-out prompt: `ar` one sample, `best_of_n` the best of N whole
candidates, `gridar` GridAR's staged search (decode/scaling/gridar.py), whose candidates may decode
with any method (`options: {decode: vvs}`). Per run: alignment and FD-world with 95 % bootstrap
intervals, and the cost per image: target passes (every candidate's, prefills included), guided rows
(passes x guidance groups: 3-way guidance runs 3) and verifier calls, with the wall-clock.
Writes scaling.md / .json / .csv into out_dir.

python scripts/bench_scaling.py num_prompts=32
python scripts/bench_scaling.py runs='[{label: gridar8, method: gridar, options: {candidates: 8}}]'

The ranker, the pruning verifier and the judge are one world evaluator: Best-of-N and GridAR both
choose by the score they are judged on, so their alignments are optimistic alike (an upper bound of
what an independent judge would see); FD-world is read on the same evaluator's features.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.images import image_to_tensor  # noqa: E402
from data.shards import HELDOUT_OFFSET  # noqa: E402
from data.world import SceneGenerator  # noqa: E402
from decode.api import DTYPES, build_components, compile_models, make_method, pick_device, tree_setting  # noqa: E402
from decode.core.sampling import SamplingParams  # noqa: E402
from decode.evaluation.measures import fd_interval, mean_interval, world_features  # noqa: E402
from decode.evaluation.metrics import write_tables  # noqa: E402
from decode.evaluation.quality import to_uint8  # noqa: E402
from decode.pipeline import Job, candidate_seeds, image_seed  # noqa: E402
from decode.resolvers import register_resolvers, reporting_input_errors  # noqa: E402
from decode.scaling.config import make_verifier, split_scaling  # noqa: E402
from decode.scaling.gridar import best_of_n, gridar  # noqa: E402
from decode.strategies.registry import resolve_method  # noqa: E402

COLUMNS = ["label", "search", "decode", "candidates", "alignment", "alignment_lo", "alignment_hi", "fd_world",
           "fd_world_lo", "fd_world_hi", "target_passes", "guided_rows", "verifier_calls", "pruned", "wall_s"]


def plan_runs(cfg: DictConfig) -> list[tuple[dict, object, object]]:
    """(run, scaling plan or None, the candidates' method config) per run: bad runs fail before any load."""
    plans = []
    for run in cfg.runs:
        run = OmegaConf.to_container(run, resolve=True)
        if "label" not in run or "method" not in run:
            raise ValueError(f"each run needs a label and a method, got {run}")
        scaling, name, options = split_scaling({"name": run["method"], **(run.get("options") or {})})
        plans.append((run, scaling, resolve_method(name, options)))
    return plans


def held_out(cfg: DictConfig, world: str, size: int):
    gen = SceneGenerator(image_size=size, seed=cfg.world_seed, world=world)
    scenes = [gen.scene(HELDOUT_OFFSET + i) for i in range(cfg.num_prompts)]
    return [s.caption for s in scenes], torch.stack([to_uint8(image_to_tensor(s.image)) for s in scenes])


@hydra.main(version_base="1.3", config_path=str(REPO / "conf"), config_name="bench_scaling")
@reporting_input_errors
def main(cfg: DictConfig) -> None:
    plans = plan_runs(cfg)
    if cfg.num_prompts < 8:
        raise ValueError(f"num_prompts must be >= 8 (bootstrap intervals), got {cfg.num_prompts}")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = pick_device(cfg.device)
    parts = build_components(cfg, device, DTYPES[cfg.dtype], methods=[m for _, _, m in plans], evaluator=True)
    compile_models(cfg.compile, parts.target.gpt, parts.drafter)
    evaluator = parts.scorer.evaluator
    prompts, real = held_out(cfg, evaluator.config.world, evaluator.config.image_size)
    real_feats = world_features(evaluator, real)
    sampling = SamplingParams(**cfg.sampling)
    rows = []
    for run, scaling, config in plans:
        method = make_method(parts, config, sampling, tree_setting(cfg.tree) if config.uses_tree else None)
        verifier = make_verifier(scaling, parts) if scaling else None
        chosen, cost = [], {"target_passes": 0, "guided_rows": 0, "verifier_calls": 0, "pruned": None}
        t0 = time.perf_counter()
        for i, prompt in enumerate(tqdm(prompts, desc=run["label"], unit="img")):
            job = Job(i, 0, prompt, image_seed(cfg.seed, i, 0))
            if scaling is None:
                out = best_of_n(parts, prompt, method, [job.seed], sampling, _First())
            elif scaling.gridar is not None:
                out = gridar(parts, prompt, method, candidate_seeds(job, scaling.candidates), sampling, verifier,
                             scaling.gridar)
            else:
                out = best_of_n(parts, prompt, method, candidate_seeds(job, scaling.candidates), sampling, verifier)
            chosen.append(to_uint8(out.image[None].cpu()))
            cost["target_passes"] += out.target_passes
            cost["guided_rows"] += out.guided_rows
            cost["verifier_calls"] += out.verifier_calls if scaling else 0
            if out.pruned:
                cost["pruned"] = [a + b for a, b in zip(cost["pruned"] or [0] * len(out.pruned), out.pruned)]
        wall = time.perf_counter() - t0
        images = torch.cat(chosen)
        align = mean_interval(torch.tensor([s for s in parts.scorer(images.float() / 127.5 - 1, prompts)]),
                              name="alignment")
        fd = fd_interval(world_features(evaluator, images), real_feats)
        n = len(prompts)
        rows.append({"label": run["label"], "search": scaling.describe() if scaling else "one sample",
                     "decode": config.name, "candidates": scaling.candidates if scaling else 1,
                     "alignment": align.value, "alignment_lo": align.lo, "alignment_hi": align.hi,
                     "fd_world": fd.value, "fd_world_lo": fd.lo, "fd_world_hi": fd.hi,
                     "target_passes": cost["target_passes"] / n, "guided_rows": cost["guided_rows"] / n,
                     "verifier_calls": cost["verifier_calls"] / n,
                     "pruned": [p / n for p in cost["pruned"]] if cost["pruned"] else None, "wall_s": wall / n})
        print(f"{run['label']}: alignment {align}, FD-world {fd}, {rows[-1]['target_passes']:.0f} target passes, "
              f"{rows[-1]['verifier_calls']:.0f} verifier calls per image")
    meta = {"num_prompts": n, "seed": cfg.seed, "world": evaluator.config.world, "device": str(device),
            "threads": torch.get_num_threads(), "command": "python scripts/bench_scaling.py " + " ".join(sys.argv[1:])}
    write_tables(Path(cfg.out_dir), "scaling", markdown(rows, meta), {"rows": rows, "meta": meta}, rows, COLUMNS)
    print(markdown(rows, meta))


class _First:
    """The ranker of a one-candidate run: nothing to choose."""

    def rank(self, prompts, images):
        return [0.0] * len(prompts)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# GridAR and Best-of-N on {meta['num_prompts']} held-out world ({meta['world']}) prompts, seed "
             f"{meta['seed']}", "",
             f"`{meta['command']}` on {meta['device']} ({meta['threads']} threads). Cost per image: target passes of "
             "every candidate (prefills included), guided rows (passes x guidance groups), verifier calls "
             "(prune, reformulate, rank: one per canvas). Alignment and FD-world with 95 % bootstrap intervals; "
             "the ranker and the judge are one evaluator, so scaled rows are optimistic alike.", "",
             "| run | search | candidates decode with | alignment | FD-world | target passes | guided rows | "
             "verifier calls | pruned per stage | s / image |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pruned = ", ".join(f"{p:.2f}" for p in r["pruned"]) if r["pruned"] else "-"
        lines.append(f"| {r['label']} | {r['search']} | {r['decode']} | {r['alignment']:.3f} [{r['alignment_lo']:.3f}, "
                     f"{r['alignment_hi']:.3f}] | {r['fd_world']:.1f} [{r['fd_world_lo']:.1f}, {r['fd_world_hi']:.1f}] | "
                     f"{r['target_passes']:.0f} | {r['guided_rows']:.0f} | {r['verifier_calls']:.0f} | {pruned} | "
                     f"{r['wall_s']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    register_resolvers()
    main()
