"""`python -m train drafter drafter.kind=spatial`: distill spatial draft heads (decode/models/spatial.py)
from a frozen target, on the drafter task's data, trainers and loggers.

Each head regresses the target's feature `offset` tokens past the one the input feature predicts
(right_j: j, below: the grid width), with the EAGLE drafter's loss: SmoothL1 on features plus
`p_weight` x soft cross-entropy between the two LM-head distributions, on features with uniform
noise. Validation reports each head's top-1 and top-10 agreement with the target's own choice there
(val/<head>_top1, val/<head>_top10) on held-out codes.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from data.features import FeatureBatch
from decode.models.drafter import target_fingerprint
from decode.models.spatial import SpatialConfig, SpatialHeads, save_spatial
from train.drafter_task import DrafterModule, drafter_source, training_target


class SpatialModule(DrafterModule):
    """The drafter task's module for spatial heads: its target, conditions, caption drops, noise and
    optimiser schedule are the EAGLE module's (inherited); the network and losses are the heads'."""

    def __init__(self, target: dict, heads: dict, lr: float = 3e-4, weight_decay: float = 0.01,
                 warmup_steps: int = 100, total_steps: int = 10000, p_weight: float = 0.1, noise_std: float = 0.2,
                 null_prob: float = 0.1, topk: int = 10, seed: int = 0, decay: str = "cosine",
                 prompt_ids: dict | None = None, **_unused):
        super(DrafterModule, self).__init__()  # LightningModule's: not the EAGLE network's constructor
        self.save_hyperparameters()
        frozen = training_target(target)
        self._frozen = (frozen, self._prompt_encoder(frozen, prompt_ids))
        source = drafter_source(frozen)
        cfg = SpatialConfig(dim=frozen.hidden_size, vocab_size=frozen.vocab_size, block_size=frozen.num_image_tokens,
                            cls_token_num=frozen.prefix_len, target_fingerprint=target_fingerprint(source), **heads)
        self.drafter = SpatialHeads(cfg)  # named like the EAGLE module's network: checkpoints and sharding alike

    @torch.no_grad()
    def image_features(self, batch, gen: torch.Generator | None) -> Tensor:
        """[B, N, D] the target's feature predicting each image token (teacher-forced, some captions null;
        offline, the features `python -m train features` dumped, their null captions drawn there)."""
        if isinstance(batch, FeatureBatch):  # hidden [B, P + N - 1, D]
            return batch.hidden[:, batch.hidden.shape[1] - batch.codes.shape[1]:]
        cond, tokens = self.condition(batch), self.target.tokens_from_codes(batch.codes)
        if gen is not None and self.hparams.null_prob > 0:
            drop = torch.rand(tokens.shape[0], device=tokens.device, generator=gen) < self.hparams.null_prob
            cond = self.target.null_condition(cond, drop)
        hidden, _ = self.target.hidden_states(cond, tokens)
        return hidden[:, self.target.prefix_len - 1:]

    def head_losses(self, feats: Tensor, inputs: Tensor) -> dict[str, Tensor]:
        """Per head: loss, and top-1 / top-k agreement with the target's choice at the head's offset."""
        head, out = self.target.logits, {}
        total = 0.0
        for name, offset in self.drafter.config.offsets().items():
            n = feats.shape[1] - offset
            if n <= 0:
                continue
            pred = self.drafter.heads[name](inputs[:, :n])
            want = feats[:, offset:]
            with torch.no_grad():
                target_logits = head(want)
            pred_logits = head(pred)
            vloss = F.smooth_l1_loss(pred, want)
            ploss = -(target_logits.softmax(-1) * pred_logits.log_softmax(-1)).sum(-1).mean()
            total = total + vloss + self.hparams.p_weight * ploss
            choice = target_logits.argmax(-1, keepdim=True)
            out[f"{name}_top1"] = (pred_logits.argmax(-1, keepdim=True) == choice).float().mean()
            out[f"{name}_top{self.hparams.topk}"] = (pred_logits.topk(self.hparams.topk, -1).indices == choice).any(-1).float().mean()
        out["loss"] = total
        return out

    def training_step(self, batch, _: int) -> Tensor:
        gen = self.step_generator()
        feats = self.image_features(batch, gen)
        out = self.head_losses(feats, self.add_noise(feats, gen))
        bs = batch.codes.shape[0]
        self.log_dict({f"train/{k}": v for k, v in out.items() if k != "loss"}, batch_size=bs)
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        return out["loss"]

    card_title = "Spatial draft heads"

    def save_network(self, out: Path, extra: dict) -> Path:
        return save_spatial(out / "spatial", self.drafter, extra=extra)

    def summary(self, metrics: dict) -> str:
        k = self.hparams.topk
        heads = ", ".join(f"{name} {metrics.get(f'val/{name}_top1', float('nan')):.3f} / "
                          f"{metrics.get(f'val/{name}_top{k}', float('nan')):.3f}"
                          for name in self.drafter.config.offsets())
        return f"spatial heads: held-out top-1 / top-{k} agreement [{heads}]"

    def validation_step(self, batch, batch_idx: int) -> None:
        feats = self.image_features(batch, None)
        out = self.head_losses(feats, feats)
        self.log_dict({f"val/{k}": v for k, v in out.items()}, batch_size=batch.codes.shape[0])
