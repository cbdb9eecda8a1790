"""`python -m decode prompt="..."`: generate images with a target, a VQ tokenizer and a text encoder.

Hydra composes conf/decode.yaml; `python -m decode --help` lists the groups and options.
Prompts work as typed: `prompt="a cat face, on a blue background"` is quoted for Hydra here.
"""
from __future__ import annotations

import functools
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from decode.drafter import Drafter, load_drafter
from decode.engine import generate_ar
from decode.evaluator import AlignmentScorer
from decode.metrics import summary_table, write_summary
from decode.pipeline import check_compatible, plan_jobs, run_jobs
from decode.resolvers import REPO, register_resolvers
from decode.sampling import SamplingParams
from decode.speculative import TreeParams, generate_eagle
from decode.target import LlamaGenTarget
from decode.text import TextEncoder
from decode.vq import VQModel

CONF_DIR = str(REPO / "conf")
QUOTED_KEYS = ("prompt", "+prompt", "++prompt")
log = logging.getLogger("decode")


def quote_prompt_args(argv: list[str]) -> list[str]:
    """Quote `prompt=` values for Hydra, whose grammar rejects unquoted commas and '='."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in QUOTED_KEYS and value and not (value[0] == value[-1] and value[0] in "'\"" and len(value) > 1):
            value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
            arg = f"{key}={value}"
        out.append(arg)
    return out


def read_prompts(cfg: DictConfig) -> list[str]:
    if (cfg.prompt is None) == (cfg.prompts is None):
        raise ValueError('give exactly one of prompt="..." or prompts=FILE (one prompt per line)')
    if cfg.prompt is not None:
        return [str(cfg.prompt)]
    path = Path(cfg.prompts)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts")
    return prompts


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


METHODS = ("ar", "eagle2")


@dataclass(frozen=True)
class Parts:
    target: LlamaGenTarget
    vq: VQModel
    text: TextEncoder | None
    scorer: AlignmentScorer | None
    drafter: Drafter | None = None


def build_parts(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> Parts:
    """Instantiate the configured components and check that they fit each other."""
    target = instantiate(cfg.target)
    target.gpt.to(device=device, dtype=dtype)
    vq = instantiate(cfg.tokenizer).to(device)
    text = None
    if target.config.model_type == "t2i":  # the caption length follows the target unless set
        length = cfg.text_encoder.get("max_length") or target.config.cls_token_num
        text = instantiate(cfg.text_encoder, device=str(device), max_length=int(length))
    check_compatible(target, vq, text)
    scorer = instantiate(cfg.evaluator, device=str(device)) if cfg.get("evaluator") else None
    drafter = None
    if cfg.method != "ar":
        if not cfg.get("drafter") or not cfg.drafter.get("ckpt"):
            raise ValueError(f"method={cfg.method} needs a drafter: drafter=world or drafter.ckpt=FOLDER")
        drafter = load_drafter(cfg.drafter.ckpt, target.gpt)  # fails here if it does not fit the target
    return Parts(target, vq, text, scorer, drafter)


def decoding_method(cfg: DictConfig, parts: Parts):
    """The generate function of `method=`, with its drafter and tree bound."""
    if cfg.method == "ar":
        return generate_ar
    tree = TreeParams(**cfg.tree)
    return functools.partial(generate_eagle, drafter=parts.drafter, tree=tree)


def run(cfg: DictConfig) -> dict[str, float]:
    if cfg.method not in METHODS:
        raise ValueError(f"method={cfg.method!r} is not available; available: {', '.join(METHODS)} "
                         f"(LANTERN, VVS and the Jacobi baselines are not in this version yet)")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {cfg.dtype!r}")
    prompts = read_prompts(cfg)
    jobs = plan_jobs(prompts, int(cfg.n), int(cfg.seed))
    parts = build_parts(cfg, pick_device(cfg.device), DTYPES[cfg.dtype])
    target, vq, text, scorer = parts.target, parts.vq, parts.text, parts.scorer
    if cfg.get("note"):
        log.warning(cfg.note)
    out_dir = Path(cfg.out_dir or HydraConfig.get().runtime.output_dir)
    t0 = time.perf_counter()
    rows = run_jobs(jobs, target=target, vq=vq, text=text, sampling=SamplingParams(**cfg.sampling),
                    batch_size=int(cfg.batch_size), out_dir=out_dir, method=cfg.method,
                    generate=decoding_method(cfg, parts), scorer=scorer)
    summary = summary_table(rows, time.perf_counter() - t0)
    write_summary(out_dir / "summary.txt", summary)
    print(summary)
    print(f"images and stats.jsonl in {out_dir}")
    return {"images": float(len(rows))}


def main() -> None:
    register_resolvers()
    sys.argv = quote_prompt_args(sys.argv)
    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="decode")(run)()


if __name__ == "__main__":
    main()
