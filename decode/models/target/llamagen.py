"""LlamaGen target adapter: the only place that knows about CFG batch doubling, the learned null
caption / null class, the caption padding mask and LlamaGen's prefix layout.

The engine and the drafter see a target through this small surface: `start` (prefill),
`extend` (a forward over new tokens: one token, a chain, or a whole draft tree with its mask and
depths), `commit`, and `teacher_forced` for training. Logits come back CFG-combined; hidden
states come back for both CFG halves, because the drafter runs on CFG pairs like LANTERN.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from decode.core.cache import KVCache, pad_block
from decode.models.target.guidance import Guided
from decode.models.target.llamagen_gpt import LlamaGenGPT


@dataclass(frozen=True)
class Condition:
    """What one batch of images is conditioned on, before CFG doubling."""

    cond: Tensor  # t2i: [B, Tc, C] left-padded caption features (padding rows zero); c2i: [B] class ids
    mask: Tensor | None = None  # t2i: [B, Tc] bool, True for valid caption slots; None = all valid
    refined: Tensor | None = None       # GridAR's reformulated prompts, like `cond` (3-way guidance only)
    refined_mask: Tensor | None = None  # like `mask`, for `refined`

    @property
    def batch(self) -> int:
        return self.cond.shape[0]


@dataclass(frozen=True)
class TargetOutput:
    logits: Tensor  # [B, T, V] float32, CFG already applied
    hidden: Tensor  # [G, B, T, D] post-final-norm features; G = 2 under CFG (cond, null), else 1


class SizedByConfig:
    """The contract's sizes, read from a LlamaGen-shaped `config` (GPTConfig, or an HF target's ConfigView)."""

    @property
    def prefix_len(self) -> int:
        return self.config.cls_token_num

    @property
    def num_image_tokens(self) -> int:
        return self.config.block_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.config.dim


def causal_mask(t: int, device: torch.device | str = "cpu") -> Tensor:
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


class LlamaGenTarget(Guided, SizedByConfig):
    """A LlamaGen GPT with classifier-free guidance, ready for cached decoding."""

    def __init__(self, gpt: LlamaGenGPT, cfg_scale: float = 1.0, three_way: bool = False):
        self.gpt = gpt
        self.cfg_scale = float(cfg_scale)
        self.three_way = three_way  # a third group, the refined prompt (decode.core.sampling.cfg_three_way)
        self._check_guidance()

    def with_refined_prompts(self) -> "LlamaGenTarget":
        """The same model with GridAR's 3-way guidance: conditions then carry `refined` prompts, and every
        pass runs three groups (cond, null, refined) and combines them (the drafter runs on all three)."""
        return LlamaGenTarget(self.gpt, self.cfg_scale, three_way=True)

    @property
    def config(self):
        return self.gpt.config

    @property
    def device(self) -> torch.device:
        return self.gpt.output.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.gpt.output.weight.dtype

    def to(self, device=None, dtype=None) -> "LlamaGenTarget":
        self.gpt.to(device=device, dtype=dtype)
        return self

    takes_prompt_ids = False  # conditions are caption features (or class ids), not prompt token ids

    def with_cfg_scale(self, cfg_scale: float) -> "LlamaGenTarget":
        return LlamaGenTarget(self.gpt, cfg_scale)

    def logits(self, h: Tensor) -> Tensor:
        """Features [..., D] -> one group's logits [..., V] (a drafter's loss reads the target's head)."""
        return self.gpt.logits(h)

    def null_condition(self, c: Condition, drop: Tensor) -> Condition:
        """`c` with the rows where `drop` [B] is set replaced by the null caption (CFG training rows)."""
        null = self.gpt.cls_embedding.uncond_embedding[None].to(c.cond.dtype)
        return Condition(torch.where(drop[:, None, None], null, c.cond), c.mask)

    def tokens_from_codes(self, codes: Tensor) -> Tensor:
        """VQ codes [B, h*w] -> this target's image tokens (LlamaGen: the codes themselves)."""
        return codes

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """Image tokens [...] -> the target's input embeddings [..., D] (a drafter's token input)."""
        return self.gpt.embed_tokens(tokens)

    # ---- condition handling (CFG doubling, padding) -------------------------------------------
    def _check_condition(self, c: Condition) -> None:
        cfg = self.config
        if cfg.model_type == "t2i":
            if c.cond.ndim != 3 or c.cond.shape[1:] != (cfg.cls_token_num, cfg.caption_dim):
                raise ValueError(f"t2i condition must be [B, {cfg.cls_token_num}, {cfg.caption_dim}] caption "
                                 f"features, got {list(c.cond.shape)}")
        elif c.cond.ndim != 1:
            raise ValueError(f"c2i condition must be [B] class ids, got {list(c.cond.shape)}")

    def _prefix(self, c: Condition) -> tuple[Tensor, Tensor]:
        """Prefix embeddings [G*B, Tc, D] and valid mask [G*B, Tc]: cond rows first, then null rows."""
        self._check_condition(c)
        cond = c.cond.to(self.device)
        if c.cond.is_floating_point():
            cond = cond.to(self.gpt.output.weight.dtype)
        mask = self._mask(c.mask, cond)
        if self.guided:
            cond = torch.cat([cond, self.gpt.null_cond(c.batch, self.device).to(cond.dtype)])
            mask = torch.cat([mask, mask])  # the caption's padding mask applies to the null half too
        if self.three_way:
            if c.refined is None or c.refined.shape != c.cond.shape:
                raise ValueError(f"3-way guidance needs refined prompts shaped like the condition {list(c.cond.shape)}, "
                                 f"got {None if c.refined is None else list(c.refined.shape)}")
            refined = c.refined.to(device=self.device, dtype=cond.dtype)
            cond, mask = torch.cat([cond, refined]), torch.cat([mask, self._mask(c.refined_mask, refined)])
        return self.gpt.embed_cond(cond), mask

    def _mask(self, mask: Tensor | None, cond: Tensor) -> Tensor:
        if mask is None:
            return torch.ones(cond.shape[0], self.prefix_len, dtype=torch.bool, device=self.device)
        return mask.to(self.device).bool()

    def guide(self, hidden: Tensor) -> TargetOutput:
        """hidden [G*B, T, D] -> CFG-combined logits and hidden as [G, B, T, D] (G: cond, null[, refined])."""
        h = hidden.view(self.groups, -1, *hidden.shape[1:])
        return TargetOutput(logits=self.combine(self.gpt.logits(h)), hidden=h)  # logits [G, B, T, V] combined

    # ---- decoding ---------------------------------------------------------------------------
    @torch.no_grad()
    def start(self, c: Condition, max_new_tokens: int, extra_slots: int = 0, all_positions: bool = False,
              image_prefix: Tensor | None = None, static: bool = False) -> tuple[KVCache, TargetOutput]:
        """Prefill the prefix; returns the cache and the output at the last prefix position (at
        every prefix position with `all_positions`: a drafter's first input).

        `extra_slots` reserves scratch room past the image (a draft tree at the last step).
        `image_prefix` [B, k]: image tokens already decided (GridAR's anchors), prefilled after the
        caption in the same pass; decoding continues at image position k.
        `static`: a static cache (every pass reads all its slots: shapes fixed, see `KVCache.static`).
        """
        k = 0 if image_prefix is None else image_prefix.shape[1]
        if k + max_new_tokens > self.num_image_tokens:
            raise ValueError(f"{k} given + {max_new_tokens} new image tokens requested, the target makes "
                             f"{self.num_image_tokens}")
        x, valid = self._prefix(c)
        if k:
            if image_prefix.shape[0] != c.batch:
                raise ValueError(f"image_prefix has {image_prefix.shape[0]} rows for a batch of {c.batch}")
            x = torch.cat([x, self.gpt.embed_tokens(image_prefix.to(self.device).repeat(self.groups, 1)).to(x.dtype)], 1)
            valid = torch.cat([valid, valid.new_ones(valid.shape[0], k)], 1)
        g_b, t = valid.shape
        cache = self.gpt.new_cache(g_b, t + max_new_tokens + extra_slots, static=static)
        # LlamaGen: padded caption columns are masked, the diagonal is forced to 1
        block = causal_mask(t, self.device)[None] & (valid[:, None, :] | torch.eye(t, dtype=torch.bool,
                                                                                   device=self.device))
        pos = torch.arange(t, device=self.device).expand(g_b, t)
        hidden = self.gpt(x, pos, cache.attention_mask(block, t), cache)
        cache.commit(t, key_valid=valid)
        return cache, self.guide(hidden if all_positions else hidden[:, -1:])

    @torch.no_grad()
    def extend(self, cache: KVCache, tokens: Tensor, block_mask: Tensor | None = None,
               depths: Tensor | None = None, rows: Sequence[int] | None = None,
               positions: Tensor | None = None, slot_positions: Tensor | None = None,
               pad_to: int | None = None) -> TargetOutput:
        """Forward new tokens [B, T] after each row's committed part; KV is written but not committed.

        Args:
            cache: the cache from `start` (rows doubled under CFG).
            tokens: [B, T] token ids.
            block_mask: [B, T, T] bool among the new tokens (default causal; a tree passes ancestry).
            depths: [B, T] position offsets from the row's length (default 0..T-1; a tree passes depth).
            rows: R image rows of the cache to run (host ints; the others skip this pass); tokens,
                block_mask and depths are then those rows' [R, ...], and so is the output.
            positions: [B, T] absolute sequence positions of the new tokens (prefix included), instead of
                the row's length + depths: tokens out of raster order (a wavefront of grid rows).
            slot_positions: [B, S] the absolute position of each committed slot (with `positions`): a new
                token then sees only the committed slots before its own position.
            pad_to: run the pass over this many entries (static shapes), padding after the T new
                tokens; the output is the T tokens' only.
        """
        if rows is not None:
            cache = cache.rows(self.group_rows(cache.batch // self.groups, [int(r) for r in rows]))  # every group
        b, t = tokens.shape
        if block_mask is None:
            block_mask = causal_mask(t, tokens.device).expand(b, t, t)
        if depths is None:
            depths = torch.arange(t, device=tokens.device).expand(b, t)
        if pad_to is not None:
            block_mask, tokens, depths = pad_block(pad_to, block_mask, tokens, depths)
        rep = (self.groups, 1, 1)
        block_mask, depths2 = block_mask.repeat(rep), depths.repeat(self.groups, 1)
        x = self.gpt.embed_tokens(tokens.repeat(self.groups, 1))
        # past the last image position (trees at the final steps) RoPE rows are zero padding
        if positions is None:
            pos = (cache.length[:, None] + depths2).clamp_max(self.gpt.max_positions - 1)
        else:
            pos = positions.repeat(self.groups, 1).clamp_max(self.gpt.max_positions - 1)
        upto = cache.longest + tokens.shape[1]
        visible = None
        if slot_positions is not None:  # [G*B, T, upto]: committed slots at earlier positions only
            slots = slot_positions.repeat(self.groups, 1)[:, :upto]
            visible = F.pad(slots, (0, upto - slots.shape[1]), value=1 << 30)[:, None, :] < pos[:, :, None]
        hidden = self.gpt(x, pos, cache.attention_mask(block_mask, upto, visible), cache)
        return self.guide(hidden if pad_to is None else hidden[:, :t])

    def commit(self, cache: KVCache, num_new: int | Tensor) -> None:
        """Commit the next `num_new` (per image row; best a host tensor) written slots, for both CFG halves."""
        if isinstance(num_new, Tensor):
            num_new = num_new.repeat(self.groups)
        cache.commit(num_new)

    # ---- training ---------------------------------------------------------------------------
    def teacher_forced(self, c: Condition, tokens: Tensor) -> TargetOutput:
        """One full forward without a cache, as in training.

        Returns logits [B, N, V] where row j predicts tokens[:, j] from the prefix and
        tokens[:, :j], and hidden [G, B, N, D] aligned with them (the features whose LM head gives
        those logits: the drafter's targets).
        """
        hidden, _ = self.hidden_states(c, tokens)  # [G*B, P+N-1, D]
        return self.guide(hidden[:, self.prefix_len - 1:])

    def hidden_states(self, c: Condition, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Post-norm features [G*B, P+N-1, D] at every input position (the P prefix slots, then image
        tokens 0 .. N-2; cond rows first, then null rows under CFG) and which of those positions
        are attendable keys [G*B, P+N-1] (caption padding is not). The drafter trains on these."""
        x_prefix, valid = self._prefix(c)
        t = x_prefix.shape[1]
        x = torch.cat([x_prefix, self.gpt.embed_tokens(tokens[:, :-1].repeat(self.groups, 1))], dim=1)
        total = x.shape[1]
        keys = torch.cat([valid, valid.new_ones(valid.shape[0], total - t)], dim=1)
        mask = causal_mask(total, x.device)[None] & (keys[:, None, :] | torch.eye(total, dtype=torch.bool,
                                                                                  device=x.device))
        pos = torch.arange(total, device=x.device).expand(x.shape[0], total)
        return self.gpt(x, pos, mask), keys
