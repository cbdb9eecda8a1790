"""Test-time scaling on the engine: GridAR (arXiv 2511.21185) and its Best-of-N baseline.

GridAR decodes N candidates of one prompt as one batch, in stages (PEERS.md 3; ALGORITHMS.md 7.4):

    stage boundaries at the top quarter and the top half of the token grid:
      decode every candidate up to the boundary (from its anchor, if any)
      verifier.prune: impossible candidates are replaced by copies of possible ones of their group
                      of 4 (round-robin); a group with none possible is kept as it is
      verifier.reformulate: each candidate's prompt gains a layout clause
    decode the rest with 3-way guidance (original, null and refined prompt)
    verifier.rank: the best candidate is the image

Candidates decode with any method of the engine (GridAR + VVS included). A copy takes the token
prefix of the candidate it copies (its anchor); the next stage prefills each candidate's caption
and anchor in one pass (decode.core.engine.generate's `prefix`) instead of copying KV caches: the
refined prompt's guidance branch has no cache for the anchor anyway. Each candidate keeps its own
random stream, so copies of one anchor continue differently.
Cost is counted as GridAR does: target passes (per candidate, prefills included) and verifier calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from decode.api import Components, condition_for
from decode.core.engine import Method, generate
from decode.core.sampling import SamplingParams, row_generators
from decode.models.target import Condition
from decode.scaling.verifiers import Verifier


@dataclass(frozen=True)
class GridAR:
    """GridAR's settings, with the published defaults (GridAR-Janus-Pro/configs/method/gridar_two_step.yaml)."""
    candidates: int = 4                    # N, a multiple of 4 (groups of 4 share anchors)
    stages: tuple[float, ...] = (0.25, 0.5)  # where the verifier looks: shares of the grid's rows
    reformulate: bool = True               # layout-clause prompts
    three_way: bool = True                 # continue with 3-way guidance (False: the refined prompt replaces it)

    def __post_init__(self):
        if self.candidates < 4 or self.candidates % 4:
            raise ValueError(f"GridAR's candidates must be a multiple of 4 (groups of 4 share anchors), "
                             f"got {self.candidates}")
        if not self.stages or any(not 0 < s < 1 for s in self.stages) or list(self.stages) != sorted(set(self.stages)):
            raise ValueError(f"GridAR's stages must be increasing shares of the grid in (0, 1), got {list(self.stages)}")


@dataclass
class Scaled:
    """One prompt's outcome: the candidates, the chosen one and what it cost."""
    tokens: Tensor                 # [N, n] every final candidate
    images: Tensor                 # [N, 3, H, W] in [-1, 1]
    scores: list[float]            # the ranker's, per candidate
    best: int
    target_passes: int = 0         # summed over candidates: prefills + verified steps
    guided_rows: int = 0           # target passes x guidance groups (3-way guidance runs 3 per pass)
    verifier_calls: int = 0        # prune + reformulate + rank, one call per canvas
    steps: int = 0                 # summed over candidates: decode steps (verified + skipped)
    skipped: int = 0               # summed over candidates: skipped steps
    verified_tokens: int = 0       # summed over candidates: tokens committed on verified steps
    nfe_steps: int = 0             # summed over candidates: verified steps (target passes less prefills)
    decoded: int = 0               # summed over candidates: tokens decoded after a step (not prefilled, not roots)
    pruned: list[int] = field(default_factory=list)          # per stage: candidates judged impossible
    all_impossible: list[int] = field(default_factory=list)  # per stage: groups kept with none possible
    prompts: list[str] = field(default_factory=list)         # the prompt the last stage continued with, per candidate

    @property
    def image(self) -> Tensor:
        return self.images[self.best]


def grid_rows(target) -> tuple[int, int]:
    """(width, rows) of the target's square token grid."""
    n = target.num_image_tokens
    width = int(round(n ** 0.5))
    if width * width != n:
        raise ValueError(f"GridAR's stages are grid rows; the target's {n} tokens are not a square grid")
    return width, n // width


def stage_ends(stages, width: int, rows: int) -> list[int]:
    """The token count at each stage: its share of the grid rounded to whole rows. Shares that round to
    the same row, to no row or to the whole grid fail here, before anything is decoded."""
    ends = [max(1, round(s * rows)) * width for s in stages]
    if any(b <= a for a, b in zip(ends, ends[1:])) or ends[-1] >= width * rows:
        raise ValueError(f"GridAR's stages {list(stages)} round to grid rows {[e // width for e in ends]} of {rows}: "
                         f"each stage must end on a later row than the one before, and before the last row")
    return ends


def anchors(possible: list[bool]) -> tuple[list[int], int]:
    """Which candidate each slot continues from: an impossible one takes a possible one of its group of
    4, round-robin; a group with none possible keeps its own. Returns the sources and how many groups
    had none."""
    source, none = list(range(len(possible))), 0
    for g in range(0, len(possible), 4):
        good = [i for i in range(g, g + 4) if possible[i]]
        if not good:
            none += 1
            continue
        bad = [i for i in range(g, g + 4) if not possible[i]]
        for j, i in enumerate(bad):
            source[i] = good[j % len(good)]
    return source, none


def tiled_canvas(tokens: Tensor, width: int, rows: int) -> Tensor:
    """[N, k] tokens of the top k / width grid rows -> [N, rows * width]: those rows tiled down
    (GridAR's `pad: repeat`), so the tokenizer decodes a whole image."""
    made = tokens.view(tokens.shape[0], -1, width)
    reps = -(-rows // made.shape[1])
    return made.repeat(1, reps, 1)[:, :rows].reshape(tokens.shape[0], -1)


def _decode(parts: Components, tokens: Tensor) -> Tensor:
    return parts.vq.decode_codes(tokens.to(next(parts.vq.parameters()).device))


def _with_refined(parts: Components, cond: Condition, refined: list[str]) -> Condition:
    r = condition_for(parts.target, parts.text, refined)
    return Condition(cond.cond, cond.mask, refined=r.cond, refined_mask=r.mask)


@torch.no_grad()
def gridar(parts: Components, prompt: str, method: Method, seeds: list[int], sampling: SamplingParams,
           verifier: Verifier, config: GridAR = GridAR()) -> Scaled:
    """GridAR for one prompt: `seeds` gives each of the config's candidates its random stream."""
    n = config.candidates
    if len(seeds) != n:
        raise ValueError(f"GridAR with {n} candidates needs {n} seeds, got {len(seeds)}")
    target = parts.target
    width, rows = grid_rows(target)
    ends = stage_ends(config.stages, width, rows)
    gens = row_generators(list(seeds), target.device)
    original = [prompt] * n
    base = cond = condition_for(target, parts.text, original)
    guided, prompts = target, original
    out = Scaled(torch.empty(0), torch.empty(0), [], 0)
    tokens = None
    for end in ends:
        tokens = _stage(guided, cond, method, sampling, gens, tokens, end, out)
        canvases = _decode(parts, tiled_canvas(tokens, width, rows))
        visible = end / (width * rows)
        possible = verifier.prune(original, canvases, visible)  # judged against the prompt asked for
        source, none = anchors(possible)
        out.verifier_calls += n
        out.pruned.append(possible.count(False))
        out.all_impossible.append(none)
        tokens, canvases = tokens[source], canvases[source]
        if config.reformulate:
            prompts = verifier.reformulate(original, canvases, visible)
            out.verifier_calls += n
            if config.three_way:
                guided, cond = target.with_refined_prompts(), _with_refined(parts, base, prompts)
            else:
                cond = condition_for(target, parts.text, prompts)
    tokens = _stage(guided, cond, method, sampling, gens, tokens, target.num_image_tokens, out)
    images = _decode(parts, tokens)
    scores = verifier.rank([prompt] * n, images)
    out.verifier_calls += n
    out.tokens, out.images, out.scores, out.prompts = tokens, images, scores, prompts
    out.best = max(range(n), key=lambda i: scores[i])
    return out


def _stage(target, cond: Condition, method: Method, sampling: SamplingParams, gens, prefix: Tensor | None,
           end: int, out: Scaled) -> Tensor:
    """Decode every candidate up to token `end`, from its anchor; charges the passes to `out`."""
    gen = generate(target, cond, num_tokens=end, sampling=sampling, generators=gens, method=method, prefix=prefix)
    passes = int(gen.nfe.sum()) + cond.batch  # the prefill is one pass per candidate
    out.target_passes += passes
    out.steps += int(gen.steps.sum())
    out.skipped += int(gen.skipped.sum())
    out.verified_tokens += int(gen.verified_tokens.sum())
    out.nfe_steps += int(gen.nfe.sum())
    out.decoded += cond.batch * (end - (0 if prefix is None else prefix.shape[1]) - 1)
    out.guided_rows += passes * target.groups
    return gen.tokens


@torch.no_grad()
def best_of_n(parts: Components, prompt: str, method: Method, seeds: list[int], sampling: SamplingParams,
              verifier: Verifier) -> Scaled:
    """Best-of-N: N whole candidates, the same final ranker as GridAR."""
    target = parts.target
    cond = condition_for(target, parts.text, [prompt] * len(seeds))
    out = Scaled(torch.empty(0), torch.empty(0), [], 0)
    tokens = _stage(target, cond, method, sampling, row_generators(list(seeds), target.device), None,
                    target.num_image_tokens, out)
    images = _decode(parts, tokens)
    out.tokens, out.images, out.prompts = tokens, images, [prompt] * len(seeds)
    out.scores = verifier.rank([prompt] * len(seeds), images)
    out.verifier_calls += len(seeds)
    out.best = max(range(len(seeds)), key=lambda i: out.scores[i])
    return out
