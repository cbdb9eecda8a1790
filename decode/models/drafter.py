"""The EAGLE-style drafter (docs/algorithms.md 6): `fc([E(token) ; f])`, then one decoder layer (the
count configurable) with the target's 2D RoPE; the output is the predicted next target feature,
read out through the target's frozen LM head.

Sequence convention (EAGLE's one-step shift). Drafter position i holds the target's feature
h_i (post-final-norm hidden at target position i) and the token at target position i + 1, and
predicts h_{i+1}. The target's prefix has P slots (caption or class), so drafter positions
0 .. P-2 are prefix slots and drafter position P-1+j holds image token j; the drafter's RoPE
table therefore has P-1 zero prefix rows (LANTERN's `cls_token_num = 119` for P = 120).

The token embedding and the LM head are the target's, frozen and never copied: callers pass
token embeddings in (`target.gpt.embed_tokens`) and read logits out (`target.gpt.logits`). A
drafter folder stores only its own weights plus a fingerprint of the target it was trained for.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from decode.core.cache import KVCache
from decode.models.checkpoint import (
    CheckpointError,
    FolderConfig,
    fingerprint_matches,
    load_state_dict_strict,
    read_model_folder,
    save_model_folder,
    weights_fingerprint,
)
from decode.models.target.llamagen_gpt import BlockStack, GPTConfig, LlamaGenGPT, TransformerBlock, rope_table_2d

KIND = "eagle_drafter"


@dataclass(frozen=True)
class DrafterConfig(FolderConfig):
    dim: int
    n_head: int
    vocab_size: int
    block_size: int            # image tokens of the target
    cls_token_num: int         # the TARGET's prefix slots P; the drafter's RoPE prefix is P - 1
    n_layer: int = 1
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    bias: bool = True          # of fc (EAGLE: bias unless the config says otherwise)
    prefix_token: int | None = None  # token embedded at the prefix slots: None zeros (ours); 0 for
                                     # imported LANTERN drafters, which were trained with token 0 there
    target_fingerprint: str = ""

    @classmethod
    def for_target(cls, gpt, n_layer: int = 1, **overrides) -> "DrafterConfig":
        """The drafter's shape for a LlamaGen GPT, or for a target adapter that says it (`drafter_dims`:
        the transformers targets), with `overrides`."""
        if hasattr(gpt, "drafter_dims"):
            base = {**gpt.drafter_dims(), "n_layer": n_layer}
        else:
            c = gpt.config
            base = dict(dim=c.dim, n_head=c.n_head, vocab_size=c.vocab_size, block_size=c.block_size,
                        cls_token_num=c.cls_token_num, n_layer=n_layer, n_kv_head=c.n_kv_head,
                        multiple_of=c.multiple_of, ffn_dim_multiplier=c.ffn_dim_multiplier, rope_base=c.rope_base,
                        norm_eps=c.norm_eps)
        if "target_fingerprint" not in overrides:  # given: e.g. a target on the meta device, which has no values
            base["target_fingerprint"] = target_fingerprint(gpt)
        return cls(**{**base, **overrides})

    def layer_config(self) -> GPTConfig:
        """The GPTConfig the decoder layers are built from (same layer code as the target)."""
        return GPTConfig(dim=self.dim, n_layer=self.n_layer, n_head=self.n_head, n_kv_head=self.n_kv_head,
                         multiple_of=self.multiple_of, ffn_dim_multiplier=self.ffn_dim_multiplier,
                         rope_base=self.rope_base, norm_eps=self.norm_eps, vocab_size=self.vocab_size,
                         block_size=math.isqrt(self.block_size) ** 2, cls_token_num=self.cls_token_num - 1)



def target_fingerprint(gpt, legacy: bool = False) -> str:
    """Fingerprint (checkpoint.weights_fingerprint) of the target's LM head and token embedding: the parts
    the drafter reads (a target adapter names them with `fingerprint_weights`)."""
    weights = gpt.fingerprint_weights() if hasattr(gpt, "fingerprint_weights") else (gpt.output.weight,
                                                                                      gpt.tok_embeddings.weight)
    return weights_fingerprint(((str(tuple(w.shape)), w) for w in weights), legacy=legacy)


class Drafter(BlockStack, nn.Module):
    def __init__(self, cfg: DrafterConfig, rope_extra: int = 32):
        super().__init__()
        self.config = cfg
        layer_cfg = cfg.layer_config()
        self.fc = nn.Linear(2 * cfg.dim, cfg.dim, bias=cfg.bias)
        self.layers = nn.ModuleList(TransformerBlock(layer_cfg) for _ in range(cfg.n_layer))
        # EAGLE: the first layer has no input norm (its input is fc's output, not a residual stream)
        self.layers[0].attention_norm = nn.Identity()
        # a grid that is not square (Lumina-mGPT's rows end in a newline) takes the rest as extra rows: the
        # drafter's own positions, consistent between its training and decoding
        rope_extra += cfg.block_size - layer_cfg.block_size
        rope = rope_table_2d(layer_cfg.grid_size, layer_cfg.head_dim, cfg.rope_base, cfg.cls_token_num - 1,
                             rope_extra)
        self.register_buffer("rope", rope, persistent=False)

    @property
    def prefix_len(self) -> int:
        """Drafter positions before image token 0: the target's prefix slots minus one."""
        return self.config.cls_token_num - 1

    def forward(self, token_emb: Tensor, features: Tensor, positions: Tensor, mask: Tensor,
                cache: KVCache | None = None, offset: int = 0) -> Tensor:
        """Predict next target features.

        Args:
            token_emb: [B, T, D] the target's embeddings of the tokens (zeros at prefix slots).
            features: [B, T, D] target features (or the drafter's own, when drafting deeper).
            positions: [B, T] rows of the drafter's RoPE table.
            mask: [B, T, T] without a cache, [B, T, S] over cache slots with one.
            cache: the drafter's own KV cache; new keys go to `cache.new_slots(T, offset)`.
            offset: scratch entries already written past the committed part in this step (tree levels).
        Returns:
            [B, T, D] predicted features h_{i+1} (no final norm: they regress post-norm features).
        """
        x = self.fc(torch.cat([token_emb.to(features.dtype), features], dim=-1))
        rope = self.rope[positions]
        slots = cache.new_slots(x.shape[1], offset) if cache is not None else None
        return self.run_blocks(x, rope, mask, cache, slots)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, static: bool = False) -> KVCache:
        p = self.fc.weight
        lc = self.config.layer_config()
        return self.allocate_cache(static, num_layers=self.config.n_layer, batch=batch, num_heads=lc.kv_heads,
                                   head_dim=lc.head_dim, max_len=max_len, dtype=dtype or p.dtype, device=p.device)


@dataclass(frozen=True)
class TeacherForced:
    """Drafter inputs from one target pass; T = P + N - 2 drafter positions."""
    token_emb: Tensor   # [B, T, D]
    features: Tensor    # [B, T, D] h_i
    next_features: Tensor  # [B, T, D] h_{i+1}, the regression target
    mask: Tensor        # [B, T, T] causal, caption padding masked (the diagonal always on)
    loss_mask: Tensor   # [B, T] positions whose next feature predicts an image token (i >= P - 1)


def prefix_embedding(gpt: LlamaGenGPT, prefix_token: int | None, like: Tensor) -> Tensor:
    """What the drafter sees as the token at prefix slots, shaped and typed like `like` [..., D]:
    zeros, or the embedding of `prefix_token` (an imported LANTERN drafter's token 0)."""
    if prefix_token is None:
        return torch.zeros_like(like)
    emb = gpt.embed_tokens(torch.tensor([prefix_token], device=like.device))[0]
    return emb.to(like.dtype).expand_as(like).clone()


def drafter_inputs(gpt: LlamaGenGPT, tokens: Tensor, hidden: Tensor, valid: Tensor,
                   prefix_token: int | None = None) -> TeacherForced:
    """Teacher-forced drafter inputs from one target pass (`LlamaGenTarget.hidden_states`).

    Args:
        tokens: [B, N] image tokens.
        hidden: [B, P + N - 1, D] target features at every position of the target's input
            (prefix slots, then image tokens 0 .. N-2).
        valid: [B, P + N - 1] attendable positions (caption padding is not).
    Position i pairs h_i with the token at target position i+1 and is trained towards h_{i+1}.
    """
    b, n = tokens.shape
    prefix = hidden.shape[1] - n + 1  # P
    # Prefix slots carry no token: a zero embedding by default (the official code feeds token id 0
    # there, which also stands for a real code; DrafterConfig.prefix_token=0 does the same).
    emb = torch.cat([prefix_embedding(gpt, prefix_token, hidden.new_empty(b, prefix - 1, hidden.shape[-1])),
                     gpt.embed_tokens(tokens[:, :-1]).to(hidden.dtype)], dim=1)
    t = emb.shape[1]
    eye = torch.eye(t, dtype=torch.bool, device=hidden.device)
    mask = torch.ones(t, t, dtype=torch.bool, device=hidden.device).tril()[None] & (valid[:, None, :t] | eye)
    loss_mask = (torch.arange(t, device=hidden.device) >= prefix - 1)[None].expand(b, t)
    return TeacherForced(emb, hidden[:, :-1], hidden[:, 1:], mask, loss_mask)


def save_drafter(folder: str | Path, drafter: Drafter, extra: dict | None = None) -> Path:
    return save_model_folder(folder, drafter, drafter.config.to_dict(), kind=KIND, extra=extra)


def check_fits(cfg: DrafterConfig, gpt: LlamaGenGPT, source: str) -> None:
    """A drafter that does not fit its target fails here, before any work, with what differs."""
    t = gpt.config
    for name, mine, theirs in (("dim (hidden size)", cfg.dim, t.dim), ("vocab_size", cfg.vocab_size, t.vocab_size),
                               ("block_size", cfg.block_size, t.block_size),
                               ("cls_token_num", cfg.cls_token_num, t.cls_token_num)):
        if mine != theirs:
            raise CheckpointError(f"{source}: drafter {name} is {mine} but the target's is {theirs}: "
                                  f"this drafter was trained for another target")
    fingerprint = functools.partial(target_fingerprint, gpt)
    if cfg.target_fingerprint and not fingerprint_matches(cfg.target_fingerprint, fingerprint):
        raise CheckpointError(f"{source}: drafter was trained for a target with fingerprint "
                              f"{cfg.target_fingerprint}, this target's LM head and embedding give {fingerprint()}")


def load_drafter(folder: str | Path, gpt: LlamaGenGPT) -> Drafter:
    meta, state = read_model_folder(folder, kind=KIND)
    cfg = DrafterConfig.from_dict(meta["config"])
    check_fits(cfg, gpt, str(folder))
    drafter = Drafter(cfg)
    load_state_dict_strict(drafter, state, source=str(folder))
    if hasattr(gpt, "drafter_dims"):  # a target adapter
        return drafter.to(device=gpt.device, dtype=gpt.dtype).eval()
    return drafter.to(device=gpt.output.weight.device, dtype=gpt.output.weight.dtype).eval()
