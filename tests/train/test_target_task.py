"""`python -m train target experiment=smoke` builds tiny code shards, trains, and writes a loadable target."""
import json

import torch

from decode.models.target import build_gpt
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


def test_cfg_sample_grid_is_written_after_validation(tmp_path):
    from decode.models.checkpoint import save_model_folder
    from decode.models.vq import load_vq

    vq = load_vq(None, codebook_size=64, encoder_ch_mult=[1, 1, 1], decoder_ch_mult=[1, 1, 1], z_channels=32, ch=32)
    save_model_folder(tmp_path / "vq", vq, vq.config.to_dict(), kind="llamagen_vq")
    res = run_train("target", "experiment=smoke", f"data.tokenizer={tmp_path / 'vq'}", "samples.count=2",
                    "trainer.max_steps=10", f"out_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path}/hydra")
    assert res.returncode == 0, res.stderr[-3000:]
    grids = sorted((tmp_path / "run" / "samples").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_0000010.png"]
    from PIL import Image

    assert Image.open(grids[0]).size == (2 * 32, 32)  # two prompts side by side, 32 px each
