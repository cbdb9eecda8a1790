"""Shared fixtures: offline environment, the reference fixtures, tiny models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod
FIXTURES = REPO / "tests" / "fixtures" / "llamagen"  # the reference fixtures (their README.md says how made)

os.environ.setdefault("WANDB_MODE", "disabled")
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"


@pytest.fixture(autouse=True)
def _hf_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    # The parity fixtures are required: a missing folder fails the suite instead of skipping it.
    assert FIXTURES.is_dir(), f"reference fixtures missing: {FIXTURES} "
    return FIXTURES


def tiny_gpt(model_type: str = "t2i", seed: int = 0, **overrides):
    from decode.models.target import build_gpt

    args = dict(size="tiny", model_type=model_type, vocab_size=64, block_size=16, init_seed=seed,
                cls_token_num=8 if model_type == "t2i" else 1, caption_dim=12, num_classes=10)
    args.update(overrides)
    return build_gpt(None, **args)


def padded_captions(batch: int, slots: int = 8, dim: int = 12, seed: int = 0):
    """Random caption features left-padded like LlamaGen: [B, slots, dim] and mask [B, slots]."""
    g = torch.Generator().manual_seed(seed)
    n_valid = torch.randint(1, slots + 1, (batch,), generator=g)
    mask = torch.arange(slots)[None, :] >= (slots - n_valid)[:, None]
    emb = torch.randn(batch, slots, dim, generator=g) * mask[..., None]
    return emb, mask


def train_command(*args: str, **env_extra: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of `python -m train ARGS`, as a user runs it (no
    inherited DDP variables)."""
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "VVS_TRAIN_TASK")}
    env.update({"WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu", **env_extra})
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return [sys.executable, "-m", "train", *args], env


def run_train(*args: str, timeout: int = 600, **env_extra: str):
    """`python -m train ARGS` in a subprocess, to the end."""
    import subprocess

    cmd, env = train_command(*args, **env_extra)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
