"""What compile=true changes in the images: each method decodes the same prompts with the same seeds
twice, eager and with torch.compile'd layer stacks, and the tokens are compared.

Compiled kernels fuse operations and round differently, so logits differ in the last bits; a
sampled token flips where a uniform draw falls within that difference of an acceptance threshold
or a multinomial boundary, and the rest of that image changes from there. This counts how often.

python scripts/compile_check.py --num 32 --methods ar eagle2 lantern vvs
python scripts/compile_check.py --device cuda --dtype bfloat16 --prompts random   # GPU machine, no text encoder
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from decode.api import (DTYPES, Components, build_components, compile_models, condition_for, decode_config,  # noqa: E402
                        make_method, pick_device)
from decode.core.engine import generate  # noqa: E402
from decode.core.sampling import SamplingParams, row_generators  # noqa: E402
from decode.models.target import Condition, LlamaGenTarget  # noqa: E402
from decode.pipeline import image_seed  # noqa: E402
from decode.strategies.registry import resolve_method  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=32, help="prompts, one image each")
    p.add_argument("--methods", nargs="+", default=["ar", "eagle2", "lantern", "vvs"])
    p.add_argument("--prompts", choices=["world", "random"], default="world",
                   help="held-out world captions (needs the MiniLM text encoder) or random caption features")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--scope", default="stack", choices=["stack", "layer"], help="what one compiled graph covers")
    p.add_argument("--out", default="outputs/compile_check")
    return p.parse_args(argv)


def conditions(args, parts: Components) -> list[Condition]:
    """One Condition per batch of prompts."""
    target = parts.target
    if args.prompts == "random":
        g = torch.Generator().manual_seed(0)
        c, p = target.config.caption_dim, target.prefix_len
        feats = torch.randn(args.num, p, c, generator=g) * 0.1
        return [Condition(feats[s:s + args.batch_size]) for s in range(0, args.num, args.batch_size)]
    from data.shards import HELDOUT_OFFSET
    from data.world import SceneGenerator
    world = SceneGenerator(image_size=64)
    prompts = [world.scene(HELDOUT_OFFSET + i).caption for i in range(args.num)]
    return [condition_for(target, parts.text, prompts[s:s + args.batch_size]) for s in range(0, args.num, args.batch_size)]


def decode_all(parts: Components, name: str, conds: list[Condition], batch_size: int) -> tuple[torch.Tensor, float]:
    sampling = SamplingParams(temperature=1.0)
    method, target = make_method(parts, resolve_method(name), sampling), parts.target
    out, t0 = [], time.perf_counter()
    for i, cond in enumerate(conds):
        seeds = [image_seed(0, i * batch_size + r, 0) for r in range(cond.batch)]
        gen = generate(target, cond, num_tokens=target.num_image_tokens, sampling=sampling,
                       generators=row_generators(seeds, target.device), method=method)
        out.append(gen.tokens.cpu())
    return torch.cat(out), time.perf_counter() - t0


@torch.no_grad()
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    parts = build_components(decode_config([f"target.cfg_scale={args.cfg_scale}"]), device, DTYPES[args.dtype],
                             methods=[resolve_method(name) for name in args.methods],
                             text_encoder=args.prompts == "world")
    fast_gpt, fast_drafter = copy.deepcopy(parts.target.gpt), copy.deepcopy(parts.drafter)
    compile_models(args.scope, fast_gpt, fast_drafter)
    fast = dataclasses.replace(parts, target=LlamaGenTarget(fast_gpt, cfg_scale=args.cfg_scale), drafter=fast_drafter)
    conds = conditions(args, parts)
    rows = []
    for name in args.methods:
        decode_all(fast, name, conds[:1], args.batch_size)  # tracing, untimed
        eager, t_eager = decode_all(parts, name, conds, args.batch_size)
        compiled, t_compiled = decode_all(fast, name, conds, args.batch_size)
        same_token = (eager == compiled).float().mean(1)  # [N]
        first = [int((e != c).nonzero()[0]) if (e != c).any() else None for e, c in zip(eager, compiled)]
        diverged = [f for f in first if f is not None]
        rows.append(dict(method=name, images=len(eager), identical_images=sum(f is None for f in first),
                         equal_token_share=float(same_token.mean()),
                         median_first_difference=sorted(diverged)[len(diverged) // 2] if diverged else None,
                         eager_s=t_eager, compiled_s=t_compiled))
        print(rows[-1])
    lines = ["| method | identical images | tokens equal at the same position | median first differing token | "
             "eager s | compiled s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['identical_images']} / {r['images']} | {r['equal_token_share']:.3f} | "
              f"{r['median_first_difference']} | {r['eager_s']:.1f} | {r['compiled_s']:.1f} |" for r in rows]
    where = f"cpu ({torch.get_num_threads()} threads)" if device.type == "cpu" else torch.cuda.get_device_name(device)
    lines += ["", f"{args.num} {args.prompts} prompts, temperature 1, CFG {args.cfg_scale}, batch {args.batch_size}, "
                  f"{where}, {args.dtype}; the same seeds eager and compiled (inductor, scope {args.scope})."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile_check.md").write_text("\n".join(lines) + "\n")
    (out / "compile_check.json").write_text(json.dumps({"rows": rows, "args": vars(args), "device": where}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
