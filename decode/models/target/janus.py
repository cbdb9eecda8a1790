"""Janus-Pro target adapter over transformers' `JanusForConditionalGeneration` (not a copy of it).

The only place that knows Janus's quirks: image tokens enter through its generation embeddings and
aligner and leave through its generation head (not the text vocabulary); the prompt is the chat
format ending in the begin-of-image token; CFG doubles the batch with an unconditional prompt whose
tokens are all padding but BOS and begin-of-image, combined as uncond + s (cond - uncond) (its
`generate`, with `guidance_scale` s = 5 as published); 24 x 24 tokens for 384 px, decoded by its
VQ-VAE. The transformers decoder runs over the engine's cache through decode.models.target.hf_bridge,
so draft trees verify with a 4-D mask and explicit positions like on LlamaGen.

Conditions are token ids: `Condition(cond=[B, T] prompt ids ending in begin-of-image, mask=[B, T])`,
left-padded (padding slots masked; positions count valid slots only, as transformers' generate does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from decode.core.cache import KVCache
from decode.models.target.guidance import Guided
from decode.models.target.hf_bridge import allocate_for, run_decoder
from decode.models.target.llamagen import Condition, TargetOutput, causal_mask


@dataclass(frozen=True)
class JanusConfigView:
    """What the engine and the CLI read of a target's config (LlamaGen's GPTConfig has the same fields)."""
    model_type: str
    vocab_size: int
    block_size: int
    cls_token_num: int
    dim: int


class JanusTarget(Guided):
    def __init__(self, model, cfg_scale: float = 5.0, three_way: bool = False, max_prompt: int = 64):
        self.model = model.eval()
        self.cfg_scale, self.three_way = float(cfg_scale), three_way
        self._check_guidance()
        gen = model.generation_config
        self.bos, self.pad = gen.bos_token_id, gen.pad_token_id
        self.boi = (gen.generation_kwargs or {}).get("boi_token_id")
        if None in (self.bos, self.pad, self.boi):
            raise ValueError("a Janus model's generation_config needs bos_token_id, pad_token_id and "
                             "generation_kwargs.boi_token_id (the unconditional prompt keeps BOS and begin-of-image)")
        self.max_prompt = max_prompt
        vq = model.config.vq_config
        self.config = JanusConfigView("t2i", vq.num_embeddings, model.config.vision_config.num_image_tokens, max_prompt,
                                      model.config.text_config.hidden_size)

    def with_refined_prompts(self) -> "JanusTarget":
        return JanusTarget(self.model, self.cfg_scale, three_way=True, max_prompt=self.max_prompt)

    # ---- the contract's facts ------------------------------------------------------------------
    @property
    def decoder(self):
        return self.model.model.language_model

    @property
    def prefix_len(self) -> int:
        return self.max_prompt

    @property
    def num_image_tokens(self) -> int:
        return self.config.block_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.config.dim

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """Image tokens [...] -> the decoder's input embeddings [..., D] (generation embeddings + aligner)."""
        return self.model.prepare_embeddings_for_image_generation(tokens)

    def guide(self, hidden: Tensor) -> TargetOutput:
        """hidden [G*B, T, D] -> guided logits over image codes and hidden as [G, B, T, D]."""
        h = hidden.view(self.groups, -1, *hidden.shape[1:])
        return TargetOutput(logits=self.combine(self.model.model.generation_head(h).float()), hidden=h)

    # ---- the prompt ------------------------------------------------------------------------------
    def _prefix(self, c: Condition) -> tuple[Tensor, Tensor]:
        """Prompt embeddings [G*B, P, D] and valid slots [G*B, P], left-padded to P = prefix_len."""
        groups = [c.cond, self._unconditional(c.cond)] if self.guided else [c.cond]
        masks = [c.mask, c.mask] if self.guided else [c.mask]
        if self.three_way:
            if c.refined is None:
                raise ValueError("3-way guidance needs refined prompts in the condition")
            groups.append(c.refined)
            masks.append(c.refined_mask)
        ids = torch.cat([self._padded(x) for x in groups]).to(self.device)
        valid = torch.cat([self._padded(m if m is not None else torch.ones_like(x, dtype=torch.bool), fill=False)
                           for x, m in zip(groups, masks)]).to(self.device).bool()
        return self.model.get_input_embeddings()(ids), valid

    def _unconditional(self, ids: Tensor) -> Tensor:
        return torch.where((ids == self.bos) | (ids == self.boi), ids, torch.full_like(ids, self.pad))

    def _padded(self, x: Tensor, fill=None) -> Tensor:
        if x.ndim != 2 or x.shape[1] > self.max_prompt:
            raise ValueError(f"a Janus condition is [B, T <= {self.max_prompt}] prompt token ids, got {list(x.shape)}")
        fill = self.pad if fill is None else fill
        return torch.cat([torch.full((x.shape[0], self.max_prompt - x.shape[1]), fill, dtype=x.dtype), x.cpu()], 1)

    # ---- decoding ----------------------------------------------------------------------------------
    @torch.no_grad()
    def start(self, c: Condition, max_new_tokens: int, extra_slots: int = 0, all_positions: bool = False,
              image_prefix: Tensor | None = None) -> tuple[KVCache, TargetOutput]:
        """Prefill the prompt (and `image_prefix` [B, k], given image tokens) in one pass."""
        k = 0 if image_prefix is None else image_prefix.shape[1]
        if k + max_new_tokens > self.num_image_tokens:
            raise ValueError(f"{k} given + {max_new_tokens} new image tokens requested, the target makes "
                             f"{self.num_image_tokens}")
        x, valid = self._prefix(c)
        if k:
            x = torch.cat([x, self.embed_tokens(image_prefix.to(self.device).repeat(self.groups, 1)).to(x.dtype)], 1)
            valid = torch.cat([valid, valid.new_ones(valid.shape[0], k)], 1)
        g_b, t = valid.shape
        cache = allocate_for(self.model.config.text_config, g_b, t + max_new_tokens + extra_slots, self.dtype,
                             self.device)
        eye = torch.eye(t, dtype=torch.bool, device=self.device)
        mask = causal_mask(t, self.device)[None] & (valid[:, None, :] | eye)
        hidden = run_decoder(self.decoder, x, self._positions(valid), cache.attention_mask(mask, t), cache, t)
        cache.commit(t, key_valid=valid)
        return cache, self.guide(hidden if all_positions else hidden[:, -1:])

    @staticmethod
    def _positions(valid: Tensor) -> Tensor:
        """Positions counting valid slots only (transformers' generate with left padding)."""
        return (valid.long().cumsum(1) - 1).clamp_min(0)

    def _shift(self, cache: KVCache) -> Tensor:
        """[G*B] how far each row's positions lag its slots: its prompt padding."""
        return (~cache.valid[:, :self.prefix_len]).sum(1)

    @torch.no_grad()
    def extend(self, cache: KVCache, tokens: Tensor, block_mask: Tensor | None = None, depths: Tensor | None = None,
               rows: Sequence[int] | None = None, positions: Tensor | None = None,
               slot_positions: Tensor | None = None) -> TargetOutput:
        """As LlamaGenTarget.extend: new tokens [B, T] after each row's committed part, KV written, not committed."""
        if rows is not None:
            cache = cache.rows(self.group_rows(cache.batch // self.groups, [int(r) for r in rows]))
        b, t = tokens.shape
        if block_mask is None:
            block_mask = causal_mask(t, tokens.device).expand(b, t, t)
        if depths is None:
            depths = torch.arange(t, device=tokens.device).expand(b, t)
        shift = self._shift(cache)[:, None]
        if positions is None:
            pos = cache.length[:, None] + depths.repeat(self.groups, 1) - shift
        else:
            pos = positions.repeat(self.groups, 1) - shift
        upto = cache.longest + t
        visible = None
        if slot_positions is not None:
            slots = slot_positions.repeat(self.groups, 1)[:, :upto] - shift
            visible = torch.nn.functional.pad(slots, (0, upto - slots.shape[1]), value=1 << 30)[:, None, :] < pos[:, :, None]
        mask = cache.attention_mask(block_mask.repeat(self.groups, 1, 1), upto, visible)
        hidden = run_decoder(self.decoder, self.embed_tokens(tokens.repeat(self.groups, 1)), pos, mask, cache, upto)
        return self.guide(hidden)

    def commit(self, cache: KVCache, num_new: int | Tensor) -> None:
        if isinstance(num_new, Tensor):
            num_new = num_new.repeat(self.groups)
        cache.commit(num_new)

    # ---- training ----------------------------------------------------------------------------------
    def hidden_states(self, c: Condition, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Features [G*B, P+N-1, D] at every input position and which are attendable keys (no cache)."""
        x, valid = self._prefix(c)
        x = torch.cat([x, self.embed_tokens(tokens[:, :-1].to(self.device).repeat(self.groups, 1)).to(x.dtype)], 1)
        keys = torch.cat([valid, valid.new_ones(valid.shape[0], tokens.shape[1] - 1)], 1)
        total = x.shape[1]
        mask = causal_mask(total, x.device)[None] & (keys[:, None, :] | torch.eye(total, dtype=torch.bool, device=x.device))
        return run_decoder(self.decoder, x, self._positions(keys), mask), keys

    def teacher_forced(self, c: Condition, tokens: Tensor) -> TargetOutput:
        hidden, _ = self.hidden_states(c, tokens)
        return self.guide(hidden[:, self.prefix_len - 1:])

    def decode_images(self, tokens: Tensor) -> Tensor:
        """Image tokens [B, N] -> pixels [B, 3, H, W] in [-1, 1] through Janus's VQ-VAE."""
        return self.model.model.vqmodel.decode(tokens.to(self.device)).clamp(-1, 1)


def tiny_janus_model(seed: int = 0, scale: float = 0.2):
    """A tiny random JanusForConditionalGeneration built locally (tests, CI): a 2-layer Llama of width 32,
    4 x 4 image tokens of 64 codes, a 2-level VQ-VAE. Weights are drawn with std `scale` (transformers'
    0.02 makes a model whose greedy image is one repeated code: useless for parity tests)."""
    from transformers import (JanusConfig, JanusForConditionalGeneration, JanusVisionConfig, JanusVQVAEConfig,
                              LlamaConfig)

    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=100, max_position_embeddings=256)
    vision = JanusVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=64,
                               patch_size=16, num_image_tokens=16, projection_dim=32, depth=1)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32,
                          channel_multiplier=[1, 1], num_res_blocks=1, projection_dim=32, image_token_embed_dim=32,
                          num_hidden_layers=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(JanusConfig(text_config=text, vision_config=vision, vq_config=vq))
        for name, p in model.named_parameters():
            if p.ndim == 2 and not name.startswith("model.vision_model"):
                p.data.normal_(0.0, scale)
    gen = model.generation_config
    gen.bos_token_id, gen.pad_token_id, gen.generation_kwargs = 1, 0, {"boi_token_id": 2}
    return model.eval()


def load_janus(folder: str | None = None, tiny_random: bool = False, seed: int = 0, cfg_scale: float = 5.0,
               max_prompt: int = 64) -> JanusTarget:
    """A Janus-Pro target from a local transformers folder (Janus-Pro-1B / 7B saved by save_pretrained), or
    with `tiny_random` a tiny random one. A folder that is not a Janus model fails naming what it holds."""
    if tiny_random:
        return JanusTarget(tiny_janus_model(seed), cfg_scale, max_prompt=max_prompt)
    from pathlib import Path

    config = Path(folder or "") / "config.json"
    if not config.is_file():
        raise ValueError(f"target folder {folder!r} holds no config.json: a Janus-Pro model saved by transformers "
                         f"(JanusForConditionalGeneration.save_pretrained) is expected there")
    import json

    kind = json.loads(config.read_text()).get("model_type")
    if kind != "janus":
        raise ValueError(f"target folder {folder} holds a {kind!r} model; this target config expects a Janus-Pro "
                         f"model (model_type 'janus')")
    from transformers import JanusForConditionalGeneration

    return JanusTarget(JanusForConditionalGeneration.from_pretrained(folder), cfg_scale, max_prompt=max_prompt)
