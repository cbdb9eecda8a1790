"""Target adapters. LlamaGen (text-to-image and class-to-image) is the first family."""
from __future__ import annotations

from pathlib import Path

import torch

from decode.models.checkpoint import load_state_dict_strict, read_model_folder, read_state_dict
from decode.models.target.llamagen import Condition, LlamaGenTarget, TargetOutput
from decode.models.target.llamagen_gpt import GPT_SIZES, GPTConfig, LlamaGenGPT, gpt_config

__all__ = ["Condition", "GPTConfig", "GPT_SIZES", "LlamaGenGPT", "LlamaGenTarget", "TargetOutput",
           "build_gpt", "load_target"]


def build_gpt(ckpt: str | None = None, size: str = "XL", init_seed: int = 0, **overrides) -> LlamaGenGPT:
    """A LlamaGen GPT from a checkpoint or, with `ckpt=None`, randomly initialised.

    Args:
        ckpt: a project model folder (its config.json decides the architecture), an official
            LlamaGen file (`.pt`, architecture from `size` and `overrides`), or None.
        size: a named size (B, L, XL, XXL, 3B, ... or tiny/small/medium).
        init_seed: seed of the random initialisation when `ckpt` is None.
        overrides: GPTConfig fields (model_type, vocab_size, block_size, cls_token_num, caption_dim...).
    """
    if ckpt is not None and Path(ckpt).is_dir():
        meta, state = read_model_folder(ckpt, kind="llamagen_gpt")
        gpt = LlamaGenGPT(GPTConfig.from_dict(meta["config"]))
        load_state_dict_strict(gpt, state, source=str(ckpt))
        return gpt.eval()
    cfg = gpt_config(size, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        gpt = LlamaGenGPT(cfg)
        _init_weights(gpt)
    if ckpt is not None:
        load_state_dict_strict(gpt, read_state_dict(ckpt), source=str(ckpt))
    return gpt.eval()


def _init_weights(gpt: LlamaGenGPT, std: float = 0.02) -> None:
    """LlamaGen's initialisation: normal(0, 0.02) for linear and embedding weights."""
    for m in gpt.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(m.weight, std=std)


def load_target(ckpt: str | None = None, size: str = "XL", cfg_scale: float = 7.5, init_seed: int = 0,
                **overrides) -> LlamaGenTarget:
    """The decode-time target: a GPT (see `build_gpt`) behind the CFG adapter."""
    return LlamaGenTarget(build_gpt(ckpt, size=size, init_seed=init_seed, **overrides).requires_grad_(False),
                          cfg_scale=cfg_scale)
