"""The decode loop.

One engine sequences the stages: prefill, then steps that each add tokens to every row. Plain
autoregressive decoding is the baseline policy: one target forward per token. (Speculative
policies, with drafting, tree verification and skipping, plug into the same loop.)
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from decode.sampling import SamplingParams, sample
from decode.target import Condition, LlamaGenTarget


@dataclass(frozen=True)
class Generation:
    tokens: Tensor  # [B, N] image tokens, raster order
    nfe: Tensor  # [B] target forwards after the prefill
    steps: Tensor  # [B] decode steps after the prefill
    prefill_s: float  # wall-clock of the prefill (batch)
    loop_s: float  # wall-clock of the steps after the prefill (batch)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_ar(target: LlamaGenTarget, condition: Condition, *, num_tokens: int, sampling: SamplingParams,
                generators: list[torch.Generator] | None) -> Generation:
    """Plain autoregressive decoding: the prefill samples token 0, then one forward per token."""
    device = target.device
    _sync(device)
    t0 = time.perf_counter()
    cache, out = target.start(condition, num_tokens)  # 1. prefill
    token = sample(out.logits[:, -1], sampling, generators)
    _sync(device)
    t1 = time.perf_counter()
    tokens = [token]
    for _ in range(num_tokens - 1):  # 2. one target forward per further token
        out = target.extend(cache, token[:, None])
        target.commit(cache, 1)
        token = sample(out.logits[:, -1], sampling, generators)
        tokens.append(token)
    _sync(device)
    t2 = time.perf_counter()
    b = condition.batch
    n = torch.full((b,), num_tokens - 1, dtype=torch.long)
    return Generation(tokens=torch.stack(tokens, 1), nfe=n, steps=n.clone(), prefill_s=t1 - t0, loop_s=t2 - t1)
