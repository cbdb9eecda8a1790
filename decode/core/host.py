"""Traffic between the host and the device in the decode loop, and a counter of where it waits.

On a GPU, every host read of a device tensor (`int(t)`, `.tolist()`, `if t.any()`, a boolean-mask
index) and every blocking copy from pageable host memory makes the CPU wait until the GPU has run
everything queued: the CPU can no longer queue the next kernels while the GPU works. The engine
therefore reads the device at one place per step (`fetch`, several tensors behind one wait), keeps
what it decides on the host as Python ints and host tensors, and sends host indices down with
`to_device` (pinned staging, no wait).

`SyncCounter` finds the waits without a GPU. It follows which tensors live on "the device" (the
models' parameters and buffers, and whatever is made from them or created with a `device=`
argument) and counts, at their call sites, the operations that would wait on a CUDA device. On a
CPU run host and device are the same memory, so the counter models a GPU run; on a GPU,
`torch.cuda.set_sync_debug_mode` gives the real count.
"""
from __future__ import annotations

import collections
import traceback
import warnings
import weakref
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

_COUNTERS: list["SyncCounter"] = []


def wait_for(device: torch.device) -> None:
    """Let the host wait until `device` has run everything queued: at a timer's ends, so GPU work is
    timed where it runs (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fetch(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Host copies of device tensors behind a single wait for the device."""
    copies = tuple(t.to("cpu", non_blocking=True) for t in tensors)
    on_gpu = next((t.device for t in tensors if t.is_cuda), None)
    if on_gpu is not None:
        torch.cuda.current_stream(on_gpu).synchronize()  # the copies above landed in pinned memory
    for counter in _COUNTERS:
        counter.note("fetch", skip=1)
    return copies


def to_device(values: Sequence | Tensor, device: torch.device, dtype: torch.dtype = torch.long) -> Tensor:
    """Host values (a list or a host tensor) as a device tensor, without waiting for the device: a
    copy from pageable memory would wait for the queued work, one staged in pinned memory does not."""
    host = values if isinstance(values, Tensor) else torch.tensor(values, dtype=dtype)
    if host.device.type != "cpu":  # already on a device: no staging
        return host.to(device, non_blocking=True)
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def cuda_syncs(fn) -> int:
    """How many times fn() synchronizes with a CUDA device, as `torch.cuda.set_sync_debug_mode`
    reports it (the real count, where `SyncCounter` models it)."""
    return sum(cuda_sync_sites(fn).values())


def cuda_sync_sites(fn, under: str = "decode") -> collections.Counter:
    """Where fn() synchronizes with a CUDA device: the innermost frame in the folder `under` whose
    operation waited, named as `SyncCounter` names its sites (module.function:line) -> how often."""
    sites = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            sites[call_site(under)] += 1

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record  # restored when the block ends
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sites


def call_site(under: str, skip: int = 0) -> str:
    """The innermost caller in the folder `under` (past `skip` more frames), as module.function:line."""
    frames = [f for f in traceback.extract_stack()[:-(2 + skip)] if f"/{under}/" in f.filename]
    return f"{Path(frames[-1].filename).stem}.{frames[-1].name}:{frames[-1].lineno}" if frames else "?"


# --- the counter --------------------------------------------------------------------------------
_READS = {Tensor.item, Tensor.tolist, Tensor.__bool__, Tensor.__int__, Tensor.__float__, Tensor.__index__,
          Tensor.numpy, Tensor.cpu, Tensor.nonzero, torch.nonzero, Tensor.argwhere, torch.argwhere,
          Tensor.masked_select, torch.masked_select, torch.unique, Tensor.unique, torch.equal,
          # these check or size their output on the host inside PyTorch: a wait per call on CUDA
          torch.multinomial, Tensor.multinomial, torch.bincount, Tensor.bincount}
_INDEXING = {Tensor.__getitem__, Tensor.__setitem__, Tensor.index_put_, Tensor.index_put}


class SyncCounter(TorchFunctionMode):
    """Counts the places a decode would wait for a CUDA device, by kind and call site.

    Kinds: `fetch` (the engine's one planned wait per step), `read` (a host read of a device tensor,
    or a boolean-mask index, whose result size depends on device data), `copy` (a blocking copy of
    host data to the device) and `mixed` (a device op given a host index tensor: an implicit copy).
    """

    def __init__(self, *modules: torch.nn.Module, sites_under: str = "decode"):
        super().__init__()
        self._on_device: set[int] = set()
        self.counts: collections.Counter = collections.Counter()
        self.sites: collections.Counter = collections.Counter()
        self._under = sites_under
        for m in modules:
            for t in [*m.parameters(), *m.buffers()]:
                self._mark(t)

    @property
    def waits(self) -> int:
        return sum(self.counts.values())

    def _mark(self, t: Tensor) -> None:
        key = id(t)
        if key not in self._on_device:
            self._on_device.add(key)
            weakref.finalize(t, self._on_device.discard, key)

    def on_device(self, t) -> bool:
        return isinstance(t, Tensor) and id(t) in self._on_device

    def note(self, kind: str, skip: int = 0) -> None:
        self.counts[kind] += 1
        self.sites[(kind, call_site(self._under, skip))] += 1

    def __enter__(self):
        _COUNTERS.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _COUNTERS.remove(self)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = list(_tensors(args)) + list(_tensors(kwargs.values()))
        device_in = [t for t in flat if self.on_device(t)]
        host_in = [t for t in flat if not self.on_device(t) and t.dim() > 0]
        self._classify(func, args, kwargs, device_in, host_in)
        out = func(*args, **kwargs)
        return self._propagate(func, args, kwargs, out, device_in)

    def _classify(self, func, args, kwargs, device_in, host_in) -> None:
        if device_in and func in _READS:
            self.note("read", skip=2)
        elif device_in and func in _INDEXING and any(t.dtype == torch.bool for t in _tensors(args[1:2])):
            self.note("read", skip=2)  # a boolean mask: the result's size is on the device
        elif device_in and host_in:
            self.note("mixed", skip=2)
        elif func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None:
            self.note("copy", skip=2)
        elif func in (Tensor.to, Tensor.cuda) and not device_in and _to_device(args, kwargs) \
                and not kwargs.get("non_blocking", False):
            self.note("copy", skip=2)

    def _propagate(self, func, args, kwargs, out, device_in):
        if func in (Tensor.to,) and kwargs.get("non_blocking") and _to_cpu(args, kwargs) and device_in:
            return out.detach()  # fetch's copy lives on the host (on a CPU `to` returns the same object)
        if func is Tensor.cpu:
            return out.detach()
        if func in (Tensor.to, Tensor.cuda) and not device_in and _to_device(args, kwargs):
            out = out.detach()  # a copy on the device (on a CPU `to` returns the host object itself)
            self._mark(out)
            return out
        if device_in or kwargs.get("device") is not None:  # (reads to the host return no tensors)
            for t in _tensors([out]):
                self._mark(t)
        return out


def _tensors(items: Iterable) -> Iterable[Tensor]:
    for x in items:
        if isinstance(x, Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            yield from _tensors(x)


def _target_device(args, kwargs):
    cands = [kwargs.get("device")] + [a for a in args[1:] if isinstance(a, (str, torch.device))]
    return next((torch.device(c) for c in cands if c is not None), None)


def _to_device(args, kwargs) -> bool:
    """A `.to(...)` naming a device (a host copy then becomes a device tensor)."""
    return _target_device(args, kwargs) is not None


def _to_cpu(args, kwargs) -> bool:
    d = _target_device(args, kwargs)
    return d is not None and d.type == "cpu"
