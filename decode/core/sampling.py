"""Sampling from next-token logits: temperature, top-k, top-p, classifier-free guidance.

Randomness is explicit: every draw takes one torch.Generator per row, so an image depends only
on its own seed, never on the batch it was decoded in or on the number of ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy (argmax), like LlamaGen's top_k=1 / sample_logits=False
    top_k: int = 0  # 0 keeps the whole vocabulary
    top_p: float = 1.0  # nucleus mass; 1.0 disables

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def cfg_combine(cond_logits: Tensor, uncond_logits: Tensor, scale: float) -> Tensor:
    """LlamaGen's guidance: uncond + (cond - uncond) * scale."""
    return uncond_logits + (cond_logits - uncond_logits) * scale


def cfg_three_way(cond_logits: Tensor, uncond_logits: Tensor, refined_logits: Tensor, scale: float) -> Tensor:
    """GridAR's 3-way guidance (arXiv 2511.21185; its code's `cfg_decode_3_way`), in LlamaGen's scale:
    uncond + scale (cond - uncond) + (scale - 1) orth, orth the refined prompt's direction
    (refined - uncond) without its component along the original one (per position, over the vocabulary),
    so the refinement adds only what the original prompt does not already say. GridAR writes the
    scales as w + 1 and w; LlamaGen's scale is GridAR's w + 1."""
    original = cond_logits - uncond_logits
    refined = refined_logits - uncond_logits
    along = (refined * original).sum(-1, keepdim=True) / (original * original).sum(-1, keepdim=True).clamp_min(1e-12)
    return uncond_logits + scale * original + (scale - 1.0) * (refined - along * original)


def filter_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """Temperature, then top-k, then top-p (LlamaGen's order); filtered entries become -inf."""
    if params.temperature != 1.0:  # (x / 1 is x: no copy per drafter level at the default)
        logits = logits / max(params.temperature, 1e-5)
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum > params.top_p
        drop[..., 1:] = drop[..., :-1].clone()  # keep the first token that crosses the threshold
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def probabilities(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution [..., V] that sampling draws from (one-hot at the argmax when greedy)."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    return filter_logits(logits.float(), params).softmax(-1)


def sample(logits: Tensor, params: SamplingParams, generators: list[torch.Generator] | None) -> Tensor:
    """Draw one token per row from logits [B, V]; returns [B] long.

    Args:
        logits: [B, V] next-token logits (CFG already applied).
        params: temperature / top-k / top-p.
        generators: one generator per row (ignored when greedy).
    """
    if params.greedy:
        return logits.argmax(-1)
    probs = probabilities(logits, params)
    if generators is None:
        return draw(probs)
    if len(generators) != probs.shape[0]:
        raise ValueError(f"{len(generators)} generators for {probs.shape[0]} rows")
    return torch.cat([draw(p[None], g) for p, g in zip(probs, generators)])


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token from each row of probs [..., V] -> [...] long.

    This is torch.multinomial's own one-sample method: the argmax of p / E, with E ~ Exp(1). The same
    generator gives the same tokens. What it leaves out are multinomial's input checks, which read
    the device twice per call: on a GPU, two waits per draw."""
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(-1)


def row_generators(seeds: list[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per row, seeded independently."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
