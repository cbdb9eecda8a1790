"""Copy a world's trained model folders into the repository in float16, so that they outlive the run
directory (a session's outputs/ does not survive it; what is committed does).

    python scripts/keep_models.py --src outputs/v4 --dst models/world

For each of tokenizer, target, evaluator, drafter, spatial, scheduler: the exported folder
SRC/<name>/<name> when its run has finished (unless the kept copy is newer than it); for the target,
while its run is still going, a snapshot of SRC/target/checkpoints/last.ckpt (its weights and a PROGRESS.md with the step), which
`python -m train target init=DST/target` continues from. Prints what it kept and the total size against
the shipping budget; exits 1 when the kept folders exceed it.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode.models.checkpoint import cast_model_folder, save_model_folder

NAMES = ("tokenizer", "target", "evaluator", "drafter", "spatial", "scheduler")
BUDGET_MB = 40.0  # what the repository ships, all folders together (issue 19)


def snapshot_target(ckpt: Path, dst: Path) -> Path:
    """A training checkpoint's target weights as a float16 model folder with a PROGRESS.md."""
    from train.target_task import trained_gpt  # the checkpoint's layout is the training task's

    config, state, step = trained_gpt(str(ckpt))
    from decode.models.target import LlamaGenGPT

    gpt = LlamaGenGPT(config)
    gpt.load_state_dict(state)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_folder(tmp, gpt, config.to_dict(), kind="llamagen_gpt")
    cast_model_folder(tmp, tmp, torch.float16)
    (tmp / "PROGRESS.md").write_text(
        f"# Target in training (not finished)\n\nA float16 snapshot of `{ckpt}` at training step {step}.\n"
        f"Continue with `python -m train target init={dst} ...` (the optimizer state starts afresh).\n")
    return _replace(tmp, dst)


def _replace(tmp: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def keep(src: Path, dst: Path) -> dict[str, str]:
    kept = {}
    for name in NAMES:
        folder, last = src / name / name, src / name / "checkpoints" / "last.ckpt"
        if folder.is_dir():
            if _kept_since(folder, dst / name):
                continue  # its card may carry notes added by hand since (lineage, measurements)
            tmp = dst / f"{name}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            cast_model_folder(folder, tmp, torch.float16)
            kept[name] = str(_replace(tmp, dst / name))
        elif name == "target" and last.is_file():
            kept[name] = str(snapshot_target(last, dst / name)) + " (snapshot of a run in progress)"
    return kept


def _kept_since(folder: Path, kept: Path) -> bool:
    """Whether `kept` was written after every file of `folder` (nothing new to keep)."""
    config = kept / "config.json"
    return config.is_file() and config.stat().st_mtime >= max((f.stat().st_mtime for f in folder.rglob("*")), default=0.0)


def size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, required=True, help="the world's run directory, e.g. outputs/v4")
    p.add_argument("--dst", type=Path, required=True, help="where the float16 folders go, e.g. models/world")
    args = p.parse_args(argv)
    if not args.src.is_dir():
        p.error(f"--src {args.src}: no such directory")
    args.dst.mkdir(parents=True, exist_ok=True)
    kept = keep(args.src, args.dst)
    for name, where in kept.items():
        print(f"{name:10s} -> {where}")
    total = size_mb(args.dst)
    print(f"{len(kept)} kept; {args.dst} holds {total:.1f} MiB (budget {BUDGET_MB:.0f} MB)")
    if total > BUDGET_MB:
        print(f"over the {BUDGET_MB:.0f} MB budget", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
