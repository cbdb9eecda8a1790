"""Janus-Pro target adapter over transformers' `JanusForConditionalGeneration` (not a copy of it).

Janus's quirks live here: image tokens enter through its generation embeddings and aligner and leave
through its generation head (not the text vocabulary); the prompt is its chat format ending in the
begin-of-image token; CFG doubles the batch with an unconditional prompt whose tokens are all padding
but BOS and begin-of-image, combined as uncond + s (cond - uncond) (its `generate`; s = 5 as published);
24 x 24 tokens for 384 px, decoded by its VQ-VAE. The shared machinery: decode.models.target.hf_target.

Conditions are token ids: `Condition(cond=[B, T] prompt ids ending in begin-of-image, mask=[B, T])`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from decode.models.target.hf_target import ConfigView, HFTarget


class JanusTarget(HFTarget):
    def __init__(self, model, cfg_scale: float = 5.0, three_way: bool = False, max_prompt: int = 64):
        self.model = model.eval()
        self.decoder, self.text_config = model.model.language_model, model.config.text_config
        self.cfg_scale, self.three_way = float(cfg_scale), three_way
        self._check_guidance()
        gen = model.generation_config
        self.bos, self.pad = gen.bos_token_id, gen.pad_token_id
        self.boi = (gen.generation_kwargs or {}).get("boi_token_id")
        if None in (self.bos, self.pad, self.boi):
            raise ValueError("a Janus model's generation_config needs bos_token_id, pad_token_id and "
                             "generation_kwargs.boi_token_id (the unconditional prompt keeps BOS and begin-of-image)")
        self.prompt_end = (self.boi,)
        self.config = ConfigView("t2i", model.config.vq_config.num_embeddings,
                                 model.config.vision_config.num_image_tokens, max_prompt,
                                 model.config.text_config.hidden_size)

    def with_cfg_scale(self, cfg_scale: float) -> "JanusTarget":
        return JanusTarget(self.model, cfg_scale, max_prompt=self.prefix_len)

    def with_refined_prompts(self) -> "JanusTarget":
        return JanusTarget(self.model, self.cfg_scale, three_way=True, max_prompt=self.prefix_len)

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """Image tokens [...] -> the decoder's input embeddings [..., D] (generation embeddings + aligner)."""
        return self.model.prepare_embeddings_for_image_generation(tokens)

    def fingerprint_weights(self) -> tuple[Tensor, Tensor]:
        return self.model.model.generation_head.vision_head.weight, self.model.model.generation_embeddings.weight

    def image_logits(self, h: Tensor, next_index: Tensor | None) -> Tensor:
        return self.model.model.generation_head(h)

    def unconditional(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return torch.where((ids == self.bos) | (ids == self.boi), ids, torch.full_like(ids, self.pad)), mask

    def decode_images(self, tokens: Tensor) -> Tensor:
        """Image tokens [B, N] -> pixels [B, 3, H, W] in [-1, 1] through Janus's VQ-VAE."""
        return self.model.model.vqmodel.decode(tokens.to(self.device)).clamp(-1, 1)
def tiny_janus_model(seed: int = 0, scale: float = 0.2):
    """A tiny random JanusForConditionalGeneration built locally (tests, CI): a 2-layer Llama of width 32,
    4 x 4 image tokens of 64 codes, a VQ-VAE of 64 px images (16x down). Weights are drawn with std `scale` (transformers'
    0.02 makes a model whose greedy image is one repeated code: useless for parity tests)."""
    from transformers import (JanusConfig, JanusForConditionalGeneration, JanusVisionConfig, JanusVQVAEConfig,
                              LlamaConfig)

    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=100, max_position_embeddings=256)
    vision = JanusVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=64,
                               patch_size=16, num_image_tokens=16, projection_dim=32, depth=1)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32,
                          channel_multiplier=[1, 1, 1, 1, 1], num_res_blocks=1, projection_dim=32, image_token_embed_dim=32,
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
        return JanusTarget(tiny_janus_model(seed).requires_grad_(False), cfg_scale, max_prompt=max_prompt)
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

    model = JanusForConditionalGeneration.from_pretrained(folder).requires_grad_(False)
    return JanusTarget(model, cfg_scale, max_prompt=max_prompt)
