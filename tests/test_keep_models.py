"""scripts/keep_models.py: finished folders kept in float16, a target in training kept as a snapshot that
`init=` can continue from, with the same function."""
import importlib.util
from pathlib import Path

import pytest
import torch

from decode.models.checkpoint import read_model_meta
from decode.models.target import GPTConfig, LlamaGenGPT, build_gpt

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "keep_models.py"
TINY = {"dim": 32, "n_layer": 1, "n_head": 2, "multiple_of": 16, "vocab_size": 16, "block_size": 16, "cls_token_num": 4,
            "caption_dim": 8}


def keep_models():
    spec = importlib.util.spec_from_file_location("keep_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_target_in_training_is_kept_as_a_float16_snapshot_of_its_last_checkpoint(tmp_path):
    torch.manual_seed(0)
    gpt = LlamaGenGPT(GPTConfig(**TINY))
    ckpt = tmp_path / "src" / "target" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"gpt.{k}": v for k, v in gpt.state_dict().items()},
                "hyper_parameters": {"gpt": TINY}, "global_step": 7}, ckpt)
    assert keep_models().main(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "keep")]) == 0
    kept = tmp_path / "keep" / "target"
    assert "step 7" in (kept / "PROGRESS.md").read_text()
    assert read_model_meta(kept)["weights_dtype"] == "float16"
    again = build_gpt(str(kept))
    for name, value in gpt.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name].float(), value.half().float())
    assert not (tmp_path / "keep" / "target.partial").exists()


def test_nothing_to_keep_keeps_nothing_and_a_missing_source_is_named(tmp_path, capsys):
    script = keep_models()
    (tmp_path / "src").mkdir()
    assert script.main(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "keep")]) == 0
    assert "0 kept" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        script.main(["--src", str(tmp_path / "nowhere"), "--dst", str(tmp_path / "keep")])
    assert stop.value.code == 2
    assert "nowhere: no such directory" in capsys.readouterr().err


def test_a_finished_folder_is_kept_again_only_when_it_changed(tmp_path):
    import os

    from decode.models.checkpoint import save_model_folder

    gpt = LlamaGenGPT(GPTConfig(**TINY))
    folder = save_model_folder(tmp_path / "src" / "target" / "target", gpt, gpt.config.to_dict(), kind="llamagen_gpt")
    (folder / "README.md").write_text("the run's card\n")
    args = ["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "keep")]
    script = keep_models()
    assert script.main(args) == 0
    card = tmp_path / "keep" / "target" / "README.md"
    card.write_text("the run's card\n\nlineage added by hand\n")
    assert script.main(args) == 0
    assert "by hand" in card.read_text()  # nothing new: the kept folder and its card stay
    later = (tmp_path / "keep" / "target" / "config.json").stat().st_mtime + 10
    os.utime(folder / "model.safetensors", (later, later))  # the run wrote new weights
    assert script.main(args) == 0
    assert card.read_text() == "the run's card\n"
