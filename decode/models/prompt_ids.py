"""Prompt encoders for targets conditioned on token ids rather than caption features (Janus-Pro,
Lumina-mGPT): they return `TextFeatures` whose `emb` is [B, L] token ids, left-padded, with the mask.

- `TemplateIds`: the model's own tokenizer (a local transformers folder) over the model's prompt
  template, then fixed suffix ids (the image header: Janus's begin-of-image; Lumina's begin-of-image
  and size tokens).
- `HashIds`: for tiny random targets (tests, CI): each word becomes an id in [low, high) by a hash, so
  a prompt always gives the same ids; no tokenizer files needed.
"""
from __future__ import annotations

import hashlib

import torch

from decode.models.text import TextFeatures, check_prompts


def _left_padded(rows: list[list[int]], max_length: int, pad: int) -> TextFeatures:
    long = [r for r in rows if len(r) > max_length]
    if long:
        raise ValueError(f"a prompt takes {len(long[0])} tokens, more than the target's {max_length} prompt slots")
    ids = torch.full((len(rows), max_length), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), max_length, dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, -len(r):], mask[i, -len(r):] = torch.tensor(r), True
    return TextFeatures(emb=ids, mask=mask)


class HashIds:
    dim = None  # ids, not features

    def __init__(self, max_length: int = 16, low: int = 10, high: int = 100, prefix: tuple = (1,),
                 suffix: tuple = (2,), pad: int = 0, device: str = "cpu"):
        self.max_length, self.low, self.high = int(max_length), int(low), int(high)
        self.prefix, self.suffix, self.pad = list(prefix), list(suffix), int(pad)

    def _word(self, w: str) -> int:
        return self.low + int.from_bytes(hashlib.sha256(w.encode()).digest()[:4], "little") % (self.high - self.low)

    def encode(self, prompts: list[str]) -> TextFeatures:
        rows = [self.prefix + [self._word(w) for w in p.lower().split()] + self.suffix for p in check_prompts(prompts)]
        return _left_padded(rows, self.max_length, self.pad)


class TemplateIds:
    dim = None

    def __init__(self, path: str, template: str, suffix: tuple = (), max_length: int = 64, device: str = "cpu"):
        from pathlib import Path

        if not (Path(path) / "tokenizer_config.json").is_file():
            raise ValueError(f"text_encoder.path={path!r} holds no tokenizer (tokenizer_config.json): the target's "
                             f"model folder is expected")
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if "{prompt}" not in template:
            raise ValueError(f"text_encoder.template must contain {{prompt}}, got {template!r}")
        self.template, self.suffix, self.max_length = template, list(suffix), int(max_length)
        self.pad = self.tokenizer.pad_token_id or 0

    def encode(self, prompts: list[str]) -> TextFeatures:
        rows = [self.tokenizer(self.template.format(prompt=p))["input_ids"] + self.suffix for p in check_prompts(prompts)]
        return _left_padded(rows, self.max_length, self.pad)
