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
    # compiled training (the aot_eager backend: tracing and autograd, no C++ build) beside eager sample decoding
    res = run_train("target", "experiment=smoke", f"data.tokenizer={tmp_path / 'vq'}", "samples.count=2",
                    "trainer.max_steps=10", f"out_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path}/hydra",
                    "compile=true", "compile_backend=aot_eager")
    assert res.returncode == 0, res.stderr[-3000:]
    grids = sorted((tmp_path / "run" / "samples").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_0000010.png"]
    from PIL import Image

    assert Image.open(grids[0]).size == (2 * 32, 32)  # two prompts side by side, 32 px each


def _tiny_target(n_layer: int, seed: int):
    from train.target_task import TargetModule

    torch.manual_seed(seed)
    gpt = dict(model_type="t2i", dim=32, n_layer=n_layer, n_head=2, multiple_of=16, vocab_size=64, block_size=16,
               cls_token_num=8, caption_dim=12)
    return TargetModule(gpt=gpt)


def _logits(module, text, codes):
    from decode.models.target import Condition

    with torch.no_grad():
        return module.target.teacher_forced(Condition(text), codes).logits


def test_a_deeper_target_grown_from_a_trained_one_computes_the_same_until_it_trains(tmp_path):
    import pytest

    from decode.models.checkpoint import save_model_folder
    from train.target_task import start_from

    trained = _tiny_target(2, seed=0)
    save_model_folder(tmp_path / "t", trained.gpt, trained.gpt.config.to_dict(), kind="llamagen_gpt")
    torch.save({"state_dict": trained.state_dict(), "hyper_parameters": dict(trained.hparams)}, tmp_path / "t.ckpt")
    text, codes = torch.randn(2, 8, 12), torch.randint(0, 64, (2, 16))
    for source in (tmp_path / "t", tmp_path / "t.ckpt"):
        deeper = _tiny_target(4, seed=1)
        assert not torch.allclose(_logits(deeper, text, codes), _logits(trained, text, codes))
        start_from(deeper.gpt, str(source))
        torch.testing.assert_close(_logits(deeper, text, codes), _logits(trained, text, codes))
        assert deeper.gpt.layers[1].attention.wqkv.weight.abs().sum() > 0  # the new blocks can learn
    with pytest.raises(ValueError, match="must be a multiple"):
        start_from(_tiny_target(3, seed=1).gpt, str(tmp_path / "t"))
    wider = _tiny_target(2, seed=1)
    wider.gpt.config = type(wider.gpt.config)(**{**wider.gpt.config.to_dict(), "dim": 48})
    with pytest.raises(ValueError, match="dim differ"):
        start_from(wider.gpt, str(tmp_path / "t"))
