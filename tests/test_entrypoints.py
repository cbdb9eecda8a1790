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
                f"out_dir={out}", "target=tiny_random_t2i", "tokenizer=tiny_random", "target.block_size=64",
                "tokenizer.encoder_ch_mult=[1,1]",
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
                 "target=tiny_random_t2i", "tokenizer=tiny_random", "target.block_size=64", "tokenizer.encoder_ch_mult=[1,1]", "tokenizer.decoder_ch_mult=[1,1]",
                 f"hydra.run.dir={tmp_path / 'hydra'}"])
    assert res2.returncode == 0 and "nothing to do: all 2 images" in res2.stdout
    assert len((out / "stats.jsonl").read_text().splitlines()) == 2
    assert "step compression" in (out / "summary.txt").read_text()  # the first run's summary stays
    # a rerun with other settings would leave these images under its name: refused, nothing touched
    before = [p.read_bytes() for p in pngs]
    res3 = _run(["-m", "decode", "prompt=a cat face, on a blue background", "n=2", "seed=7", f"out_dir={out}",
                 "target=tiny_random_t2i", "tokenizer=tiny_random", "target.block_size=64", "tokenizer.encoder_ch_mult=[1,1]", "tokenizer.decoder_ch_mult=[1,1]",
                 f"hydra.run.dir={tmp_path / 'hydra'}"])
    assert res3.returncode != 0 and "other settings (seed differ" in res3.stderr, res3.stderr[-2000:]
    assert [p.read_bytes() for p in sorted((out / "images").glob("*.png"))] == before


def test_decode_empty_prompt_fails_clearly(tmp_path):
    res = _run(["-m", "decode", "prompt= ", f"hydra.run.dir={tmp_path}"])
    assert res.returncode == 1 and "error: prompt 0 is empty" in res.stderr
    assert "Traceback" not in res.stderr and "Error executing job" not in res.stderr  # one line, not a traceback


def test_help_texts():
    res = _run(["-m", "train", "--help"])
    assert res.returncode == 0 and "drafter" in res.stdout and "experiment=smoke" in res.stdout
    res = _run(["-m", "decode", "--help"])
    assert res.returncode == 0 and "stats.jsonl" in res.stdout and "target:" in res.stdout
    res = _run(["-m", "train", "bogus"])
    assert res.returncode != 0 and "unknown task 'bogus'" in res.stderr


def test_every_greedy_exact_method_writes_the_images_of_greedy_ar(tmp_path):
    """eagle2, LANTERN with delta 0 and SJD are exact: at temperature 0 their PNGs are greedy AR's.
    VVS with tau 0 skips verifications (its images may differ) and reports the skips."""
    from decode.models.drafter import Drafter, DrafterConfig, save_drafter
    from decode.models.target import build_gpt

    gpt = build_gpt(None, size="tiny", model_type="t2i", vocab_size=1024, block_size=64, cls_token_num=120,
                    caption_dim=384, init_seed=0)  # what target=tiny_random_t2i target.block_size=64 builds
    save_drafter(tmp_path / "drafter", Drafter(DrafterConfig.for_target(gpt)))
    common = ["prompt=a cat face, on a blue background", "n=2", "batch_size=2", "sampling.temperature=0",
              "target=tiny_random_t2i", "tokenizer=tiny_random", "target.block_size=64",
              "tokenizer.encoder_ch_mult=[1,1]", "tokenizer.decoder_ch_mult=[1,1]", f"hydra.run.dir={tmp_path}/h",
              f"drafter.ckpt={tmp_path / 'drafter'}", "tree=fixed", "tree.total_tokens=6", "tree.depth=2", "tree.top_k=3"]
    runs = {"ar": [], "eagle2": [], "lantern": ["method.delta=0"], "sjd": ["method.window=4"],
            "vvs": ["method.base=lantern", "method.tau=0", "method.lantern_k=8", "method.delta=0.3"]}
    images, rows = {}, {}
    for method, extra in runs.items():
        out = tmp_path / method
        res = _run(["-m", "decode", f"method={method}", f"out_dir={out}", *extra, *common])
        assert res.returncode == 0, res.stderr[-3000:]
        images[method] = [p.read_bytes() for p in sorted((out / "images").glob("*.png"))]
        rows[method] = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
        assert rows[method][0]["method"] == method and rows[method][0]["nfe"] <= 63
        assert "skip ratio" in res.stdout
    assert len(images["ar"]) == 2
    assert images["eagle2"] == images["ar"] and images["lantern"] == images["ar"] and images["sjd"] == images["ar"]
    assert all(r["skipped_steps"] > 0 and r["steps"] == r["nfe"] + r["skipped_steps"] for r in rows["vvs"])
    res = _run(["-m", "decode", "method=lantern", "+method.gamma=1", *common])
    assert res.returncode != 0 and "method.gamma is unknown" in res.stderr and "reads delta, lantern_k" in res.stderr


def test_two_processes_write_the_images_of_one(tmp_path):
    """torchrun with 2 CPU processes (gloo): same PNGs as 1 process, one merged stats.jsonl; a rerun
    skips the images already written."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat face, on a blue background\none small red square in the top left\nthree dots\n")
    common = [f"prompts={prompts}", "n=2", "batch_size=2", "target=tiny_random_t2i", "tokenizer=tiny_random",
              "target.block_size=16", "tokenizer.encoder_ch_mult=[1,1]", "tokenizer.decoder_ch_mult=[1,1]", "~evaluator",
              f"hydra.run.dir={tmp_path}/h"]
    one = _run(["-m", "decode", f"out_dir={tmp_path / 'one'}", *common])
    assert one.returncode == 0, one.stderr[-3000:]
    # --standalone: torchrun picks a free port itself
    two = _run(["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "decode",
                f"out_dir={tmp_path / 'two'}", *common])
    assert two.returncode == 0, two.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "one" / "images").glob("*.png"))
    assert len(names) == 6 and names == sorted(p.name for p in (tmp_path / "two" / "images").glob("*.png"))
    for name in names:
        assert (tmp_path / "one" / "images" / name).read_bytes() == (tmp_path / "two" / "images" / name).read_bytes()
    rows = [json.loads(line) for line in (tmp_path / "two" / "stats.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(p, s) for p in range(3) for s in range(2)]
    assert "ranks               2" in two.stdout
    again = _run(["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "decode",
                  f"out_dir={tmp_path / 'two'}", *common])
    assert again.returncode == 0 and "nothing to do: all 6 images" in again.stdout


def test_transformers_targets_decode_from_the_cli(tmp_path):
    """The tiny random Janus-Pro writes images and stats with an exact training-free method; a drafter made
    for another target, and Chameleon (no VQ decoder in transformers), fail before decoding, naming why."""
    out = tmp_path / "janus"
    res = _run(["-m", "decode", "target=janus_tiny_random", "prompt=a red star", "method=mc_sjd", "n=2",
                f"out_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}"])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["tokens"] == 16 and len(list((out / "images").glob("*.png"))) == 2
    res = _run(["-m", "decode", "target=janus_tiny_random", "prompt=a red star", "method=vvs",
                f"hydra.run.dir={tmp_path / 'hydra2'}"])
    assert res.returncode == 1 and "trained for another target" in res.stderr  # the world drafter: refused
    res = _run(["-m", "decode", "target=chameleon_tiny_random", "prompt=a red star",
                f"hydra.run.dir={tmp_path / 'hydra3'}"])
    assert res.returncode == 1 and "cannot draw its images" in res.stderr


def test_gridar_from_the_cli_writes_its_candidates_and_says_how_it_chose(tmp_path):
    """The shipped world, GridAR N=4 with VVS on the fixed tree (tree=auto picks AR on a CPU): the chosen image, the candidate strip, the search's cost in
    the stats, and the summary's warning that the world verifier's alignment is its selection criterion."""
    out = tmp_path / "run"
    res = _run(["-m", "decode", "method=gridar", "method.decode=vvs", "tree=fixed", "n=1", f"out_dir={out}",
                "prompt=one large green circle in the center, against a noisy yellow background",
                f"hydra.run.dir={tmp_path / 'hydra'}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "images" / "00000_000.png").exists() and (out / "candidates" / "00000_000.png").exists()
    (row,) = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert row["candidates"] == 4 and row["verifier_calls"] >= 4 and row["nfe"] < 4 * 256
    assert "the alignment above is the selection criterion" in res.stdout


def test_a_draft_checkpoint_of_the_wrong_kind_fails_before_any_model_loads(tmp_path):
    from decode.models.spatial import SpatialConfig, SpatialHeads, save_spatial

    heads = save_spatial(tmp_path / "spatial", SpatialHeads(SpatialConfig(dim=8, vocab_size=16, block_size=16,
                                                                          cls_token_num=4)))
    common = ["prompt=a red star", f"hydra.run.dir={tmp_path / 'hydra'}", f"out_dir={tmp_path / 'out'}"]
    res = _run(["-m", "decode", "method=eagle2", f"drafter.ckpt={heads}", *common])
    assert res.returncode != 0 and "drafter.ckpt" in res.stderr and "holds a 'spatial_heads'" in res.stderr, res.stderr[-2000:]
    res = _run(["-m", "decode", "method=spatial", f"method.spatial_ckpt={REPO / 'models' / 'world' / 'drafter'}", *common])
    assert res.returncode != 0 and "method.spatial_ckpt" in res.stderr and "holds a 'eagle_drafter'" in res.stderr
    assert not (tmp_path / "out").exists()


def test_spatial_heads_shipped_with_the_world_decode_from_the_cli(tmp_path):
    """models/world/spatial fits the shipped target: method=spatial and spatial_vvs run, write images and
    take fewer passes than AR's 255."""
    for method in ("spatial", "spatial_vvs"):
        out = tmp_path / method
        res = _run(["-m", "decode", f"method={method}", "n=2", "batch_size=2", f"out_dir={out}",
                    "prompt=one large green circle in the center, against a noisy yellow background",
                    f"hydra.run.dir={tmp_path / 'hydra'}"])
        assert res.returncode == 0, res.stderr[-3000:]
        rows = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all(r["tokens"] == 256 and r["nfe"] < 255 for r in rows)
        assert len(list((out / "images").glob("*.png"))) == 2
