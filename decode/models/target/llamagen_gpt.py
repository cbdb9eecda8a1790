"""The LlamaGen GPT (text-to-image and class-to-image), written for decoding.

The project's own implementation of the architecture of FoundationVision/LlamaGen
(`autoregressive/models/gpt.py`), with the official parameter names so that official
checkpoints load unchanged. Unlike the reference it has one forward that takes explicit
positions, an explicit attention mask and an optional preallocated KV cache, so prefill,
one-token decode and a masked forward over a whole draft tree are the same code.

Two behaviours of the reference are reproduced on purpose (docs/algorithms.md 7):
- the 2D RoPE table has all-zero rows for the `cls_token_num` prefix positions, so prefix
  queries and keys are multiplied by zero and the condition reaches image tokens only through
  the values;
- rotations act on interleaved pairs (x[2k], x[2k+1]), not on rotate-half pairs.

This file knows nothing about classifier-free guidance or sampling; the adapter does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decode.core.cache import KVCache, LayerKV
from decode.models.checkpoint import FolderConfig


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass(frozen=True)
class GPTConfig(FolderConfig):
    dim: int = 1280
    n_layer: int = 36
    n_head: int = 20
    n_kv_head: int | None = None  # None: multi-head attention (every official size)
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    vocab_size: int = 16384
    block_size: int = 256  # image tokens: grid * grid
    cls_token_num: int = 120  # prefix slots: 120 caption slots (t2i) or 1 class slot (c2i)
    model_type: str = "t2i"  # "t2i" | "c2i"
    caption_dim: int = 2048  # t2i: text-encoder width (FLAN-T5-XL 2048, MiniLM 384)
    num_classes: int = 1000  # c2i: the null class id is num_classes

    def __post_init__(self):
        if self.model_type not in ("t2i", "c2i"):
            raise ValueError(f"model_type must be 't2i' or 'c2i', got {self.model_type!r}")
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        grid = int(round(self.block_size ** 0.5))
        if grid * grid != self.block_size:
            raise ValueError(f"block_size {self.block_size} is not a square grid")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def grid_size(self) -> int:
        return int(round(self.block_size ** 0.5))

    @property
    def ffn_dim(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)



# LlamaGen's named sizes (gpt.py GPT_models); layers / heads / width.
GPT_SIZES: dict[str, dict] = {
    "B": dict(n_layer=12, n_head=12, dim=768),
    "L": dict(n_layer=24, n_head=16, dim=1024),
    "XL": dict(n_layer=36, n_head=20, dim=1280),
    "XXL": dict(n_layer=48, n_head=24, dim=1536),
    "XXXL": dict(n_layer=48, n_head=40, dim=2560),
    "1B": dict(n_layer=22, n_head=32, dim=2048),
    "3B": dict(n_layer=24, n_head=32, dim=3200),
    "7B": dict(n_layer=32, n_head=32, dim=4096),
    # small sizes of this project (the embedded world and tests)
    "tiny": dict(n_layer=2, n_head=4, dim=64, multiple_of=64),
    "small": dict(n_layer=6, n_head=6, dim=384, multiple_of=128),
    "medium": dict(n_layer=8, n_head=8, dim=512, multiple_of=128),
}


def gpt_config(size: str, **overrides) -> GPTConfig:
    if size not in GPT_SIZES:
        raise ValueError(f"unknown GPT size {size!r}; known sizes: {', '.join(GPT_SIZES)}")
    return GPTConfig(**{**GPT_SIZES[size], **overrides})


def rope_table_2d(grid: int, head_dim: int, base: float, prefix: int, extra: int = 0) -> Tensor:
    """LlamaGen's 2D RoPE table [prefix + grid*grid + extra, head_dim // 2, 2] of (cos, sin).

    Rows for the prefix (and the `extra` rows past the grid, used by draft trees that reach
    beyond the last image token) are zero, as in the reference.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # [half // 2]
    t = torch.arange(grid, dtype=torch.float32)
    f = torch.outer(t, freqs)  # [grid, half // 2]
    angles = torch.cat([f[:, None, :].expand(-1, grid, -1), f[None, :, :].expand(grid, -1, -1)], dim=-1)
    table = torch.stack([angles.cos(), angles.sin()], dim=-1).flatten(0, 1)  # [grid*grid, half, 2]
    return torch.cat([torch.zeros(prefix, half, 2), table, torch.zeros(extra, half, 2)])


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate interleaved pairs. x [B, T, H, Dh]; rope [B, T, Dh // 2, 2]."""
    xp = x.float().reshape(*x.shape[:-1], -1, 2)  # [B, T, H, Dh/2, 2]
    r = rope[:, :, None]  # [B, T, 1, Dh/2, 2]
    out = torch.stack([xp[..., 0] * r[..., 0] - xp[..., 1] * r[..., 1],
                       xp[..., 1] * r[..., 0] + xp[..., 0] * r[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.kv_heads, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, cache: LayerKV | None) -> Tensor:
        b, t, d = x.shape
        kv = self.kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([d, kv, kv], dim=-1)
        q = apply_rope(q.view(b, t, self.n_head, self.head_dim), rope).transpose(1, 2)  # [B, H, T, Dh]
        k = apply_rope(k.view(b, t, self.kv_heads, self.head_dim), rope).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            cache.write(k, v)
            k, v = cache.read(mask.shape[-1])  # [B, Hkv, S, Dh]
        if self.kv_heads != self.n_head:
            k = k.repeat_interleave(self.n_head // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.n_head // self.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask[:, None])
        return self.wo(out.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, rope, mask, kv=None):
        h = x + self.attention(self.attention_norm(x), rope, mask, kv)
        return h + self.feed_forward(self.ffn_norm(h))


def _call_block(block: nn.Module, h: Tensor, rope: Tensor, mask: Tensor, kv: LayerKV | None) -> Tensor:
    return block(h, rope, mask, kv)


COMPILE_SCOPES = ("stack", "layer")
STATIC_RECOMPILE_LIMIT = 64
STATIC_CACHES = 4  # static caches a model keeps for reuse (one per batch size and length; see allocate_cache)


class BlockStack:
    """Running a module's decoder layers (`self.layers`, TransformerBlocks) over an optional KV
    cache; shared by the target and the drafter.

    `compile_blocks(scope)` swaps in `torch.compile`d code, shapes dynamic, `fullgraph` (nothing in
    a graph waits on the host), KV writes and reads inside:
    - "stack": one graph over every layer. The fastest on a small model (fewest calls), but tracing
      grows with the depth: a 36-layer stack takes minutes per shape kind.
    - "layer": one graph for a single block, shared by every layer (each gets its own KV tensor as
      an input). Tracing costs one layer's; each layer is then a call of its own.
    A new graph is traced when a shape's kind changes (prefill, one token, a tree, a sub-batch).
    Decoding with static shapes (`generate(static_shapes=True)`) has a fixed set of shapes: compiled
    `static`, each traces once, in the first decode, and never again."""

    _compiled = None
    _compile_scope = None
    _graphs = False  # compiled as CUDA graphs: their outputs are overwritten by the next replay

    def run_blocks(self, h: Tensor, rope: Tensor, mask: Tensor, cache: KVCache | None,
                   slots: Tensor | None) -> Tensor:
        if self._compile_scope == "stack":
            h = self._compiled(self, h, rope, mask, cache, slots)
        else:
            h = BlockStack._layers(self, h, rope, mask, cache, slots)
        return h.clone() if self._graphs else h  # a caller may keep it past the graph's next replay

    def _layers(self, h, rope, mask, cache, slots):
        per_layer = self._compile_scope == "layer"
        call = self._compiled if per_layer else _call_block
        for i, block in enumerate(self.layers):
            kv = None if cache is None else cache.layer(i, slots, own_tensor=per_layer)
            h = call(block, h, rope, mask, kv)
        return h

    def allocate_cache(self, static: bool, **shape) -> KVCache:
        """A new cache (`shape`: KVCache.allocate's arguments). A static cache is kept and handed, emptied,
        to the next decode of the same shape: CUDA graphs captured on its addresses then replay instead
        of being captured again. One decode at a time per model uses it (a second one of the same shape
        running meanwhile would share it); the last STATIC_CACHES shapes are kept."""
        if not static:
            return KVCache.allocate(**shape)
        pool = self.__dict__.setdefault("_static_caches", {})  # key -> cache, least recently used first
        key = tuple(sorted((k, str(v)) for k, v in shape.items()))
        cache = pool.pop(key, None)
        cache = cache.clear() if cache is not None else KVCache.allocate(static=True, **shape)
        pool[key] = cache
        while len(pool) > STATIC_CACHES:
            pool.pop(next(iter(pool)))
        return cache

    def compile_blocks(self, scope: str = "stack", backend: str = "inductor", static: bool = False) -> None:
        """`static`: shapes specialised (dynamic=False), for decoding with static shapes, where each
        pass kind has one shape; on a GPU inductor then captures each graph as a CUDA graph."""
        if scope not in COMPILE_SCOPES:
            raise ValueError(f"compile scope must be one of {COMPILE_SCOPES}, got {scope!r}")
        # plain functions, not bound methods: a deep copy of this module then runs its own layers
        fn = BlockStack._layers if scope == "stack" else _call_block
        self._graphs = static and backend == "inductor" and next(self.parameters()).is_cuda
        if static:
            # every model compiled in the process shares these code objects, and each pass kind of each
            # (a decode's 2-7, again for another batch size or image length) is one specialisation:
            # past the limit a fullgraph compile fails, so leave room
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, STATIC_RECOMPILE_LIMIT)
        self._compiled = torch.compile(fn, dynamic=not static, fullgraph=True, backend=backend,
                                       mode="reduce-overhead" if self._graphs else None)
        self._compile_scope = scope


class CaptionEmbedder(nn.Module):
    """Caption features -> width `dim` (MLP with tanh-GELU, no bias); holds the learned null caption."""

    def __init__(self, caption_dim: int, dim: int, token_num: int):
        super().__init__()
        self.cap_proj = nn.Module()
        self.cap_proj.fc1 = nn.Linear(caption_dim, dim, bias=False)
        self.cap_proj.fc2 = nn.Linear(dim, dim, bias=False)
        # a buffer in the reference (not trained by the optimizer there, but saved): keep the name
        self.register_buffer("uncond_embedding", torch.randn(token_num, caption_dim) / caption_dim ** 0.5)

    def forward(self, caption: Tensor) -> Tensor:
        return self.cap_proj.fc2(F.gelu(self.cap_proj.fc1(caption), approximate="tanh"))


class LabelEmbedder(nn.Module):
    """Class ids -> one prefix slot; row `num_classes` is the null class of CFG."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)[:, None]  # [B, 1, D]


class LlamaGenGPT(BlockStack, nn.Module):
    """LlamaGen transformer. State-dict keys equal the official ones."""

    def __init__(self, cfg: GPTConfig, rope_extra: int = 16):
        super().__init__()
        self.config = cfg
        if cfg.model_type == "t2i":
            self.cls_embedding = CaptionEmbedder(cfg.caption_dim, cfg.dim, cfg.cls_token_num)
        else:
            self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        rope = rope_table_2d(cfg.grid_size, cfg.head_dim, cfg.rope_base, cfg.cls_token_num, rope_extra)
        self.register_buffer("rope", rope, persistent=False)

    @property
    def max_positions(self) -> int:
        return self.rope.shape[0]

    def embed_cond(self, cond: Tensor) -> Tensor:
        """t2i: caption features [B, Tc, C] -> [B, Tc, D]; c2i: class ids [B] -> [B, 1, D]."""
        return self.cls_embedding(cond)

    def null_cond(self, batch: int, device: torch.device) -> Tensor:
        """The CFG null condition in the same format as `embed_cond`'s input."""
        if self.config.model_type == "t2i":
            return self.cls_embedding.uncond_embedding[None].expand(batch, -1, -1).to(device)
        return torch.full((batch,), self.config.num_classes, dtype=torch.long, device=device)

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        return self.tok_embeddings(tokens)

    def logits(self, hidden: Tensor) -> Tensor:
        """Post-norm hidden [..., D] -> float32 logits [..., V]."""
        return self.output(hidden).float()

    def forward(self, x: Tensor, positions: Tensor, mask: Tensor, cache: KVCache | None = None) -> Tensor:
        """Run the layers on new input embeddings; returns post-final-norm hidden states.

        Args:
            x: [B, T, D] input embeddings of the new tokens.
            positions: [B, T] rows of the RoPE table (prefix slots first, image token n at
                `cls_token_num + n`; tree nodes at their depth).
            mask: without a cache, [B, T, T] bool over the new tokens themselves; with a cache,
                [B, T, S] bool over cache slots (see `KVCache.attention_mask`).
            cache: when given, the new keys/values are written to `cache.new_slots(T)`.
        Returns:
            [B, T, D] hidden states after the final RMSNorm (the drafter's features).
        """
        rope = self.rope[positions]  # [B, T, Dh/2, 2]
        slots = cache.new_slots(x.shape[1]) if cache is not None else None
        return self.norm(self.run_blocks(x, rope, mask, cache, slots))

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, static: bool = False) -> KVCache:
        p = self.output.weight
        return self.allocate_cache(static, num_layers=self.config.n_layer, batch=batch,
                                   num_heads=self.config.kv_heads, head_dim=self.config.head_dim, max_len=max_len,
                                   dtype=dtype or p.dtype, device=p.device)
