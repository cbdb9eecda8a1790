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
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, Timer
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from train.trainer_strategies import build_strategy

log = logging.getLogger(__name__)


def output_dir(cfg: DictConfig, model: str | None = None) -> Path:
    """The run's folder, `out_dir=` (`python -m train` fills an unset one with Hydra's run directory).

    `model` names the sub-folder the task saves its result to: a folder that already holds it, or
    Lightning checkpoints, is refused unless the run resumes (ckpt_path) or says overwrite=true.
    Retraining into it would replace the model, and Lightning would write last-v1.ckpt beside the
    old run's last.ckpt, which a later ckpt_path=last would resume. A resume's checkpoint must be
    there and readable: checked now, before any model is built or data is made.
    """
    if not cfg.get("out_dir"):  # `python -m train` sets it to Hydra's run dir when the user does not
        raise ValueError("out_dir is not set: give out_dir=FOLDER")
    path = Path(cfg.out_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"out_dir={path} is a file, not a folder")
    if model is not None and cfg.get("ckpt_path"):
        resume_step(cfg, path)
    elif model is not None:
        _check_fresh(path, model, overwrite=bool(cfg.get("overwrite")))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _check_fresh(path: Path, model: str, overwrite: bool) -> None:
    ckpts = path / "checkpoints"
    held = [p.name for p in (path / model, ckpts) if p.is_dir() and any(p.iterdir())]
    if not held:
        return
    if not overwrite:
        raise ValueError(f"out_dir={path} already holds a run ({' and '.join(held)}): give a new out_dir, "
                         f"resume it with ckpt_path=last, or train over it with overwrite=true (its "
                         f"checkpoints are deleted, its {model} folder replaced at the end)")
    # the old run's last.ckpt must not outlive it: ckpt_path=last would resume it
    if ckpts.is_dir() and rank_zero_only.rank == 0:
        log.warning("overwrite=true: deleting %s", ckpts)
        shutil.rmtree(ckpts)


def resume_step(cfg: DictConfig, out: Path) -> int:
    """The global step the run resumes from (0 for a fresh run). Read up front, so a missing or
    unreadable checkpoint stops the run before any model is built or data is made."""
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path:
        return 0
    path = out / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if path.is_dir():  # a DeepSpeed checkpoint folder: rank 0's model states (ZeRO-3: zero_pp_rank_0_...)
        found = sorted((path / "checkpoint").glob("*mp_rank_00_model_states.pt"))
        path = found[0] if found else path / "checkpoint" / "mp_rank_00_model_states.pt"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint to resume from not found: {path}{_resume_hint(cfg, out)}")
    try:  # mmap: the weights are not read, only the small pickle around them
        return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"])
    except Exception as e:  # torch.load raises whatever a stray file's bytes lead it to
        why = (f"{type(e).__name__}: {e}" if zipfile.is_zipfile(path)
               else "not a torch.save zip archive: truncated, or another kind of file")
        raise ValueError(f"ckpt_path={ckpt_path}: {path} is not a readable Lightning checkpoint ({why})") from e


def _resume_hint(cfg: DictConfig, out: Path) -> str:
    if cfg.get("ckpt_path") != "last":
        return ""
    if not cfg.get("out_dir"):
        return (f" (ckpt_path=last resumes the run in out_dir; without out_dir= this run got a fresh folder, "
                f"{out}: give out_dir=<the earlier run's folder>)")
    return f" (ckpt_path=last resumes the run in out_dir={out}: is that the earlier run's folder?)"


STEPS_END_THE_STREAM = "the LR schedule's length; the training stream is endless, so max_steps is its only end"


def require_ints(cfg: DictConfig, minimum: int, *keys: str, why: str = "") -> None:
    """Whole-number options that must be >= minimum, checked before any model is built: torch
    reports a zero batch size deep in its sampler, and Lightning reads max_steps=-1 as no limit."""
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{key} must be a whole number >= {minimum}, got {value!r}{why and f' ({why})'}")


def require_shards(cfg: DictConfig, *keys: str) -> None:
    """Local shards named by the options `keys` (those given) must exist: checked now, not when
    Lightning's sanity check first opens them, after the model is built."""
    from data.sources import local_shards

    for key in keys:
        urls = OmegaConf.select(cfg, key)
        if urls:
            try:
                local_shards(urls)
            except (FileNotFoundError, ValueError) as e:  # ValueError: EmptyDatasetError
                raise type(e)(f"{key}={urls}: {e}") from None


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
    # no version counter: last.ckpt is always the newest, the one ckpt_path=last resumes (never a last-v1.ckpt)
    ckpt = ModelCheckpoint(dirpath=str(out_dir / "checkpoints"), save_last=True, save_top_k=0,
                           every_n_train_steps=int(cfg.get("checkpoint_every", 500)), enable_version_counter=False)
    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    if t.get("limit_val_batches", 1) in (0, 0.0):  # the exported model's card is measured on held-out data
        raise ValueError("trainer.limit_val_batches=0: every task ends by measuring its model on held-out data for "
                         "the model card; give at least 1 batch (and a large trainer.val_check_interval to skip "
                         "validation during training)")
    t["strategy"] = build_strategy(t.get("strategy"), str(t.get("accelerator", "auto")), t.get("devices", 1))
    if not isinstance(t["strategy"], str) and str(t.get("accelerator")) == "auto":
        t["accelerator"] = "gpu" if torch.cuda.is_available() else "cpu"
    # Timer keeps its count in the checkpoint, so the card's wall time covers every resume of the run
    return L.Trainer(default_root_dir=str(out_dir), logger=logger,
                     callbacks=[ckpt, StopOnNaN(), Timer(verbose=False), *(extra_callbacks or [])], **t)


def training_seconds(trainer: L.Trainer) -> float:
    """Seconds spent in fit over the whole run, resumes included (up to the last checkpoint of each stop)."""
    return next(c for c in trainer.callbacks if isinstance(c, Timer)).time_elapsed("train")


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


def inherited_licence(source: str | os.PathLike | None) -> str:
    """The licence line a model derived from `source` (a model folder) must carry: OpenMoji's
    attribution when the source's card says it was made from OpenMoji (CC BY-SA 4.0, share-alike)."""
    card = Path(str(source)) / "README.md" if source else None
    if card is None or not card.is_file() or "OpenMoji" not in card.read_text():
        return ""
    from data.world import ATTRIBUTION  # the emoji package loads only for world-derived models
    return (f"Weights under CC BY-SA 4.0: derived from `{source}`, which was trained on scenes made from "
            f"OpenMoji. {ATTRIBUTION}")


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
