"""Distributed strategies on CPU: DDP with 2 gloo processes, and DeepSpeed ZeRO-3 (the gloo
subclass) giving the same drafter as a plain single-process run."""
import torch
from safetensors.torch import load_file

from decode.models.checkpoint import save_model_folder
from tests.conftest import run_train, tiny_gpt
from tests.train.test_drafter_task import TOKENIZER


def _smoke(tmp_path, name, *overrides):
    target = tmp_path / "target"
    if not target.exists():
        gpt = tiny_gpt(vocab_size=64, block_size=64, cls_token_num=16, caption_dim=384)
        save_model_folder(target, gpt, gpt.config.to_dict(), kind="llamagen_gpt")
    res = run_train(
        "drafter", "experiment=smoke", "target=tiny_random_t2i", f"target.ckpt={target}",
         "data.tokenizer=null", f"data.random_tokenizer={TOKENIZER}", "data.image_size=32", "data.max_length=16",
         f"data.train_urls='{tmp_path}/codes/train-{{000000..000001}}.tar'" if name != "plain" else "data.build=true",
         f"data.heldout_urls='{tmp_path}/codes/heldout-000000.tar'" if name != "plain" else "data.build=true",
         f"out_dir={tmp_path / name if name != 'plain' else tmp_path}", f"hydra.run.dir={tmp_path}/hydra_{name}",
         *overrides)
    assert res.returncode == 0, res.stderr[-3000:]
    return load_file(str((tmp_path / name if name != "plain" else tmp_path) / "drafter" / "model.safetensors"))


def test_ddp_and_zero3_on_cpu(tmp_path):
    plain = _smoke(tmp_path, "plain")  # also builds the code shards the others read
    zero3 = _smoke(tmp_path, "zero3", "trainer=deepspeed_zero3")
    assert plain.keys() == zero3.keys()
    for k in plain:
        assert plain[k].shape == zero3[k].shape, k  # ZeRO-3 export gathers the partitioned parameters
        torch.testing.assert_close(plain[k], zero3[k], atol=5e-4, rtol=1e-2)  # fp32, reduction order differs
    ddp = _smoke(tmp_path, "ddp", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu")
    assert ddp.keys() == plain.keys() and all(torch.isfinite(v).all() for v in ddp.values())
