"""How often GridAR's world verifier judges a partial canvas impossible, per stage and certainty:
on real scenes with their own captions (every one is possible: a verdict of impossible is a false
alarm) and with another scene's caption (mostly impossible: a verdict of impossible is a catch).
Partial canvases are made as GridAR makes them: the top rows, tiled down.

python scripts/calibrate_world_verifier.py --evaluator models/world/evaluator --num 300 \
    --out docs/results/gridar/verifier_calibration.json

Scenes come from seed 11 (neither the training shards' nor the benchmark's held-out scenes), so the
default certainty is not tuned on the prompts the benchmark reports.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.world import SceneGenerator  # noqa: E402
from decode.evaluation.world_evaluator import load_evaluator  # noqa: E402
from decode.scaling.verifiers import WorldVerifier  # noqa: E402

STAGES = (0.25, 0.5, 1.0)


def tiled(images: torch.Tensor, share: float) -> torch.Tensor:
    """[N, 3, H, W]: the top `share` of the rows, tiled down (GridAR's pad: repeat)."""
    h = images.shape[2]
    rows = max(1, int(round(h * share)))
    return images[:, :, :rows].repeat(1, 1, -(-h // rows), 1)[:, :, :h]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--evaluator", default="models/world/evaluator")
    ap.add_argument("--num", type=int, default=300)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--certainty", type=float, nargs="+", default=[0.9, 0.95, 0.99, 0.999])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.num < 2:
        raise SystemExit(f"--num must be >= 2 (each scene is also judged against the next one's caption), got {args.num}")
    evaluator = load_evaluator(args.evaluator)
    gen = SceneGenerator(evaluator.config.image_size, seed=args.seed, world=evaluator.config.world)
    scenes = [gen.scene(i) for i in range(args.num)]
    images = torch.stack([torch.from_numpy(np.array(s.image)).permute(2, 0, 1) for s in scenes]).float() / 127.5 - 1
    own = [s.caption for s in scenes]
    other = own[1:] + own[:1]
    rows = []
    for certainty in args.certainty:
        verifier = WorldVerifier(evaluator, certainty)
        for share in STAGES:
            canvas = tiled(images, share)
            rows.append({"certainty": certainty, "visible": share,
                         "false_impossible": 1 - float(np.mean(verifier.prune(own, canvas, share))),
                         "caught": 1 - float(np.mean(verifier.prune(other, canvas, share)))})
    print(f"{'certainty':>9} {'visible':>7} {'own caption: impossible':>24} {'other caption: impossible':>26}")
    for r in rows:
        print(f"{r['certainty']:>9} {r['visible']:>7} {r['false_impossible']:>24.3f} {r['caught']:>26.3f}")
    result = {"evaluator": args.evaluator, "world": evaluator.config.world, "scenes": args.num, "seed": args.seed,
              "command": "python scripts/calibrate_world_verifier.py " + " ".join(argv or sys.argv[1:]), "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
