"""Decode run folders side by side: each method's speed next to the quality of its images.

`python -m decode` writes a run folder per method (images/*.png, stats.jsonl, run.json). For real
targets (official LlamaGen weights) this puts the runs of the same prompts in one table: NFE, step
compression, tau, skip ratio, latency per image, images/s and the wall-clock speed-up over the AR
run (from the runs' own stats), beside FID and precision/recall against a folder of real images and
the CLIP score. Definitions: docs/algorithms.md 5. Writes evaluation.md, evaluation.csv and
evaluation.json into out_dir.

python scripts/evaluate_images.py 'runs=[outputs/decode/ar,outputs/decode/vvs]' real=data/coco_val
python scripts/evaluate_images.py 'runs=[...]' real=REAL real2=REAL2 clip=models/clip-vit-base-patch32
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file: the repository's packages

from decode.evaluation.image_sets import evaluate_runs, markdown  # noqa: E402
from decode.resolvers import register_resolvers, reporting_input_errors  # noqa: E402


@hydra.main(version_base="1.3", config_path=str(REPO / "conf"), config_name="evaluate_images")
@reporting_input_errors  # bad input: its one-line message, exit status 1
def main(cfg: DictConfig) -> None:
    rows, meta = evaluate_runs(cfg)
    print(markdown(rows, meta))
    print(f"evaluation.md, evaluation.csv and evaluation.json in {Path(cfg.out_dir)}")


if __name__ == "__main__":
    register_resolvers()
    main()
