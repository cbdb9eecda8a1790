"""`python -m train target experiment=smoke` builds tiny code shards, trains, and writes a loadable target."""
import json

import torch

from decode.target import build_gpt
from tests.conftest import run_train


def test_smoke_run_writes_a_loadable_target(tmp_path):
    res = run_train("target", "experiment=smoke", f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path}/hydra")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "target" / "metrics.json").read_text())
    assert {"val/nll", "val/top1_prob", "val/entropy"} <= set(metrics)
    assert 0 < metrics["val/top1_prob"] <= 1 and metrics["val/nll"] > 0
    gpt = build_gpt(str(tmp_path / "target"))
    assert gpt.config.vocab_size == 64 and gpt.config.block_size == 64
    assert not torch.isnan(gpt.output.weight).any()
