"""The redundancy study: how many verifications VVS's skipping could save on a base method, at best.

A base method decodes while verifying every step; at each step where a skip would be allowed
(past the warm-up, with drafts), the recorder (decode.strategies.learned_skip.TraceRecorder) asks
what the verification-free selector would have committed and compares it with what verification
committed. A step is *redundant* when the two agree token for token: skipping it would have saved
one target pass and changed nothing. Tables: the redundant share overall, by the grid row being
generated, and by tree agreement (VVS's path similarity, the signal its rule thresholds), and the
step compression the base would reach if every redundant step had been skipped and nothing else
changed (an upper bound: it ignores the consecutive-skip cap and the stale features a skip leaves).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from tqdm import tqdm

from decode.api import Components, decode_batch
from decode.core.engine import Method
from decode.core.sampling import SamplingParams
from decode.strategies.learned_skip import TraceRecorder, TraceStep

SIMILARITY, PROGRESS = 0, 6  # their columns in decode.strategies.skipping.step_features


@dataclass(frozen=True)
class Traced:
    steps: list[TraceStep]  # image = index into the prompts
    nfe: torch.Tensor       # [N] target passes per image (every step verified)
    tokens: int             # image tokens per image


@torch.no_grad()
def trace_steps(parts: Components, prompts: list[str], method: Method, seeds: list[int], selector_seeds: list[int],
                sampling: SamplingParams, *, warmup: int = 5, batch_size: int = 8, progress: bool = True) -> Traced:
    """Decode `prompts` with `method`, verifying every step, and record each eligible step."""
    steps, nfe = [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"traces ({method.name})", unit="batch",
                      disable=not progress):
        end = min(start + batch_size, len(prompts))
        recorder = TraceRecorder(parts.codebook, seeds=selector_seeds[start:end], warmup=warmup)
        out = decode_batch(parts, prompts[start:end], dataclasses.replace(method, skipping=recorder.skipping()),
                           seeds[start:end], sampling, images=False)
        steps += [dataclasses.replace(s, image=start + s.image) for s in recorder.steps]
        nfe.append(out.generation.nfe)
    return Traced(steps, torch.cat(nfe), parts.target.num_image_tokens)


def _share(steps: list[TraceStep]) -> str:
    if not steps:
        return "n/a (0 steps)"
    safe = sum(s.safe for s in steps)
    return f"{safe / len(steps):.3f} ({len(steps)} steps)"


def redundancy_summary(traced: Traced, grid: int, bins: int = 5) -> dict:
    """The study's figures for one base (see the module docstring)."""
    steps, n = traced.steps, traced.tokens
    safe = [s for s in steps if s.safe]
    images = len(traced.nfe)
    nfe = float(traced.nfe.float().sum())
    by_row = {}
    for s in steps:
        by_row.setdefault(min(int(s.features[PROGRESS] * n) // grid, grid - 1), []).append(s)
    sims = torch.tensor([s.features[SIMILARITY] for s in steps], dtype=torch.float64)
    edges = torch.quantile(sims, torch.linspace(0, 1, bins + 1, dtype=torch.float64)).tolist() if len(sims) else []
    by_sim = []
    for i in range(len(edges) - 1):
        last = i == len(edges) - 2
        part = [s for s in steps if edges[i] <= s.features[SIMILARITY] and
                (s.features[SIMILARITY] <= edges[i + 1] if last else s.features[SIMILARITY] < edges[i + 1])]
        by_sim.append((edges[i], edges[i + 1], part))
    return {
        "images": images, "verified_steps": nfe / images, "eligible_steps": len(steps) / images,
        "redundant_steps": len(safe) / images, "redundant_share": len(safe) / max(len(steps), 1),
        "tokens_per_redundant_skip": sum(s.proposed for s in safe) / max(len(safe), 1),
        "kept_share": sum(s.kept / max(s.proposed, 1) for s in steps) / max(len(steps), 1),
        "latent_similarity": sum(s.similarity for s in steps) / max(len(steps), 1),
        "step_compression": images * n / nfe, "step_compression_if_skipped": images * n / max(nfe - len(safe), 1),
        "by_row": {row: _share(by_row[row]) for row in sorted(by_row)},
        "by_similarity": [(lo, hi, _share(part)) for lo, hi, part in by_sim],
    }


def redundancy_markdown(results: dict[str, dict], note: str) -> str:
    lines = ["| base | verified steps / image | eligible | redundant | redundant share | tokens / redundant skip | "
             "selector tokens kept | latent similarity | step compression | at best, every redundant step skipped |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for base, r in results.items():
        lines.append(f"| {base} | {r['verified_steps']:.1f} | {r['eligible_steps']:.1f} | {r['redundant_steps']:.1f} | "
                     f"{r['redundant_share']:.3f} | {r['tokens_per_redundant_skip']:.2f} | {r['kept_share']:.3f} | "
                     f"{r['latent_similarity']:.3f} | {r['step_compression']:.2f} | "
                     f"{r['step_compression_if_skipped']:.2f} |")
    for base, r in results.items():
        lines += ["", f"Redundant share by grid row being generated ({base}):", "",
                  "| row | " + " | ".join(str(k) for k in r["by_row"]) + " |",
                  "|---|" + "---|" * len(r["by_row"]),
                  "| share | " + " | ".join(r["by_row"].values()) + " |",
                  "", f"Redundant share by tree agreement (path similarity quantile bins, {base}):", "",
                  "| similarity | redundant share |", "|---|---|"]
        lines += [f"| {lo:.3f} - {hi:.3f} | {share} |" for lo, hi, share in r["by_similarity"]]
    lines += ["", note, "A step is redundant when the verification-free selector (a uniformly drawn tree path cut "
              "to the mean path length) would have committed exactly the tokens verification committed; eligible "
              "steps are those past the warm-up with drafts; selector tokens kept = the share of the selector's tokens that "
              "verification committed too (common prefix), latent similarity = their mean cosine with the verified "
              "tokens in the VQ latent space (what a quality-aware skip would accept). 'At best': the base's step compression had every "
              "redundant step been skipped and nothing else changed (no cap on consecutive skips, no stale features)."]
    return "\n".join(lines) + "\n"
