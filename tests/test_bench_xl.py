"""make bench-xl's input checks: they fail before any model is built, naming the value."""
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_xl  # noqa: E402

BASE = dict(runs=["ar", "eagle2"], batch_size=1, trace_prompts=2, num_tokens=256, size="XL", dtype="float32",
            vocab_size=16384, cls_token_num=120, caption_dim=2048, compile=False, static_shapes=False)


@pytest.mark.parametrize("change,match", [
    (dict(runs=["eagle2"]), "runs must include ar"),
    (dict(runs=["ar", "sjd"]), "runs must include ar and be among"),
    (dict(trace_prompts=3, batch_size=2), "multiple of batch_size"),
    (dict(size="XXXXL"), "unknown GPT size"),
    (dict(dtype="fp8"), "dtype must be one of"),
    (dict(runs=["ar", "spatial"], batch_size=2, trace_prompts=2), "one image at a time"),
    (dict(runs=["ar", "spatial"], compile=True, static_shapes=True), "leave spatial out of runs"),
    (dict(runs=["ar", "auto"], compile="layer", static_shapes=True), "leave auto out of runs"),
])
def test_bad_settings_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        bench_xl.check(OmegaConf.create({**BASE, **change}))


def test_a_size_that_does_not_fit_says_how_much_it_needs(monkeypatch):
    monkeypatch.setattr(bench_xl.os, "sysconf", lambda name: 1024 if name == "SC_AVPHYS_PAGES" else 4096)
    with pytest.raises(MemoryError, match=r"size=XL in float32 needs about \d+\.\d GiB \(\d+ M parameters\)"):
        bench_xl.check_memory(OmegaConf.create(BASE), torch.device("cpu"))
