"""What compile=true costs up front: the time of the first call of each shape kind (tracing plus one
run) of a LlamaGen target with compiled layers, next to the time of a later call of the same kind.

The target has random weights at a named size (LlamaGen-XL: 36 layers) with CFG, so any machine can
time it. Shape kinds, in the order a decode meets them: the prefill, one token, a draft tree.

python scripts/compile_time.py --size XL --scope layer
python scripts/compile_time.py --size XL --scope stack --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode.core.host import wait_for  # noqa: E402
from decode.api import DTYPES, compile_models, pick_device  # noqa: E402
from decode.models.target import Condition, LlamaGenTarget, build_gpt  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="XL", help="a LlamaGen size (B, L, XL, ...)")
    p.add_argument("--scope", default="layer", choices=["stack", "layer"])
    p.add_argument("--tree", type=int, default=59, help="draft-tree nodes of the third shape kind")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--out", default=None, help="a JSON file for the timings")
    return p.parse_args(argv)


def timed(fn, device) -> float:
    wait_for(device)
    t0 = time.perf_counter()
    fn()
    wait_for(device)
    return time.perf_counter() - t0


@torch.no_grad()
def main(argv=None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    gpt = build_gpt(None, size=args.size, model_type="t2i", vocab_size=16384, block_size=1024, cls_token_num=120,
                    caption_dim=2048).to(device=device, dtype=DTYPES[args.dtype]).eval()
    target = LlamaGenTarget(gpt, cfg_scale=7.5)
    cond = Condition(torch.randn(1, 120, 2048, device=device) * 0.1, torch.ones(1, 120, dtype=torch.bool, device=device))
    compile_models(args.scope, gpt)
    state = {}

    def prefill():
        state["cache"], state["out"] = target.start(cond, 64, extra_slots=2 * args.tree + 8)

    def one_token():
        target.extend(state["cache"], state["out"].logits[:, -1:].argmax(-1))
        target.commit(state["cache"], 1)

    tree = torch.randint(gpt.config.vocab_size, (1, args.tree), device=device)
    kinds = {"prefill": prefill, "one token": one_token, "tree": lambda: target.extend(state["cache"], tree)}
    result = {}
    for name, fn in kinds.items():
        first = timed(fn, device)
        result[name] = {"first_s": first, "later_s": timed(fn, device)}
        print(f"{name:10s} first call {first:7.2f} s   later call {result[name]['later_s']:7.3f} s", flush=True)
    where = f"cpu ({torch.get_num_threads()} threads)" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"{args.size}, compile={args.scope}, {where}, {args.dtype}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "device": where, "times": result}, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
