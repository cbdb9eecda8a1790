"""Lumina-mGPT (Chameleon architecture) target adapter over transformers' `ChameleonForConditionalGeneration`.

Lumina-mGPT's quirks live here (shared/spec/ALGORITHMS.md 4):
- Image tokens are BPE ids of the text vocabulary (transformers' `vocabulary_mapping`: code <-> id).
  The engine sees a compact vocabulary: the VQ codes 0 .. C-1, then C = the row-end newline token.
- An image is H rows of W codes, each row ended by the newline: the engine makes H x (W + 1) tokens.
  The target forces the newline where a row ends and forbids it elsewhere (Lumina's logits
  processor); drafts are not forced (a drafter learns the newline from data), the target rejects a
  wrong one. The end-of-image token after the last row is fixed and not generated.
- The prompt ends in the image header: begin-of-image and the two size tokens. CFG's unconditional
  branch sees the header only (Lumina's sequential mode), combined as uncond + s (cond - uncond);
  s = 3 and image top-k 2000 as published.
- transformers ships Chameleon's VQ encoder, not its decoder: pixels need the VQGAN decoder.
Shared machinery (prompt padding, guidance groups, cached tree passes): decode.models.target.hf_target.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from decode.models.target.hf_target import ConfigView, HFTarget

HEADER = 3  # begin-of-image, height token, width token: what the unconditional branch sees
TINY_HEADER = (5, 20, 20)  # the tiny random model's: <boi> and two ids standing for the size


class ChameleonTarget(HFTarget):
    draws_images = False  # transformers ships Chameleon's VQ encoder only
    def __init__(self, model, grid: int, newline_id: int, cfg_scale: float = 3.0, three_way: bool = False,
                 max_prompt: int = 64, header: tuple[int, ...] | None = None):
        """`header`: the prompt's last ids, begin-of-image and the two size tokens (default: Lumina-mGPT's,
        <racm3:break> 8197 then <reserved{8800 + n}> with n = grid // 2, its 32 px patches per side; token
        <reservedN> has id N + 4, as the newline <reserved08799> is 8803)."""
        self.model = model.eval()
        self.prompt_end = tuple(header) if header is not None else (8197, 8804 + grid // 2, 8804 + grid // 2)
        if len(self.prompt_end) != HEADER:
            raise ValueError(f"a Lumina-mGPT image header is {HEADER} ids (begin-of-image, height, width), "
                             f"got {list(self.prompt_end)}")
        self.decoder, self.text_config = model.model, model.config
        self.cfg_scale, self.three_way = float(cfg_scale), three_way
        self._check_guidance()
        mapping = model.model.vocabulary_mapping
        codes = sorted(mapping.img2bpe)
        if codes != list(range(len(codes))):
            raise ValueError("the model's image vocabulary does not map codes 0 .. C-1 to token ids")
        if newline_id in mapping.bpe2img:
            raise ValueError(f"newline_id {newline_id} is an image token; Lumina-mGPT's row end is a text token")
        self.grid, self.newline_id = int(grid), int(newline_id)
        need = max_prompt + self.grid * (self.grid + 1)
        if self.grid < 1 or need > model.config.max_position_embeddings:
            raise ValueError(f"grid {grid} (a {self.grid * 16} px image) needs {need} positions with the prompt; the model "
                             f"was trained for {model.config.max_position_embeddings} (Lumina-mGPT-7B-768: grid 48)")
        self.pad = model.config.pad_token_id or 0
        # columns of the text vocabulary the engine's tokens are: the codes, then the newline
        self.columns = torch.tensor([mapping.img2bpe[c] for c in codes] + [newline_id])
        self.config = ConfigView("t2i", len(codes) + 1, self.grid * (self.grid + 1), max_prompt,
                                 model.config.hidden_size)

    def with_cfg_scale(self, cfg_scale: float) -> "ChameleonTarget":
        return ChameleonTarget(self.model, self.grid, self.newline_id, cfg_scale, False, self.prefix_len,
                               self.prompt_end)

    def tokens_from_codes(self, codes: Tensor) -> Tensor:
        """VQ codes [B, H*W] -> tokens [B, H*(W+1)]: each row ended by the newline."""
        grid = codes.view(codes.shape[0], self.grid, self.grid)
        newline = torch.full((codes.shape[0], self.grid, 1), self.newline, dtype=codes.dtype, device=codes.device)
        return torch.cat([grid, newline], 2).reshape(codes.shape[0], -1)

    def with_refined_prompts(self) -> "ChameleonTarget":
        return ChameleonTarget(self.model, self.grid, self.newline_id, self.cfg_scale, True, self.prefix_len,
                               self.prompt_end)

    @property
    def newline(self) -> int:
        """The newline's index in the engine's vocabulary (the last)."""
        return self.vocab_size - 1

    def fingerprint_weights(self) -> tuple[Tensor, Tensor]:
        cols = self.columns.to(self.device)
        return self.model.lm_head.weight[cols], self.model.get_input_embeddings().weight[cols]

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(self.columns.to(tokens.device)[tokens])

    def image_logits(self, h: Tensor, next_index: Tensor | None) -> Tensor:
        """The LM head's logits at the engine's columns; where the next token's image index is known,
        the newline forced at row ends and forbidden elsewhere."""
        logits = self.model.lm_head(h)[..., self.columns.to(h.device)]  # [G, B, T, V]
        if next_index is None:
            return logits
        row_end = (next_index % (self.grid + 1)) == self.grid  # [G, B, T]
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep[..., :self.newline] = ~row_end[..., None]
        keep[..., self.newline] = row_end
        return logits.masked_fill(~keep, torch.finfo(logits.dtype).min)

    def unconditional(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The same ids, with every slot but the last HEADER (the image header) masked."""
        keep = torch.zeros_like(mask, dtype=torch.bool)
        keep[:, -HEADER:] = True
        return ids, mask.bool() & keep

    def codes(self, tokens: Tensor) -> Tensor:
        """Engine tokens [B, H * (W + 1)] -> VQ codes [B, H * W] (the row-end newlines dropped)."""
        grid = tokens.view(tokens.shape[0], self.grid, self.grid + 1)
        if (grid[:, :, -1] != self.newline).any() or (grid[:, :, :-1] == self.newline).any():
            raise ValueError("tokens break Lumina-mGPT's row structure (a newline ends each row, nowhere else)")
        return grid[:, :, :-1].reshape(tokens.shape[0], -1)

    def codebook(self) -> Tensor:
        """[C + 1, d] the VQ codebook and, for the newline, a row far from every code (never a neighbour)."""
        rows = self.model.model.vqmodel.quantize.embedding.weight.detach()
        far = rows.abs().max() * 1e3 * torch.ones(1, rows.shape[1], dtype=rows.dtype, device=rows.device)
        return torch.cat([rows, far])

    def decode_images(self, tokens: Tensor) -> Tensor:
        raise ValueError("transformers ships Chameleon's VQ encoder only: decoding codes to pixels needs "
                                  "the Chameleon VQGAN decoder, not available here")


def tiny_chameleon_model(seed: int = 0, codes: int = 32, scale: float = 0.2):
    """A tiny random ChameleonForConditionalGeneration (tests, CI): 2 layers of width 32, `codes` image
    tokens at ids 8 .. 8 + codes - 1, a text vocabulary of 128 whose id 4 is the newline."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration, ChameleonVQVAEConfig

    digits = "ABCDEFGHIJ"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<image>": 3, "<newline>": 4, "<boi>": 5, "<eoi>": 6}
    vocab.update({f"IMGIMG{''.join(digits[int(d)] for d in str(c))}Z": 8 + c for c in range(codes)})
    vq = ChameleonVQVAEConfig(embed_dim=8, num_embeddings=codes, latent_channels=32, base_channels=32,
                              channel_multiplier=[1, 1, 1, 1, 1], num_res_blocks=1, resolution=64)  # 64 px -> 4 x 4
    config = ChameleonConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             vq_config=vq.to_dict(), vocabulary_map=vocab, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ChameleonForConditionalGeneration(config)
        for name, p in model.named_parameters():
            if p.ndim == 2 and "vqmodel" not in name:
                p.data.normal_(0.0, scale)
    return model.eval()


def load_chameleon(folder: str | None = None, tiny_random: bool = False, grid: int = 48, newline_id: int = 8803,
                   seed: int = 0, cfg_scale: float = 3.0, max_prompt: int = 64,
                   header: list[int] | None = None) -> ChameleonTarget:
    """Lumina-mGPT from a local transformers folder (grid 48 at 768 px; newline id 8803), or a tiny random
    Chameleon (`tiny_random`; newline id 4). A folder of another family fails naming what it holds."""
    if tiny_random:
        return ChameleonTarget(tiny_chameleon_model(seed).requires_grad_(False), grid, 4, cfg_scale,
                               max_prompt=max_prompt, header=header or TINY_HEADER)
    config = Path(folder or "") / "config.json"
    if not config.is_file():
        raise ValueError(f"target folder {folder!r} holds no config.json: a Lumina-mGPT / Chameleon model saved by "
                         f"transformers (ChameleonForConditionalGeneration.save_pretrained) is expected there")
    kind = json.loads(config.read_text()).get("model_type")
    if kind != "chameleon":
        raise ValueError(f"target folder {folder} holds a {kind!r} model; this target config expects Lumina-mGPT "
                         f"(model_type 'chameleon')")
    from transformers import ChameleonForConditionalGeneration

    model = ChameleonForConditionalGeneration.from_pretrained(folder).requires_grad_(False)
    return ChameleonTarget(model, grid, newline_id, cfg_scale, max_prompt=max_prompt, header=header)
