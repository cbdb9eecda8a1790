"""Run a transformers decoder over this project's KV cache (decode.core.cache.KVCache).

transformers' attention layers write and read keys and values through one call,
`cache.update(key_states, value_states, layer_idx, ...)`, and take a prepared 4-D attention mask as
is. So a transformers decoder (Llama inside Janus-Pro, Chameleon) can verify a draft tree with the
engine's own cache: the bridge writes each layer's new keys to the pass's slots and hands back the
row's keys up to `upto`; the mask (ancestry within the tree, committed slots before it) comes from
`KVCache.attention_mask`. Accepted slots are then compacted by the engine like the LlamaGen target's.
"""
from __future__ import annotations

import torch
from torch import Tensor

from decode.core.cache import KVCache


class CacheBridge:
    """One pass's view of a KVCache, in the shape of transformers' `Cache.update`."""

    def __init__(self, cache: KVCache, slots: Tensor, upto: int):
        self.cache, self.slots, self.upto = cache, slots, upto

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Write k, v [B, Hkv, T, Dh] to this pass's slots; return the keys and values [B, Hkv, upto, Dh]."""
        kv = self.cache.layer(layer_idx, self.slots)
        kv.write(key_states, value_states)
        return kv.read(self.upto)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.upto


def allocate_for(text_config, batch: int, max_len: int, dtype: torch.dtype, device) -> KVCache:
    """A KVCache sized for a transformers decoder config (its layers, key/value heads and head size)."""
    heads = text_config.num_key_value_heads or text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return KVCache.allocate(num_layers=text_config.num_hidden_layers, batch=batch, num_heads=heads,
                            head_dim=head_dim, max_len=max_len, dtype=dtype, device=device)


def run_decoder(decoder, x: Tensor, positions: Tensor, mask: Tensor, cache: KVCache | None = None,
                upto: int = 0) -> Tensor:
    """decoder (a transformers base model with `inputs_embeds`) over embeddings x [B, T, D] at
    `positions` [B, T] with a boolean mask [B, T, S] (True: may attend) -> final-norm features
    [B, T, D]. With `cache`, the new keys go to its next slots and S = upto; without, S = T."""
    bridge = CacheBridge(cache, cache.new_slots(x.shape[1]), upto) if cache is not None else None
    # transformers passes a 4-D mask through as given; only sdpa reads a boolean one, eager attention adds
    # it to the scores: an additive mask (0 where allowed, the dtype's minimum elsewhere) is right for both
    additive = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, torch.finfo(x.dtype).min)
    out = decoder(inputs_embeds=x, attention_mask=additive[:, None], position_ids=positions, cache=bridge,
                  use_cache=bridge is not None)
    return out.last_hidden_state
