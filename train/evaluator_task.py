"""`python -m train evaluator`: the embedded world's attribute classifier (decode.evaluation.world_evaluator).

Cross-entropy on every head: per cell the object (or empty), a shape's colour and the size; the
background's pattern and colour. Scenes come from the generator, endless and labelled for free;
held-out scenes use indices far from the training ones.
"""
from __future__ import annotations

import logging

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from data.images import WorldScenes, collate_scenes
from data.world import evaluator_labels
from decode.models.checkpoint import load_state_dict_strict, read_model_folder, save_model_folder
from decode.evaluation.world_evaluator import AttributeEvaluator, EvaluatorConfig, alignment_scores
from train.common import build_logger, build_trainer, output_dir, require_ints, training_seconds, write_model_card

log = logging.getLogger(__name__)


class EvaluatorModule(L.LightningModule):
    def __init__(self, model: dict, lr: float = 1e-3, weight_decay: float = 0.01, warmup_steps: int = 100):
        super().__init__()
        self.save_hyperparameters()
        self.model = AttributeEvaluator(EvaluatorConfig(**model))

    def _loss(self, images: torch.Tensor, attributes: list[dict]):
        targets = {k: v.to(images.device) for k, v in self.model.targets(attributes).items()}
        logits, _ = self.model.logits(images)
        parts = {k: F.cross_entropy(logits[k].flatten(0, -2), targets[k].flatten()) for k in logits}
        return sum(parts.values()), parts, logits, targets

    def training_step(self, batch, _: int) -> torch.Tensor:
        loss, parts, _, _ = self._loss(*batch)
        self.log_dict({f"train/{k}": v for k, v in parts.items()})
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, _: int) -> None:
        loss, _, logits, t = self._loss(*batch)
        pred = self.model.predict(batch[0])
        mentioned, coloured = t["cell_object"] > 0, t["cell_colour"] > 0
        acc = lambda p, y, m: ((p == y) & m).sum() / m.sum().clamp_min(1)  # noqa: E731
        self.log_dict({
            "val/loss": loss,
            # alignment of real images with their own captions: the evaluator's attribute accuracy
            "val/alignment": alignment_scores(pred, t).mean(),
            "val/object_acc": acc(pred.cell_object, t["cell_object"], mentioned),
            "val/empty_acc": acc(pred.cell_object, t["cell_object"], ~mentioned),
            "val/colour_acc": acc(pred.cell_colour, t["cell_colour"], coloured),
            "val/size_acc": acc(pred.cell_size, t["cell_size"], mentioned),
            "val/pattern_acc": (pred.bg_pattern == t["bg_pattern"]).float().mean(),
            "val/bg_colour_acc": (pred.bg_colour == t["bg_colour"]).float().mean()})

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warm = max(1, self.hparams.warmup_steps)
        total = max(warm + 1, int(self.trainer.max_steps) if self.trainer.max_steps > 0 else 10_000)
        # linear warm-up, then cosine decay to 5% of the peak over max_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.05 + 0.95 * 0.5 * (
            1 + torch.cos(torch.tensor(min(1.0, max(0, s - warm) / (total - warm)) * torch.pi)).item())))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# Keys an evaluator may change when it is fine-tuned onto another world version: only the object
# label space differs between worlds, so every layer but the object head carries over.
_WORLD_KEYS = ("world", "objects")


def start_from(model, folder: str) -> None:
    """Fine-tuning: start from an exported evaluator of the same architecture. One of another world
    version gives everything but its object head, which starts fresh for the new object labels."""
    meta, state = read_model_folder(folder, kind="world_evaluator")
    mine = model.config.to_dict()
    theirs = {"world": "v2", **meta["config"]}  # folders written before world versions existed are v2
    changed = sorted(k for k in mine if theirs.get(k) != mine[k])
    if any(k not in _WORLD_KEYS for k in changed):
        raise ValueError(f"init={folder} is an evaluator with another configuration ({', '.join(changed)} differ)")
    if changed:
        log.warning("init=%s is an evaluator of another world (%s differ): its object head starts fresh",
                    folder, ", ".join(changed))
        state = {**state, **{k: v for k, v in model.state_dict().items() if k.startswith("object_head.")}}
    load_state_dict_strict(model, state, source=str(folder))


def run(cfg: DictConfig) -> dict[str, float]:
    # bad values stop the run here, before the model is built
    require_ints(cfg, 1, "data.batch_size", "data.num_train", "data.num_heldout", "data.image_size", "model.width")
    require_ints(cfg, 0, "data.num_workers")
    L.seed_everything(cfg.seed, workers=True)
    out = output_dir(cfg, "evaluator")
    model_cfg = {**evaluator_labels(cfg.data.get("world")), "image_size": cfg.data.image_size, "width": cfg.model.width}
    module = EvaluatorModule(model=model_cfg, **OmegaConf.to_container(cfg.optim, resolve=True))
    if cfg.get("init"):
        start_from(module.model, cfg.init)
    d = cfg.data
    loader = lambda n, start, shuffle: DataLoader(  # noqa: E731
        WorldScenes(n, image_size=d.image_size, seed=d.seed, start=start, texture=d.get("texture"),
                             world=d.get("world")), batch_size=d.batch_size,
        shuffle=shuffle, num_workers=d.num_workers, collate_fn=collate_scenes, drop_last=shuffle,
        persistent_workers=d.num_workers > 0)
    heldout = loader(d.num_heldout, d.heldout_start, False)
    trainer = build_trainer(cfg, out, build_logger(cfg.get("logger"), out, "evaluator"))
    trainer.fit(module, loader(d.num_train, 0, True), heldout, ckpt_path=cfg.get("ckpt_path"))
    wall = training_seconds(trainer)
    metrics = {k: float(v) for k, v in trainer.validate(module, heldout, verbose=False)[0].items()}
    if trainer.is_global_zero:
        folder = save_model_folder(out / "evaluator", module.model, module.model.config.to_dict(),
                                   kind="world_evaluator")
        write_model_card(folder, title="Attribute evaluator of the embedded world", cfg=cfg,
                         steps=trainer.global_step, wall_s=wall, metrics=metrics,
                         notes="Trained on generated scenes of OpenMoji emoji (CC BY-SA 4.0) and shapes; "
                               "weights under CC BY-SA 4.0. val/alignment is measured on held-out real images.")
        print(f"evaluator: held-out alignment {metrics['val/alignment']:.3f}, object accuracy "
              f"{metrics['val/object_acc']:.3f}, {trainer.global_step} steps in {wall:.0f} s -> {folder}")
    return metrics
