"""A model card's wall time covers the whole run: a resumed run adds the time the checkpoint had
counted, not only the last process's (a run stopped by a session end is resumed several times)."""
import time

import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from omegaconf import OmegaConf

from train.common import build_trainer, training_seconds


class SlowSteps(BoringModel):
    def __init__(self, sleep_s: float):
        super().__init__()
        self.sleep_s = sleep_s

    def training_step(self, batch, batch_idx):
        time.sleep(self.sleep_s)
        return super().training_step(batch, batch_idx)


def _trainer(out, max_steps):
    cfg = OmegaConf.create({"checkpoint_every": 2, "trainer": {
        "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "limit_val_batches": 1,
        "enable_progress_bar": False, "enable_model_summary": False}})
    return build_trainer(cfg, out, logger=False)


def test_a_resumed_run_counts_the_time_before_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    first = _trainer(tmp_path, 4)
    first.fit(SlowSteps(0.25))
    counted = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
    before = next(v for k, v in counted.items() if k.startswith("Timer"))["time_elapsed"]["train"]
    assert before >= 4 * 0.25 and training_seconds(first) >= before

    second = _trainer(tmp_path, 6)
    second.fit(SlowSteps(0.0), ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert second.global_step == 6
    assert training_seconds(second) >= before  # without the checkpoint's count: two fast steps, well under 1 s
