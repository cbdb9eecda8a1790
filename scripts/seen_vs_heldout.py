"""Is a target learning its training scenes by heart? Teacher-forced NLL (with the caption, no CFG) of
each target on scenes it trained on against held-out scenes; the gap grows as it memorises.

python scripts/seen_vs_heldout.py outputs/v4/target/target models/world/target \\
    --seen outputs/v4/target/codes/train-000007.tar --heldout outputs/v4/target/codes/heldout-000000.tar

Each TARGET is a model folder or a `python -m train target` checkpoint (.ckpt). One row per target,
as a markdown table on stdout (and JSON with --out).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.code_shards import CodeShards, collate_code_samples  # noqa: E402
from decode.evaluation.metrics import next_token_stats  # noqa: E402
from decode.models.target import Condition, LlamaGenGPT, LlamaGenTarget  # noqa: E402
from train.target_task import trained_gpt  # noqa: E402


@torch.no_grad()
def mean_nll(target: LlamaGenTarget, urls: str, num: int, max_length: int, batch_size: int) -> float:
    """Mean per-token NLL over the first `num` samples of the code shards `urls`."""
    total, seen = 0.0, 0
    for batch in DataLoader(CodeShards(urls, max_length, repeat=False), batch_size=batch_size,
                            collate_fn=collate_code_samples):
        take = min(len(batch.codes), num - seen)
        logits = target.teacher_forced(Condition(batch.text[:take], batch.mask[:take]), batch.codes[:take]).logits
        total += next_token_stats(logits, batch.codes[:take])["nll"].item() * take
        seen += take
        if seen >= num:
            break
    if seen < num:
        raise ValueError(f"{urls} holds {seen} samples, fewer than --num {num}")
    return total / seen


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="+", help="target folders or training checkpoints (.ckpt)")
    p.add_argument("--seen", required=True, help="code shards the targets trained on")
    p.add_argument("--heldout", required=True, help="code shards they never saw")
    p.add_argument("--num", type=int, default=192, help="samples from each set")
    p.add_argument("--max-length", type=int, default=48, help="caption tokens, as the targets were trained")
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--out", help="also write the rows here as JSON")
    args = p.parse_args(argv)
    if args.num < 1:
        raise SystemExit(f"--num must be at least 1, got {args.num}")
    rows = []
    print("| target | NLL seen | NLL held out | gap |\n| --- | --- | --- | --- |")
    for source in args.targets:
        config, state, step = trained_gpt(source)
        gpt = LlamaGenGPT(config)
        gpt.load_state_dict(state)
        target = LlamaGenTarget(gpt.eval(), cfg_scale=1.0)
        seen, heldout = (mean_nll(target, urls, args.num, args.max_length, args.batch_size)
                         for urls in (args.seen, args.heldout))
        rows.append({"target": source, "step": step, "num": args.num, "nll_seen": seen, "nll_heldout": heldout,
                     "gap": heldout - seen})
        print(f"| {source} | {seen:.3f} | {heldout:.3f} | {heldout - seen:.3f} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
