"""`python -m train scheduler`: learn when VVS may skip a verification.

1. Traces (built once, resumable per shard): the target + drafter decode world prompts with
   LANTERN acceptance and verification at every step; `decode.strategies.learned_skip.TraceRecorder` records each
   step's cheap features and whether the verification-free selector's tokens would have been
   exactly what verification committed ("safe"). Training prompts come from the world's training
   scenes; held-out traces from other scenes.
2. A small MLP (or logistic regression, model.hidden=0) learns P(safe) with binary cross-entropy.
3. The folder (`<out_dir>/scheduler`) names the target and drafter it was trained with; decode
   uses it with `method=vvs method.base=lantern method.skipping=learned method.scheduler_ckpt=FOLDER`.
"""
from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import BinaryAUROC

from data.shards import HELDOUT_OFFSET
from data.traces import Traces, image_records, load_traces, read_manifest, write_manifest, write_shard
from data.world import SceneGenerator
from decode.strategies.registry import MethodConfig, resolve_method
from decode.api import Components, build_components, make_method
from decode.evaluation.redundancy import trace_steps
from decode.resolvers import register_resolvers
from decode.pipeline import image_seed
from decode.core.sampling import SamplingParams
from decode.strategies.learned_skip import PolicyConfig, SkipPolicy, drafter_fingerprint, save_scheduler
from decode.core.trees import TreeParams
from train.common import (
    build_logger,
    build_trainer,
    inherited_licence,
    output_dir,
    require_ints,
    training_seconds,
    write_model_card,
)


def trace_method(cfg: DictConfig) -> MethodConfig:
    """The base the traces decode with (VVS's: LANTERN k 1000, delta 0.2), verifying every step."""
    return resolve_method("lantern", {k: cfg.method[k] for k in ("lantern_k", "delta")})


def decode_parts(cfg: DictConfig) -> Components:
    register_resolvers()
    return build_components(cfg, torch.device("cpu"), methods=[trace_method(cfg)])


def record_traces(parts: Components, prompts: list[str], *, seed: int, first_image: int, sampling: SamplingParams,
                  tree: TreeParams, base: MethodConfig, warmup: int, batch_size: int,
                  progress: bool = True) -> list[dict]:
    """Decode `prompts` (verifying every step) and return one trace record per image."""
    ids = [first_image + i for i in range(len(prompts))]
    traced = trace_steps(parts, prompts, make_method(parts, base, sampling, tree), [image_seed(seed, i, 0) for i in ids],
                         [image_seed(seed, i, 1) for i in ids], sampling, warmup=warmup, batch_size=batch_size,
                         progress=progress)
    return image_records(traced.steps, first_image, len(prompts))


def ensure_traces(cfg: DictConfig, folder: Path, parts) -> Path:
    """Build the trace shards unless a manifest with the same settings says they are complete."""
    target, vq, drafter = parts.target, parts.vq, parts.drafter
    t = cfg.traces
    settings = {"format": 2, "target": str(cfg.target.ckpt), "cfg_scale": cfg.target.cfg_scale,
                "drafter_fingerprint": drafter_fingerprint(drafter),
                "traces": OmegaConf.to_container(t), "method": OmegaConf.to_container(cfg.method),
                "sampling": OmegaConf.to_container(cfg.sampling), "tree": OmegaConf.to_container(cfg.tree)}
    meta = read_manifest(folder)
    if meta is not None and meta.get("settings") == settings:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    size = vq.config.downsample * int(round(target.num_image_tokens ** 0.5))
    world = SceneGenerator(image_size=size, seed=t.world_seed, world=t.get("world"))
    sampling, tree = SamplingParams(**cfg.sampling), TreeParams(**cfg.tree)
    shards = {}
    for split, count, offset in (("train", t.num_images, t.start), ("heldout", t.heldout_images, HELDOUT_OFFSET)):
        shards[split] = 0
        for first in range(0, count, t.per_shard):
            n = min(t.per_shard, count - first)
            prompts = [world.scene(offset + first + i).caption for i in range(n)]
            recs = record_traces(parts, prompts, seed=t.seed + (split == "heldout"), first_image=first,
                                 sampling=sampling, tree=tree, base=trace_method(cfg), warmup=cfg.method.warmup,
                                 batch_size=t.batch_size)
            write_shard(folder, split, shards[split], recs)
            shards[split] += 1
    write_manifest(folder, {"settings": settings, "shards": shards})
    return folder


class SchedulerModule(L.LightningModule):
    def __init__(self, model: dict, lr: float = 3e-3, weight_decay: float = 0.0, pos_weight: float = 1.0):
        super().__init__()
        self.save_hyperparameters()
        self.policy = SkipPolicy(PolicyConfig(**model))
        self.auroc = BinaryAUROC()

    def _loss(self, batch):
        feats, safe = batch
        logits = self.policy.logits(feats)
        pw = torch.tensor(self.hparams.pos_weight, device=feats.device)
        return F.binary_cross_entropy_with_logits(logits, safe, pos_weight=pw), logits, safe

    def training_step(self, batch, _: int):
        loss, _, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, _: int) -> None:
        loss, logits, safe = self._loss(batch)
        pred = logits > 0
        self.auroc.update(logits, (safe > 0.5).long())
        self.log_dict({"val/loss": loss, "val/accuracy": (pred == (safe > 0.5)).float().mean(),
                       "val/skip_rate_at_0.5": pred.float().mean(),
                       "val/precision_at_0.5": ((pred & (safe > 0.5)).sum() / pred.sum().clamp_min(1)).float()},
                      prog_bar=False)

    def on_validation_epoch_end(self) -> None:
        self.log("val/auroc", self.auroc.compute(), prog_bar=True)
        self.auroc.reset()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.policy.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def _loader(tr: Traces, label: str, batch_size: int, shuffle: bool) -> DataLoader:
    return DataLoader(TensorDataset(tr.features, tr.target(label)), batch_size=batch_size, shuffle=shuffle)


@torch.no_grad()
def compare_with_similarity_rule(policy: SkipPolicy, held: Traces) -> dict[str, float]:
    """How the learned policy ranks held-out steps against VVS's path-similarity rule (feature 0):
    AUROC for each label, and the mean latent similarity of the steps each would skip at the same
    skip rates (higher: skipped steps commit tokens closer to what verification would have)."""
    from torchmetrics.functional.classification import binary_auroc

    prob, rule = policy.eval()(held.features), held.features[:, 0]
    out = {}
    for label in ("exact", "kept", "latent"):
        y = (held.target(label) > 0.5).long()
        if 0 < int(y.sum()) < len(y):
            out[f"heldout/auroc_{label}_learned"] = float(binary_auroc(prob, y))
            out[f"heldout/auroc_{label}_similarity_rule"] = float(binary_auroc(rule, y))
    for q in (0.9, 0.75, 0.5, 0.25):  # knob values that approve the top 10 ... 75% of held-out steps (sweeps)
        out[f"heldout/threshold_q{int(q * 100)}_learned"] = float(prob.quantile(q))
        out[f"heldout/tau_q{int(q * 100)}_similarity_rule"] = float(rule.quantile(q))
    for rate in (0.1, 0.25, 0.5):
        k = max(1, int(rate * len(prob)))
        out[f"heldout/similarity_of_top{int(rate * 100)}pct_learned"] = float(held.similarity[prob.topk(k).indices].mean())
        out[f"heldout/similarity_of_top{int(rate * 100)}pct_rule"] = float(held.similarity[rule.topk(k).indices].mean())
    return out


def run(cfg: DictConfig) -> dict[str, float]:
    # bad values stop the run here, before the models are loaded and traces decoded
    require_ints(cfg, 1, "data.batch_size", "traces.num_images", "traces.heldout_images", "traces.per_shard",
                 "traces.batch_size")
    L.seed_everything(cfg.seed, workers=True)
    out = output_dir(cfg, "scheduler")
    parts = decode_parts(cfg)
    t0 = time.perf_counter()
    folder = ensure_traces(cfg, Path(cfg.traces.dir) if cfg.traces.dir else out / "traces", parts)
    trace_s = time.perf_counter() - t0
    L.seed_everything(cfg.seed, workers=True)  # again: making traces draws random numbers, reusing them does not
    train, held = load_traces(folder, "train"), load_traces(folder, "heldout")
    print(f"traces: {len(train)} train steps ({float(train.safe.mean()):.3f} exactly safe, mean latent similarity "
          f"{float(train.similarity.mean()):.3f}), {len(held)} held-out steps, built in {trace_s:.0f} s -> {folder}")
    module = SchedulerModule(model=OmegaConf.to_container(cfg.model), **OmegaConf.to_container(cfg.optim))
    module.policy.set_standardisation(train.features)
    trainer = build_trainer(cfg, out, build_logger(cfg.get("logger"), out, "scheduler"))
    label = cfg.data.label
    trainer.fit(module, _loader(train, label, cfg.data.batch_size, True), _loader(held, label, 4096, False),
                ckpt_path=cfg.get("ckpt_path"))
    wall = training_seconds(trainer)
    metrics = {k: float(v) for k, v in
               trainer.validate(module, _loader(held, label, 4096, False), verbose=False)[0].items()}
    rate = float((held.target(label) > 0.5).float().mean())
    metrics["heldout_positive_rate"] = rate
    metrics.update(compare_with_similarity_rule(module.policy, held))
    if trainer.is_global_zero:
        dest = save_scheduler(out / "scheduler", module.policy.eval(), parts.target, parts.drafter,
                              extra={"traces": str(folder), "features": "decode.strategies.skipping.step_features"})
        write_model_card(dest, title="VVS learned skip scheduler", cfg=cfg, steps=trainer.global_step,
                         wall_s=wall + trace_s, metrics=metrics,
                         notes=f"Traces: {len(train)} training steps, {len(held)} held-out steps, built in "
                               f"{trace_s:.0f} s (0 s: reused). Use: python -m decode method=vvs "
                               f"method.base=lantern method.skipping=learned method.scheduler_ckpt=<this folder>. heldout/* metrics "
                               f"compare the policy with VVS's path-similarity rule on held-out steps. "
                               + inherited_licence(cfg.target.ckpt))
        print(f"scheduler ({label} label): held-out AUROC {metrics['val/auroc']:.3f}, accuracy "
              f"{metrics['val/accuracy']:.3f} (majority-class baseline {max(rate, 1 - rate):.3f}) -> {dest}")
    return metrics
