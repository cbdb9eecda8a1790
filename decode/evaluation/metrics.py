"""Per-image decode statistics and the end-of-run summary (definitions: docs/algorithms.md 5).

- NFE: target forward passes after the prefill (the prefill is reported on its own).
- step compression: generated image tokens / NFE.
- latency: wall-clock from prefill to last token for the batch the image was decoded in; text
  encoding and VQ decoding are reported on their own.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


def next_token_stats(logits: torch.Tensor, codes: torch.Tensor) -> dict[str, torch.Tensor]:
    """NLL, top-1 accuracy, mean top-1 probability and entropy (nats) of next-token distributions
    logits [B, N, V] against the codes [B, N] that followed (the realism bar uses the last two)."""
    logp = logits.float().log_softmax(-1)  # [B, N, V]
    p = logp.exp()
    return {"nll": F.nll_loss(logp.flatten(0, 1), codes.flatten()),
            "top1_acc": (logits.argmax(-1) == codes).float().mean(),
            "top1_prob": p.max(-1).values.mean(),
            "entropy": -(p * logp).sum(-1).mean()}


@dataclass(frozen=True)
class ImageStats:
    prompt_index: int
    sample_index: int
    prompt: str
    seed: int
    method: str
    tokens: int
    nfe: int
    step_compression: float
    latency_s: float  # prefill + steps, for the whole batch the image was in
    prefill_s: float
    text_encode_s: float  # for the batch
    vq_decode_s: float  # for the batch
    batch_size: int
    device: str
    dtype: str
    image: str
    alignment: float | None = None  # evaluator's share of the prompt's attributes found (world prompts only)
    steps: int = 0  # decode steps after the prefill: verified (= NFE) + skipped
    skipped_steps: int = 0
    skip_ratio: float = 0.0  # skipped steps / all steps
    tau: float = 0.0  # tokens committed per verified step (the target's own next token included)
    tau_all: float = 0.0  # tokens per step, skipped steps included
    tokens_per_skip: float = 0.0  # tokens committed per skipped step (0 without skips)
    draft_s: float = 0.0  # batch: drafting (drafter passes, tree building)
    verify_s: float = 0.0  # batch: target passes + acceptance
    schedule_s: float = 0.0  # batch: skip decisions (VVS schedulers)
    batch_passes: int = 0  # target passes the image's batch ran (>= NFE: a pass serves every verifying row)
    clip_score: float | None = None  # raw CLIP cosine with "A photo depicts " + prompt (clip=FOLDER)
    target_nll: float | None = None  # nats per token under the distribution AR samples (decode.evaluation.measures)
    candidates: int = 1  # test-time scaling (method=gridar / best_of_n): candidates searched for this image
    verifier_calls: int = 0  # test-time scaling: prune, reformulate and rank calls, one per canvas
    guided_rows: int = 0  # test-time scaling: target passes x guidance groups (3-way guidance runs 3)
    pruned: list | None = None  # GridAR: candidates judged impossible at each stage


def speed_stats(gen, i: int) -> dict:
    """Row i of a `decode.core.engine.Generation` -> its per-image speed figures (definitions above)."""
    n = int(gen.tokens.shape[1])
    nfe, steps = int(gen.nfe[i]), int(gen.steps[i])
    skipped = int(gen.skipped[i]) if gen.skipped is not None else 0
    ver_tokens = int(gen.verified_tokens[i]) if gen.verified_tokens is not None else nfe
    return dict(tokens=n, nfe=nfe, steps=steps, skipped_steps=skipped, step_compression=n / max(nfe, 1),
                skip_ratio=skipped / max(steps, 1), tau=ver_tokens / max(nfe, 1), tau_all=(n - 1) / max(steps, 1),
                tokens_per_skip=(n - 1 - ver_tokens) / skipped if skipped else 0.0, draft_s=gen.draft_s,
                verify_s=gen.verify_s, schedule_s=gen.schedule_s, batch_passes=gen.batch_passes)


def append_jsonl(path: str | os.PathLike, rows: list[ImageStats]) -> None:
    """Append rows; each write is one flushed call, so an interrupted run leaves whole lines."""
    with open(path, "a") as f:
        f.write("".join(json.dumps(asdict(r)) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def batches(rows: list[dict]) -> list[tuple[float, int]]:
    """The decode batches behind the rows, as (latency_s, images). Every row of a batch carries the batch's
    timings and its size; rows of one batch need not be adjacent (a multi-process run's stats.jsonl is
    sorted by prompt), so rows are grouped by their timings, and a group holding more rows than its batch
    size (two batches timed alike) is split into batches of that size."""
    groups: dict[tuple, int] = {}
    for r in rows:
        key = (r["latency_s"], r["batch_size"], r.get("prefill_s"), r.get("text_encode_s"), r.get("vq_decode_s"))
        groups[key] = groups.get(key, 0) + 1
    out = []
    for (latency, size, *_), count in groups.items():
        full, rest = divmod(count, max(int(size), 1))
        out += [(float(latency), int(size))] * full + ([(float(latency), rest)] if rest else [])
    return out


def summary_table(rows: list[ImageStats], wall_s: float) -> str:
    """A short human summary of one decode run."""
    if not rows:
        return "no images were generated (all were already present?)"
    n = len(rows)
    mean = lambda key: sum(getattr(r, key) for r in rows) / n  # noqa: E731
    found = batches([asdict(r) for r in rows])
    lines = [
        f"images              {n}  (method {rows[0].method}, device {rows[0].device}, dtype {rows[0].dtype}, "
        f"batch size {rows[0].batch_size})",
        f"tokens per image    {mean('tokens'):.0f}",
        f"NFE per image       {mean('nfe'):.1f}   (target forwards after the prefill; the batches ran "
        f"{mean('batch_passes'):.1f} passes each: a pass runs when any row verifies)",
        f"step compression    {mean('step_compression'):.3f}  (tokens / NFE)",
        f"tau                 {mean('tau'):.3f}  (tokens per verified step; {mean('tau_all'):.3f} over all steps)",
        f"skip ratio          {mean('skip_ratio'):.3f}  (skipped / all steps; {mean('tokens_per_skip'):.2f} tokens "
        f"per skipped step)",
        f"latency per batch   {sum(l for l, _ in found) / len(found):.3f} s  (prefill to last token; "
        + (f"draft {mean('draft_s'):.3f} s, verify {mean('verify_s'):.3f} s, schedule {mean('schedule_s'):.3f} s)"
           if mean('draft_s') + mean('verify_s') + mean('schedule_s') > 0
           else "phases not timed: on a GPU that needs three waits a step, phase_times=True in generate)"),
        f"text encode / batch {mean('text_encode_s'):.3f} s,  VQ decode / batch {mean('vq_decode_s'):.3f} s",
        f"throughput          {n / sum(l for l, _ in found):.2f} images/s decoding (prefill to last token, "
        f"one process: the batches' latencies summed), "
        f"{n / wall_s:.2f} images/s over the whole run ({wall_s:.1f} s: text, VQ, scoring and files included)",
    ]
    if rows[0].candidates > 1:
        lines.insert(3, f"search              {rows[0].candidates} candidates per image, {mean('verifier_calls'):.1f} "
                        f"verifier calls per image; NFE and step compression count every candidate's target passes, "
                        f"prefills included ({mean('guided_rows'):.0f} guided rows: passes x guidance groups)")
    scored = [r.alignment for r in rows if r.alignment is not None]
    if scored:
        lines.append(f"alignment           {sum(scored) / len(scored):.3f}  (evaluator: share of the prompt's "
                     f"attributes found; {len(scored)} of {n} images had a world prompt)")
    clipped = [r.clip_score for r in rows if r.clip_score is not None]
    if clipped:
        lines.append(f"CLIP score          {sum(clipped) / len(clipped):.4f}  (raw cosine, 'A photo depicts ' + prompt)")
    nll = [r.target_nll for r in rows if r.target_nll is not None]
    if nll:
        lines.append(f"target NLL          {_mean_with_interval(nll)}  (nats per token under the distribution AR samples: "
                     f"AR's value for a lossless method; compare with an AR run of the same prompts)")
    if not scored and not clipped and not nll:  # docs/algorithms.md 5.2: speed travels with quality, or says it has none
        lines.append("quality             not measured: no world prompts for the evaluator and no clip= weights; "
                     "these speed figures say nothing about the images (scripts/benchmark.py adds FID)")
    return "\n".join(lines)


def write_tables(out: Path, stem: str, markdown: str, payload: dict, rows: list[dict], columns: list[str]) -> None:
    """<stem>.md, <stem>.json and <stem>.csv (the given columns of `rows`) in `out`, each written to a
    temporary name and renamed, so an interrupted script keeps its last complete tables."""
    out.mkdir(parents=True, exist_ok=True)
    write_summary(out / f"{stem}.md", markdown.rstrip("\n"))
    write_summary(out / f"{stem}.json", json.dumps(payload, indent=2))
    with open(out / f"{stem}.csv.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / f"{stem}.csv.tmp").replace(out / f"{stem}.csv")


def write_summary(path: str | os.PathLike, text: str) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def _mean_with_interval(values: list[float]) -> str:
    """The mean, with its 95 % bootstrap interval where there are enough images for one."""
    from decode.evaluation.measures import MIN_IMAGES, mean_interval

    if len(values) < MIN_IMAGES:
        return f"{sum(values) / len(values):.3f} (no interval: {len(values)} images, fewer than {MIN_IMAGES})"
    return str(mean_interval(torch.tensor(values), name="target NLL"))
