"""`python -m train evaluator experiment=smoke` trains and writes a loadable evaluator."""
import json

import torch

from decode.evaluator import load_evaluator
from tests.conftest import run_train


def test_smoke_run_writes_a_loadable_evaluator(tmp_path):
    res = run_train("evaluator", "experiment=smoke", f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path}/hydra")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "evaluator" / "metrics.json").read_text())
    assert 0.0 <= metrics["val/alignment"] <= 1.0 and "val/object_acc" in metrics
    pred = load_evaluator(tmp_path / "evaluator").predict(torch.zeros(2, 3, 64, 64))
    assert pred.cell_object.shape == (2, 9) and pred.features.shape[0] == 2
