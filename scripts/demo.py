"""`make demo`: the main job on the embedded default, end to end.

Today that is plain autoregressive decoding with a randomly initialised tiny LlamaGen target and
a random VQ tokenizer (the trained embedded world, the drafter and VVS decoding come in later
versions): the images are noise, and the run proves the pipeline and prints its statistics.
"""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a cat face in the top left and a small red star at the bottom, on a striped blue background"
NOTE = ("demo: the target and tokenizer are RANDOMLY INITIALISED (no trained weights ship yet), "
        "so the image is noise; this shows the decode pipeline and its statistics")


def main() -> int:
    out = REPO / "outputs" / "demo"
    cmd = [sys.executable, "-m", "decode", f"prompt={PROMPT}", "n=2", "batch_size=2", "seed=0",
           f"note='{NOTE}'", f"out_dir={out}", f"hydra.run.dir={out / 'hydra'}"]
    for old in (out / "images").glob("*.png"):
        old.unlink()  # the demo always regenerates
    (out / "stats.jsonl").unlink(missing_ok=True)
    print("+", " ".join(cmd[1:3]), "...", flush=True)
    return subprocess.call(cmd, cwd=REPO)


if __name__ == "__main__":
    sys.exit(main())
