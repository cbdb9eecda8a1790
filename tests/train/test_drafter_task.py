"""`python -m train drafter` runs end to end on a tiny random target and writes a loadable drafter;
the frozen target stays out of its checkpoints."""
import json
import os
import subprocess
import sys

import torch

from decode.checkpoint import save_model_folder
from decode.drafter import load_drafter
from tests.conftest import REPO, tiny_gpt

TOKENIZER = "{codebook_size:64,encoder_ch_mult:[1,1,1],decoder_ch_mult:[1,1,1],z_channels:32,ch:32,num_res_blocks:1}"


def test_smoke_run_distills_a_loadable_drafter(tmp_path):
    gpt = tiny_gpt(vocab_size=64, block_size=64, cls_token_num=16, caption_dim=384)
    save_model_folder(tmp_path / "target", gpt, gpt.config.to_dict(), kind="llamagen_gpt")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["WANDB_MODE"] = "disabled"
    res = subprocess.run(
        [sys.executable, "-m", "train", "drafter", "experiment=smoke", "target=tiny_random_t2i",
         f"target.ckpt={tmp_path / 'target'}",
         "data.tokenizer=null", f"data.random_tokenizer={TOKENIZER}", "data.image_size=32", "data.max_length=16",
         f"out_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path}/hydra"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "drafter" / "metrics.json").read_text())
    for d in range(1, 6):
        assert 0.0 <= metrics[f"val/agreement_depth{d}"] <= 1.0
    assert metrics["val/vloss"] > 0 and "val/top10_agreement" in metrics
    drafter = load_drafter(tmp_path / "run" / "drafter", gpt)
    assert drafter.config.cls_token_num == 16
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"] and all(k.startswith("drafter.") for k in ckpt["state_dict"])
