"""Both entry points run end to end as a user calls them (subprocesses)."""
import json
import os
import subprocess
import sys

from decode.__main__ import quote_prompt_args
from tests.conftest import REPO


def _run(args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_prompts_are_quoted_for_hydra():
    assert quote_prompt_args(["x", "prompt=a cat, on a mat", "n=2"]) == ["x", "prompt='a cat, on a mat'", "n=2"]
    assert quote_prompt_args(["prompt=it's a=b"]) == ["prompt='it\\'s a=b'"]
    assert quote_prompt_args(["prompt='already'"]) == ["prompt='already'"]


def test_decode_writes_images_and_stats(tmp_path):
    out = tmp_path / "run"
    res = _run(["-m", "decode", "prompt=a cat face, on a blue background", "n=2", "batch_size=2",
                f"out_dir={out}", "target.block_size=64", "tokenizer.encoder_ch_mult=[1,1]",
                "tokenizer.decoder_ch_mult=[1,1]", f"hydra.run.dir={tmp_path / 'hydra'}"])
    assert res.returncode == 0, res.stderr[-3000:]
    pngs = sorted((out / "images").glob("*.png"))
    assert [p.name for p in pngs] == ["00000_000.png", "00000_001.png"]
    rows = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["tokens"] == 64 and rows[0]["nfe"] == 63
    assert rows[0]["prompt"] == "a cat face, on a blue background" and rows[0]["method"] == "ar"
    assert "step compression" in res.stdout
    # a rerun skips the images already written
    res2 = _run(["-m", "decode", "prompt=a cat face, on a blue background", "n=2", f"out_dir={out}",
                 "target.block_size=64", "tokenizer.encoder_ch_mult=[1,1]", "tokenizer.decoder_ch_mult=[1,1]",
                 f"hydra.run.dir={tmp_path / 'hydra'}"])
    assert res2.returncode == 0 and "no images were generated" in res2.stdout
    assert len((out / "stats.jsonl").read_text().splitlines()) == 2


def test_decode_empty_prompt_fails_clearly(tmp_path):
    res = _run(["-m", "decode", "prompt= ", f"hydra.run.dir={tmp_path}"])
    assert res.returncode != 0 and "prompt 0 is empty" in res.stderr


def test_help_texts():
    res = _run(["-m", "train", "--help"])
    assert res.returncode == 0 and "drafter" in res.stdout and "experiment=smoke" in res.stdout
    res = _run(["-m", "decode", "--help"])
    assert res.returncode == 0 and "stats.jsonl" in res.stdout and "target:" in res.stdout
    res = _run(["-m", "train", "bogus"])
    assert res.returncode != 0 and "unknown task 'bogus'" in res.stderr
