"""`python -m train evaluator experiment=smoke` trains and writes a loadable evaluator."""
import json
import os
import subprocess
import sys

import torch

from decode.evaluator import load_evaluator
from tests.conftest import REPO


def test_smoke_run_writes_a_loadable_evaluator(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["WANDB_MODE"] = "disabled"
    res = subprocess.run([sys.executable, "-m", "train", "evaluator", "experiment=smoke", f"out_dir={tmp_path}",
                          f"hydra.run.dir={tmp_path}/hydra"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "evaluator" / "metrics.json").read_text())
    assert 0.0 <= metrics["val/alignment"] <= 1.0 and "val/object_acc" in metrics
    pred = load_evaluator(tmp_path / "evaluator").predict(torch.zeros(2, 3, 64, 64))
    assert pred.cell_object.shape == (2, 9) and pred.features.shape[0] == 2
