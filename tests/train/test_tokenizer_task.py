"""`python -m train tokenizer experiment=smoke` runs end to end, writes a model folder, and resumes."""
import json

import torch

from decode.models.vq import load_vq
from tests.conftest import run_train


def _train(out, *extra, run_dir=None):
    """out_dir=out, or (run_dir given) no out_dir: the run writes into Hydra's run dir."""
    where = [f"hydra.run.dir={run_dir}"] if run_dir else [f"out_dir={out}", f"hydra.run.dir={out}/hydra"]
    return run_train("tokenizer", "experiment=smoke", *where, *extra)


def test_smoke_run_writes_a_loadable_tokenizer_and_resumes(tmp_path):
    out = tmp_path / "tok"
    res = _train(None, "trainer.max_steps=10", run_dir=out)  # no out_dir: the Hydra run dir
    assert res.returncode == 0, res.stderr[-3000:]
    folder = out / "tokenizer"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert {"val/psnr", "val/codebook_usage"} <= set(metrics)
    assert "| steps | 10 |" in (folder / "README.md").read_text()
    vq = load_vq(str(folder))
    assert vq.encode(torch.zeros(1, 3, 64, 64)).shape == (1, 256)
    assert (out / "checkpoints" / "last.ckpt").is_file()
    # resume: the second run continues from step 10 to step 20
    res = _train(out, "trainer.max_steps=20", "ckpt_path=last")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| steps | 20 |" in (folder / "README.md").read_text()
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 20


def test_wandb_offline_run_records_metrics_and_reconstruction_images(tmp_path):
    res = run_train("tokenizer", "experiment=smoke", "logger=wandb", "trainer.max_steps=10",
                    f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path}/hydra", WANDB_MODE="offline")
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    images = list(runs[0].glob("files/media/images/val/reconstructions_*.png"))
    assert images, sorted(str(p.relative_to(runs[0])) for p in runs[0].rglob("*"))[:40]


def test_fine_tuning_starts_from_a_tokenizer_of_the_same_architecture(tmp_path):
    import pytest

    from decode.models.checkpoint import save_model_folder
    from decode.models.vq import VQConfig, VQModel
    from train.tokenizer_task import start_from

    small = dict(codebook_size=64, encoder_ch_mult=[1, 1], decoder_ch_mult=[1, 1], z_channels=32, ch=32, num_res_blocks=1)
    torch.manual_seed(0)
    source, fresh = VQModel(VQConfig(**small)), VQModel(VQConfig(**small))
    save_model_folder(tmp_path / "tok", source, source.config.to_dict(), kind="llamagen_vq")
    start_from(fresh, str(tmp_path / "tok"))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), fresh.state_dict().values()))
    with pytest.raises(ValueError, match="codebook_size"):
        start_from(VQModel(VQConfig(**{**small, "codebook_size": 128})), str(tmp_path / "tok"))


def test_the_perceptual_loss_is_zero_for_equal_images_and_trains_the_reconstruction_only():
    from train.perceptual import InceptionPerceptual
    from train.tokenizer_task import TokenizerModule

    net = InceptionPerceptual(size=96)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = (x + 0.2 * torch.randn_like(x)).requires_grad_()
    assert float(net(x, x)) == 0.0
    loss = net(y, x)
    loss.backward()
    assert float(loss) > 0 and y.grad.abs().sum() > 0
    small = dict(codebook_size=64, encoder_ch_mult=[1, 1], decoder_ch_mult=[1, 1], z_channels=32, ch=32, num_res_blocks=1)
    module = TokenizerModule(vq=small, perceptual_weight=1.0)
    parts, _, _ = module.losses(x)
    assert float(parts["perceptual"]) > 0
    assert all(k.startswith("vq.") for k in module.state_dict())  # Inception stays out of checkpoints
