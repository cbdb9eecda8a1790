"""Decode-loop time per step of some methods on the embedded world, for comparing two versions of the
engine: run it once against each checkout (`--repo`), alternating, on the same machine.

The models always come from this checkout's models/world; random caption features (no text
encoder). Each method decodes `--repeats` times; the first is a warm-up, the best of the rest counts.

python scripts/loop_time.py --repo /tmp/old_checkout --methods ar lantern lantern_pp
python scripts/loop_time.py --methods ar lantern lantern_pp
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODELS = Path(__file__).resolve().parents[1] / "models" / "world"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]), help="checkout whose decode/ runs")
    p.add_argument("--methods", nargs="+", default=["ar", "lantern", "lantern_pp"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    sys.path.insert(0, args.repo)
    import torch

    from decode.models.drafter import load_drafter
    from decode.core.engine import generate
    from decode.strategies.registry import build_method
    from decode.core.sampling import SamplingParams, row_generators
    from decode.models.target import Condition, LlamaGenTarget, build_gpt
    from decode.core.trees import TreeParams
    from decode.models.vq import load_vq

    torch.set_num_threads(args.threads)
    gpt = build_gpt(str(MODELS / "target"))
    target = LlamaGenTarget(gpt, cfg_scale=4.0)
    drafter = load_drafter(MODELS / "drafter", gpt)
    codebook = load_vq(str(MODELS / "tokenizer")).quantize.embedding.weight.detach()
    sampling = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    cond = Condition(torch.randn(args.batch, target.prefix_len, target.config.caption_dim, generator=g) * 0.1)
    out = {"repo": args.repo}
    with torch.no_grad():
        for name in args.methods:
            method = build_method(name, sampling=sampling, tree=TreeParams(), options=None,
                                  drafter=drafter, codebook=codebook)
            runs = [generate(target, cond, num_tokens=target.num_image_tokens, sampling=sampling,
                             generators=row_generators(list(range(args.batch))), method=method)
                    for _ in range(args.repeats)]
            best = min(runs[1:], key=lambda r: r.loop_s)
            out[name] = dict(loop_s=round(best.loop_s, 3), steps=best.batch_steps,
                             ms_per_step=round(1000 * best.loop_s / best.batch_steps, 2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
