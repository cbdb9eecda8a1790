"""The part of a transformers-backed target adapter that every family shares (Janus-Pro, Chameleon /
Lumina-mGPT): the prompt as token ids left-padded to `prefix_len`, guidance groups, the prefill, cached
passes over new tokens or a draft tree through decode.models.target.hf_bridge, teacher forcing.

A family says how image tokens go in (`embed_tokens`) and come out (`image_logits`: [G, B, T, V] from
features, given which image index each position predicts, so a family can force structure tokens), and
what its unconditional prompt is. Positions count valid prompt slots only, as transformers' generate
does with left padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from decode.core.cache import KVCache
from decode.models.target.guidance import Guided
from decode.models.target.hf_bridge import allocate_for, run_decoder
from decode.models.target.llamagen import Condition, SizedByConfig, TargetOutput, causal_mask


@dataclass(frozen=True)
class ConfigView:
    """What the engine and the CLI read of a target's config (LlamaGen's GPTConfig has these fields)."""
    model_type: str
    vocab_size: int
    block_size: int
    cls_token_num: int
    dim: int


class HFTarget(Guided, SizedByConfig):
    model = None          # the transformers model
    decoder = None        # its base decoder (inputs_embeds, 4-D mask, position_ids, cache)
    text_config = None
    config: ConfigView
    pad: int = 0
    draws_images = True   # False: the family's VQ decoder is not in transformers (tokenizer=own refuses it)

    # ---- a family's part -----------------------------------------------------------------------
    def embed_tokens(self, tokens: Tensor) -> Tensor:
        raise NotImplementedError

    def image_logits(self, h: Tensor, next_index: Tensor | None) -> Tensor:
        """Features [G, B, T, D] -> logits [G, B, T, V] over the engine's image vocabulary; `next_index`
        [G, B, T] the image index each position predicts (None: unknown, a drafter's features)."""
        raise NotImplementedError

    def unconditional(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    # ---- the contract's facts ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    def to(self, device=None, dtype=None) -> "HFTarget":
        self.model.to(device=device, dtype=dtype)
        return self

    def codebook(self) -> Tensor:
        """[V, d] the rows LANTERN's neighbourhoods and VVS's path similarity compare (the VQ codebook)."""
        return self.model.model.vqmodel.quantize.embedding.weight.detach()

    takes_prompt_ids = True

    def with_cfg_scale(self, cfg_scale: float) -> "HFTarget":
        """The same model at another guidance scale (training runs unguided, its checks guided)."""
        raise NotImplementedError

    def logits(self, h: Tensor) -> Tensor:
        """Features [..., D] -> one group's logits [..., V], no structure forced (a drafter's loss)."""
        return self.image_logits(h, None)

    def null_condition(self, c: Condition, drop: Tensor) -> Condition:
        """`c` with the rows where `drop` [B] is set replaced by the unconditional prompt (CFG training rows)."""
        mask = c.mask if c.mask is not None else torch.ones_like(c.cond, dtype=torch.bool)
        ids, null_mask = self.unconditional(c.cond, mask)
        return Condition(torch.where(drop[:, None].to(ids.device), ids, c.cond),
                         torch.where(drop[:, None].to(mask.device), null_mask, mask))

    def tokens_from_codes(self, codes: Tensor) -> Tensor:
        """VQ codes [B, h*w] -> this target's image tokens."""
        return codes

    def encode_images(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> VQ codes [B, h*w] by the family's own VQ encoder."""
        out = self.model.model.vqmodel.encode(images.to(self.device, self.dtype))
        return out.image_tokens.view(images.shape[0], -1)

    def drafter_dims(self) -> dict:
        """An EAGLE drafter's shape for this target (decode.models.drafter.DrafterConfig.for_target)."""
        tc = self.text_config
        return dict(dim=tc.hidden_size, n_head=tc.num_attention_heads, n_kv_head=tc.num_key_value_heads,
                    vocab_size=self.vocab_size, block_size=self.num_image_tokens, cls_token_num=self.prefix_len,
                    multiple_of=64, ffn_dim_multiplier=None, rope_base=10000.0, norm_eps=tc.rms_norm_eps)

    def fingerprint_weights(self) -> tuple[Tensor, Tensor]:
        """The weights a drafter reads through this target: its image head and image embedding."""
        raise NotImplementedError

    def guide(self, hidden: Tensor, next_index: Tensor | None = None) -> TargetOutput:
        """hidden [G*B, T, D] -> guided logits [B, T, V] and hidden as [G, B, T, D]."""
        h = hidden.view(self.groups, -1, *hidden.shape[1:])
        index = None if next_index is None else next_index.view(self.groups, -1, *next_index.shape[1:])
        return TargetOutput(logits=self.combine(self.image_logits(h, index).float()), hidden=h)

    # ---- the prompt ------------------------------------------------------------------------------
    def _prefix(self, c: Condition) -> tuple[Tensor, Tensor]:
        """Prompt embeddings [G*B, P, D] and valid slots [G*B, P], left-padded to P = prefix_len."""
        mask = c.mask if c.mask is not None else torch.ones_like(c.cond, dtype=torch.bool)
        self._check_prompt_end(c.cond, mask)
        groups = [(c.cond, mask)]
        if self.guided:
            groups.append(self.unconditional(c.cond, mask))
        if self.three_way:
            if c.refined is None:
                raise ValueError("3-way guidance needs refined prompts in the condition")
            refined_mask = c.refined_mask if c.refined_mask is not None else torch.ones_like(c.refined, dtype=torch.bool)
            self._check_prompt_end(c.refined, refined_mask)
            groups.append((c.refined, refined_mask))
        ids = torch.cat([self._padded(x, self.pad) for x, _ in groups]).to(self.device)
        valid = torch.cat([self._padded(m.bool(), False) for _, m in groups]).to(self.device)
        return self.model.get_input_embeddings()(ids), valid

    prompt_end: tuple[int, ...] = ()  # the ids every prompt ends in (the family's image header)

    def _check_prompt_end(self, ids: Tensor, mask: Tensor) -> None:
        """Prompts (left-padded) must end in the family's image header: without it the model is asked to
        continue text, and CFG's unconditional prompt (which keeps the header) would be wrong."""
        k = len(self.prompt_end)
        if not k:
            return
        end = torch.tensor(self.prompt_end, dtype=ids.dtype, device=ids.device)
        tail, valid = ids[:, -k:], mask[:, -k:].bool()
        bad = [r for r in range(ids.shape[0]) if ids.shape[1] < k or not (valid[r].all() and torch.equal(tail[r], end))]
        if bad:
            raise ValueError(f"{type(self).__name__}: prompt ids must end in the image header {list(self.prompt_end)}; "
                             f"row {bad[0]} ends in {ids[bad[0], -k:].tolist()} (set the prompt encoder's "
                             f"text_encoder.suffix or template to end in it)")

    def _padded(self, x: Tensor, fill) -> Tensor:
        if x.ndim != 2 or x.shape[1] > self.prefix_len:
            raise ValueError(f"a {type(self).__name__} condition is [B, T <= {self.prefix_len}] prompt token ids, "
                             f"got {list(x.shape)}")
        return torch.cat([torch.full((x.shape[0], self.prefix_len - x.shape[1]), fill, dtype=x.dtype), x.cpu()], 1)

    @staticmethod
    def _positions(valid: Tensor) -> Tensor:
        return (valid.long().cumsum(1) - 1).clamp_min(0)

    def _prompt_valid(self, cache: KVCache) -> Tensor:
        """[G*B] valid prompt slots per row (positions of image tokens start there)."""
        return cache.valid[:, :self.prefix_len].sum(1)

    # ---- decoding ----------------------------------------------------------------------------------
    @torch.no_grad()
    def start(self, c: Condition, max_new_tokens: int, extra_slots: int = 0, all_positions: bool = False,
              image_prefix: Tensor | None = None) -> tuple[KVCache, TargetOutput]:
        """Prefill the prompt (and `image_prefix` [B, k], image tokens already decided) in one pass."""
        k = 0 if image_prefix is None else image_prefix.shape[1]
        if k + max_new_tokens > self.num_image_tokens:
            raise ValueError(f"{k} given + {max_new_tokens} new image tokens requested, the target makes "
                             f"{self.num_image_tokens}")
        x, valid = self._prefix(c)
        if k:
            x = torch.cat([x, self.embed_tokens(image_prefix.to(self.device).repeat(self.groups, 1)).to(x.dtype)], 1)
            valid = torch.cat([valid, valid.new_ones(valid.shape[0], k)], 1)
        g_b, t = valid.shape
        cache = allocate_for(self.text_config, g_b, t + max_new_tokens + extra_slots, self.dtype, self.device)
        mask = causal_mask(t, self.device)[None] & (valid[:, None, :] | torch.eye(t, dtype=torch.bool, device=self.device))
        pos = self._positions(valid)
        hidden = run_decoder(self.decoder, x, pos, cache.attention_mask(mask, t), cache, t)
        cache.commit(t, key_valid=valid)
        index = pos - valid[:, :self.prefix_len].sum(1, keepdim=True) + 1
        if not all_positions:
            hidden, index = hidden[:, -1:], index[:, -1:]
        return cache, self.guide(hidden, index)

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
        shift = (self.prefix_len - self._prompt_valid(cache))[:, None]  # prompt padding: slots ahead of positions
        slot = cache.length[:, None] + depths.repeat(self.groups, 1) if positions is None else positions.repeat(self.groups, 1)
        pos = slot - shift
        upto = cache.longest + t
        visible = None
        if slot_positions is not None:
            slots = slot_positions.repeat(self.groups, 1)[:, :upto]
            visible = F.pad(slots, (0, upto - slots.shape[1]), value=1 << 30)[:, None, :] < slot[:, :, None]
        mask = cache.attention_mask(block_mask.repeat(self.groups, 1, 1), upto, visible)
        hidden = run_decoder(self.decoder, self.embed_tokens(tokens.repeat(self.groups, 1)), pos, mask, cache, upto)
        return self.guide(hidden, slot - self.prefix_len + 1)

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
        n = tokens.shape[1]
        index = torch.arange(n, device=hidden.device).expand(hidden.shape[0], n)
        return self.guide(hidden[:, self.prefix_len - 1:], index)


class OwnTokenizer:
    """A transformers target's own VQ decoder in the place of the run's tokenizer (`tokenizer=own`):
    what the pipeline and LANTERN / VVS read of a tokenizer (codes to pixels, the codebook rows)."""

    @dataclass(frozen=True)
    class _Config:
        codebook_size: int
        downsample: int
        family: str

        def to_dict(self) -> dict:
            return dict(self.__dict__)

    def __init__(self, target: HFTarget):
        self.target = target
        mult = target.model.config.vq_config.channel_multiplier
        self.config = self._Config(target.vocab_size, 2 ** (len(mult) - 1), type(target).__name__)
        self.codebook = target.codebook()

    def decode_codes(self, tokens: Tensor) -> Tensor:
        return self.target.decode_images(tokens)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> codes [B, h*w] (code shards for this target)."""
        return self.target.encode_images(images)

    @property
    def quantize(self):
        from types import SimpleNamespace

        return SimpleNamespace(embedding=SimpleNamespace(weight=self.codebook))

    def parameters(self):
        return iter([self.codebook])

    def to(self, device):
        self.codebook = self.codebook.to(device)
        return self
