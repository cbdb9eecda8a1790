"""Every decoding method side by side, in one process, on held-out prompts of the embedded world.

For each run (a method with its published defaults, conf/method/*.yaml, plus overrides) and each
seed, it decodes one image per prompt and records speed (NFE, step compression, tau, skip ratio,
wall-clock, speed-up over AR in this same process) and quality (FID against the real images of the
same prompts, the evaluator's alignment, precision/recall). Writes results.md, results.csv and
results.json into out_dir.

python scripts/benchmark.py num_prompts=100 seeds=[0,1] batch_size=8
python scripts/benchmark.py runs='[{label: vvs_tau08, method: vvs, options: {tau: 0.8}}]'
python scripts/benchmark.py runs='[{label: ar, method: ar}, {label: lantern_t20, method: lantern, tree: {total_tokens: 20}}]'
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.images import image_to_tensor  # noqa: E402
from data.shards import HELDOUT_OFFSET  # noqa: E402
from data.world import SceneGenerator  # noqa: E402
from decode.evaluation.benchmark import HeldOut, check_config, plot, run_benchmark  # noqa: E402
from decode.evaluation.quality import to_uint8  # noqa: E402
from decode.evaluation.world_evaluator import evaluator_world  # noqa: E402
from decode.resolvers import register_resolvers, reporting_input_errors  # noqa: E402


def world_held_out(cfg: DictConfig, image_size: int) -> HeldOut:
    """cfg.num_prompts held-out world scenes, and as many others for the FID floor, of the world the
    evaluator reads."""
    world = SceneGenerator(image_size=image_size, seed=cfg.world_seed, world=evaluator_world(cfg.evaluator_ckpt))
    scenes = [world.scene(HELDOUT_OFFSET + i) for i in range(cfg.num_prompts)]
    others = [world.scene(HELDOUT_OFFSET + cfg.num_prompts + i) for i in range(cfg.num_prompts)]
    images = lambda ss: torch.stack([to_uint8(image_to_tensor(s.image)) for s in ss])  # noqa: E731
    calibration = [world.scene(i).caption for i in range(cfg.batch_size)]  # training scenes: tree=auto's first batch
    return HeldOut([s.caption for s in scenes], [s.attributes for s in scenes], images(scenes), images(others),
                   calibration)


@hydra.main(version_base="1.3", config_path=str(REPO / "conf"), config_name="benchmark")
@reporting_input_errors  # bad input: its one-line message, exit status 1
def main(cfg: DictConfig) -> None:
    if cfg.get("replot"):  # redraw results.png from a results.json
        saved = json.loads(Path(cfg.replot).read_text())
        plot(saved["rows"], Path(cfg.replot).with_name("results.png"), saved["meta"])
        return
    plans = check_config(cfg)  # before the models, Inception and the FID reference load, and before out_dir exists
    run_benchmark(cfg, plans, lambda size: world_held_out(cfg, size))


if __name__ == "__main__":
    register_resolvers()
    main()
