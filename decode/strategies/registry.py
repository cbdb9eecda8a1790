"""Decoding methods by name: which drafting, acceptance and skip scheduler each one combines.

| method     | drafting                     | acceptance                      | scheduler            |
|------------|------------------------------|---------------------------------|----------------------|
| ar         | none                         | the target's own sample         | never                |
| eagle2     | EAGLE-2 dynamic tree         | greedy / exact multi-candidate  | never                |
| lantern    | EAGLE-2 dynamic tree         | LANTERN (k, delta: TVD bound)   | never                |
| lantern_pp | static tree, sampled drafts  | LANTERN++ (k, lambda bound)     | never                |
| vvs_u      | as lantern                   | as lantern                      | uniform interval     |
| vvs        | as lantern                   | as lantern                      | path similarity, tau |
| sjd        | Jacobi window on the target  | exact (SJD's probabilistic rule)| never                |
| sjd_vp     | Jacobi window, VP-favoured   | exact                           | never                |
Published defaults live in conf/method/*.yaml (ALGORITHMS.md 1.9 and 2.5).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

from torch import Tensor

from decode.strategies.acceptance import Relaxation, latent_neighbours, make_acceptance
from decode.models.drafter import Drafter
from decode.strategies.drafting import EagleDrafting
from decode.core.engine import Method
from decode.strategies.jacobi import INITS, JacobiDrafting
from decode.core.sampling import SamplingParams
from decode.strategies.skipping import LearnedScheduler, NeverSkip, SimilaritySkip, UniformSkip
from decode.core.trees import STATIC_SHAPES, TreeParams

METHODS = ("ar", "eagle2", "lantern", "lantern_pp", "vvs_u", "vvs", "sjd", "sjd_vp")
NEEDS_DRAFTER = ("eagle2", "lantern", "lantern_pp", "vvs_u", "vvs")
USES_TREE = ("eagle2", "lantern", "vvs_u", "vvs")  # lantern_pp's static shape fixes its own
SCHEDULERS = ("never", "uniform", "similarity", "learned")
_LANTERN = ("lantern_k", "delta")
_SKIP = ("scheduler", "max_consecutive", "warmup", "staleness")
KNOBS = {  # the MethodOptions each method reads, its skip scheduler's aside
    "ar": (), "eagle2": (), "lantern": _LANTERN, "lantern_pp": _LANTERN + ("static_tree",),
    "vvs_u": _LANTERN, "vvs": _LANTERN, "sjd": ("window", "init"), "sjd_vp": ("window", "init", "vp_beta", "vp_cap"),
}
SCHEDULER_KNOBS = {"never": (), "uniform": ("interval",), "similarity": ("tau", "decay"), "learned": ("threshold",)}


def knobs_used(name: str, options: "MethodOptions") -> dict:
    """The knobs that can change what method `name` makes (the others it never reads)."""
    kind = _scheduler_kind(name, options) if name in NEEDS_DRAFTER else "never"  # AR and SJD never skip
    used = KNOBS[name] + ((_SKIP + SCHEDULER_KNOBS[kind]) if kind != "never" else ())
    return {k: getattr(options, k) for k in used}


@dataclass(frozen=True)
class MethodOptions:
    """Every knob of every method (each method reads its own)."""
    lantern_k: int = 1000         # neighbours considered per token
    delta: float = 0.2            # <= 1: TVD bound (LANTERN); > 1: lambda bound (LANTERN++)
    static_tree: str | None = None  # lantern_pp: a shape in decode.core.trees.STATIC_SHAPES
    scheduler: str | None = None  # vvs: similarity (default) | learned; vvs_u: uniform
    interval: int = 5             # vvs_u
    tau: float = 0.7              # vvs path-similarity threshold
    decay: float = 0.9            # vvs similarity weights over depth
    max_consecutive: int = 1      # cap on consecutive skipped steps (1 in the released code)
    warmup: int = 5               # no skip before this many tokens
    staleness: int = 0            # extra positions back for reused features (0: reuse_prev)
    threshold: float = 0.865      # learned scheduler: skip when P(safe) >= threshold (world sweep: docs/results.md)
    window: int = 16              # sjd
    init: str = "repeat_horizon"  # sjd: random | repeat_horizon | repeat_vertical
    vp_beta: float = 1.0          # sjd_vp: strength of the favouring
    vp_cap: float = 10.0          # sjd_vp: largest probability ratio rewarded

    def __post_init__(self):  # nonsense fails here, before any model loads or image is made
        checks = [
            (self.lantern_k >= 1, f"method.lantern_k must be >= 1 (neighbours per token), got {self.lantern_k}"),
            (self.delta >= 0, f"method.delta must be >= 0, got {self.delta}"),
            (self.interval >= 1, f"method.interval must be >= 1, got {self.interval}"),
            (0 < self.decay <= 1, f"method.decay must be in (0, 1], got {self.decay}"),
            (self.max_consecutive >= 1, f"method.max_consecutive must be >= 1, got {self.max_consecutive}"),
            (self.warmup >= 0 and self.staleness >= 0, "method.warmup and method.staleness must be >= 0"),
            (self.window >= 1, f"method.window (sjd) must be >= 1, got {self.window}"),
            (self.init in INITS, f"method.init={self.init!r} is unknown; known: {', '.join(INITS)}"),
            (self.vp_cap >= 1, f"method.vp_cap must be >= 1, got {self.vp_cap}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ValueError(f"method.scheduler={self.scheduler!r} is unknown; known: {', '.join(SCHEDULERS)}")
        if self.tau > 1:  # allowed: the rule's cost without its skips (tests use it); but never silently
            warnings.warn(f"method.tau={self.tau} > 1: path similarity never reaches it, so VVS's similarity "
                          "rule never skips (method.scheduler=never skips nothing without computing it)")
        if self.static_tree is not None and self.static_tree not in STATIC_SHAPES:
            raise ValueError(f"method.static_tree={self.static_tree!r} is not a known shape; known: "
                             f"{', '.join(STATIC_SHAPES)}")


def options_from_config(conf) -> MethodOptions:
    """A method's config (conf/method/<name>.yaml, with overrides) as MethodOptions; an unknown knob
    fails with the list of known ones."""
    opts = {k: v for k, v in conf.items() if k not in ("name", "scheduler_ckpt")}
    known = set(MethodOptions.__dataclass_fields__)
    unknown = sorted(set(opts) - known)
    if unknown:
        raise ValueError(f"unknown method option(s) {unknown}; known: {', '.join(sorted(known))}")
    return MethodOptions(**opts)


def build_method(name: str, *, sampling: SamplingParams, tree: TreeParams = TreeParams(),
                 options: MethodOptions = MethodOptions(), drafter: Drafter | None = None,
                 codebook: Tensor | None = None, learned_policy=None) -> Method:
    """The Method for `name`. `codebook` [V, d] (raw VQ rows) is needed by LANTERN and VVS;
    `learned_policy` by scheduler=learned."""
    if name not in METHODS:
        raise ValueError(f"method={name!r} is unknown; available: {', '.join(METHODS)}")
    if name == "ar":
        return Method("ar")
    if name in ("sjd", "sjd_vp"):
        beta = options.vp_beta if name == "sjd_vp" else 0.0
        drafting = functools.partial(_jacobi, window=options.window, init=options.init, vp_beta=beta,
                                     vp_cap=options.vp_cap)
        return Method(name, drafting=drafting, acceptance=make_acceptance(sampling))
    if drafter is None:
        raise ValueError(f"method={name} needs a drafter (drafter.ckpt=FOLDER, trained by python -m train drafter)")
    relax = None
    if name != "eagle2":
        if codebook is None:
            raise ValueError(f"method={name} needs the VQ codebook (latent neighbourhoods / path similarity)")
        relax = Relaxation(latent_neighbours(codebook, options.lantern_k), options.delta)
    if name == "lantern_pp":
        tree = TreeParams(tree.total_tokens, tree.depth, tree.top_k, options.static_tree or "naive_extend_57")
    drafting = functools.partial(_eagle, drafter=drafter, tree=tree)
    return Method(name, drafting=drafting, acceptance=make_acceptance(sampling, relax),
                  scheduler=_scheduler(name, options, codebook, learned_policy), staleness=options.staleness)


def _scheduler_kind(name: str, o: MethodOptions) -> str:
    return o.scheduler or {"vvs_u": "uniform", "vvs": "similarity"}.get(name, "never")


def _scheduler(name: str, o: MethodOptions, codebook: Tensor | None, learned_policy):
    kind = _scheduler_kind(name, o)
    cap = dict(max_consecutive=o.max_consecutive, warmup=o.warmup)
    if kind == "never":
        return NeverSkip()
    if kind == "uniform":
        return UniformSkip(o.interval, **cap)
    if kind == "similarity":
        return SimilaritySkip(codebook, o.tau, o.decay, **cap)
    if kind == "learned":
        if learned_policy is None:
            raise ValueError("scheduler=learned needs method.scheduler_ckpt=FOLDER (python -m train scheduler)")
        return LearnedScheduler(learned_policy, codebook, o.threshold, **cap)
    raise ValueError(f"scheduler={kind!r} is unknown; known: {', '.join(SCHEDULERS)}")


def _eagle(target, batch: int, num_tokens: int, *, drafter: Drafter, tree: TreeParams) -> EagleDrafting:
    return EagleDrafting(drafter, target, tree, batch, num_tokens)


def _jacobi(target, batch: int, num_tokens: int, **kw) -> JacobiDrafting:
    return JacobiDrafting(target, batch, num_tokens, **kw)
