"""decode.evaluation.image_sets (the library behind scripts/evaluate_images.py): decode run folders side by side
(speed from their stats.jsonl, quality against real images). Tiny fake run folders written in the real format
(decode.evaluation.metrics.ImageStats); a cheap colour feature stands in for Inception, so FID and precision/recall
run in milliseconds. No timing assertions."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from decode.evaluation import image_sets as ev
from decode.evaluation.metrics import ImageStats, append_jsonl, batches
from tests.conftest import REPO

PROMPTS = [f"a {c} square" for c in ("red", "green", "blue", "yellow", "white", "black", "grey", "pink")]


class ColourFeature(nn.Module):
    """uint8 [B, 3, H, W] -> per-channel mean and spread: tells flat colours from noise."""
    num_features = 6

    def forward(self, x):
        x = x.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def _flat(rng, size=(32, 32)) -> Image.Image:
    colour = rng.integers(0, 256, 3)
    arr = np.clip(colour + rng.normal(0, 8, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _noise(rng, size=(32, 32)) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def make_run(folder, method, latencies, *, batch_size=4, prompts=PROMPTS, seed=0, device="cpu", dtype="float32",
             nfe=255, skip_ratio=0.0, clip_score=None):
    """A decode run folder: one PNG per prompt, stats.jsonl rows batch by batch (latencies[i]: batch i's)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    for start in range(0, len(prompts), batch_size):
        rows = []
        for i in range(start, min(start + batch_size, len(prompts))):
            name = f"{i:05d}_000.png"
            _flat(rng).save(folder / "images" / name)
            rows.append(ImageStats(
                prompt_index=i, sample_index=0, prompt=prompts[i], seed=i, method=method, tokens=256, nfe=nfe,
                step_compression=256 / nfe, latency_s=latencies[start // batch_size], prefill_s=0.01,
                text_encode_s=0.02, vq_decode_s=0.03, batch_size=min(batch_size, len(prompts) - start),
                device=device, dtype=dtype, image=str(folder / "images" / name), skip_ratio=skip_ratio,
                tau=256 / nfe, clip_score=clip_score))
        append_jsonl(folder / "stats.jsonl", rows)
    return folder


def make_real(folder, n=8, seed=10, kind=_flat, size=(48, 40)):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):  # other sizes and formats than the runs': center-cropped and resized to 32x32
        kind(rng, size).save(folder / f"real_{i}.{'jpg' if i % 2 else 'png'}")
    return folder


def _cfg(runs, real, **extra):
    return OmegaConf.create({**dict(runs=[str(r) for r in runs], real=str(real), real2=None, clip=None, pr_k=3,
                                    batch_size=4, workers=0, device="cpu", out_dir="unused"), **extra})


@pytest.fixture
def folders(tmp_path):
    ar = make_run(tmp_path / "ar", "ar", [2.0, 2.2], seed=0)
    vvs = make_run(tmp_path / "vvs", "vvs", [0.5, 0.7], seed=1, nfe=100, skip_ratio=0.2)
    return ar, vvs, make_real(tmp_path / "real")


def _evaluate(cfg, **kw):
    return ev.evaluate(ev.check_inputs(cfg), feature=ColourFeature(), device=torch.device("cpu"), batch_size=4,
                       progress=False, **kw)


def test_a_row_per_run_and_the_speed_up_is_the_latency_ratio(folders, tmp_path):
    ar, vvs, real = folders
    rows, meta = _evaluate(_cfg([ar, vvs], real), out=tmp_path / "out")
    assert [r["label"] for r in rows] == ["ar", "vvs"] and [r["images"] for r in rows] == [8, 8]
    by = {r["label"]: r for r in rows}
    assert by["ar"]["latency_s"] == pytest.approx(2.1) and by["vvs"]["latency_s"] == pytest.approx(0.6)
    assert by["vvs"]["speedup_vs_ar"] == pytest.approx(2.1 / 0.6) and by["ar"]["speedup_vs_ar"] == pytest.approx(1.0)
    assert by["ar"]["images_per_s"] == pytest.approx(8 / 4.2) and by["ar"]["batches"] == 2
    assert by["vvs"]["nfe"] == 100 and by["vvs"]["skip_ratio"] == pytest.approx(0.2)
    assert all(r["fid"] >= 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 for r in rows)
    text = (tmp_path / "out" / "evaluation.md").read_text()
    assert text.count("\n| ar | ar | 8 |") == 1 and text.count("\n| vvs | vvs | 8 |") == 1
    assert "Definitions" in text and "device cpu, dtype float32, batch size 4" in text and "no FID floor" in text
    csv_lines = (tmp_path / "out" / "evaluation.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("label,method,images")
    assert (tmp_path / "out" / "evaluation.json").is_file()


def test_fid_of_a_run_against_itself_is_zero_and_against_noise_larger(folders, tmp_path):
    ar, vvs, _ = folders
    rows, _ = _evaluate(_cfg([ar], ar / "images"))
    itself = rows[0]["fid"]
    assert itself == pytest.approx(0.0, abs=1e-4)
    assert rows[0]["precision"] == 1.0 and rows[0]["recall"] == 1.0
    noise = make_real(tmp_path / "noise", kind=_noise)
    floor = make_real(tmp_path / "floor", seed=11)
    rows, meta = _evaluate(_cfg([ar], noise, real2=str(floor)))
    assert rows[0]["fid"] > 0.1 and rows[0]["fid"] > 1000 * abs(itself)
    assert meta["fid_floor"] > 0.1 and meta["real2_images"] == 8  # flat colours against noise: far apart


def test_speed_up_is_not_given_across_batch_sizes_devices_or_dtypes(tmp_path):
    ar = make_run(tmp_path / "ar", "ar", [2.0, 2.0])
    b8 = make_run(tmp_path / "b8", "eagle2", [1.0], batch_size=8, seed=1)
    bf = make_run(tmp_path / "bf16", "lantern", [1.0, 1.0], dtype="bfloat16", seed=2)
    real = make_real(tmp_path / "real")
    rows, meta = _evaluate(_cfg([b8, bf, ar], real))  # the AR run listed last still serves the earlier rows
    by = {r["label"]: r for r in rows}
    assert np.isnan(by["b8"]["speedup_vs_ar"]) and "batch_size 8 vs AR's 4" in by["b8"]["speedup_note"]
    assert np.isnan(by["bf16"]["speedup_vs_ar"]) and "dtype bfloat16 vs AR's float32" in by["bf16"]["speedup_note"]
    text = ev.markdown(rows, meta)
    assert "Speed-up n/a: b8: not measured alike" in text and "| n/a |" in text
    no_ar, meta = _evaluate(_cfg([b8], real))
    assert no_ar[0]["speedup_note"] == "no run of method ar given"
    assert "Speed-up n/a: no run of method ar given." in ev.markdown(no_ar, meta)


def test_batches_are_found_however_the_rows_are_ordered():
    rows = [dict(latency_s=lat, batch_size=2, prefill_s=0.1, text_encode_s=0.1, vq_decode_s=0.1)
            for lat in (1.0, 3.0, 1.0, 3.0, 1.0, 1.0, 5.0)]  # a multi-process stats.jsonl: batches interleaved
    rows[-1]["batch_size"] = 1  # the last, partial batch
    assert sorted(batches(rows)) == [(1.0, 2), (1.0, 2), (3.0, 2), (5.0, 1)]


def test_runs_of_other_prompts_are_refused_naming_the_run(folders, tmp_path):
    ar, _, real = folders
    other = make_run(tmp_path / "sjd_other", "sjd", [1.0, 1.0], prompts=PROMPTS[:3] + ["a cat"] + PROMPTS[4:])
    with pytest.raises(ValueError, match=r"run sjd_other .*other prompts than run ar.*'a cat'.*same prompts"):
        ev.check_inputs(_cfg([ar, other], real))
    fewer = make_run(tmp_path / "fewer", "sjd", [1.0], prompts=PROMPTS[:4])
    with pytest.raises(ValueError, match=r"run fewer .*4 images, run ar 8"):
        ev.check_inputs(_cfg([ar, fewer], real))


def test_a_folder_that_is_not_a_run_is_refused(folders, tmp_path):
    ar, _, real = folders
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"run empty: .*has no images"):
        ev.check_inputs(_cfg([ar, tmp_path / "empty"], real))
    (tmp_path / "nostats" / "images").mkdir(parents=True)
    _flat(np.random.default_rng(0)).save(tmp_path / "nostats" / "images" / "00000_000.png")
    with pytest.raises(ValueError, match=r"run nostats: .*stats.jsonl is missing"):
        ev.check_inputs(_cfg([tmp_path / "nostats"], real))
    two = make_run(tmp_path / "two", "ar", [1.0], prompts=PROMPTS[:2])  # FID, but too few for precision/recall
    rows, meta = _evaluate(_cfg([two], real))
    assert rows[0]["fid"] >= 0 and np.isnan(rows[0]["precision"])
    assert "Precision/recall n/a for two: k=3 needs more than 3" in ev.markdown(rows, meta)
    one = make_run(tmp_path / "one", "ar", [1.0], prompts=PROMPTS[:1])
    with pytest.raises(ValueError, match=r"run one: 1 image.*FID needs at least 2"):
        ev.check_inputs(_cfg([one], real))
    with pytest.raises(ValueError, match=r"runs must be a non-empty list"):
        ev.check_inputs(_cfg([], real))


def test_unreadable_real_images_are_skipped_and_counted(folders, tmp_path):
    ar, _, _ = folders
    real = make_real(tmp_path / "real_small", n=3)
    for i in range(2):
        (real / f"broken_{i}.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"real=.*3 readable image\(s\) \(2 unreadable skipped.*at least 4"):
        ev.check_inputs(_cfg([ar], real))
    _flat(np.random.default_rng(5)).save(real / "extra.webp")
    rows, meta = _evaluate(_cfg([ar], real))
    assert meta["real_images"] == 4 and meta["real_unreadable"] == 2
    assert "(2 unreadable skipped)" in ev.markdown(rows, meta)
    with pytest.raises(ValueError, match="shares images with real"):
        ev.check_inputs(_cfg([ar], real, real2=str(real)))


def test_clip_scores_in_the_stats_are_reused(tmp_path):
    ar = make_run(tmp_path / "ar", "ar", [1.0, 1.0], clip_score=0.25)
    rows, _ = _evaluate(_cfg([ar], make_real(tmp_path / "real")))
    assert rows[0]["clip_score"] == pytest.approx(0.25) and rows[0]["clip_source"] == "stats.jsonl"


def test_runs_without_clip_scores_are_scored_each_image_with_its_own_prompt(tmp_path):
    ar = make_run(tmp_path / "ar", "ar", [1.0, 1.0])  # no CLIP score in its stats
    seen = {}

    def scorer(images, prompts):  # stands in for CLIPScorer: uint8 [B, 3, 32, 32] and the B captions
        for image, prompt in zip(images, prompts):
            seen[prompt] = image.float().mean().item()
        return [float(PROMPTS.index(p)) for p in prompts]

    rows, _ = _evaluate(_cfg([ar], make_real(tmp_path / "real")), clip=scorer)
    assert rows[0]["clip_source"] == "clip folder" and rows[0]["clip_score"] == pytest.approx(3.5)
    assert sorted(seen) == sorted(PROMPTS)
    for i, prompt in enumerate(PROMPTS):  # the image scored with prompt i is image i (flat colours differ)
        png = np.asarray(Image.open(ar / "images" / f"{i:05d}_000.png").resize((32, 32)), dtype=np.float64)
        assert seen[prompt] == pytest.approx(png.mean(), abs=2.0)


def test_evaluate_runs_writes_the_tables_with_the_settings(folders, tmp_path, monkeypatch):
    ar, vvs, real = folders
    monkeypatch.setattr(ev, "InceptionPool", ColourFeature)  # where evaluate_runs looks it up
    out = tmp_path / "out"
    rows, meta = ev.evaluate_runs(_cfg([ar, vvs], real, out_dir=str(out)))
    assert [r["label"] for r in rows] == ["ar", "vvs"] and meta["settings"]["out_dir"] == str(out)
    assert {p.name for p in out.iterdir()} >= {"evaluation.md", "evaluation.csv", "evaluation.json"}
    assert '"settings"' in (out / "evaluation.json").read_text()


def test_the_config_composes_and_the_entry_point_reports_bad_input_in_one_line(tmp_path):
    from hydra import compose, initialize_config_dir

    from decode.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("evaluate_images", overrides=["runs=[a/ar,b/vvs]", "real=r"])
    assert list(cfg.runs) == ["a/ar", "b/vvs"] and cfg.pr_k == 3 and cfg.real2 is None
    (tmp_path / "empty").mkdir()
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate_images.py"), f"runs=[{tmp_path / 'empty'}]",
                          f"real={tmp_path}", f"out_dir={tmp_path / 'out'}"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 1 and res.stderr.startswith("error: run empty:"), res.stderr
