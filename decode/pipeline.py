"""Prompts in, PNGs and per-image stats out: text encoding, generation, VQ decoding, writing.

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

from decode.core.engine import generate_ar
from decode.core.host import wait_for
from decode.evaluation.metrics import ImageStats, append_jsonl, speed_stats
from decode.core.sampling import SamplingParams, row_generators
from decode.models.target import Condition, LlamaGenTarget
from decode.models.target.llamagen_gpt import COMPILE_SCOPES
from decode.models.text import TextEncoder, check_prompts
from decode.models.vq import VQModel


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


def check_compatible(target: LlamaGenTarget, vq: VQModel, text: TextEncoder | None) -> None:
    """Components that do not fit each other fail before any work starts."""
    cfg = target.config
    if vq.config.codebook_size != cfg.vocab_size:
        raise ValueError(f"tokenizer codebook ({vq.config.codebook_size}) != target vocab_size ({cfg.vocab_size})")
    if cfg.model_type == "t2i":
        if text is None:
            raise ValueError("a text-to-image target needs a text encoder")
        if text.dim != cfg.caption_dim:
            raise ValueError(f"text encoder width {text.dim} != target caption_dim {cfg.caption_dim}")
        if text.max_length != cfg.cls_token_num:
            raise ValueError(f"text encoder length {text.max_length} != target cls_token_num {cfg.cls_token_num}")


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def save_png(img: Image.Image, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU; otherwise the named device, if it is there.
    On CUDA, also keeps this process's attention off cuDNN (see `avoid_cudnn_attention`)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device={name!r} is not a device: use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name} but this torch sees no CUDA device "
                             f"(torch {torch.__version__}); use device=cpu or device=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        avoid_cudnn_attention()
    return device


def avoid_cudnn_attention() -> None:
    """Turn off cuDNN's backend of `scaled_dot_product_attention` for this process (the
    memory-efficient kernel takes the masked passes instead). cuDNN builds an execution plan per
    new key length, and a decode's key length grows at every step: on an H200 (torch 2.11, bf16)
    each drafter pass of a round spent ~68 ms on the host building one, and a drafter round at XL
    dimensions took 227-291 ms, 13-15 ms without cuDNN (docs/results.md, the GPU section)."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def compile_models(setting, *models) -> str | None:
    """The `compile` option: false (eager), true or "stack" (one graph over each model's layers),
    "layer" (one graph per block, shared by the layers; much quicker to trace on deep models).
    Compiles each model given (target GPT, drafter; None is passed over) and returns the scope.

    The same computation, but inductor's fused kernels round differently from eager ones, so a
    sampled image can differ from its eager twin (the distribution does not). The first batch of
    each shape kind (prefill, one token, a tree, a sub-batch) pays the tracing."""
    if setting in (None, False):
        return None
    scope = "stack" if setting is True else setting
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile must be false, true, 'stack' or 'layer'; got {setting!r}")
    for m in models:
        if m is not None:
            m.compile_blocks(scope)
    return scope


def condition_for(target: LlamaGenTarget, text: TextEncoder | None, prompts: list[str]) -> Condition:
    if target.config.model_type == "c2i":
        try:
            labels = [int(p) for p in prompts]
        except ValueError as err:
            raise ValueError(f"a class-to-image target takes class ids as prompts, got {prompts!r}") from err
        bad = [x for x in labels if not 0 <= x < target.config.num_classes]
        if bad:
            raise ValueError(f"class ids {bad} outside [0, {target.config.num_classes})")
        return Condition(torch.tensor(labels))
    feats = text.encode(prompts)
    return Condition(feats.emb, feats.mask)


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


def run_jobs(jobs: list[Job], *, target: LlamaGenTarget, vq: VQModel, text: TextEncoder | None,
             sampling: SamplingParams, batch_size: int, out_dir: Path, method: str = "ar",
             generate=generate_ar, scorer=None, progress: bool = True,
             stats_name: str = "stats.jsonl", clip=None) -> list[ImageStats]:
    """Generate every job not already on disk; returns the stats of the images made now.

    `generate(target, condition, num_tokens=, sampling=, generators=) -> Generation` is the decoding
    method (plain AR by default; `decode.speculative.generate_eagle` with its drafter bound).
    `scorer(images, prompts) -> [alignment or None]` (decode.evaluation.world_evaluator.AlignmentScorer) adds quality;
    `clip(images, prompts) -> [cosine]` (decode.evaluation.quality.CLIPScorer) adds the CLIP score.
    """
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if not (img_dir / j.name).exists()]
    device, dtype = target.device, target.gpt.output.weight.dtype
    made: list[ImageStats] = []
    bar = tqdm(total=len(todo), desc=f"decode ({method})", unit="img", disable=not progress)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        t0 = time.perf_counter()
        cond = condition_for(target, text, [j.prompt for j in batch])
        wait_for(device)  # on a GPU t_text would otherwise miss the encoder's queued kernels
        t_text = time.perf_counter() - t0
        gen = generate(target, cond, num_tokens=target.num_image_tokens, sampling=sampling,
                          generators=row_generators([j.seed for j in batch], device))
        t1 = time.perf_counter()
        with torch.no_grad():
            images = vq.decode_codes(gen.tokens.to(next(vq.parameters()).device))
        wait_for(images.device)
        t_vq = time.perf_counter() - t1
        aligned = scorer(images, [j.prompt for j in batch]) if scorer is not None else [None] * len(batch)
        clipped = clip(images, [j.prompt for j in batch]) if clip is not None else [None] * len(batch)
        rows = []
        for i, (job, img) in enumerate(zip(batch, to_pil(images))):
            save_png(img, img_dir / job.name)
            rows.append(ImageStats(
                prompt_index=job.prompt_index, sample_index=job.sample_index, prompt=job.prompt, seed=job.seed,
                method=method, latency_s=gen.prefill_s + gen.loop_s, prefill_s=gen.prefill_s, text_encode_s=t_text,
                vq_decode_s=t_vq, batch_size=len(batch), device=str(device), dtype=str(dtype).removeprefix("torch."),
                image=str(img_dir / job.name), alignment=aligned[i], clip_score=clipped[i], **speed_stats(gen, i)))
        append_jsonl(out_dir / stats_name, rows)
        made.extend(rows)
        bar.update(len(batch))
    bar.close()
    return made
