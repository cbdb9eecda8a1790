"""Where each method's decode loop would wait for a GPU: host reads of device tensors, blocking
copies and implicit index copies per decode step, counted by `decode.core.host.SyncCounter` on the
embedded world (random caption features, so no text encoder is needed).

Per step = (waits of a whole decode - waits of the prefill alone) / the batch's loop steps. On a
GPU machine, `--cuda-debug` also counts the real synchronisations with
`torch.cuda.set_sync_debug_mode("warn")`.

python scripts/host_syncs.py --methods ar eagle2 lantern lantern_pp vvs --batch 1 4
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from decode.api import DTYPES, Components, build_components, decode_config, make_method, pick_device  # noqa: E402
from decode.core.engine import generate  # noqa: E402
from decode.core.host import SyncCounter, cuda_sync_sites, cuda_syncs  # noqa: E402
from decode.core.sampling import SamplingParams, row_generators  # noqa: E402
from decode.models.target import Condition  # noqa: E402
from decode.strategies.registry import resolve_method  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["ar", "eagle2", "lantern", "lantern_pp", "vvs", "sjd"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    p.add_argument("--tokens", type=int, default=64, help="image tokens per decode")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--cuda-debug", action="store_true", help="also count real CUDA syncs (GPU only)")
    p.add_argument("--top", type=int, default=6, help="call sites listed per run")
    p.add_argument("--out", default="outputs/host_syncs")
    return p.parse_args(argv)


def decode(parts: Components, name: str, batch: int, tokens: int, sampling: SamplingParams, counter=None):
    method, target = make_method(parts, resolve_method(name), sampling), parts.target
    g = torch.Generator().manual_seed(0)
    cond = Condition(torch.randn(batch, target.prefix_len, target.config.caption_dim, generator=g).mul(0.1)
                     .to(target.device))
    gens = row_generators(list(range(batch)), target.device)
    if counter is None:
        return generate(target, cond, num_tokens=tokens, sampling=sampling, generators=gens, method=method)
    with counter:
        return generate(target, cond, num_tokens=tokens, sampling=sampling, generators=gens, method=method)


@torch.no_grad()
def main(argv=None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    parts = build_components(decode_config(), device, DTYPES[args.dtype],
                             methods=[resolve_method(name) for name in args.methods], text_encoder=False)
    gpt, drafter = parts.target.gpt, parts.drafter
    sampling = SamplingParams(temperature=args.temperature)
    rows = []
    for name in args.methods:
        for b in args.batch:
            prefill, full = SyncCounter(gpt, drafter), SyncCounter(gpt, drafter)
            decode(parts, name, b, 1, sampling, prefill)
            gen = decode(parts, name, b, args.tokens, sampling, full)
            steps = gen.batch_steps
            row = dict(method=name, batch=b, steps=steps, prefill_waits=prefill.waits,
                       per_step=(full.waits - prefill.waits) / max(steps, 1),
                       by_kind={k: (full.counts[k] - prefill.counts[k]) / max(steps, 1) for k in full.counts},
                       sites=[(k, s, n) for (k, s), n in full.sites.most_common(args.top)])
            if args.cuda_debug and device.type == "cuda":
                real_prefill = cuda_syncs(lambda: decode(parts, name, b, 1, sampling))
                real_full = cuda_sync_sites(lambda: decode(parts, name, b, args.tokens, sampling))
                row["cuda_per_step"] = (sum(real_full.values()) - real_prefill) / max(steps, 1)
                row["cuda_sites"] = real_full.most_common(args.top)  # the whole decode's, set-up included
            rows.append(row)
            print(json.dumps(row))
    lines = ["| method | batch | loop steps | waits per step | by kind | top call sites (kind, site, count) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["by_kind"].items()) if v)
        sites = "; ".join(f"{k} {s} x{n}" for k, s, n in r["sites"])
        real = f" (CUDA: {r['cuda_per_step']:.2f})" if "cuda_per_step" in r else ""
        if "cuda_sites" in r:
            sites += "<br>CUDA: " + "; ".join(f"{s} x{n}" for s, n in r["cuda_sites"])
        lines.append(f"| {r['method']} | {r['batch']} | {r['steps']} | {r['per_step']:.2f}{real} | {kinds} | {sites} |")
    lines += ["", f"{args.tokens} tokens per image, temperature {args.temperature}, CFG 4, {device}, {args.dtype}; "
                  "waits counted by decode.core.host.SyncCounter (a model of a CUDA run). Per step: the loop's waits "
                  "(a whole decode's minus the prefill's) over the batch's steps; call sites: the whole decode, "
                  "set-up included (a tensor made with an explicit device= counts as on the device there, "
                  "even on the host)." + (" CUDA: the real waits, from the sync debug mode, at their innermost "
                                          "decode/ frame." if args.cuda_debug else "")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_syncs.md").write_text("\n".join(lines) + "\n")
    (out / "host_syncs.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
