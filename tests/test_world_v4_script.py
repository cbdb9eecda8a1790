"""scripts/world_v4.sh: the drafter stages run only from a target whose eval_target report meets the bar.

The training commands are replaced by a stand-in interpreter that records them; the gate itself and
keep_models run on the real interpreter."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_stages(tmp_path: Path, stages: str, alignment: float | None, bar: str | None = None):
    v4, keep = tmp_path / "v4", tmp_path / "keep"
    if alignment is not None:
        (v4 / "eval_target").mkdir(parents=True)
        (v4 / "eval_target" / "report.json").write_text(json.dumps({"alignment_samples": alignment}))
    py = tmp_path / "py"  # `-m train ...` is recorded, not run; anything else runs on the real interpreter
    py.write_text(f'#!/usr/bin/env bash\nif [ "$1" = -m ]; then echo "RAN $*"; exit 0; fi\nexec {sys.executable} "$@"\n')
    py.chmod(0o755)
    env = dict(os.environ, PY=str(py), V4=str(v4), KEEP=str(keep), STAGES=stages)
    env.pop("BAR", None)
    if bar is not None:
        env["BAR"] = bar
    out = subprocess.run(["bash", "scripts/world_v4.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    log = v4 / "drafter.log"  # a stage's output goes to its log
    return out, log.read_text() if log.exists() else ""


@pytest.mark.parametrize("alignment, runs", [(0.55, False), (0.65, True)])
def test_the_drafter_trains_only_from_a_target_that_meets_the_bar(tmp_path, alignment, runs):
    out, log = run_stages(tmp_path, "drafter", alignment)
    assert ("RAN -m train drafter" in log) == runs, out.stdout + out.stderr
    assert (out.returncode == 0) == runs
    if not runs:
        assert "below the bar" in out.stdout and "0.550" in out.stdout


def test_without_a_report_the_drafter_asks_for_eval_target_unless_the_bar_is_off(tmp_path):
    out, log = run_stages(tmp_path, "drafter", None)
    assert out.returncode == 1 and "run stage eval_target first" in out.stdout and not log
    out, log = run_stages(tmp_path, "drafter", None, bar="0")
    assert out.returncode == 0 and "RAN -m train drafter" in log, out.stdout + out.stderr
