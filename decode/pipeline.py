"""Jobs in, PNGs and per-image stats out: planning, resuming, writing (decoding is decode.api).

Each image is seeded from (seed, prompt index, sample index) alone, so what an image looks like
does not depend on the batch it was decoded in or on how prompts are split across ranks.
Images are written to a temporary name and renamed; a rerun skips images already written.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from decode.api import Components, decode_batch
from decode.core.engine import Method
from decode.core.sampling import SamplingParams
from decode.evaluation.metrics import ImageStats, append_jsonl, speed_stats
from decode.models.text import check_prompts
from decode.scaling.config import ScalingPlan
from decode.scaling.gridar import Scaled, best_of_n, gridar


@dataclass(frozen=True)
class Job:
    prompt_index: int
    sample_index: int
    prompt: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.prompt_index:05d}_{self.sample_index:03d}.png"


def image_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed from (seed, prompt index, sample index): independent of batching and ranks."""
    digest = hashlib.sha256(f"{seed}/{prompt_index}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def plan_jobs(prompts: list[str], n: int, seed: int) -> list[Job]:
    prompts = check_prompts(prompts)
    if n < 1:
        raise ValueError(f"n (images per prompt) must be >= 1, got {n}")
    return [Job(i, s, p, image_seed(seed, i, s)) for i, p in enumerate(prompts) for s in range(n)]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def save_png(img: Image.Image, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


RUN_FILE = "run.json"


def check_run_folder(out_dir: Path, settings: dict) -> None:
    """A rerun into `out_dir` resumes it (images already written are skipped) only if it makes the
    same images: same settings (see `decode.__main__.run_settings`) and, for every image already
    there, the same prompt at its index. Otherwise the earlier images would stand under the new
    settings' names, so the rerun is refused. More prompts or a larger n extend a run."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir={out_dir} is a file, not a folder")
    path = out_dir / RUN_FILE
    made = {int(png.name[:5]) for png in (out_dir / "images").glob("[0-9]" * 5 + "_*.png")}
    if not path.is_file() or not made:
        return
    before = json.loads(path.read_text())
    changed = sorted(k for k in set(before) | set(settings)
                     if k != "prompts" and before.get(k) != settings.get(k))
    old, new = before.get("prompts", []), settings.get("prompts", [])
    if any(i < len(old) and i < len(new) and old[i] != new[i] for i in made):
        changed.append("prompts")
    if changed:
        raise ValueError(f"out_dir={out_dir} holds images made with other settings ({', '.join(changed)} "
                         f"differ; see {path}); pick a new out_dir, or rerun with the same settings to resume")


def record_run_folder(out_dir: Path, settings: dict) -> None:
    """Write the settings that made this folder's images (see `check_run_folder`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out_dir / RUN_FILE)


def run_jobs(jobs: list[Job], *, parts: Components, method: Method, sampling: SamplingParams, batch_size: int,
             out_dir: Path, progress: bool = True, stats_name: str = "stats.jsonl", nll: bool = True) -> list[ImageStats]:
    """Decode every job not already on disk (decode.api.decode_batch), write its PNG and stats line;
    returns the stats of the images made now. `parts.scorer` adds alignment, `parts.clip` the CLIP
    score, `nll` each image's target NLL (one teacher-forced pass per batch, outside the timed decode)."""
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if not (img_dir / j.name).exists()]
    device, dtype = parts.target.device, parts.target.dtype
    made: list[ImageStats] = []
    bar = tqdm(total=len(todo), desc=f"decode ({method.name})", unit="img", disable=not progress)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        prompts = [j.prompt for j in batch]
        out = decode_batch(parts, prompts, method, [j.seed for j in batch], sampling, nll=nll)
        gen = out.generation
        aligned = parts.scorer(out.images, prompts) if parts.scorer is not None else [None] * len(batch)
        clipped = parts.clip(out.images, prompts) if parts.clip is not None else [None] * len(batch)
        rows = []
        for i, (job, img) in enumerate(zip(batch, to_pil(out.images))):
            save_png(img, img_dir / job.name)
            rows.append(ImageStats(
                prompt_index=job.prompt_index, sample_index=job.sample_index, prompt=job.prompt, seed=job.seed,
                method=method.name, latency_s=gen.prefill_s + gen.loop_s, prefill_s=gen.prefill_s,
                text_encode_s=out.text_s, vq_decode_s=out.vq_s, batch_size=len(batch), device=str(device),
                dtype=str(dtype).removeprefix("torch."), image=str(img_dir / job.name), alignment=aligned[i],
                clip_score=clipped[i], target_nll=float(out.nll[i]) if nll else None, **speed_stats(gen, i)))
        append_jsonl(out_dir / stats_name, rows)
        made.extend(rows)
        bar.update(len(batch))
    bar.close()
    return made


def candidate_seeds(job: Job, n: int) -> list[int]:
    """The random streams of a job's n candidates (test-time scaling): from the job's seed alone."""
    return [image_seed(job.seed, 0, c) for c in range(n)]


def run_scaled_jobs(jobs: list[Job], *, parts: Components, method: Method, sampling: SamplingParams,
                    plan: ScalingPlan, verifier, out_dir: Path, progress: bool = True,
                    stats_name: str = "stats.jsonl") -> list[ImageStats]:
    """GridAR or Best-of-N per job (decode.scaling): the chosen image in images/, every final candidate
    side by side in candidates/ (the chosen one first), one stats line per job whose speed figures
    count the whole search: nfe is the target passes of all candidates (prefills included) and
    step compression the image's tokens over them, beside the verifier calls."""
    img_dir, cand_dir = out_dir / "images", out_dir / "candidates"
    img_dir.mkdir(parents=True, exist_ok=True)
    cand_dir.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if not (img_dir / j.name).exists()]
    device, dtype = parts.target.device, parts.target.dtype
    made: list[ImageStats] = []
    for job in tqdm(todo, desc=f"{plan.name} ({method.name})", unit="img", disable=not progress):
        seeds = candidate_seeds(job, plan.candidates)
        t0 = time.perf_counter()
        if plan.gridar is not None:
            out: Scaled = gridar(parts, job.prompt, method, seeds, sampling, verifier, plan.gridar)
        else:
            out = best_of_n(parts, job.prompt, method, seeds, sampling, verifier)
        wall = time.perf_counter() - t0
        pils = to_pil(out.images)
        order = [out.best] + [i for i in range(len(pils)) if i != out.best]
        strip = Image.new("RGB", (sum(pils[i].width for i in order), pils[0].height))
        for x, i in enumerate(order):
            strip.paste(pils[i], (x * pils[0].width, 0))
        save_png(strip, cand_dir / job.name)
        save_png(pils[out.best], img_dir / job.name)
        aligned = parts.scorer(out.image[None], [job.prompt]) if parts.scorer is not None else [None]
        n = int(out.tokens.shape[1])
        row = ImageStats(prompt_index=job.prompt_index, sample_index=job.sample_index, prompt=job.prompt,
                         seed=job.seed, method=f"{plan.name}+{method.name}", tokens=n, nfe=out.target_passes,
                         step_compression=n / out.target_passes, latency_s=wall, prefill_s=0.0, text_encode_s=0.0,
                         vq_decode_s=0.0, batch_size=plan.candidates, device=str(device),
                         dtype=str(dtype).removeprefix("torch."), image=str(img_dir / job.name),
                         alignment=aligned[0], steps=out.steps, skipped_steps=out.skipped,
                         skip_ratio=out.skipped / max(out.steps, 1), tau=out.verified_tokens / max(out.nfe_steps, 1),
                         tau_all=out.decoded / max(out.steps, 1), batch_passes=out.target_passes,
                         candidates=plan.candidates, verifier_calls=out.verifier_calls, guided_rows=out.guided_rows,
                         pruned=out.pruned)
        append_jsonl(out_dir / stats_name, [row])
        made.append(row)
    return made
