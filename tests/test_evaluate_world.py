"""scripts/evaluate_world.py runs end to end on tiny random models and reports every number
beside its reference (slow: the real Inception network runs on CPU)."""
import json
import subprocess
import sys

import pytest

from data.world import evaluator_labels
from decode.models.checkpoint import save_model_folder
from decode.evaluation.world_evaluator import AttributeEvaluator, EvaluatorConfig
from decode.models.vq import load_vq
from tests.conftest import REPO, tiny_gpt


def tiny_folders(tmp_path) -> list[str]:
    gpt = tiny_gpt(vocab_size=64, block_size=64, cls_token_num=48, caption_dim=384)
    save_model_folder(tmp_path / "target", gpt, gpt.config.to_dict(), kind="llamagen_gpt")
    vq = load_vq(None, codebook_size=64, encoder_ch_mult=[1, 1, 1], decoder_ch_mult=[1, 1, 1], z_channels=32, ch=32)
    save_model_folder(tmp_path / "vq", vq, vq.config.to_dict(), kind="llamagen_vq")
    ev_cfg = EvaluatorConfig(**evaluator_labels(), image_size=32, width=8)
    save_model_folder(tmp_path / "ev", AttributeEvaluator(ev_cfg), ev_cfg.to_dict(), kind="world_evaluator")
    return ["--target", str(tmp_path / "target"), "--tokenizer", str(tmp_path / "vq"), "--evaluator",
            str(tmp_path / "ev"), "--num", "8", "--batch-size", "4", "--out", str(tmp_path / "out")]


@pytest.mark.slow
def test_evaluate_world_report(tmp_path):
    res = subprocess.run([sys.executable, "scripts/evaluate_world.py", *tiny_folders(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for key in ("alignment_samples", "alignment_real", "precision_k3", "recall_k3"):
        assert 0.0 <= report[key] <= 1.0, key
    assert report["fid_samples_vs_real"] > 0 and report["fid_real_vs_real_floor"] >= 0
    for name in ("cfg_1", "cfg_4"):  # a distribution over 64 codes: top-1 in [1/64, 1], entropy in [0, ln 64]
        assert 1 / 64 <= report[f"target_top1_prob_{name}"] <= 1.0
        assert 0.0 <= report[f"target_entropy_{name}"] <= 4.16
    assert report["tokenizer_psnr_db"] > 0
    assert (tmp_path / "out" / "samples_vs_real.png").is_file()


def test_without_fid_the_report_says_what_the_caption_is_worth(tmp_path):
    res = subprocess.run([sys.executable, "scripts/evaluate_world.py", *tiny_folders(tmp_path), "--no-fid"],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["fid_samples_vs_real"] is None and report["fid_definition"] is None
    nll = report["target_nll_given_caption"]
    assert set(nll) == {"own", "cells_mirrored", "another_scene", "null"}
    assert all(0.0 < v < 10.0 for v in nll.values())  # a random 64-code target: about ln 64 = 4.16 nats
    assert set(report["attributes_samples"]) >= {"object", "object_anywhere", "bg_pattern"}
    for name in ("real", "tokenizer_reconstructions", "samples"):  # each share beside its interval
        lo, hi = report[f"alignment_{name}_interval"]
        assert lo <= report[f"alignment_{name}"] <= hi
        value, lo, hi = report[f"object_in_cell_{name}"]
        assert lo <= value <= hi and value == report[f"attributes_{name}"]["object"]


def test_mirroring_moves_every_cell_through_the_centre():
    from tests.conftest import load_script

    world = load_script("evaluate_world")
    assert world.mirrored("a small red circle in the top left, a cat face at the bottom and a banana on the right"
                          ) == "a small red circle in the bottom right, a cat face at the top and a banana on the left"
    assert world.mirrored("one large rocket in the center") == "one large rocket in the center"
    background = "a small fish on the left, against a red left-to-right gradient background, top-to-bottom"
    assert world.mirrored(background) == background.replace("on the left", "on the right")


def test_a_training_checkpoint_loads_as_its_folder_would(tmp_path):
    import torch

    from tests.conftest import load_script
    from train.target_task import TargetModule

    module = TargetModule(gpt=dict(model_type="t2i", dim=32, n_layer=2, n_head=2, multiple_of=16, vocab_size=64,
                                   block_size=16, cls_token_num=8, caption_dim=12))
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, tmp_path / "last.ckpt")
    gpt = load_script("evaluate_world").load_target(str(tmp_path / "last.ckpt"))
    assert gpt.config == module.gpt.config
    assert all(torch.equal(a, b) for a, b in zip(gpt.state_dict().values(), module.gpt.state_dict().values()))
