"""Decoding methods by name: each is a composition of three strategies, with the published defaults.

| method     | drafting                     | acceptance                        | skipping             |
|------------|------------------------------|-----------------------------------|----------------------|
| ar         | none                         | exact (the target's own sample)   | never                |
| eagle2     | eagle (EAGLE-2 dynamic tree) | exact (greedy / multi-candidate)  | never                |
| lantern    | eagle                        | lantern (k, delta: TVD bound)     | never                |
| lantern_pp | static tree, sampled drafts  | lantern_pp (k, lambda bound)      | never                |
| vvs_u      | eagle                        | lantern                           | uniform interval     |
| vvs        | static tree, sampled drafts  | lantern_pp (lambda 2)             | similarity, tau 0.6  |
| sjd        | jacobi window on the target  | exact (SJD's probabilistic rule)  | never                |
| sjd_vp     | jacobi, VP-favoured redraws  | exact                             | never                |
| mc_sjd     | jacobi, coupled redraws      | exact (lossless)                  | never                |
| sjd_pac    | jacobi, coupled redraws, a proactive tree (3 candidates at the first 2 slots) | exact (lossless) | never |
| gsd        | jacobi window on the target  | gsd (grouped: ranks, p gap, dist) | never                |
| zipar      | none; rows advance together  | exact (each row's sampled token)  | never                |
| zipar_sjd  | each row in flight: 4 Jacobi guesses (decode/core/lanes.py) | exact (SJD's rule per row) | never |
| spatial    | each row in flight: trained right / below heads (decode/models/spatial.py) | exact per row | never |
| spatial_vvs| spatial                      | exact per row                     | similarity 0.9 (right vs below drafts) |

zipar's, zipar_sjd's and spatial's schedule is next_set (decode/core/wavefront.py: row_window, max_rows,
lane_drafts); every other method's is raster (one frontier in raster order). spatial's heads come from
method.spatial_ckpt (python -m train drafter drafter.kind=spatial); any acceptance rule applies per row.

Any part can be swapped: `method=vvs method.base=lantern_pp` is VVS's skipping over LANTERN++'s
drafting and acceptance; `method=eagle2 method.skipping=uniform` skips over exact acceptance;
`method.drafting`, `method.acceptance`, `method.skipping` pick one part
(`method=eagle2 method.acceptance=gsd` is GSD's grouped acceptance on the drafter's tree). Skipping needs a drafter's
tree (drafting eagle or static). Each knob belongs to one strategy (KNOBS, with its published
default: the one place defaults live); a knob the composition does not read is refused.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import Tensor

from decode.core.sampling import SamplingParams
from decode.core.trees import STATIC_SHAPES, TreeParams
from decode.core.engine import Method
from decode.core.wavefront import NextSet
from decode.models.drafter import Drafter
from decode.resolvers import REPO
from decode.strategies.acceptance import Grouping, Relaxation, latent_neighbours, make_acceptance
from decode.strategies.drafting import EagleDrafts
from decode.strategies.jacobi import INITS, JacobiDrafts
from decode.strategies.lane_drafting import SpatialLanes
from decode.models.spatial import SpatialHeads
from decode.strategies.skipping import LearnedSkip, NeverSkip, SimilaritySkip, SkipLimits, Skipping, UniformSkip

# measured on world v4 (docs/results.md "Spatial heads ... on world v4"; conf/benchmark_spatial_default.yaml):
# window 4 is the narrowest whose target NLL stays inside AR's interval, FD-world and alignment not worse, on 64
# held-out prompts of world seed 1 (3.67x; window 3: NLL outside), confirmed on 64 of seed 2 (3.65x). On v2
# window 2 kept AR's quality; v4's images carry structure across rows, which a narrow window loses. 8 guesses
# per row added 1 % over 4 (v2)
SPATIAL_SCHEDULE = {"lane_drafts": 4, "row_window": 4}
# (drafting, acceptance, skipping) and the method's own knob values, where they differ from the strategy's
METHODS: dict[str, tuple[str, str, str, str, dict]] = {
    "ar": ("none", "exact", "never", "raster", {}),
    "eagle2": ("eagle", "exact", "never", "raster", {}),
    "lantern": ("eagle", "lantern", "never", "raster", {}),
    "lantern_pp": ("static", "lantern_pp", "never", "raster", {}),
    "vvs_u": ("eagle", "lantern", "uniform", "raster", {}),
    # VVS's similarity skipping over LANTERN++ (lambda 2) with tau 0.6: the frontier rule's pick on world v4
    # (docs/results.md "VVS's defaults"): 2.44x fewer passes on 64 held-out prompts of world seed 1, quality
    # inside AR's interval, confirmed on 64 of seed 2. On v4 the rule skips almost nothing (0.3 % of steps):
    # every tau that skips more left AR's target NLL interval (over exact EAGLE-2 tau 0.86: inside on one set,
    # outside on the other). v2's pick was tau 0.5 over exact EAGLE-2; the paper's: method.base=lantern
    # method.tau=0.7
    "vvs": ("static", "lantern_pp", "similarity", "raster", {"lam": 2.0, "tau": 0.6}),
    "sjd": ("jacobi", "exact", "never", "raster", {}),
    "sjd_vp": ("jacobi", "exact", "never", "raster", {"vp_beta": 1.0}),
    "mc_sjd": ("jacobi", "exact", "never", "raster", {"coupled": True}),
    # SJD-PAC: coupled redraws are its adaptive continuation. The window is padded as SJD does on LlamaGen
    # (repeat_horizon, like every Jacobi method here); SJD-PAC pads with uniform draws (method.init=random).
    # 4 candidates at the first 2 slots: the most passes saved of widths 2-4 and depths 2-4 on 64 held-out
    # prompts of world v4 seed 1 (1.60x SJD; 3 candidates: 1.52x), confirmed on seed 2 (1.54x; 3: 1.50x)
    # (conf/benchmark_sjd_pac.yaml). A high-entropy target's first slots are where more candidates pay
    "sjd_pac": ("jacobi", "exact", "never", "raster", {"coupled": True, "pac_width": 4, "pac_depth": 2}),
    "gsd": ("jacobi", "gsd", "never", "raster", {}),
    "zipar": ("none", "exact", "never", "next_set", {}),
    "zipar_sjd": ("none", "exact", "never", "next_set", {"lane_drafts": 4}),
    "spatial": ("spatial", "exact", "never", "next_set", SPATIAL_SCHEDULE),
    # exact per row, skipping only where the two drafts agree strongly: with LANTERN per row and tau 0.7 skipped
    # chains broke target NLL (4.36); exact with tau 0.9 stayed inside AR's interval (docs/results.md)
    "spatial_vvs": ("spatial", "exact", "similarity", "next_set", {**SPATIAL_SCHEDULE, "tau": 0.9}),
}
_LIMITS = {"max_consecutive": 1, "warmup": 5, "staleness": 0}  # VVS's released code (run_vvs.sh)
KNOBS: dict[str, dict[str, dict]] = {  # part -> strategy -> the knobs it reads, with their published defaults
    "drafting": {
        "none": {}, "eagle": {},  # the dynamic tree's size is the run's `tree.*`
        "static": {"static_tree": "naive_extend_57"},  # LANTERN++'s LlamaGen default
        "jacobi": {"window": 16, "init": "repeat_horizon", "vp_beta": 0.0, "vp_cap": 10.0,  # SJD's LlamaGen setting
                   "coupled": False,  # MC-SJD: redrawn slots coupled to their previous draft
                   "pac_width": 1, "pac_depth": 0},  # SJD-PAC's proactive tree: candidates per slot, slots
        "spatial": {"spatial_ckpt": str(REPO / "models" / "world" / "spatial")},  # right / below heads
    },
    "acceptance": {
        "exact": {},
        "lantern": {"lantern_k": 1000, "delta": 0.2},  # VVS's base (docs/algorithms.md 3.3)
        "lantern_pp": {"lantern_k": 10, "lam": 5.0},    # LANTERN++'s run.sh
        "gsd": {"group_ranks": 7, "group_p_gap": 0.15, "group_sq_dist": 0.5},  # junhyukso/GSD's constants
    },
    "skipping": {
        "never": {},
        "uniform": {"interval": 5, **_LIMITS},
        "similarity": {"tau": 0.7, "decay": 0.9, **_LIMITS},
        "learned": {"threshold": 0.865, "scheduler_ckpt": str(REPO / "models" / "world" / "scheduler"), **_LIMITS},
    },
    "schedule": {
        "raster": {},
        # ZipAR's Lumina-mGPT default is 16 of 48 columns; a third of our 16-column grid rounds to 6
        "next_set": {"row_window": 6, "max_rows": 16, "lane_drafts": 0},  # lane_drafts: SJD guesses per row (ours)
    },
}
PARTS = tuple(KNOBS)
TREE_DRAFTING = ("eagle", "static")  # the drafts skipping can take from
LANE_DRAFTING = ("none", "spatial")  # what a next-set schedule's rows can draft with (none: Jacobi guesses)
_CHECKS = {  # knob -> (valid?, what is allowed)
    "lantern_k": (lambda v: v >= 1, ">= 1 (neighbours per token)"),
    "delta": (lambda v: 0 <= v <= 1, "in [0, 1] (a total-variation bound; LANTERN++'s lambda is acceptance=lantern_pp, lam)"),
    "lam": (lambda v: v >= 1, ">= 1 (1: exact)"),
    "interval": (lambda v: v >= 1, ">= 1"),
    "decay": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "max_consecutive": (lambda v: v >= 1, ">= 1"),
    "warmup": (lambda v: v >= 0, ">= 0"),
    "staleness": (lambda v: v >= 0, ">= 0"),
    "window": (lambda v: v >= 1, ">= 1"),
    "init": (lambda v: v in INITS, f"one of {', '.join(INITS)}"),
    "vp_cap": (lambda v: v >= 1, ">= 1"),
    "pac_width": (lambda v: v >= 1, ">= 1 (candidates per proactive slot; 1: a chain)"),
    "pac_depth": (lambda v: v >= 0, ">= 0 (proactive slots at the window's start)"),
    "static_tree": (lambda v: v in STATIC_SHAPES, f"one of {', '.join(STATIC_SHAPES)}"),
    "threshold": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "group_ranks": (lambda v: v >= 0, ">= 0 (0: exact)"),
    "group_p_gap": (lambda v: v >= 0, ">= 0"),
    "group_sq_dist": (lambda v: 0 <= v <= 4, "in [0, 4] (squared distance of unit embedding rows)"),
    "row_window": (lambda v: v >= 1, ">= 1 (tokens of the row above before a row starts; at most the grid width)"),
    "max_rows": (lambda v: v >= 1, ">= 1 (grid rows in flight; at most the grid's rows)"),
    "lane_drafts": (lambda v: v >= 0, ">= 0 (Jacobi guesses each row in flight verifies per pass; below the grid width)"),
}


@dataclass(frozen=True)
class MethodConfig:
    """A resolved method: its name, its three strategies and the knobs they read."""
    name: str
    drafting: str
    acceptance: str
    skipping: str
    knobs: dict = field(default_factory=dict)
    schedule: str = "raster"

    @property
    def needs_drafter(self) -> bool:
        """Reads an EAGLE drafter (drafter.ckpt)."""
        return self.drafting in TREE_DRAFTING

    @property
    def needs_spatial(self) -> bool:
        """Reads spatial heads (method.spatial_ckpt)."""
        return self.drafting == "spatial"

    @property
    def uses_tree(self) -> bool:
        """Reads the run's `tree.*`, which tree=auto sizes: a dynamic tree's size and depth, or how many
        of its static shape's nodes a static tree keeps."""
        return self.drafting in TREE_DRAFTING

    def describe(self) -> str:
        return (f"{self.name} ({self.drafting} drafting, {self.acceptance} acceptance, {self.skipping} skipping"
                + (f", {self.schedule} schedule)" if self.schedule != "raster" else ")"))


def resolve_method(name: str, overrides: dict | None = None) -> MethodConfig:
    """Method `name` with `overrides`: `base` (another method's drafting and acceptance),
    `drafting` / `acceptance` / `skipping` (one part), and knobs. None values mean "the default"
    (Hydra's nulls). Fails, naming the value, on an unknown name, part or knob, a knob the
    composition does not read, a value out of range, or skipping without a drafter's tree."""
    if name not in METHODS:
        raise ValueError(f"method={name!r} is unknown; available: {', '.join(METHODS)}")
    given = {k: v for k, v in (overrides or {}).items() if v is not None and k != "name"}
    parts = dict(zip(PARTS, METHODS[name][:4]))
    knobs = dict(METHODS[name][4])
    base = given.pop("base", None)
    if base is not None:
        if base not in METHODS:
            raise ValueError(f"method.base={base!r} is unknown; available: {', '.join(METHODS)}")
        parts.update(drafting=METHODS[base][0], acceptance=METHODS[base][1])
        knobs.update(METHODS[base][4])
    for part in PARTS:
        choice = given.pop(part, parts[part])
        if choice not in KNOBS[part]:
            raise ValueError(f"method.{part}={choice!r} is unknown; known: {', '.join(KNOBS[part])}")
        parts[part] = choice
    if parts["schedule"] == "next_set" and parts["drafting"] not in LANE_DRAFTING:
        raise ValueError(f"method.schedule=next_set drafts each grid row's guesses itself (Jacobi) or with spatial heads; "
                         f"method={name} drafts with {parts['drafting']}: use method.drafting=none or spatial")
    if parts["drafting"] == "spatial" and parts["schedule"] != "next_set":
        raise ValueError(f"method.drafting=spatial drafts rows of a wavefront: it needs method.schedule=next_set "
                         f"(method={name} has {parts['schedule']})")
    if parts["drafting"] == "spatial" and (given.get("lane_drafts", knobs.get("lane_drafts", 0)) or 0) < 1:
        raise ValueError(f"method.lane_drafts must be >= 1 for spatial heads (each row's chain is their guesses); "
                         f"got {given.get('lane_drafts', knobs.get('lane_drafts', 0))}")
    if parts["drafting"] == "spatial" and parts["skipping"] == "learned":
        raise ValueError("method.skipping=learned reads an EAGLE draft tree's features (python -m train scheduler); "
                         "spatial heads skip with method.skipping=uniform or similarity (their two drafts compared)")
    if parts["skipping"] != "never" and parts["drafting"] not in (*TREE_DRAFTING, "spatial"):
        raise ValueError(f"method.skipping={parts['skipping']} needs a drafter's tree to take tokens from "
                         f"(drafting {' or '.join(TREE_DRAFTING)}); method={name} drafts with {parts['drafting']}")
    defaults = {k: v for part in PARTS for k, v in KNOBS[part][parts[part]].items()}
    unread = sorted(set(given) - set(defaults))
    if unread:
        known = sorted({k for part in KNOBS.values() for kn in part.values() for k in kn})
        what = "unknown" if set(unread) - set(known) else "not read by this composition"
        raise ValueError(f"method.{unread[0]} is {what}: {_composition(name, parts)} reads "
                         f"{', '.join(sorted(defaults)) or 'no knobs'}")
    values = {**defaults, **{k: v for k, v in knobs.items() if k in defaults}, **given}
    for k, v in values.items():
        ok, allowed = _CHECKS.get(k, (lambda _: True, ""))
        if not ok(v):
            raise ValueError(f"method.{k} must be {allowed}; got {v!r}")
    if parts["drafting"] == "spatial" and values.get("staleness", 0):
        raise ValueError(f"method.staleness={values['staleness']} is not read by spatial heads' skipping (a skipped "
                         "row drafts nothing more until its next pass); leave it at 0")
    if values.get("tau", 0) > 1:  # allowed: the rule's cost without its skips (tests use it); never silently
        warnings.warn(f"method.tau={values['tau']} > 1: path similarity never reaches it, so the similarity rule "
                      "never skips (method.skipping=never skips nothing without computing it)")
    return MethodConfig(name, parts["drafting"], parts["acceptance"], parts["skipping"], values, parts["schedule"])


def _composition(name: str, parts: dict) -> str:
    return f"{name} ({', '.join(f'{parts[p]} {p}' for p in PARTS)})"


def build_method(method: MethodConfig | str, *, sampling: SamplingParams, tree: TreeParams = TreeParams(),
                 options: dict | None = None, drafter: Drafter | None = None, codebook: Tensor | None = None,
                 learned_policy=None) -> Method:
    """The engine's Method for a resolved method (or a name, with `options` as its overrides).
    `codebook` [V, d] (raw VQ rows) is needed by LANTERN's acceptance and VVS's similarity and learned
    skipping; `learned_policy` by skipping=learned."""
    config = resolve_method(method, options) if isinstance(method, str) else method
    schedule = None
    if config.schedule == "next_set":
        schedule = NextSet(config.knobs["row_window"], config.knobs["max_rows"], config.knobs["lane_drafts"])
    return Method(config.name, drafting=_drafting(config, tree, drafter),
                  acceptance=make_acceptance(sampling, relaxation(config, codebook)),
                  skipping=_skipping(config, codebook, learned_policy), schedule=schedule)


def _drafting(config: MethodConfig, tree: TreeParams, drafter: Drafter | None):
    k = config.knobs
    if config.drafting == "none":
        return None
    if config.drafting == "spatial":
        if not isinstance(drafter, SpatialHeads):
            raise ValueError(f"method={config.name} drafts with spatial heads (method.spatial_ckpt=FOLDER, trained by "
                             f"python -m train drafter drafter.kind=spatial), got {type(drafter).__name__}")
        return SpatialLanes(drafter)
    if config.drafting == "jacobi":
        return JacobiDrafts(window=k["window"], init=k["init"], vp_beta=k["vp_beta"], vp_cap=k["vp_cap"],
                            coupled=bool(k["coupled"]), pac_width=k["pac_width"], pac_depth=k["pac_depth"])
    if drafter is None or isinstance(drafter, SpatialHeads):
        raise ValueError(f"method={config.name} needs an EAGLE drafter (drafter.ckpt=FOLDER, trained by python -m train "
                         f"drafter), got {type(drafter).__name__}")
    if config.drafting == "static":
        tree = TreeParams(tree.total_tokens, tree.depth, tree.top_k, k["static_tree"], tree.static_size)
    elif tree.static_size is not None and tree.static is None:
        raise ValueError(f"tree.static_size={tree.static_size} keeps nodes of a static shape; method={config.name} "
                         f"drafts a dynamic tree (tree.total_tokens, tree.depth size it)")
    return EagleDrafts(drafter, tree)


def relaxation(config: MethodConfig, codebook: Tensor | None) -> Relaxation | Grouping | None:
    """LANTERN's latent neighbourhoods with the acceptance's bound, or GSD's groups (None: exact acceptance)."""
    if config.acceptance == "exact":
        return None
    if codebook is None:
        raise ValueError(f"method={config.name} needs the VQ codebook ({config.acceptance} acceptance "
                         "compares tokens by their codebook rows)")
    k = config.knobs
    if config.acceptance == "gsd":
        return Grouping(codebook, k["group_ranks"], k["group_p_gap"], k["group_sq_dist"])
    if config.acceptance == "lantern":
        return Relaxation(latent_neighbours(codebook, k["lantern_k"]), k["delta"])
    return Relaxation(latent_neighbours(codebook, k["lantern_k"]), k["lam"], multiplicative=True)


def _skipping(config: MethodConfig, codebook: Tensor | None, learned_policy):
    k = config.knobs
    if config.skipping == "never":
        return NeverSkip()
    if config.skipping == "uniform":
        rule = UniformSkip(k["interval"])
    elif codebook is None:
        raise ValueError(f"method={config.name} needs the VQ codebook (the {config.skipping} skip rule embeds the drafts)")
    elif config.skipping == "similarity":
        rule = SimilaritySkip(codebook, k["tau"], k["decay"])
    else:
        if learned_policy is None:
            raise ValueError("skipping=learned needs its policy (method.scheduler_ckpt=FOLDER, python -m train scheduler)")
        rule = LearnedSkip(learned_policy, codebook, k["threshold"])
    return Skipping(rule, SkipLimits(k["max_consecutive"], k["warmup"]), k["staleness"])
