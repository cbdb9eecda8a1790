"""Golden token grids: every method on a few world prompts at fixed seeds, greedy and sampled.

Recorded once before the decode redesign (issue 18) so that the redesign can be checked to keep
behaviour: `tests/decode/test_golden.py` decodes the same runs and asserts identical tokens and
pass counts. Re-record only when a method's behaviour is meant to change, and say so in the commit:

    .venv/bin/python -m tests.golden --record
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

FILE = Path(__file__).resolve().parent / "fixtures" / "golden_grids.json"
PROMPTS = ["one large green circle in the center, against a noisy yellow background",
           "a small red star at the top left, on a striped blue background"]
SEEDS = [11, 12]
NUM_TOKENS = 64  # the first four rows of the 16 x 16 grid: enough for drafts, skips and Jacobi windows
# (label, method, option overrides): every method, and VVS's schedulers over its base
RUNS = [
    ("ar", "ar", {}),
    ("eagle2", "eagle2", {}),
    ("lantern", "lantern", {}),
    ("lantern_pp", "lantern_pp", {}),
    ("vvs_u", "vvs_u", {}),
    ("vvs", "vvs", {"base": "lantern", "tau": 0.7}),  # recorded when VVS's default base was LANTERN
    ("vvs_tau05", "vvs", {"base": "lantern", "tau": 0.5}),
    ("vvs_learned", "vvs", {"base": "lantern", "skipping": "learned", "threshold": 0.5}),
    ("vvs_stale2", "vvs", {"base": "lantern", "tau": 0.5, "staleness": 2, "max_consecutive": 2}),
    ("lantern_pp_sim", "lantern_pp", {"skipping": "similarity", "tau": 0.5}),  # skipping over LANTERN++
    ("eagle2_uniform", "eagle2", {"skipping": "uniform"}),  # skipping over exact acceptance
    ("sjd", "sjd", {}),
    ("sjd_vp", "sjd_vp", {}),
]
MODES = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 1.0}}


def decode_runs(runs=RUNS, modes=MODES) -> dict[str, dict]:
    """{label/mode: {tokens: [B][N], nfe: [B], skipped: [B]}} decoded by the project's decode API."""
    from tests.golden_api import decode_world

    out = {}
    for mode, sampling in modes.items():
        for label, method, overrides in runs:
            gen = decode_world(method, overrides, sampling, PROMPTS, SEEDS, NUM_TOKENS)
            out[f"{label}/{mode}"] = {"tokens": gen.tokens.tolist(), "nfe": gen.nfe.tolist(),
                                      "skipped": gen.skipped.tolist()}
    return out


def load() -> dict[str, dict]:
    return json.loads(FILE.read_text())


def main(argv: list[str]) -> None:
    if argv != ["--record"]:
        raise SystemExit("usage: python -m tests.golden --record")
    torch.set_num_threads(1)
    grids = decode_runs()
    FILE.parent.mkdir(parents=True, exist_ok=True)
    FILE.write_text(json.dumps(grids, sort_keys=True) + "\n")
    for k, v in grids.items():
        print(f"{k:24s} nfe {v['nfe']} skipped {v['skipped']}")
    print(f"wrote {FILE}")


if __name__ == "__main__":
    main(sys.argv[1:])
