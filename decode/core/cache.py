"""Preallocated key/value cache for the target and the drafter.

The cache owns storage and bookkeeping only: which slots are written, which hold committed keys
that later tokens may attend to, and how long each row is. It does not decide what to keep; the
engine does (tree acceptance, skipped steps). Rows may have different lengths (batched
speculative decoding commits a different number of tokens per row).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from decode.core.host import to_device


@dataclass
class KVCache:
    k: Tensor  # [L, B, H, S, Dh]
    v: Tensor  # [L, B, H, S, Dh]
    valid: Tensor  # [B, S] bool: a committed key that later tokens may attend to (caption padding is not)
    length: Tensor  # [B] long: committed slots per row; new tokens are written from here on
    host_length: Tensor  # [B] long, on the host: `length`'s copy, so sizing a pass never reads the device
    static: bool = False  # every pass reads all slots (masked), so its shapes never depend on the lengths
    layer_views: tuple | None = None  # static: each layer's (k, v) views, made once (fixed objects and addresses)

    @classmethod
    def allocate(cls, *, num_layers: int, batch: int, num_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 static: bool = False) -> "KVCache":
        shape = (num_layers, batch, num_heads, max_len, head_dim)
        cache = cls(k=torch.zeros(shape, dtype=dtype, device=device),
                    v=torch.zeros(shape, dtype=dtype, device=device),
                    valid=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
                    length=torch.zeros(batch, dtype=torch.long, device=device),
                    host_length=torch.zeros(batch, dtype=torch.long), static=static)
        if static:
            cache.layer_views = tuple((cache.k[i], cache.v[i]) for i in range(num_layers))
            if cache.k.is_cuda:  # CUDA graphs replay on fixed addresses: tell inductor these are (no copy-in)
                for t in (cache.k, cache.v, *(view for pair in cache.layer_views for view in pair)):
                    torch._dynamo.mark_static_address(t)
        return cache

    def clear(self) -> "KVCache":
        """Empty the cache in place (same tensors, same addresses), for a decode that reuses it."""
        for t in (self.k, self.v, self.valid, self.length, self.host_length):
            t.zero_()
        return self

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def longest(self) -> int:
        """The longest row's committed length (read on the host)."""
        return int(self.host_length.max()) if self.batch else 0

    def new_slots(self, num_new: int, offset: int = 0) -> Tensor:
        """Slots [B, T] that T new tokens are written to: right after each row's committed part
        (and after `offset` scratch entries written earlier in the same step, e.g. a draft tree)."""
        if num_new and self.longest + offset + num_new > self.capacity:
            raise ValueError(f"KV cache overflow: {self.longest + offset + num_new} slots needed, "
                             f"capacity {self.capacity}")
        return self.length[:, None] + offset + torch.arange(num_new, device=self.length.device)

    def layer(self, i: int, slots: Tensor, own_tensor: bool = False) -> "LayerKV":
        """Layer i's keys and values for a pass writing to `slots` [B, T]: addressed through the whole
        storage, or (`own_tensor`) through that layer's tensor, for a graph compiled per layer."""
        rows = self._row_index(slots.device)
        if own_tensor:
            k, v = self.layer_views[i] if self.layer_views else (self.k[i], self.v[i])
            return LayerKV(k, v, None, rows, slots, self.gathered)
        return LayerKV(self.k, self.v, i, rows, slots, self.gathered)

    gathered = False  # a pass over some rows reads copies of them (CacheRows); the whole cache, views

    def _row_index(self, device) -> Tensor:
        """Rows of the storage this cache's batch rows are (all of them; a `CacheRows` view: some)."""
        return torch.arange(self.batch, device=device)

    def attention_mask(self, block_mask: Tensor, upto: int, committed_visible: Tensor | None = None) -> Tensor:
        """Mask [B, T, upto] for T new tokens written at `new_slots(T, offset)`.

        A new token sees every committed valid slot before its row's length (with `committed_visible`
        [B, T, upto]: only those it allows, e.g. the earlier positions of a wavefront whose slots are not
        in raster order), and the uncommitted entries that `block_mask` [B, T, offset + T] allows:
        earlier scratch entries of this step and the new tokens themselves (causal for a chain,
        ancestors for a tree). A static cache widens the mask to every slot (`upto` is its capacity).
        """
        if self.static:
            upto = self.capacity
        b, t, width = block_mask.shape
        cols = torch.arange(upto, device=block_mask.device)[None, :]  # [1, S]
        committed = (self.valid[:, :upto] & (cols < self.length[:, None]))[:, None, :]  # [B, 1, S]
        if committed_visible is not None:
            committed = committed & committed_visible
        rel = cols - self.length[:, None]  # [B, S] index of the scratch entry stored in each slot
        in_block = (rel >= 0) & (rel < width)
        gathered = torch.gather(block_mask, 2, rel.clamp(0, max(width - 1, 0))[:, None, :].expand(b, t, upto))
        return committed | (in_block[:, None, :] & gathered)

    def commit(self, num_new: int | Sequence[int] | Tensor, key_valid: Tensor | None = None) -> None:
        """Mark the next `num_new` slots of each row as committed (optionally some as not attendable).

        `num_new` is an int or per-row counts, best given on the host (a device tensor is read)."""
        n_host = torch.as_tensor(num_new).cpu().expand(self.batch).clone()
        width = int(n_host.max()) if self.batch else 0
        if width:
            n = to_device(n_host, self.length.device)
            rel = torch.arange(self.capacity, device=n.device)[None, :] - self.length[:, None]  # [B, S]
            inside = (rel >= 0) & (rel < n[:, None])
            if key_valid is None:
                self.valid |= inside
            else:  # elementwise, no boolean-mask index (whose size the host would have to read)
                ok = torch.gather(key_valid[:, :width].bool(), 1, rel.clamp(0, width - 1))
                self.valid.copy_(torch.where(inside, ok, self.valid))
            self.length += n
        self.host_length += n_host

    def rows(self, index: Sequence[int]) -> "CacheRows":
        """The cache seen by a forward pass over some of its rows only (the others sit this step out)."""
        if self.static:
            raise RuntimeError("a static cache runs whole-batch passes (rows that sit a step out are masked)")
        index = list(index)
        dev = to_device(index, self.length.device)
        return CacheRows(k=self.k, v=self.v, valid=self.valid[dev], length=self.length[dev],
                         host_length=self.host_length[index], index=dev)

    def keep(self, src: Tensor, count: Sequence[int] | Tensor) -> None:
        """Compact accepted entries: move slots `src` [B, A] (absolute) to the row's next slots.

        Row b keeps `count[b]` entries (host counts); its entries past that are ignored. The moved
        slots are committed. Used after tree verification, where accepted nodes are scattered in the tree.
        """
        b, a = src.shape
        if a == 0:
            return
        count_host = torch.as_tensor(count).cpu()
        count = to_device(count_host, src.device)
        dst = self.length[:, None] + torch.arange(a, device=src.device)[None, :]
        use = torch.arange(a, device=src.device)[None, :] < count[:, None]
        dst = torch.where(use, dst, src)  # unused entries copy onto themselves
        rows = torch.arange(b, device=src.device)[:, None]
        for store in (self.k, self.v):
            moved = store[:, rows, :, src]  # [B, A, L, H, Dh]
            store[:, rows, :, dst] = moved
        self.commit(count_host)


def pad_entries(width: int, *per_token: Tensor) -> tuple[Tensor, ...]:
    """Tensors [B, T, ...] of a pass's T entries, zero-padded to `width` entries (static shapes)."""
    t = per_token[0].shape[1]
    if t > width:
        raise ValueError(f"a pass of {t} entries does not fit the static width {width}")
    return tuple(torch.cat([x, x.new_zeros(x.shape[0], width - t, *x.shape[2:])], 1) for x in per_token)


def pad_block(width: int, block_mask: Tensor, *per_token: Tensor) -> tuple[Tensor, ...]:
    """`pad_entries` for a pass with its block mask [B, T, T], which grows to [B, width, width] with
    each padding entry seeing itself only. Padding is written to scratch slots and never committed
    or seen by a real entry."""
    b, t, _ = block_mask.shape
    padded = pad_entries(width, *per_token)  # checks the width
    mask = torch.eye(width, dtype=torch.bool, device=block_mask.device).repeat(b, 1, 1)
    mask[:, :t, :t] = block_mask
    return (mask, *padded)


@dataclass
class CacheRows(KVCache):
    """Rows `index` of a cache, for a pass over a sub-batch: keys and values are written to and read
    from the shared storage; `valid` and `length` are copies of those rows' (a pass writes scratch
    slots only; committing goes through the whole cache afterwards)."""
    index: Tensor = None  # [R] rows of the full cache

    @property
    def batch(self) -> int:
        return self.index.shape[0]

    gathered = True

    def _row_index(self, device) -> Tensor:
        return self.index

    def commit(self, num_new, key_valid=None) -> None:
        raise RuntimeError("commit through the whole cache, not a view of some of its rows")

    def keep(self, src: Tensor, count: Tensor) -> None:
        raise RuntimeError("compact through the whole cache, not a view of some of its rows")


@dataclass(frozen=True)
class LayerKV:
    """One layer's keys and values as its attention sees them in one pass: where the pass's new
    entries go and what it reads back.

    `k`, `v` are either the whole storage [L, B, H, S, Dh] with `layer` naming the layer, or the
    layer's own tensor [B, H, S, Dh] with `layer` None. The first keeps a graph compiled over all
    layers writing in place: compiled, a write through the view `k[layer]` made AR 2.6x slower than
    eager on a CPU, since the graph copies the view back. The second lets one graph compiled for a
    single layer serve every layer: the layer's tensor comes in as an input, so the graph holds no
    layer index to specialize on.
    """
    k: Tensor
    v: Tensor
    layer: int | None
    rows: Tensor   # [B] storage rows of this pass
    slots: Tensor  # [B, T] where the new entries go
    gathered: bool  # read these rows' copies (a pass over some rows) rather than views of all rows

    def write(self, k: Tensor, v: Tensor) -> None:
        """Write k, v [B, H, T, Dh] into the slots (scratch until committed)."""
        rows = self.rows[:, None].expand_as(self.slots)  # [B, T]
        if self.layer is None:
            index = (rows, slice(None), self.slots)
        else:
            index = (torch.full_like(self.slots, self.layer), rows, slice(None), self.slots)
        # advanced indices around one slice put (B, T) first: the value is [B, T, H, Dh]
        self.k[index] = k.transpose(1, 2).to(self.k.dtype)
        self.v[index] = v.transpose(1, 2).to(self.v.dtype)

    def read(self, upto: int) -> tuple[Tensor, Tensor]:
        """Keys and values [B, H, upto, Dh] of this pass's rows."""
        k, v = (self.k, self.v) if self.layer is None else (self.k[self.layer], self.v[self.layer])
        if self.gathered:
            return k[self.rows, :, :upto], v[self.rows, :, :upto]
        return k[:, :, :upto], v[:, :, :upto]
