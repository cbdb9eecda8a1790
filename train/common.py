"""What every training task shares: trainer, loggers, checkpoints, the NaN guard, model cards.

Tasks stay short `run(cfg)` functions; everything Lightning-specific that more than one task
needs lives here.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from train.strategies import build_strategy

log = logging.getLogger(__name__)


def output_dir(cfg: DictConfig) -> Path:
    """The run's folder: `out_dir=` if given, else Hydra's run directory."""
    if cfg.get("out_dir"):
        path = Path(cfg.out_dir)
    else:
        path = Path(HydraConfig.get().runtime.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_logger(cfg: DictConfig | None, out_dir: Path, name: str):
    """csv (default, no account), wandb (offline unless WANDB_API_KEY is set), or none."""
    kind = (cfg or {}).get("kind", "none")
    if kind == "none":
        return False
    if kind == "csv":
        return L.pytorch.loggers.CSVLogger(save_dir=str(out_dir / "logs"), name=name)
    if kind == "wandb":
        (out_dir / "wandb").mkdir(parents=True, exist_ok=True)
        offline = cfg.get("offline") if cfg.get("offline") is not None else not os.environ.get("WANDB_API_KEY")
        return L.pytorch.loggers.WandbLogger(project=cfg.get("project", "vvs-drafters"), name=name,
                                             save_dir=str(out_dir), offline=bool(offline),
                                             tags=list(cfg.get("tags") or []))
    raise ValueError(f"logger.kind must be none, csv or wandb, got {kind!r}")


class StopOnNaN(Callback):
    """Stop at the first non-finite loss, before the optimizer step can spread it.

    The last checkpoint on disk was written before the bad step, so it stays good.
    """

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise FloatingPointError(f"train/loss is {float(loss)} at step {trainer.global_step}: stopping; "
                                     f"the last good checkpoint is kept in {trainer.default_root_dir}/checkpoints")


def build_trainer(cfg: DictConfig, out_dir: Path, logger, extra_callbacks: list | None = None) -> L.Trainer:
    ckpt = ModelCheckpoint(dirpath=str(out_dir / "checkpoints"), save_last=True, save_top_k=0,
                           every_n_train_steps=int(cfg.get("checkpoint_every", 500)))
    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    t["strategy"] = build_strategy(t.get("strategy"), str(t.get("accelerator", "auto")), t.get("devices", 1))
    if not isinstance(t["strategy"], str) and str(t.get("accelerator")) == "auto":
        t["accelerator"] = "gpu" if torch.cuda.is_available() else "cpu"
    return L.Trainer(default_root_dir=str(out_dir), logger=logger,
                     callbacks=[ckpt, StopOnNaN(), *(extra_callbacks or [])], **t)


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def write_model_card(folder: Path, *, title: str, cfg: DictConfig, steps: int, wall_s: float,
                     metrics: dict[str, float], notes: str = "") -> None:
    """README.md beside the weights: command, config, seed, steps, wall time, device, final metrics."""
    task = os.environ.get("VVS_TRAIN_TASK", "TASK")
    args = [a for a in sys.argv[1:] if not a.startswith("hydra.searchpath=")]  # added by the entry point
    command = " ".join(["python -m train", task, *args])
    lines = [f"# {title}", "", notes, "", "| item | value |", "| --- | --- |",
             f"| command | `{command}` |", f"| code version | {git_revision()} |", f"| seed | {cfg.get('seed')} |",
             f"| steps | {steps} |", f"| wall time | {wall_s / 60:.1f} min |", f"| device | {device_name()} |", "",
             "## Final metrics", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())]
    lines += ["", "## Config", "", "```yaml", OmegaConf.to_yaml(cfg, resolve=True).strip(), "```", ""]
    (folder / "README.md").write_text("\n".join(lines))
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
