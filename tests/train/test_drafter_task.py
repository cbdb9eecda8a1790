"""`python -m train drafter` runs end to end on a tiny random target and writes a loadable drafter;
the frozen target stays out of its checkpoints."""
import contextlib
import json
import os
import signal
import subprocess
import time

import pytest
import torch

from decode.models.checkpoint import save_model_folder
from decode.models.drafter import load_drafter
from tests.conftest import REPO, run_train, tiny_gpt, train_command

TOKENIZER = "{codebook_size:64,encoder_ch_mult:[1,1,1],decoder_ch_mult:[1,1,1],z_channels:32,ch:32,num_res_blocks:1}"


def test_smoke_run_distills_a_loadable_drafter(tmp_path):
    gpt = tiny_gpt(vocab_size=64, block_size=64, cls_token_num=16, caption_dim=384)
    save_model_folder(tmp_path / "target", gpt, gpt.config.to_dict(), kind="llamagen_gpt")
    res = run_train("drafter", "experiment=smoke", "target=tiny_random_t2i", f"target.ckpt={tmp_path / 'target'}",
                    "data.tokenizer=null", f"data.random_tokenizer={TOKENIZER}", "data.image_size=32",
                    "data.max_length=16", f"out_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path}/hydra",
                    "compile=true", "compile_backend=aot_eager")  # compiled features, eager validation decodes
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "drafter" / "metrics.json").read_text())
    for d in range(1, 6):
        assert 0.0 <= metrics[f"val/agreement_depth{d}"] <= 1.0
    assert metrics["val/vloss"] > 0 and "val/top10_agreement" in metrics
    assert 1.0 <= metrics["val/greedy_step_compression"] <= 64.0
    drafter = load_drafter(tmp_path / "run" / "drafter", gpt)
    assert drafter.config.cls_token_num == 16
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"] and all(k.startswith("drafter.") for k in ckpt["state_dict"])


def test_offline_distillation_streams_dumped_features(tmp_path):
    gpt = tiny_gpt(vocab_size=64, block_size=64, cls_token_num=16, caption_dim=384)
    save_model_folder(tmp_path / "target", gpt, gpt.config.to_dict(), kind="llamagen_gpt")
    common = ["target=tiny_random_t2i", f"target.ckpt={tmp_path / 'target'}"]

    def run(*args):
        res = run_train(*args, f"hydra.run.dir={tmp_path}/hydra")
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout

    data = ["data.tokenizer=null", f"data.random_tokenizer={TOKENIZER}", "data.image_size=32", "data.max_length=16"]
    run("drafter", "experiment=smoke", *common, *data, "trainer.max_steps=1", f"out_dir={tmp_path / 'online'}")
    codes = sorted((tmp_path / "online" / "codes").glob("train-*.tar"))
    pattern = str(codes[0]).replace("000000", "{000000..%06d}" % (len(codes) - 1))
    out = run("features", *common, f"codes='{pattern}'", f"out={tmp_path / 'feats'}", "shard_size=8")
    assert "KiB per sample" in out
    feats = sorted((tmp_path / "feats").glob("train-*.tar"))
    fpattern = str(feats[0]).replace("000000", "{000000..%06d}" % (len(feats) - 1))
    run("drafter", "experiment=smoke", *common, *data, f"data.features='{fpattern}'",
        f"data.train_urls='{pattern}'", f"data.heldout_urls='{pattern}'", f"out_dir={tmp_path / 'offline'}")
    metrics = json.loads((tmp_path / "offline" / "drafter" / "metrics.json").read_text())
    assert 0.0 <= metrics["val/agreement_depth1"] <= 1.0
    run("drafter", "experiment=smoke", "drafter.kind=spatial", *common, *data, f"data.features='{fpattern}'",
        f"data.train_urls='{pattern}'", f"data.heldout_urls='{pattern}'", f"out_dir={tmp_path / 'spatial'}")
    metrics = json.loads((tmp_path / "spatial" / "spatial" / "metrics.json").read_text())
    assert 0.0 <= metrics["val/below_top1"] <= metrics["val/below_top10"] <= 1.0


def test_spatial_heads_distil_per_direction_and_refuse_another_grid(tmp_path):
    gpt = tiny_gpt(vocab_size=64, block_size=64, cls_token_num=16, caption_dim=384)
    save_model_folder(tmp_path / "target", gpt, gpt.config.to_dict(), kind="llamagen_gpt")
    # the frozen target compiled (aot_eager: tracing, no C++ build) for the features
    res = run_train("drafter", "experiment=smoke", "drafter.kind=spatial", "drafter.right=2",
                    "target=tiny_random_t2i", f"target.ckpt={tmp_path / 'target'}",
                    "data.tokenizer=null", f"data.random_tokenizer={TOKENIZER}", "data.image_size=32",
                    "data.max_length=16", f"out_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path}/hydra",
                    "compile=true", "compile_backend=aot_eager")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "spatial heads: held-out top-1 / top-10 agreement [right1" in res.stdout
    metrics = json.loads((tmp_path / "run" / "spatial" / "metrics.json").read_text())
    for head in ("right1", "right2", "below"):
        assert 0.0 <= metrics[f"val/{head}_top1"] <= metrics[f"val/{head}_top10"] <= 1.0
    assert "val/right3_top1" not in metrics
    assert "Spatial draft heads" in (tmp_path / "run" / "spatial" / "README.md").read_text()

    from decode.models.checkpoint import CheckpointError
    from decode.models.spatial import load_spatial
    from decode.models.target import LlamaGenTarget

    heads = load_spatial(tmp_path / "run" / "spatial", LlamaGenTarget(gpt))
    assert set(heads.heads) == {"right1", "right2", "below"} and heads.config.width == 8
    wider = tiny_gpt(vocab_size=64, block_size=256, cls_token_num=16, caption_dim=384)
    with pytest.raises(CheckpointError, match="grid tokens"):
        load_spatial(tmp_path / "run" / "spatial", LlamaGenTarget(wider))


def test_resume_continues_exactly(tmp_path):
    """10 steps in one go equal 6 steps, a stop, and a resume to 10 (data position and randomness)."""
    from safetensors.torch import load_file

    gpt = tiny_gpt(vocab_size=64, block_size=64, cls_token_num=16, caption_dim=384)
    save_model_folder(tmp_path / "target", gpt, gpt.config.to_dict(), kind="llamagen_gpt")
    def args(out, *more):
        return ("drafter", "experiment=smoke", "target=tiny_random_t2i", f"target.ckpt={tmp_path / 'target'}",
                "data.tokenizer=null", f"data.random_tokenizer={TOKENIZER}", "data.image_size=32",
                "data.max_length=16", "trainer.val_check_interval=3", "checkpoint_every=3",
                "optim.warmup_steps=2", "optim.lr=3e-3", f"out_dir={out}", f"hydra.run.dir={out}/hydra", *more)

    def run(out, *more):
        res = run_train(*args(out, *more))
        assert res.returncode == 0, res.stderr[-3000:]

    run(tmp_path / "straight", "trainer.max_steps=10", "optim.total_steps=10")
    run(tmp_path / "resumed", "trainer.max_steps=6", "optim.total_steps=10")  # stopped at step 6
    run(tmp_path / "resumed", "trainer.max_steps=10", "optim.total_steps=10", "ckpt_path=last")
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 9  # the resumed run went on past its starting step (6)
    card = (tmp_path / "resumed" / "drafter" / "README.md").read_text()
    assert "| steps | 10 |" in card and "OpenMoji" not in card  # a random target: no attribution to inherit
    a = load_file(str(tmp_path / "straight" / "drafter" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "drafter" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)

    # killed (SIGKILL, no chance to clean up) once its first checkpoint is on disk, then resumed
    killed = tmp_path / "killed"
    cmd, env = train_command(*args(killed, "trainer.max_steps=10", "optim.total_steps=10"))
    log = tmp_path / "killed.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=sink,
                                start_new_session=True)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 600
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):  # already gone: the assertion below says so
        os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed:\n" + log.read_text()[-3000:]
    assert not (killed / "drafter").exists()  # it was killed before the end
    run(killed, "trainer.max_steps=10", "optim.total_steps=10", "ckpt_path=last")
    c = load_file(str(killed / "drafter" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], c[k], atol=1e-6, rtol=1e-5)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    gpt = tiny_gpt(vocab_size=64, block_size=64, cls_token_num=16, caption_dim=384)
    save_model_folder(tmp_path / "target", gpt, gpt.config.to_dict(), kind="llamagen_gpt")
    args = ["drafter", "experiment=smoke", "target=tiny_random_t2i", f"target.ckpt={tmp_path / 'target'}",
            "data.tokenizer=null", f"data.random_tokenizer={TOKENIZER}", "data.image_size=32", "data.max_length=16",
            "optim.decode_prompts=0", f"out_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path}/hydra"]
    assert run_train(*args, "trainer.max_steps=5").returncode == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    before = ckpt.read_bytes()
    res = run_train(*args, "trainer.max_steps=10", "ckpt_path=last", "optim.noise_std=nan")  # NaN features
    assert res.returncode != 0 and "train/loss is nan" in res.stderr
    assert ckpt.read_bytes() == before  # the last good checkpoint is untouched
    assert torch.load(ckpt, weights_only=False)["global_step"] == 5


def test_a_rerun_over_built_shards_trains_the_same_drafter(tmp_path):
    """Building the code shards draws random numbers, finding them built does not: the second run
    into the same out_dir must still start from the same initialisation and train the same drafter."""
    from safetensors.torch import load_file

    # the shipped tokenizer, as in `make demo`: loading it draws random numbers (module init)
    from decode.models.checkpoint import read_model_meta

    codebook = read_model_meta(REPO / "models/world/tokenizer")["config"]["codebook_size"]
    gpt = tiny_gpt(vocab_size=codebook, block_size=256, cls_token_num=16, caption_dim=384)
    save_model_folder(tmp_path / "target", gpt, gpt.config.to_dict(), kind="llamagen_gpt")
    out = tmp_path / "run"

    def run(*extra):
        res = run_train("drafter", "experiment=smoke", "target=tiny_random_t2i", f"target.ckpt={tmp_path / 'target'}",
                        f"data.tokenizer={REPO / 'models/world/tokenizer'}", "data.image_size=64",
                        "data.max_length=16", "trainer.max_steps=3", "trainer.val_check_interval=3",
                        f"out_dir={out}", f"hydra.run.dir={out}/hydra", *extra)
        assert res.returncode == 0, res.stderr[-3000:]
        return load_file(str(out / "drafter" / "model.safetensors"))

    first, second = run(), run("overwrite=true")  # the second finds the shards the first built
    for k in first:
        torch.testing.assert_close(second[k], first[k], atol=0, rtol=0)
    # the first run's checkpoint is gone, not kept beside the second's (as last.ckpt / last-v1.ckpt)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["last.ckpt"]


def test_drafters_distil_from_transformers_targets_and_decode_exactly(tmp_path):
    """`python -m train drafter target=janus_tiny_random` (and Chameleon) codes the world with the target's
    own VQ, prompts with its prompt encoder, and writes a drafter the decode CLI loads; greedy EAGLE-2 with
    it makes greedy AR's image (the drafter only changes how many passes)."""
    import sys

    for target in ("janus_tiny_random", "chameleon_tiny_random"):
        out = tmp_path / target
        res = run_train("drafter", "experiment=smoke", f"target={target}", f"out_dir={out}",
                        f"hydra.run.dir={out}/hydra")
        assert res.returncode == 0, res.stderr[-3000:]
        metrics = json.loads((out / "drafter" / "metrics.json").read_text())
        assert 1.0 <= metrics["val/greedy_step_compression"] <= 20.0
    made = {}
    for method in ("ar", "eagle2"):
        run = tmp_path / f"decode_{method}"
        res = subprocess.run([sys.executable, "-m", "decode", "target=janus_tiny_random", "prompt=a red star",
                              f"method={method}", "tree=fixed", "sampling.temperature=0",
                              f"drafter.ckpt={tmp_path / 'janus_tiny_random' / 'drafter'}", f"out_dir={run}",
                              f"hydra.run.dir={run}/hydra"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        made[method] = (run / "images" / "00000_000.png").read_bytes()
    assert made["ar"] == made["eagle2"]
