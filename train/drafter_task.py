"""`python -m train drafter`: distill an EAGLE-style drafter (decode.models.drafter) from a frozen target.

Online distillation (the default): the frozen target runs teacher-forced inside the training
step on (caption, image codes) and its post-norm features are the drafter's inputs and targets;
nothing is dumped to disk. The target's weights are held outside the module's registry, so they
never enter checkpoints or hyperparameters (only its path does).

Loss (EAGLE, docs/algorithms.md 6): SmoothL1 between predicted and true next features plus
`p_weight` x soft cross-entropy between the LM-head distributions of the two, both over the
positions whose next feature predicts an image token. Inputs get uniform feature noise.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader

from data.code_shards import CodeShards, collate_code_samples, report_reads_at_end
from data.features import FeatureBatch, FeatureShards, collate_features
from data.preprocess import ensure_code_shards
from decode.models.drafter import Drafter, DrafterConfig, TeacherForced, drafter_inputs, save_drafter
from decode.core.sampling import SamplingParams
from decode.core.engine import generate
from decode.strategies.registry import build_method
from decode.core.trees import TreeParams
from decode.models.target import Condition
from decode.models.target.hf_target import OwnTokenizer
from train.common import (
    STEPS_END_THE_STREAM,
    build_logger,
    build_trainer,
    inherited_licence,
    output_dir,
    require_ints,
    require_shards,
    resume_step,
    training_seconds,
    write_model_card,
)
from train.trainer_strategies import full_parameters


class DrafterModule(L.LightningModule):
    def __init__(self, target: dict, drafter: dict, lr: float = 3e-4, weight_decay: float = 0.01,
                 warmup_steps: int = 100, total_steps: int = 10000, p_weight: float = 0.1, noise_std: float = 0.2,
                 null_prob: float = 0.1, topk: int = 10, unroll_depth: int = 5, seed: int = 0,
                 decode_prompts: int = 2, decode_cfg_scale: float = 4.0, tree: dict | None = None,
                 decay: str = "cosine", prompt_ids: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        # `target`: a conf/target entry. Only this description is saved; a tuple keeps the frozen weights
        # (and a transformers target's prompt encoder, `prompt_ids`) out of state_dict, checkpoints and the optimizer.
        frozen = training_target(target)
        self._frozen = (frozen, self._prompt_encoder(frozen, prompt_ids))
        self.drafter = Drafter(DrafterConfig.for_target(drafter_source(frozen), **drafter))

    @staticmethod
    def _prompt_encoder(target, prompt_ids: dict | None):
        """A transformers target's prompt encoder (its captions become token ids); None for LlamaGen."""
        if not target.takes_prompt_ids:
            return None
        if not prompt_ids:
            raise ValueError("a target conditioned on prompt token ids needs its prompt encoder (text_encoder)")
        return instantiate({**prompt_ids, "max_length": prompt_ids.get("max_length") or target.prefix_len})

    @property
    def target(self):
        return self._frozen[0]

    def condition(self, batch) -> Condition:
        """The target's condition for a batch: its caption states, or (a transformers target) the
        captions' prompt ids."""
        if not self.target.takes_prompt_ids:
            return Condition(batch.text, batch.mask)
        ids = self._frozen[1].encode(batch.captions)
        return Condition(ids.emb.to(self.device), ids.mask.to(self.device))

    def compile_target(self, backend: str = "inductor") -> None:
        """The frozen target's decoder stack compiled for the teacher-forced features (LlamaGen targets);
        the validation decodes run eagerly."""
        gpt = getattr(self.target, "gpt", None)
        if not hasattr(gpt, "compile_blocks"):
            raise ValueError(f"compile=true: LlamaGen targets only, not {type(self.target).__name__}")
        gpt.compile_blocks("stack", backend=backend)

    def on_fit_start(self) -> None:
        self.target.to(device=self.device)

    on_validation_start = on_fit_start

    def step_generator(self) -> torch.Generator:
        """Randomness of one training step, a function of (seed, step, rank) only: a resumed run
        draws the same caption drops and feature noise as an uninterrupted one."""
        seed = (int(self.hparams.seed) * 1_000_003 + int(self.global_step)) * 1009 + int(self.global_rank)
        return torch.Generator(device=self.device).manual_seed(seed)

    @torch.no_grad()
    def teacher(self, batch, gen: torch.Generator | None) -> TeacherForced:
        """Drafter inputs from the frozen target; with `gen`, some captions become the null caption."""
        if isinstance(batch, FeatureBatch):  # offline: features dumped by `python -m train features`
            return drafter_inputs(drafter_source(self.target), batch.codes, batch.hidden, batch.valid,
                                  self.drafter.config.prefix_token)
        cond, tokens = self.condition(batch), self.target.tokens_from_codes(batch.codes)
        if gen is not None and self.hparams.null_prob > 0:  # CFG: the drafter must also serve null rows
            drop = torch.rand(tokens.shape[0], device=tokens.device, generator=gen) < self.hparams.null_prob
            cond = self.target.null_condition(cond, drop)
        hidden, valid = self.target.hidden_states(cond, tokens)
        return drafter_inputs(drafter_source(self.target), tokens, hidden, valid, self.drafter.config.prefix_token)

    def predict_features(self, tf: TeacherForced, features: Tensor) -> Tensor:
        b, t, _ = features.shape
        pos = torch.arange(t, device=features.device).expand(b, t)
        return self.drafter(tf.token_emb, features, pos, tf.mask)

    def add_noise(self, features: Tensor, gen: torch.Generator) -> Tensor:
        # EAGLE's AddUniformNoise: (U[0,1) - 0.5) * std * 512 / seq_len
        scale = self.hparams.noise_std * 512 / features.shape[1]
        noise = torch.rand(features.shape, device=features.device, dtype=features.dtype, generator=gen)
        return features + (noise - 0.5) * scale

    def losses(self, tf: TeacherForced, pred: Tensor) -> dict[str, Tensor]:
        m = tf.loss_mask.float()
        denom = m.sum().clamp_min(1)
        vloss = (F.smooth_l1_loss(pred, tf.next_features, reduction="none").mean(-1) * m).sum() / denom
        head = self.target.logits
        with torch.no_grad():
            target_logits = head(tf.next_features)
        p_target = target_logits.softmax(-1)
        pred_logits = head(pred)
        ploss = -((p_target * pred_logits.log_softmax(-1)).sum(-1) * m).sum() / denom
        agree = ((pred_logits.argmax(-1) == target_logits.argmax(-1)).float() * m).sum() / denom
        return {"loss": vloss + self.hparams.p_weight * ploss, "vloss": vloss, "ploss": ploss, "acc1": agree,
                "_pred_logits": pred_logits, "_target_logits": target_logits}

    def training_step(self, batch, _: int) -> Tensor:
        gen = self.step_generator()
        tf = self.teacher(batch, gen)
        out = self.losses(tf, self.predict_features(tf, self.add_noise(tf.features, gen)))
        bs = batch.codes.shape[0]
        self.log_dict({f"train/{k}": out[k] for k in ("vloss", "ploss", "acc1")}, batch_size=bs)
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        return out["loss"]

    @torch.no_grad()
    def agreement_curve(self, tf: TeacherForced) -> list[Tensor]:
        """Top-1 agreement with the target at depths 1 .. unroll_depth. At depth d every position is
        fed the drafter's own depth d-1 prediction of its feature instead of the target's (EAGLE
        drafting depth d); a proxy for acceptance, which also feeds predictions as context."""
        head, m = self.target.logits, tf.loss_mask
        want = head(tf.next_features).argmax(-1)
        feats, curve = tf.features, []
        p0 = int(m[0].float().argmax())  # first trained position (P - 1)
        for d in range(1, self.hparams.unroll_depth + 1):
            pred = self.predict_features(tf, feats)
            valid = m.clone()
            valid[:, : p0 + d - 1] = False  # positions with a full chain of d - 1 own predictions
            hit = (head(pred).argmax(-1) == want) & valid
            curve.append(hit.sum() / valid.sum().clamp_min(1))
            # depth d+1: position i reads the prediction made at i-1 (of h_i); the prefix keeps truth
            feats = torch.cat([tf.features[:, : p0 + 1], pred[:, p0:-1]], dim=1)
        return curve

    @torch.no_grad()
    def greedy_step_compression(self, batch) -> Tensor:
        """Real acceptance: greedy EAGLE-2 decodes (with CFG, the decode-time tree) of the first
        held-out captions; image tokens per target forward after the prefill."""
        n = min(self.hparams.decode_prompts, batch.codes.shape[0])
        target = self.target.with_cfg_scale(self.hparams.decode_cfg_scale)
        greedy = SamplingParams(temperature=0.0)
        method = build_method("eagle2", sampling=greedy, tree=TreeParams(**(self.hparams.tree or {})),
                              drafter=self.drafter.eval())
        cond = self.condition(batch)
        with torch.compiler.set_stance("force_eager"):  # compile=true compiles the training features only
            gen = generate(target, Condition(cond.cond[:n], cond.mask[:n]), num_tokens=target.num_image_tokens,
                           sampling=greedy, method=method)
        return gen.tokens.shape[1] / gen.nfe.float().clamp_min(1).mean()

    def validation_step(self, batch, batch_idx: int) -> None:
        if batch_idx == 0 and self.hparams.decode_prompts > 0 and not isinstance(batch, FeatureBatch):
            self.log("val/greedy_step_compression", self.greedy_step_compression(batch), batch_size=1)
        tf = self.teacher(batch, None)
        out = self.losses(tf, self.predict_features(tf, tf.features))
        m = tf.loss_mask
        topk = out["_pred_logits"].topk(self.hparams.topk, dim=-1).indices
        in_topk = (topk == out["_target_logits"].argmax(-1, keepdim=True)).any(-1)
        bs = batch.codes.shape[0]
        metrics = {"val/loss": out["loss"], "val/vloss": out["vloss"], "val/ploss": out["ploss"],
                   f"val/top{self.hparams.topk}_agreement": (in_topk & m).sum() / m.sum()}
        for d, a in enumerate(self.agreement_curve(tf), start=1):
            metrics[f"val/agreement_depth{d}"] = a
        self.log_dict(metrics, batch_size=bs)

    card_title = "EAGLE-style drafter"

    def save_network(self, out: Path, extra: dict) -> Path:
        """The trained network as a model folder under the run's `out`."""
        return save_drafter(out / "drafter", self.drafter, extra=extra)

    def summary(self, metrics: dict) -> str:
        """The run's closing line (held-out figures)."""
        curve = ", ".join(f"{metrics.get(f'val/agreement_depth{d}', float('nan')):.3f}"
                          for d in range(1, self.hparams.unroll_depth + 1))
        greedy = metrics.get("val/greedy_step_compression")
        greedy = f", greedy EAGLE-2 step compression {greedy:.2f}" if greedy is not None else ""
        return f"drafter: held-out top-1 agreement by depth [{curve}]{greedy}"

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.drafter.parameters(), lr=self.hparams.lr, betas=(0.9, 0.95),
                                weight_decay=self.hparams.weight_decay)
        lr_at = functools.partial(lr_factor, warmup=self.hparams.warmup_steps, total=self.hparams.total_steps,
                                  decay=self.hparams.decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def lr_factor(step: int, *, warmup: int, total: int, decay: str = "cosine") -> float:
    """The learning rate at `step` over the peak: linear warm-up, then cosine down to 10% of the
    peak (the default) or linear down to 0 at `total` (the released LANTERN recipe)."""
    warm, total = max(1, warmup), max(2, total)
    if step < warm:
        return (step + 1) / warm
    done = min(1.0, (step - warm) / max(1, total - warm))
    return 1.0 - done if decay == "linear" else 0.1 + 0.45 * (1 + math.cos(math.pi * done))


def training_target(target: dict):
    """The frozen target of a conf/target entry, unguided (training reads one group's features)."""
    return instantiate({**target, "cfg_scale": 1.0})


def drafter_source(target):
    """What a drafter's shape, fingerprint and token embeddings come from: a LlamaGen target's GPT (the
    folders already trained name its fingerprint), or a transformers target adapter itself."""
    return getattr(target, "gpt", target)


def target_name(target: DictConfig) -> str:
    """The target a drafter was distilled from, as its model card says it: its checkpoint or folder, or
    the loader of a random one."""
    return str(target.get("ckpt") or target.get("folder") or f"{target._target_} (tiny random)")


def check_options(cfg: DictConfig) -> None:
    """Bad values stop the run here, before shards are built or the target is loaded."""
    require_ints(cfg, 1, "trainer.max_steps", "optim.total_steps",
                 why=STEPS_END_THE_STREAM)
    require_ints(cfg, 1, "data.batch_size", "data.max_length", "data.shard_size", "data.build_train",
                 "data.build_heldout")
    if cfg.data.num_workers not in (0, 1):
        raise ValueError(f"data.num_workers must be 0 or 1 (more workers would interleave the stream), "
                         f"got {cfg.data.num_workers!r}")
    require_shards(cfg, "data.train_urls", "data.heldout_urls", "data.features")
    if cfg.optim.get("decay", "cosine") not in ("cosine", "linear"):
        raise ValueError(f"optim.decay must be 'cosine' or 'linear', got {cfg.optim.decay!r}")


def run(cfg: DictConfig) -> dict[str, float]:
    check_options(cfg)
    L.seed_everything(cfg.seed, workers=True)
    out = output_dir(cfg, "drafter")
    # Exact resume: the stream restarts where the checkpoint's step left it (Lightning does not
    # restore an iterable dataset's position), and each step's randomness depends on the step.
    skip = resume_step(cfg, out) * int(cfg.data.batch_size)
    target_cfg = OmegaConf.to_container(cfg.target, resolve=True)
    own = None
    if cfg.get("tokenizer") and cfg.tokenizer.get("own"):  # a transformers target: codes by its own VQ
        own = OwnTokenizer(training_target(target_cfg))
    train_urls, heldout_urls = ensure_code_shards(cfg.data, out, vq=own)
    # again: building the shards draws random numbers, finding them built does not; the model's
    # initialisation and the run must not depend on which happened
    L.seed_everything(cfg.seed, workers=True)
    prompts = OmegaConf.to_container(cfg.text_encoder, resolve=True) if own is not None else None
    net = OmegaConf.to_container(cfg.drafter, resolve=True)
    kind = net.pop("kind", "eagle")
    optim = {"total_steps": int(cfg.trainer.max_steps), **OmegaConf.to_container(cfg.optim, resolve=True)}
    if kind == "spatial":
        from train.spatial_task import SpatialModule

        heads = {k: net[k] for k in ("right", "below") if k in net}
        module = SpatialModule(target=target_cfg, prompt_ids=prompts, heads=heads, seed=int(cfg.seed), **optim)
    else:
        net = {k: v for k, v in net.items() if k not in ("right", "below")}
        module = DrafterModule(target=target_cfg, prompt_ids=prompts, drafter=net, seed=int(cfg.seed), **optim)
    if cfg.get("compile"):
        module.compile_target(cfg.get("compile_backend", "inductor"))
    bs, workers = int(cfg.data.batch_size), int(cfg.data.num_workers)
    strict = bool(cfg.data.get("strict", False))  # corrupt samples: skipped and counted, or fatal
    if cfg.data.get("features"):  # offline: stream dumped target features; validation stays online
        train_data = FeatureShards(cfg.data.features, repeat=True, skip=skip, strict=strict)
        train_loader = DataLoader(train_data, batch_size=bs, collate_fn=collate_features, num_workers=workers)
    else:
        train_data = CodeShards(train_urls, cfg.data.max_length, repeat=True, skip=skip, strict=strict)
        train_loader = DataLoader(train_data, batch_size=bs, collate_fn=collate_code_samples, num_workers=workers)
    heldout_data = CodeShards(heldout_urls, cfg.data.max_length, repeat=False, strict=strict)
    heldout_loader = DataLoader(heldout_data, batch_size=bs, collate_fn=collate_code_samples, num_workers=workers)
    trainer = build_trainer(cfg, out, build_logger(cfg.get("logger"), out, "drafter"))
    trainer.fit(module, train_loader, heldout_loader, ckpt_path=cfg.get("ckpt_path"))
    wall = training_seconds(trainer)
    metrics = {k: float(v) for k, v in trainer.validate(module, heldout_loader, verbose=False)[0].items()}
    with full_parameters(trainer, module.drafter):
        if trainer.is_global_zero:
            folder = module.save_network(out, extra={"target": target_name(cfg.target)})
    if trainer.is_global_zero:
        write_model_card(folder, title=module.card_title, cfg=cfg, steps=trainer.global_step, wall_s=wall,
                         metrics=metrics, notes=f"Distilled online from the target `{target_name(cfg.target)}`. "
                                                + inherited_licence(cfg.target.get("ckpt")))
        print(f"{module.summary(metrics)}, {trainer.global_step} steps in {wall:.0f} s -> {folder}")
        report_reads_at_end(train_data, heldout_data)
    return metrics
