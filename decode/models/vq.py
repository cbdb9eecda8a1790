"""The LlamaGen VQ image tokenizer (VQ-GAN encoder/decoder with an l2-normalised codebook).

The project's own implementation of the architecture of LlamaGen's
`tokenizer/tokenizer_image/vq_model.py`, with the official parameter names. The base width
`ch` is configurable (the official tokenizers use 128); GroupNorm uses 32 groups, so `ch` and
every `ch * mult` must be multiples of 32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decode.models.checkpoint import FolderConfig


@dataclass(frozen=True)
class VQConfig(FolderConfig):
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True  # keeps the official `quantize.codebook_used` buffer
    commit_loss_beta: float = 0.25
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    ch: int = 128
    num_res_blocks: int = 2

    def __post_init__(self):
        object.__setattr__(self, "encoder_ch_mult", tuple(self.encoder_ch_mult))
        object.__setattr__(self, "decoder_ch_mult", tuple(self.decoder_ch_mult))
        for m in set(self.encoder_ch_mult) | set(self.decoder_ch_mult):
            if (self.ch * m) % 32:
                raise ValueError(f"VQ width ch*mult = {self.ch * m} is not a multiple of 32 (GroupNorm groups)")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)



def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(b, c, h * w).transpose(1, 2)  # [B, HW, C]
        k = self.k(y).reshape(b, c, h * w).transpose(1, 2)
        v = self.v(y).reshape(b, c, h * w).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as in the reference


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        mult, ch, last = cfg.encoder_ch_mult, cfg.ch, len(cfg.encoder_ch_mult) - 1
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        self.conv_blocks = nn.ModuleList()
        cin = ch
        for level, m in enumerate(mult):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                block.res.append(ResnetBlock(cin, ch * m))
                cin = ch * m
                if level == last:
                    block.attn.append(AttnBlock(cin))
            if level != last:
                block.downsample = Downsample(cin)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList([ResnetBlock(cin, cin), AttnBlock(cin), ResnetBlock(cin, cin)])
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.conv_blocks:
            for i, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[i](h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        mult, ch, last = cfg.decoder_ch_mult, cfg.ch, len(cfg.decoder_ch_mult) - 1
        cin = ch * mult[last]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, 1, 1)
        self.mid = nn.ModuleList([ResnetBlock(cin, cin), AttnBlock(cin), ResnetBlock(cin, cin)])
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(len(mult))):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                block.res.append(ResnetBlock(cin, ch * mult[level]))
                cin = ch * mult[level]
                if level == last:
                    block.attn.append(AttnBlock(cin))
            if level != 0:
                block.upsample = Upsample(cin)
            self.conv_blocks.append(block)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, 1, 1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for block in self.conv_blocks:
            for i, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[i](h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass(frozen=True)
class Quantized:
    z_q: Tensor  # [B, E, h, w] quantized latents (straight-through gradient to the encoder)
    codes: Tensor  # [B, h*w] code indices, raster order
    codebook_loss: Tensor  # scalar: ||sg(z) - e||^2
    commit_loss: Tensor  # scalar: ||z - sg(e)||^2 (weighted by beta in VQModel.losses)


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.l2_norm = cfg.codebook_l2_norm
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        if self.l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)
        if cfg.codebook_show_usage:
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def forward(self, z: Tensor) -> Quantized:
        with torch.autocast(z.device.type, enabled=False):
            # float32 distances: under bf16 autocast the 8-bit mantissa ties near codes and the argmin
            # picks among them at random (the encoder and decoder still run in bf16)
            q = self._nearest(z.float())
        return Quantized(q.z_q.to(z.dtype), q.codes, q.codebook_loss, q.commit_loss)

    def _nearest(self, z: Tensor) -> Quantized:
        b, e, h, w = z.shape
        z = z.permute(0, 2, 3, 1)  # [B, h, w, E]
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        book = self.codebook()
        flat = z.reshape(-1, e)
        d = flat.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1) - 2 * flat @ book.t()  # [B*h*w, K]
        codes = d.argmin(1)
        z_q = book[codes].view(z.shape)
        codebook_loss = F.mse_loss(z_q, z.detach())
        commit_loss = F.mse_loss(z_q.detach(), z)
        z_q = z + (z_q - z).detach()
        return Quantized(z_q.permute(0, 3, 1, 2), codes.view(b, h * w), codebook_loss, commit_loss)

    def lookup(self, codes: Tensor, grid: tuple[int, int]) -> Tensor:
        """codes [B, h*w] -> latents [B, E, h, w]."""
        z = self.codebook()[codes]  # [B, h*w, E]
        return z.view(codes.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2)


class VQModel(nn.Module):
    """encode: image in [-1, 1] -> codes; decode_codes: codes -> image in (about) [-1, 1]."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    def quantize_image(self, images: Tensor) -> Quantized:
        return self.quantize(self.quant_conv(self.encoder(images)))

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [-1, 1] -> codes [B, (H/ds) * (W/ds)] (raster order)."""
        return self.quantize_image(images).codes

    def decode_latents(self, z_q: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def decode_codes(self, codes: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """codes [B, h*w] -> images [B, 3, h*ds, w*ds]; a square grid unless `grid` says otherwise."""
        if grid is None:
            side = int(round(codes.shape[1] ** 0.5))
            if side * side != codes.shape[1]:
                raise ValueError(f"{codes.shape[1]} codes do not form a square grid; pass grid=(h, w)")
            grid = (side, side)
        return self.decode_latents(self.quantize.lookup(codes, grid))


def load_vq(ckpt: str | None = None, init_seed: int = 0, **config) -> VQModel:
    """A VQ tokenizer from a project model folder, an official LlamaGen `.pt` file (architecture
    from `config`), or randomly initialised when `ckpt` is None."""
    from pathlib import Path

    from decode.models.checkpoint import load_state_dict_strict, read_model_folder, read_state_dict

    if ckpt is not None and Path(ckpt).is_dir():
        meta, state = read_model_folder(ckpt, kind="llamagen_vq")
        vq = VQModel(VQConfig.from_dict(meta["config"]))
        load_state_dict_strict(vq, state, source=str(ckpt))
        return vq.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        vq = VQModel(VQConfig(**config))
    if ckpt is not None:
        load_state_dict_strict(vq, read_state_dict(ckpt), source=str(ckpt))
    return vq.eval()
