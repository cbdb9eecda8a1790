"""The learned VVS skip policy: traces to learn from, the small model, and its checkpoint folder.

Traces: decoding that verifies every step, and records per row and step the cheap features a
policy may see (`decode.strategies.skipping.step_features`) with what skipping would have cost: the tokens the
verification-free selector would have committed are compared with what verification committed;
`kept` is their common prefix (the step is `safe` to skip when all of them match), and
`similarity` their mean cosine in the VQ latent space (a quality-aware label: a different but
latently close token changes the image little, LANTERN's premise).
The policy is an MLP on standardised features giving P(safe); `method=vvs method.scheduler=learned`
skips where P(safe) >= method.threshold. Its folder records the target and drafter it was
trained with; loading it beside others fails.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from decode.models.checkpoint import weights_fingerprint
from decode.models.drafter import Drafter, target_fingerprint
from decode.strategies.skipping import (NUM_STEP_FEATURES, SkipLimits, Skipping, StepContext, select_skip_tokens,
                                       step_features)
from decode.models.target import LlamaGenTarget

KIND = "vvs_skip_policy"


@dataclass(frozen=True)
class PolicyConfig:
    num_features: int = NUM_STEP_FEATURES
    hidden: int = 32  # 0: logistic regression


class SkipPolicy(nn.Module):
    """features [B, F] -> P(skipping is safe) [B]."""

    def __init__(self, cfg: PolicyConfig = PolicyConfig()):
        super().__init__()
        self.config = cfg
        self.register_buffer("mean", torch.zeros(cfg.num_features))
        self.register_buffer("std", torch.ones(cfg.num_features))
        f = cfg.num_features
        self.net = (nn.Linear(f, 1) if cfg.hidden == 0 else
                    nn.Sequential(nn.Linear(f, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, 1)))

    def set_standardisation(self, features: Tensor) -> None:
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp_min(1e-6))

    def logits(self, features: Tensor) -> Tensor:
        return self.net((features - self.mean) / self.std).squeeze(-1)

    def forward(self, features: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(features))


def drafter_fingerprint(drafter: Drafter, legacy: bool = False) -> str:
    """Fingerprint (checkpoint.weights_fingerprint) of the drafter's own weights (its frozen copies of the
    target's tables excluded)."""
    return weights_fingerprint(sorted(drafter.state_dict().items()), legacy=legacy)


def save_scheduler(folder: str | Path, policy: SkipPolicy, target: LlamaGenTarget, drafter: Drafter,
                   extra: dict | None = None) -> Path:
    from decode.models.checkpoint import save_model_folder

    return save_model_folder(folder, policy, asdict(policy.config), kind=KIND,
                             extra={"target_fingerprint": target_fingerprint(target.gpt),
                                    "drafter_fingerprint": drafter_fingerprint(drafter), **(extra or {})})


def load_scheduler_policy(folder: str | Path, target: LlamaGenTarget, drafter: Drafter | None) -> SkipPolicy:
    """The policy in `folder`, refused if it was trained for another target or drafter."""
    from decode.models.checkpoint import fingerprint_matches, load_state_dict_strict, read_model_folder

    meta, state = read_model_folder(folder, kind=KIND)
    if drafter is None:
        raise ValueError("a learned skip scheduler needs the drafter it was trained with (drafter.ckpt=...)")
    for what, want, have in (("target", meta.get("target_fingerprint"), partial(target_fingerprint, target.gpt)),
                             ("drafter", meta.get("drafter_fingerprint"), partial(drafter_fingerprint, drafter))):
        if not fingerprint_matches(want, have):
            raise ValueError(f"{folder}: this scheduler was trained with another {what} (fingerprint {want}, "
                             f"this {what}: {have()}); retrain it with python -m train scheduler")
    policy = SkipPolicy(PolicyConfig(**meta["config"]))
    load_state_dict_strict(policy, state, source=str(folder))
    return policy.eval()


@dataclass
class TraceStep:
    image: int       # row of the batch
    step: int
    features: list[float]
    proposed: int    # tokens the selector would commit (its L: drafts + the next root)
    kept: int        # of them, how many match what verification committed (common prefix)
    similarity: float  # mean latent cosine of the proposed tokens with the verified ones (0 past its end)

    @property
    def safe(self) -> bool:
        return self.kept >= self.proposed


class TraceRecorder:
    """A skip rule that never skips and records, per eligible row and step, the features and what a
    skip would have cost. The selector draws from its own generators (seeded from `seeds`), so
    recording does not change what is decoded. `skipping()` is the strategy to decode with."""

    def __init__(self, latents: Tensor, seeds: list[int], warmup: int = 5):
        self.latents = latents.detach().float().cpu()
        self.unit = torch.nn.functional.normalize(self.latents, dim=-1)
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.warmup = warmup
        self.steps: list[TraceStep] = []
        self._open: dict[int, tuple[int, list[float], list[int]]] = {}

    def skipping(self) -> Skipping:
        return Skipping(self, SkipLimits(max_consecutive=1, warmup=self.warmup))

    def wants_skip(self, ctx: StepContext, allowed: Tensor) -> Tensor:
        self._open = {}
        feats = step_features(ctx, self.latents)
        for r in allowed.nonzero().flatten().tolist():  # never skipping, the consecutive-skip run is always 0
            nodes = select_skip_tokens(ctx.tree, r, float(torch.rand((), generator=self.gens[r])))
            self._open[r] = (ctx.step, feats[r].tolist(), ctx.tree.tokens[r, nodes[1:]].tolist())
        return torch.zeros(ctx.made.shape[0], dtype=torch.bool)

    def after_step(self, following: Tensor, counts: Tensor) -> None:
        rows = following.tolist() if self._open else []
        for r, (step, feats, proposed) in self._open.items():
            verified = rows[r][:int(counts[r])]
            kept = 0
            while kept < min(len(proposed), len(verified)) and proposed[kept] == verified[kept]:
                kept += 1
            n = min(len(proposed), len(verified))
            cos = (self.unit[proposed[:n]] * self.unit[verified[:n]]).sum(-1).sum() if n else torch.tensor(0.0)
            self.steps.append(TraceStep(r, step, feats, len(proposed), kept, float(cos) / len(proposed)))
        self._open = {}
