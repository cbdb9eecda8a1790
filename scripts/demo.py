"""`make demo`: the main job on the embedded default, end to end.

1. `python -m train drafter experiment=demo`: a short online distillation of an EAGLE-style
   drafter from the shipped world target (a few minutes on 2 CPU cores), with its held-out
   agreement curve. Skip it with DEMO_TRAIN=0 (the shipped drafter is used then).
2. `python -m decode` with the shipped world target, tokenizer and evaluator on the same world
   prompts and seeds:
   - greedy AR and greedy EAGLE-2: exact speculative decoding must reproduce AR's images byte for
     byte with fewer target forwards (checked here);
   - sampled AR and sampled VVS (similarity-scheduled verification skipping over LANTERN++ lambda 2,
     the frontier's pick on world v4; docs/results.md "VVS's defaults on world v4"):
     each prints its speed summary (NFE, step compression, tau, skip ratio, latency split) and the
     evaluator's alignment and target NLL of what it made; a side-by-side table closes the demo. These
     runs fix the draft tree (tree=fixed) to show what speculation does to the step count;
   - sampled VVS with tree=auto, the decode default: the budget times how many of LANTERN++'s static
     tree's nodes pay on this device (decode/budget.py) and falls back to plain AR when none beats it,
     never slower; on a 2-core CPU the small world target is compute-bound, so it picks AR.
Four images per run are far too few to compare quality; scripts/benchmark.py does that.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_WORLD_SEED = 2  # the shipped models were trained on world seeds 0 and 1: these prompts are held out
NUM_PROMPTS = 2
RUNS = [  # (run name, method, sampling temperature, tree)
    ("ar_greedy", "ar", 0.0, "fixed"), ("eagle2_greedy", "eagle2", 0.0, "fixed"), ("ar", "ar", 1.0, "fixed"),
    ("vvs", "vvs", 1.0, "fixed"), ("vvs_auto", "vvs", 1.0, "auto")]


def demo_prompts() -> list[str]:
    """Captions of the default world's first scenes at a seed no shipped model was trained on."""
    from data.world import SceneGenerator

    world = SceneGenerator(seed=DEMO_WORLD_SEED)
    return [world.scene(i).caption for i in range(NUM_PROMPTS)]


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd[1:4]), "...", flush=True)
    code = subprocess.call(cmd, cwd=REPO)
    if code:
        sys.exit(code)


def main() -> int:
    out = REPO / "outputs" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    drafter = REPO / "models" / "world" / "drafter"
    if os.environ.get("DEMO_TRAIN", "1") != "0":
        run([sys.executable, "-m", "train", "drafter", "experiment=demo", "overwrite=true", f"out_dir={out / 'drafter'}",
             f"hydra.run.dir={out / 'drafter' / 'hydra'}"])
        drafter = out / "drafter" / "drafter"
    captions = demo_prompts()
    prompts = out / "prompts.txt"
    prompts.write_text("\n".join(captions) + "\n")
    images, stats = {}, {}
    for name, method, temperature, tree in RUNS:
        run_dir = out / name
        for old in (run_dir / "images").glob("*.png"):
            old.unlink()  # the demo always regenerates
        (run_dir / "stats.jsonl").unlink(missing_ok=True)
        print(f"\n== {name}: method={method} sampling.temperature={temperature} tree={tree} ==", flush=True)
        run([sys.executable, "-m", "decode", f"prompts={prompts}", f"method={method}", f"drafter.ckpt={drafter}",
             f"tree={tree}",
             "n=2", "batch_size=4", "seed=0", f"sampling.temperature={temperature}", f"out_dir={run_dir}",
             f"hydra.run.dir={run_dir / 'hydra'}"])
        images[name] = [p.read_bytes() for p in sorted((run_dir / "images").glob("*.png"))]
        stats[name] = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    same = images["ar_greedy"] == images["eagle2_greedy"]
    print(f"\ngreedy EAGLE-2 images identical to greedy AR: {same} ({len(images['ar_greedy'])} images)")
    prompt_grid(captions, {name: sorted((out / name / "images").glob("*.png")) for name in ("ar", "vvs")},
                out / "grid.png")
    print(side_by_side(stats))
    print(f"prompt | AR | VVS, side by side: {out / 'grid.png'}")
    print(f"files in {out}")
    return 0 if same else 1


def prompt_grid(prompts: list[str], columns: dict[str, list[Path]], path: Path, scale: int = 3) -> None:
    """One row per image: its prompt, then each run's image of it (same prompt, same seed), upscaled."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    names = list(columns)
    first = Image.open(columns[names[0]][0])
    side, text_w, font = first.width * scale, 260, ImageFont.load_default()
    rows = len(columns[names[0]])
    sheet = Image.new("RGB", (text_w + len(names) * (side + 8), 16 + rows * (side + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(names):
        draw.text((text_w + c * (side + 8), 2), name, fill="black", font=font)
    for r in range(rows):
        y = 16 + r * (side + 8)
        prompt = prompts[int(columns[names[0]][r].name[:5])]
        for j, line in enumerate(textwrap.wrap(prompt, width=40)):
            draw.text((4, y + 12 * j), line, fill="black", font=font)
        for c, name in enumerate(names):
            img = Image.open(columns[name][r]).convert("RGB").resize((side, side), Image.NEAREST)
            sheet.paste(img, (text_w + c * (side + 8), y))
    sheet.save(path)


def side_by_side(stats: dict[str, list[dict]]) -> str:
    mean = lambda rows, k: sum(r[k] or 0 for r in rows) / len(rows)  # noqa: E731
    lines = ["run            NFE/img  step compr.  tau    skip ratio  latency/batch  alignment  target NLL",
             "-------------  -------  -----------  -----  ----------  -------------  ---------  ----------"]
    for name, rows in stats.items():
        lines.append(f"{name:13s}  {mean(rows, 'nfe'):7.1f}  {mean(rows, 'step_compression'):11.2f}  "
                     f"{mean(rows, 'tau'):5.2f}  {mean(rows, 'skip_ratio'):10.3f}  {mean(rows, 'latency_s'):11.2f} s  "
                     f"{mean(rows, 'alignment'):9.3f}  {mean(rows, 'target_nll'):10.3f}")
    lines.append("(2-core CPU, float32, batch 4, 4 images per run: too few for quality claims; target NLL = nats "
                 "per token under the distribution AR samples, AR's value for a lossless method; "
                 "scripts/benchmark.py measures speed and quality side by side, with intervals)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
