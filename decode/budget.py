"""`tree=auto`: the draft tree that gives the most tokens per second on this device, or plain AR
when no tree pays (docs/algorithms.md 2.5).

A tree of n nodes costs one target pass over n tokens plus a drafter round whose cost grows with
its depth; what it buys is the tokens acceptance keeps. Both sides are measured on the run's own
target, drafter, device, dtype and batch, through the real engine:

- cost: short decodes time the verification of a tree of each candidate size (target pass and
  acceptance), the drafter round of each candidate depth, and one AR step, each the median of a
  timing decode's steps but its first (`steady_state`), half an image into a decode;
- acceptance: one calibration decode with the largest candidate tree records each verified
  step's tree (its nodes' depths and drafter scores) and accepted path. A smaller EAGLE-2 tree of n
  nodes and depth d keeps the n - 1 best-scored nodes of depth <= d + 1, and would have accepted
  the prefix of that path that lies inside it: E(n, d) = 1 + the mean accepted drafts inside it
  (the next token is always made). Exact for greedy acceptance; for sampled acceptance an
  estimate, since a rejected sibling changes the residual the next sibling is tested against.
- static shapes (LANTERN++'s, hence VVS's default): the candidates are the shape's n cheapest
  nodes (decode.core.trees.prune_static), timed whole (drafting and verification), and calibrated
  on the full shape the same way: E(n) = 1 + the mean accepted drafts inside the kept nodes.

tokens/s (n, d) = E(n, d) / (verify(n) + draft(d)); AR = 1 / ar_step. The choice, with the whole
table, is cached per device, model, dtype, batch, method and sampling (`cache_dir`), so it is
measured once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from decode.core.engine import Method, generate
from decode.core.sampling import SamplingParams, row_generators
from decode.core.trees import TreeParams, prune_static, shape_nodes, static_shape
from decode.strategies.drafting import EagleDrafts

log = logging.getLogger("decode")


def drafted_nodes(depth: int, top_k: int) -> int:
    """Nodes EAGLE-2 drafts: top_k at level 1, then each round top_k children of each of top_k frontier nodes."""
    return top_k + depth * top_k * top_k


@dataclass(frozen=True)
class AutoTree:
    """The candidates and the measurement's size. The largest size and depth are the calibration tree."""
    sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 59)
    depths: tuple[int, ...] = (0, 1, 2, 3, 4)
    top_k: int = 10
    timing_tokens: int = 16       # tokens per timing decode (the median of its steps counts)
    min_gain: float = 1.1         # a tree must be predicted this much faster than AR (timing noise: never slower)
    calibration_tokens: int = 0   # tokens of the calibration decode (0: the whole image)
    cache_dir: str | None = None  # None: measured every run

    def __post_init__(self):
        object.__setattr__(self, "sizes", tuple(sorted({int(s) for s in self.sizes})))
        object.__setattr__(self, "depths", tuple(sorted({int(d) for d in self.depths})))
        if not self.sizes or self.sizes[0] < 2 or not self.depths or self.depths[0] < 0 or self.top_k < 1:
            raise ValueError(f"tree=auto needs sizes >= 2, depths >= 0 and top_k >= 1; got sizes {self.sizes}, "
                             f"depths {self.depths}, top_k {self.top_k}")
        drafted = drafted_nodes(max(self.depths), self.top_k)
        if max(self.sizes) - 1 > drafted:
            raise ValueError(f"tree=auto: the largest size {max(self.sizes)} needs more drafts than depth "
                             f"{max(self.depths)} with top_k {self.top_k} makes ({drafted}); add a depth or drop the size")
        if self.min_gain < 1.0:
            raise ValueError(f"tree=auto needs min_gain >= 1 (a tree is chosen only when predicted faster than AR); "
                             f"got {self.min_gain}")
        if self.timing_tokens < 2 or self.calibration_tokens < 0:
            raise ValueError(f"tree=auto needs timing_tokens >= 2 and calibration_tokens >= 0; got "
                             f"{self.timing_tokens}, {self.calibration_tokens}")

    @classmethod
    def from_config(cls, tree: dict) -> "AutoTree":
        fixed = {k: tree[k] for k in ("total_tokens", "depth", "static") if tree.get(k) is not None}
        if fixed:
            raise ValueError(f"tree=auto chooses the tree's size and depth; {fixed} fixes them: use tree=fixed "
                             f"({' '.join(f'tree.{k}={v}' for k, v in fixed.items())})")
        tree = {k: v for k, v in tree.items() if k not in ("total_tokens", "depth", "static")}
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(tree) - known - {"auto"})
        if unknown:
            raise ValueError(f"tree=auto: unknown key(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**{k: v for k, v in tree.items() if k in known})


@dataclass(frozen=True)
class BudgetChoice:
    tree: TreeParams | None          # None: plain AR pays best
    ar_tokens_per_s: float
    rows: list[dict] = field(default_factory=list)  # per candidate: size, depth, tokens_per_pass, step_s, tokens_per_s
    cached: bool = False
    min_gain: float = 1.0            # how much faster than AR a tree had to be predicted

    def describe(self) -> str:
        best = max(self.rows, key=lambda r: r["tokens_per_s"]) if self.rows else None
        if self.tree is None:
            bar = f"{self.min_gain:.2f} x AR's" if self.min_gain > 1 else "AR's"
            why = (f"the best tree ({best['size']} nodes, depth {best['depth']}: {best['tokens_per_s']:.1f} tokens/s) "
                   f"is not faster than {bar} {self.ar_tokens_per_s:.1f} tokens/s") if best else "no candidate tree"
            return f"tree=auto chose AR: {why}"
        shape = (f"{self.tree.nodes} nodes of the static {self.tree.static}, depth {best['depth']}"
                 if self.tree.static else
                 f"{self.tree.total_tokens} nodes, depth {self.tree.depth}, top-k {self.tree.top_k}")
        return (f"tree=auto chose {shape}: "
                f"{best['tokens_per_pass']:.2f} tokens per pass in {1e3 * best['step_s']:.1f} ms, "
                f"{best['tokens_per_s']:.1f} tokens/s against AR's {self.ar_tokens_per_s:.1f}")

    def table(self) -> str:
        lines = ["size depth tokens/pass step_ms tokens/s"]
        lines += [f"{r['size']:4d} {r['depth']:5d} {r['tokens_per_pass']:11.2f} {1e3 * r['step_s']:7.2f} "
                  f"{r['tokens_per_s']:8.1f}" for r in sorted(self.rows, key=lambda r: -r["tokens_per_s"])]
        lines.append(f"  AR     1 {1.0:11.2f} {1e3 / self.ar_tokens_per_s:7.2f} {self.ar_tokens_per_s:8.1f}")
        return "\n".join(lines)

    def method(self, method: Method) -> Method:
        """The method to decode with: as given, or plain AR (named so) when no tree pays."""
        return method if self.tree is not None else Method(f"{method.name} (auto: ar)")


# --- acceptance ---------------------------------------------------------------------------------
class _RecordingAcceptance:
    """Acceptance as given, recording per verified row its tree (node depths and scores) and path.
    Calibration only: it reads the tree back from the device once more per step."""

    def __init__(self, inner):
        self.inner, self.steps = inner, []

    def __call__(self, tree, logits, sampling, generators, rows=None):
        verdict = self.inner(tree, logits, sampling, generators, rows)
        depths, scores = tree.depths.cpu(), tree.scores.float().cpu()
        for r in range(tree.tokens.shape[0]) if rows is None else rows:
            self.steps.append((depths[r], scores[r], verdict.paths[r]))
        return verdict


def _drafts_kept(path, inside: set) -> int:
    """Drafts of an accepted path (root first) that a smaller tree holding `inside` would have accepted."""
    kept = 0
    for node in path[1:]:
        if node not in inside:
            break
        kept += 1
    return kept


def expected_tokens(steps, size: int, depth: int) -> float:
    """E(n, d): tokens per pass a tree of `size` nodes and `depth` would have made, from the
    calibration tree's recorded steps (module docstring)."""
    total = 0
    for depths, scores, path in steps:
        eligible = (depths >= 1) & (depths <= depth + 1)
        ranked = torch.where(eligible, scores, torch.tensor(float("-inf"))).argsort(descending=True, stable=True)
        total += _drafts_kept(path, set(ranked[: min(size - 1, int(eligible.sum()))].tolist()))
    return 1.0 + total / max(1, len(steps))


def expected_static_tokens(steps, kept: list[int]) -> float:
    """E(n) of a static shape pruned to the nodes `kept` (indices in the calibration shape)."""
    inside = set(kept)
    return 1.0 + sum(_drafts_kept(path, inside) for _, _, path in steps) / max(1, len(steps))


# --- cost ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepTimes:
    loop: float    # seconds per step, the whole step (timing decodes skip nothing: a step is a pass)
    verify: float  # seconds per step, verification alone
    draft: float   # seconds per step, drafting alone


def steady_state(decode, method: Method, tokens: int) -> StepTimes:
    """Seconds per step once a decode is under way: the median over a timed decode's steps but its
    first, after an untimed decode (allocation, compilation of new shapes). The first step's drafting
    runs over the whole prompt, once per decode: on a short timing decode it made small trees look
    dearer than they are. Medians, because interference on a shared machine comes in bursts that a
    total or a difference of totals takes whole (timings of the world target varied 2x between runs)."""
    decode(method, tokens)
    steps = decode(method, tokens).step_times
    steps = steps[1:] if len(steps) > 1 else steps
    draft, verify, whole = (statistics.median(column) for column in zip(*steps))
    return StepTimes(whole, verify, draft)


@dataclass(frozen=True)
class Costs:
    """Seconds per AR step, per verification of a tree of each size, per drafter round of each depth;
    for a static shape, per step (drafting and verification) of each of its pruned sizes."""
    ar_step: float
    verify: dict[int, float]
    draft: dict[int, float]
    static: str | None = None
    static_step: dict[int, float] = field(default_factory=dict)


def _decoder(target, cond, seeds: list[int], sampling: SamplingParams, context: int = 0):
    """decode(method, n): n tokens decoded after `context` image tokens given (prefilled, untimed)."""
    prefix = torch.zeros(cond.batch, context, dtype=torch.long, device=target.device) if context else None

    def decode(m: Method, n: int):
        return generate(target, cond, num_tokens=context + n, sampling=sampling, method=m, phase_times=True,
                        generators=None if sampling.greedy else row_generators(seeds, target.device), prefix=prefix)
    return decode


def _with_tree(method: Method, drafter, tree: TreeParams, acceptance=None) -> Method:
    return Method(method.name, drafting=EagleDrafts(drafter, tree), acceptance=acceptance or method.acceptance)


def _eagle(method: Method, drafter, size: int, depth: int, top_k: int) -> Method:
    return _with_tree(method, drafter, TreeParams(size, depth, top_k))


def static_of(method: Method) -> str | None:
    """The static shape `method` drafts with (LANTERN++'s), or None (a dynamic tree)."""
    return getattr(getattr(method.drafting, "tree", None), "static", None)


def static_sizes(name: str, auto: AutoTree) -> list[int]:
    """The candidate sizes of a static shape: the budget's sizes that fit in it, and the whole shape."""
    full = shape_nodes(name)
    return sorted({s for s in auto.sizes if s < full} | {full})


def calibration_tree(method: Method, auto: AutoTree) -> TreeParams:
    """The tree every candidate is a part of: the largest dynamic candidate, or the whole static shape."""
    name = static_of(method)
    return TreeParams(static=name) if name else TreeParams(max(auto.sizes), max(auto.depths), auto.top_k)


def calibrate(target, drafter, method: Method, cond, seeds: list[int], sampling: SamplingParams, auto: AutoTree,
              num_tokens: int) -> list:
    """The recorded steps of one decode with the calibration tree (no skipping): what
    `expected_tokens` reads."""
    recorder = _RecordingAcceptance(method.acceptance)
    _decoder(target, cond, seeds, sampling)(
        _with_tree(method, drafter, calibration_tree(method, auto), recorder), num_tokens)
    return recorder.steps


def time_candidates(target, drafter, method: Method, cond, seeds: list[int], sampling: SamplingParams,
                    auto: AutoTree, context: int = 0) -> Costs:
    """Short timed decodes on this device: an AR step, verification per size, drafting per depth (a
    static shape: each pruned size's whole step). They start after `context` image tokens given (half
    an image: the average pass's context): a tree's pass grows dearer against AR's as the context
    grows, and timing at the image's start made trees look cheaper than they are (at XL in bfloat16 on
    a CPU: a 2-node tree's step predicted at 1.07x AR's cost a whole image's 1.25x)."""
    decode, t = _decoder(target, cond, seeds, sampling, context), auto.timing_tokens
    ar = steady_state(decode, Method(), t).loop
    name = static_of(method)
    if name:
        step = {}
        for size in static_sizes(name, auto):
            g = steady_state(decode, _with_tree(method, drafter, TreeParams(static=name, static_size=size)), t)
            step[size] = g.loop  # the whole step: timing decodes do not skip, so a step is a pass
        return Costs(ar, {}, {}, name, step)
    # the deepest tree can hold every size; its drafting is timed apart
    verify = {size: steady_state(decode, _eagle(method, drafter, size, max(auto.depths), auto.top_k), t).verify
              for size in auto.sizes}
    draft = {depth: steady_state(decode, _eagle(method, drafter, 2, depth, auto.top_k), t).draft
             for depth in auto.depths}
    return Costs(ar, verify, draft)


def decide(steps: list, costs: Costs, auto: AutoTree) -> BudgetChoice:
    """The candidate with the most tokens per second, or AR (None) when none beats it by `auto.min_gain`."""
    if costs.static:
        return _choose(static_rows(steps, costs), 1.0 / costs.ar_step, auto.top_k, costs.static, auto.min_gain)
    rows = []
    for size in auto.sizes:
        for depth in auto.depths:
            if size - 1 > drafted_nodes(depth, auto.top_k):
                continue  # EAGLE-2 cannot draft that many nodes that shallow
            e, step = expected_tokens(steps, size, depth), costs.verify[size] + costs.draft[depth]
            rows.append(dict(size=size, depth=depth, tokens_per_pass=e, step_s=step, tokens_per_s=e / step))
    return _choose(rows, 1.0 / costs.ar_step, auto.top_k, min_gain=auto.min_gain)


def measure(target, drafter, method: Method, cond, seeds: list[int], sampling: SamplingParams,
            auto: AutoTree, num_tokens: int) -> BudgetChoice:
    """Calibrate and time on this device (module docstring); `cond` is one batch of the run's conditions."""
    steps = calibrate(target, drafter, method, cond, seeds, sampling, auto, auto.calibration_tokens or num_tokens)
    context = min(num_tokens // 2, num_tokens - auto.timing_tokens - 1)  # mid-image, with room to time
    return decide(steps, time_candidates(target, drafter, method, cond, seeds, sampling, auto, max(0, context)), auto)


def static_rows(steps: list, costs: Costs) -> list[dict]:
    """Per pruned size of the static shape: its expected tokens per pass and tokens per second."""
    shape, rows = static_shape(costs.static), []
    for size, step in sorted(costs.static_step.items()):
        pruned, kept = prune_static(shape, size)
        e = expected_static_tokens(steps, kept)
        rows.append(dict(size=size, depth=max(pruned.depths()) - 1, tokens_per_pass=e, step_s=step, tokens_per_s=e / step))
    return rows


def _choose(rows: list[dict], ar_tokens_per_s: float, top_k: int, static: str | None = None,
            min_gain: float = 1.0) -> BudgetChoice:
    best = max(rows, key=lambda r: r["tokens_per_s"], default=None)
    if best is None or best["tokens_per_s"] <= min_gain * ar_tokens_per_s:
        return BudgetChoice(None, ar_tokens_per_s, rows, min_gain=min_gain)
    if static:
        return BudgetChoice(TreeParams(static=static, static_size=best["size"]), ar_tokens_per_s, rows, min_gain=min_gain)
    return BudgetChoice(TreeParams(best["size"], best["depth"], top_k), ar_tokens_per_s, rows, min_gain=min_gain)


# --- the cached choice -------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.machine()}:{os.cpu_count()}cores:{torch.get_num_threads()}threads"


def cache_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def choose_tree(target, drafter, method: Method, cond, seeds: list[int], sampling: SamplingParams,
                auto: AutoTree, identity: dict, num_tokens: int | None = None) -> BudgetChoice:
    """The cached choice for `identity` (what the run's models, dtype, batch, method and sampling
    are), or a fresh measurement, written to the cache."""
    if drafter is None:
        raise ValueError(f"tree=auto chooses the tree of a drafter method; {method.name} has no drafter")
    identity = {**identity, "device": device_name(target.device), "auto": asdict(auto) | {"cache_dir": None},
                "batch": cond.batch, "sampling": asdict(sampling)}
    path = Path(auto.cache_dir) / f"{cache_key(identity)}.json" if auto.cache_dir else None
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        tree = TreeParams(**saved["tree"]) if saved["tree"] else None
        return BudgetChoice(tree, saved["ar_tokens_per_s"], saved["rows"], cached=True, min_gain=auto.min_gain)
    choice = measure(target, drafter, method, cond, seeds, sampling, auto, num_tokens or target.num_image_tokens)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"identity": identity, "tree": asdict(choice.tree) if choice.tree else None,
                  "ar_tokens_per_s": choice.ar_tokens_per_s, "rows": choice.rows}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    return choice
