"""`python -m train tokenizer`: train the decode/ VQ tokenizer (LlamaGen architecture).

Loss: L1 + L2 reconstruction, plus the codebook and commitment terms of VQ-VAE, and optionally
(`optim.perceptual_weight`) a perceptual term from Inception-v3's first blocks (train/perceptual.py):
LlamaGen's LPIPS needs VGG weights that cannot be fetched here. Its adversarial term is left out.
"""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from data.images import ShardImages, WorldImages
from decode.models.checkpoint import save_model_folder
from decode.models.vq import VQConfig, VQModel
from train.perceptual import InceptionPerceptual
from train.common import (
    build_logger,
    build_trainer,
    output_dir,
    require_ints,
    require_shards,
    training_seconds,
    write_model_card,
)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(x.clamp(-1, 1), y, reduction="none").flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean()


class TokenizerModule(L.LightningModule):
    def __init__(self, vq: dict, lr: float = 2e-4, weight_decay: float = 0.0, l2_weight: float = 1.0,
                 codebook_weight: float = 1.0, commit_beta: float = 0.25, warmup_steps: int = 100,
                 perceptual_weight: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.vq = VQModel(VQConfig(**vq))
        # a frozen feature network, not a submodule: it stays out of checkpoints and of the optimizer
        self._perceptual = [InceptionPerceptual()] if perceptual_weight > 0 else []

    def losses(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        q = self.vq.quantize_image(images)
        recon = self.vq.decode_latents(q.z_q)
        hp = self.hparams
        parts = {"l1": F.l1_loss(recon, images), "l2": F.mse_loss(recon, images),
                 "codebook": q.codebook_loss, "commit": q.commit_loss}
        parts["loss"] = (parts["l1"] + hp.l2_weight * parts["l2"] + hp.codebook_weight * parts["codebook"]
                         + hp.commit_beta * parts["commit"])
        if self._perceptual:
            net = self._perceptual[0].to(images.device)
            parts["perceptual"] = net(recon, images)
            parts["loss"] = parts["loss"] + hp.get("perceptual_weight", 0.0) * parts["perceptual"]
        return parts, recon, q.codes

    def training_step(self, images: torch.Tensor, _: int) -> torch.Tensor:
        parts, _, _ = self.losses(images)
        self.log_dict({f"train/{k}": v for k, v in parts.items() if k != "loss"})
        self.log("train/loss", parts["loss"], prog_bar=True)
        return parts["loss"]

    def on_validation_epoch_start(self) -> None:
        self._val_codes = []

    def validation_step(self, images: torch.Tensor, batch_idx: int) -> None:
        parts, recon, codes = self.losses(images)
        self._val_codes.append(codes.flatten())
        self.log_dict({"val/loss": parts["loss"], "val/psnr": psnr(recon, images)})
        if batch_idx == 0:
            self._log_reconstructions(images[:8], recon[:8])

    def on_validation_epoch_end(self) -> None:
        used = torch.cat(self._val_codes).unique().numel()
        self.log("val/codebook_usage", used / self.vq.config.codebook_size)

    def _log_reconstructions(self, images: torch.Tensor, recon: torch.Tensor) -> None:
        grid = torch.cat([images, recon.clamp(-1, 1)], dim=2)  # originals above reconstructions
        grid = ((grid + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        log_image = getattr(self.logger, "log_image", None)  # W&B logger only
        if log_image is not None:
            log_image("val/reconstructions", list(grid), step=self.global_step)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.vq.parameters(), lr=self.hparams.lr, betas=(0.9, 0.95),
                                weight_decay=self.hparams.weight_decay)
        warm = max(1, self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def start_from(vq: VQModel, folder: str) -> None:
    """Fine-tuning (e.g. after the world changes): start from an exported tokenizer of the same architecture."""
    from decode.models.checkpoint import load_state_dict_strict, read_model_folder

    meta, state = read_model_folder(folder, kind="llamagen_vq")
    theirs, mine = VQConfig.from_dict(meta["config"]).to_dict(), vq.config.to_dict()
    changed = sorted(k for k in mine if theirs.get(k) != mine[k])
    if changed:
        raise ValueError(f"init={folder} is a tokenizer of another architecture ({', '.join(changed)} differ)")
    load_state_dict_strict(vq, state, source=str(folder))


def build_images(data: DictConfig, split: str):
    if data.source == "world":
        n = data.num_train if split == "train" else data.num_heldout
        start = 0 if split == "train" else data.heldout_start  # held-out scenes: indices never trained on
        return WorldImages(n, image_size=data.image_size, seed=data.seed, start=start, texture=data.get("texture"),
                           world=data.get("world"))
    if data.source == "webdataset":
        return ShardImages(data.train_urls if split == "train" else data.heldout_urls, data.image_size)
    raise ValueError(f"data.source must be 'world' or 'webdataset', got {data.source!r}")


def check_options(cfg: DictConfig) -> None:
    """Bad values stop the run here, before the model is built."""
    require_ints(cfg, 1, "data.batch_size", "data.image_size")
    require_ints(cfg, 0, "data.num_workers")
    if cfg.data.source == "world":
        require_ints(cfg, 1, "data.num_train", "data.num_heldout")
    elif cfg.data.source == "webdataset":
        for key in ("data.train_urls", "data.heldout_urls"):
            if not OmegaConf.select(cfg, key):
                raise ValueError(f"data.source=webdataset needs {key} (image-text shards)")
        require_shards(cfg, "data.train_urls", "data.heldout_urls")
    else:
        raise ValueError(f"data.source must be 'world' or 'webdataset', got {cfg.data.source!r}")


def run(cfg: DictConfig) -> dict[str, float]:
    check_options(cfg)
    L.seed_everything(cfg.seed, workers=True)
    out = output_dir(cfg, "tokenizer")
    # plain containers: checkpoints must reload with torch.load(weights_only=True)
    module = TokenizerModule(vq=OmegaConf.to_container(cfg.vq, resolve=True),
                             **OmegaConf.to_container(cfg.optim, resolve=True))
    if cfg.get("init"):
        start_from(module.vq, cfg.init)
    loader = lambda split, shuffle: DataLoader(  # noqa: E731
        build_images(cfg.data, split), batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
        shuffle=shuffle, drop_last=split == "train", persistent_workers=cfg.data.num_workers > 0)
    trainer = build_trainer(cfg, out, build_logger(cfg.get("logger"), out, "tokenizer"))
    trainer.fit(module, loader("train", cfg.data.source == "world"), loader("heldout", False),
                ckpt_path=cfg.get("ckpt_path"))
    wall = training_seconds(trainer)
    final = trainer.validate(module, loader("heldout", False), verbose=False)[0]
    metrics = {k: float(v) for k, v in final.items()}
    if trainer.is_global_zero:
        folder = save_model_folder(out / "tokenizer", module.vq, module.vq.config.to_dict(), kind="llamagen_vq")
        write_model_card(folder, title="VQ tokenizer (LlamaGen architecture) of the embedded world", cfg=cfg,
                         steps=trainer.global_step, wall_s=wall, metrics=metrics,
                         notes="Images: OpenMoji emoji (CC BY-SA 4.0) and shapes; weights under CC BY-SA 4.0.")
        print(f"tokenizer: held-out PSNR {metrics['val/psnr']:.2f} dB, codebook usage "
              f"{metrics['val/codebook_usage']:.1%}, {trainer.global_step} steps in {wall:.0f} s -> {folder}")
    return metrics
