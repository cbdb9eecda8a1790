"""Caption features of world prompts, for a machine without the text encoder (the GPU check):
the held-out prompts the benchmarks decode and the training prompts tree=auto calibrates on.

python scripts/precompute_captions.py --out .whl/world_captions.pt --num 32
then, there: text_encoder=precomputed text_encoder.path=.whl/world_captions.pt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.shards import HELDOUT_OFFSET  # noqa: E402
from data.world import WORLDS, SceneGenerator  # noqa: E402
from decode.models.text import load_text_encoder, precompute_captions  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, default=32, help="held-out prompts (and as many training prompts)")
    p.add_argument("--world", default=None, choices=WORLDS)
    p.add_argument("--max-length", type=int, default=48, help="the world target's caption slots")
    args = p.parse_args(argv)
    gen = SceneGenerator(seed=0, world=args.world)
    prompts = [gen.scene(HELDOUT_OFFSET + i).caption for i in range(args.num)] + \
              [gen.scene(i).caption for i in range(args.num)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    precompute_captions(load_text_encoder("minilm", max_length=args.max_length), prompts, args.out)
    print(f"{len(set(prompts))} captions -> {args.out}")


if __name__ == "__main__":
    main()
