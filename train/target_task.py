"""`python -m train target`: train the decode/ LlamaGen text-to-image GPT on code shards.

Input: shards of (VQ codes, caption token states) written by data/preprocess.py, so images and
captions are not re-encoded every epoch. 10% of captions are replaced by the learned null caption
(LlamaGen's `class_dropout_prob`), keeping the caption's padding mask as LlamaGen does, so that
classifier-free guidance works at decode time.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from data.code_shards import CodeShards, collate_code_samples, report_reads_at_end
from data.preprocess import ensure_code_shards
from decode.models.checkpoint import load_state_dict_strict, read_model_folder, save_model_folder
from decode.evaluation.metrics import next_token_stats
from decode.models.target import Condition, GPTConfig, LlamaGenGPT, LlamaGenTarget
from train.common import (
    STEPS_END_THE_STREAM,
    build_logger,
    build_trainer,
    output_dir,
    require_ints,
    require_shards,
    training_seconds,
    write_model_card,
)

class TargetModule(L.LightningModule):
    def __init__(self, gpt: dict, lr: float = 3e-4, weight_decay: float = 0.05, warmup_steps: int = 200,
                 total_steps: int = 10000, null_prob: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.gpt = LlamaGenGPT(GPTConfig(**gpt))
        for m in self.gpt.modules():  # LlamaGen's init: normal(0, 0.02)
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(m.weight, std=0.02)
        self.target = LlamaGenTarget(self.gpt, cfg_scale=1.0)  # shares the GPT's parameters

    def forward_batch(self, batch, drop_captions: bool) -> torch.Tensor:
        text = batch.text
        if drop_captions and self.hparams.null_prob > 0:
            drop = torch.rand(text.shape[0], device=self.device) < self.hparams.null_prob
            null = self.gpt.cls_embedding.uncond_embedding[None].to(text.dtype)
            text = torch.where(drop[:, None, None], null, text)  # the padding mask stays the caption's
        out = self.target.teacher_forced(Condition(text, batch.mask), batch.codes)
        return out.logits  # [B, N, V]

    def training_step(self, batch, _: int) -> torch.Tensor:
        logits = self.forward_batch(batch, drop_captions=True)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.codes.flatten())
        self.log("train/loss", loss, prog_bar=True, batch_size=logits.shape[0])
        return loss

    def validation_step(self, batch, _: int) -> None:
        stats = next_token_stats(self.forward_batch(batch, drop_captions=False), batch.codes)
        self.log_dict({f"val/{k}": v for k, v in stats.items()}, batch_size=batch.codes.shape[0])

    def configure_optimizers(self):
        decay = [p for n, p in self.gpt.named_parameters() if p.ndim >= 2]
        other = [p for n, p in self.gpt.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                 {"params": other, "weight_decay": 0.0}], lr=self.hparams.lr, betas=(0.9, 0.95))
        warm, total = max(1, self.hparams.warmup_steps), max(2, self.hparams.total_steps)
        lr_at = lambda s: min((s + 1) / warm, max(0.1, 1 - (s - warm) / (total - warm)))  # noqa: E731
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lr_at), "interval": "step"}}


def start_from(gpt: LlamaGenGPT, source: str) -> None:
    """init=SOURCE: start from a trained target, a model folder or a training checkpoint (.ckpt). A deeper
    `gpt.n_layer` (a multiple of the source's) grows it without changing what it computes: each trained
    layer is followed by new ones whose output projections (attention `wo`, feed-forward `w2`) start at
    zero, so every new block adds nothing to the residual stream at step 0 and learns from there
    (function-preserving growth, as Net2Net's deeper networks)."""
    have, state, _ = trained_gpt(source)
    want = gpt.config
    changed = [f for f in dataclasses.asdict(want) if f != "n_layer" and getattr(have, f) != getattr(want, f)]
    if changed:
        raise ValueError(f"init={source} is a target of another shape ({', '.join(changed)} differ); only "
                         f"n_layer may grow")
    if want.n_layer % have.n_layer:
        raise ValueError(f"init={source} has {have.n_layer} layers: gpt.n_layer={want.n_layer} must be a multiple")
    factor = want.n_layer // have.n_layer
    grown = {k: v for k, v in state.items() if not k.startswith("layers.")}
    for key, value in state.items():
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            grown[f"layers.{int(i) * factor}.{rest}"] = value
    for j in range(want.n_layer):
        if j % factor:  # a new block: its own initialisation, its outputs zero
            for key, value in gpt.layers[j].state_dict().items():
                silent = key in ("attention.wo.weight", "feed_forward.w2.weight")
                grown[f"layers.{j}.{key}"] = torch.zeros_like(value) if silent else value
    load_state_dict_strict(gpt, grown, source=source)


def trained_gpt(source: str) -> tuple[GPTConfig, dict[str, torch.Tensor], int | None]:
    """(config, state dict, training step: None for a folder) of a target model folder or of a
    `python -m train target` checkpoint."""
    if str(source).endswith(".ckpt"):
        ckpt = torch.load(source, map_location="cpu", weights_only=False)
        state = {k.removeprefix("gpt."): v for k, v in ckpt["state_dict"].items() if k.startswith("gpt.")}
        return GPTConfig(**ckpt["hyper_parameters"]["gpt"]), state, ckpt.get("global_step")
    meta, state = read_model_folder(source, kind="llamagen_gpt")
    return GPTConfig.from_dict(meta["config"]), state, None


class SampleGrid(L.Callback):
    """After each validation: CFG samples for fixed prompts, saved as a PNG grid under
    <out>/samples and sent to the logger when it takes images (W&B)."""

    def __init__(self, prompts: list[str], tokenizer: str, out: Path, cfg_scale: float, max_length: int,
                 seed: int = 0):
        self.prompts, self.tokenizer, self.out = prompts, tokenizer, out
        self.cfg_scale, self.max_length, self.seed = cfg_scale, max_length, seed

    def on_validation_end(self, trainer: L.Trainer, module: "TargetModule") -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        from PIL import Image

        from decode.api import Components, decode_batch
        from decode.core.engine import Method
        from decode.core.sampling import SamplingParams
        from decode.models.text import load_text_encoder
        from decode.models.vq import load_vq
        from decode.pipeline import save_png, to_pil

        was_training = module.training
        module.eval()
        parts = Components(LlamaGenTarget(module.gpt, cfg_scale=self.cfg_scale),  # the model being trained
                           load_vq(self.tokenizer).to(module.device),
                           load_text_encoder("minilm", max_length=self.max_length, device=str(module.device)))
        with torch.compiler.set_stance("force_eager"):  # compile=true compiles the training pass, not decoding's
            out = decode_batch(parts, self.prompts, Method(), [self.seed + i for i in range(len(self.prompts))],
                               SamplingParams(temperature=1.0, top_k=0, top_p=1.0))
        images = to_pil(out.images)
        side = images[0].width
        grid = Image.new("RGB", (side * len(images), side))
        for i, img in enumerate(images):
            grid.paste(img, (i * side, 0))
        (self.out / "samples").mkdir(parents=True, exist_ok=True)
        save_png(grid, self.out / "samples" / f"step_{trainer.global_step:07d}.png")
        log_image = getattr(trainer.logger, "log_image", None)  # W&B logger only
        if log_image is not None:
            log_image("val/cfg_samples", [grid], step=trainer.global_step, caption=[" | ".join(self.prompts)])
        module.train(was_training)


def sample_prompts(data: DictConfig, count: int) -> list[str]:
    """Captions of the first `count` held-out world scenes: fixed prompts whose real images exist."""
    from data.shards import HELDOUT_OFFSET
    from data.world import SceneGenerator

    gen = SceneGenerator(image_size=data.image_size, seed=data.seed, world=data.get("world"))
    return [gen.scene(HELDOUT_OFFSET + i).caption for i in range(count)]


def check_options(cfg: DictConfig) -> None:
    """Bad values stop the run here, before shards are built or the model is."""
    require_ints(cfg, 1, "trainer.max_steps",
                 why=STEPS_END_THE_STREAM)
    require_ints(cfg, 1, "data.batch_size", "data.max_length", "data.shard_size", "data.build_train",
                 "data.build_heldout")
    require_ints(cfg, 0, "data.num_workers", "samples.count")
    require_shards(cfg, "data.train_urls", "data.heldout_urls")


def run(cfg: DictConfig) -> dict[str, float]:
    check_options(cfg)
    L.seed_everything(cfg.seed, workers=True)
    out = output_dir(cfg, "target")
    train_urls, heldout_urls = ensure_code_shards(cfg.data, out)
    # again: building the shards draws random numbers, finding them built does not; the model's
    # initialisation and the run must not depend on which happened
    L.seed_everything(cfg.seed, workers=True)
    gpt_cfg = OmegaConf.to_container(cfg.gpt, resolve=True)  # plain containers: weights_only reloads
    module = TargetModule(gpt=gpt_cfg, total_steps=int(cfg.trainer.max_steps),
                          **OmegaConf.to_container(cfg.optim, resolve=True))
    if cfg.get("init"):
        start_from(module.gpt, str(cfg.init))
    if cfg.get("compile"):  # the decoder stack compiled, as decoding does: parameter names and checkpoints unchanged
        module.gpt.compile_blocks("stack", backend=cfg.get("compile_backend", "inductor"))
    strict = bool(cfg.data.get("strict", False))  # corrupt samples: skipped and counted, or fatal
    train_data = CodeShards(train_urls, cfg.data.max_length, repeat=True, strict=strict)
    heldout_data = CodeShards(heldout_urls, cfg.data.max_length, repeat=False, strict=strict)
    loader = lambda data: DataLoader(data, batch_size=cfg.data.batch_size,  # noqa: E731
                                     collate_fn=collate_code_samples, num_workers=cfg.data.num_workers)
    callbacks = []
    if cfg.samples.count and cfg.data.tokenizer:  # a random tokenizer's pictures say nothing
        callbacks.append(SampleGrid(sample_prompts(cfg.data, cfg.samples.count), cfg.data.tokenizer, out,
                                    cfg.samples.cfg_scale, cfg.data.max_length, cfg.seed))
    trainer = build_trainer(cfg, out, build_logger(cfg.get("logger"), out, "target"), callbacks)
    trainer.fit(module, loader(train_data), loader(heldout_data), ckpt_path=cfg.get("ckpt_path"))
    wall = training_seconds(trainer)
    metrics = {k: float(v) for k, v in trainer.validate(module, loader(heldout_data), verbose=False)[0].items()}
    if trainer.is_global_zero:
        folder = save_model_folder(out / "target", module.gpt, module.gpt.config.to_dict(), kind="llamagen_gpt")
        write_model_card(folder, title="LlamaGen t2i target of the embedded world", cfg=cfg,
                         steps=trainer.global_step, wall_s=wall, metrics=metrics,
                         notes="Trained on OpenMoji (CC BY-SA 4.0) scenes; weights under CC BY-SA 4.0.")
        print(f"target: held-out NLL {metrics['val/nll']:.3f}, top-1 prob {metrics['val/top1_prob']:.3f}, "
              f"entropy {metrics['val/entropy']:.2f} nats, {trainer.global_step} steps in {wall:.0f} s -> {folder}")
        report_reads_at_end(train_data, heldout_data)
    return metrics
