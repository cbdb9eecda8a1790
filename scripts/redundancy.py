"""The redundancy study (decode/evaluation/redundancy.py): on held-out world prompts, how many of each
base method's verifications VVS's selector would have matched token for token, by grid row and by
tree agreement, and the step compression skipping them all would give at best.

python scripts/redundancy.py --bases lantern lantern_pp eagle2 --num 64 --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.shards import HELDOUT_OFFSET  # noqa: E402
from data.world import SceneGenerator  # noqa: E402
from decode.api import build_components, decode_config, make_method, pick_device  # noqa: E402
from decode.core.sampling import SamplingParams  # noqa: E402
from decode.evaluation.redundancy import redundancy_markdown, redundancy_summary, trace_steps  # noqa: E402
from decode.pipeline import image_seed  # noqa: E402
from decode.strategies.registry import resolve_method  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bases", nargs="+", default=["lantern", "lantern_pp", "eagle2"])
    p.add_argument("--num", type=int, default=64, help="held-out world prompts, one image each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=5, help="no skip is considered before this many tokens")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="outputs/redundancy")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = {b: resolve_method(b) for b in args.bases}
    parts = build_components(decode_config(), pick_device(args.device), methods=list(configs.values()))
    world = SceneGenerator(image_size=64)
    prompts = [world.scene(HELDOUT_OFFSET + i).caption for i in range(args.num)]
    sampling = SamplingParams(temperature=1.0)
    seeds = [image_seed(args.seed, i, 0) for i in range(args.num)]
    selector = [image_seed(args.seed, i, 1) for i in range(args.num)]
    grid = int(round(parts.target.num_image_tokens ** 0.5))
    results = {}
    for base, config in configs.items():
        traced = trace_steps(parts, prompts, make_method(parts, config, sampling), seeds, selector, sampling,
                             warmup=args.warmup, batch_size=args.batch_size)
        results[base] = redundancy_summary(traced, grid)
    note = (f"{args.num} held-out world prompts, seed {args.seed}, temperature 1, CFG "
            f"{parts.target.cfg_scale}, batch {args.batch_size}, warm-up {args.warmup}; "
            f"command: python scripts/redundancy.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    text = redundancy_markdown(results, note)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "redundancy.md").write_text(text)
    (out / "redundancy.json").write_text(json.dumps({"results": results, "args": vars(args)}, indent=2, default=str))
    print(text)


if __name__ == "__main__":
    main()
