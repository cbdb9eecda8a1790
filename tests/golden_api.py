"""How the golden runs reach the decoder: the embedded world's models, loaded once."""
from __future__ import annotations

import functools

import torch

from decode.models.drafter import load_drafter
from decode.core.engine import generate
from decode.strategies.registry import build_method
from decode.api import condition_for
from decode.resolvers import REPO
from decode.core.sampling import SamplingParams, row_generators
from decode.strategies.learned_skip import load_scheduler_policy
from decode.models.target import load_target
from decode.models.text import load_text_encoder
from decode.core.trees import TreeParams
from decode.models.vq import load_vq

WORLD = REPO / "models" / "world"


@functools.lru_cache(maxsize=1)
def world_parts():
    target = load_target(str(WORLD / "target"), cfg_scale=4.0)
    vq = load_vq(str(WORLD / "tokenizer"))
    text = load_text_encoder("minilm", max_length=target.config.cls_token_num)
    drafter = load_drafter(WORLD / "drafter", target.gpt)
    policy = load_scheduler_policy(WORLD / "scheduler", target, drafter)
    return target, vq, text, drafter, policy


def decode_world(method: str, overrides: dict, sampling: dict, prompts, seeds, num_tokens):
    target, vq, text, drafter, policy = world_parts()
    params = SamplingParams(**sampling)
    m = build_method(method, sampling=params, tree=TreeParams(), options=overrides,
                     drafter=drafter, codebook=vq.quantize.embedding.weight.detach(), learned_policy=policy)
    cond = condition_for(target, text, prompts)
    with torch.no_grad():
        return generate(target, cond, num_tokens=num_tokens, sampling=params, generators=row_generators(seeds),
                        method=m)
