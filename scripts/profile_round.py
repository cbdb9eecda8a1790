"""Where one drafter round's time goes, op by op: the round's median time, a target step's beside
it, and torch.profiler tables (by device time, by host time) of one round.

The target has the named size's dimensions but only `--layers` layers: a drafter round reads only
its embedding and LM head, and a shallow stack builds quickly (the target step is timed with those
layers only). Found cuDNN's attention planning on an H200 (docs/results/gpu_h200).

    python scripts/profile_round.py --device cuda --dtype bfloat16        # on a GPU machine
    python scripts/profile_round.py --device cpu --dtype float32 --size B  # here
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from cost_model import Drafts, Fill, timed  # noqa: E402

from decode.models.drafter import Drafter, DrafterConfig  # noqa: E402
from decode.core.host import wait_for  # noqa: E402
from decode.api import DTYPES, pick_device  # noqa: E402
from decode.core.sampling import SamplingParams, row_generators  # noqa: E402
from decode.models.target import LlamaGenTarget, build_gpt  # noqa: E402
from decode.core.trees import TreeParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--size", default="XL")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--filled", type=int, default=512, help="image tokens already in the caches")
    ap.add_argument("--rows", type=int, default=15, help="rows of each profiler table")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    device = pick_device(args.device)  # on CUDA this also turns cuDNN attention off
    t0 = time.perf_counter()
    with torch.device(device):
        gpt = build_gpt(None, size=args.size, n_layer=args.layers, model_type="t2i", vocab_size=16384,
                        block_size=1024, cls_token_num=120, caption_dim=2048)
        drafter = Drafter(DrafterConfig.for_target(gpt)).eval()
    gpt.to(dtype=DTYPES[args.dtype])
    drafter.to(dtype=DTYPES[args.dtype])
    target = LlamaGenTarget(gpt, cfg_scale=7.5)
    print(f"built in {time.perf_counter() - t0:.1f} s", flush=True)
    for name, temperature in (("sampled", 1.0), ("greedy", 0.0)):
        sampling, gens = SamplingParams(temperature=temperature), row_generators(range(1), device)
        fill = Fill.make(target, 1, args.filled, device)
        drafts = Drafts(target, drafter, TreeParams(total_tokens=59, depth=4, top_k=10), fill, sampling, gens)
        rounds = [timed(drafts.round, 10, device) * 1e3 for _ in range(2)]
        step = timed(lambda: target.extend(fill.cache, fill.root[:, None]), 10, device) * 1e3
        print(f"{name}: drafter round {rounds[0]:.2f} / {rounds[1]:.2f} ms (two medians of 10); "
              f"{args.layers}-layer target step {step:.2f} ms", flush=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        drafts.round()
        wait_for(device)
    events = prof.key_averages()
    print(f"ops in one (greedy) round: {sum(e.count for e in events)} profiler events")
    by_device = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=by_device, row_limit=args.rows,
                                                             max_name_column_width=45, max_shapes_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=45))


if __name__ == "__main__":
    main()
