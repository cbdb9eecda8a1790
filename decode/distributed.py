"""Many processes: `torchrun --nproc_per_node=N -m decode prompts=FILE`.

Each rank decodes every N-th job (jobs are seeded by (seed, prompt, sample) alone, so images do not
depend on N), writes its images atomically and its stats to its own file, and rank 0 gathers the
rows into stats.jsonl and the summary. NCCL on GPUs, gloo on CPUs. If one rank fails, torchrun stops
the others and exits with that rank's error.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def ranks_from_env() -> Ranks:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK (a single process without them)."""
    try:
        return Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as err:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {err}") from err


def start(ranks: Ranks, device: torch.device) -> torch.device:
    """Join the process group; on CUDA each rank takes its local GPU. Returns the rank's device."""
    if not ranks.distributed:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=60))
    return device


def share(obj, ranks: Ranks):
    """Rank 0's value of `obj` on every rank (e.g. the run directory)."""
    if not ranks.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(rows: list, ranks: Ranks) -> list:
    """Every rank's rows, concatenated on rank 0 (others get [])."""
    if not ranks.distributed:
        return rows
    out = [None] * ranks.world if ranks.main else None
    dist.gather_object(rows, out, dst=0)
    return [r for part in out for r in part] if ranks.main else []


@contextmanager
def group_left_at_end():
    """Leave the default process group, if this process is in one, when the block ends (decoding and
    training both end here). After a completed run every rank first waits for the others: a rank that
    tore gloo down while rank 0 was still finishing its gather could abort at exit (SIGABRT, "terminate
    called without an active exception"), turning a finished run into a failed one. After an error
    (Hydra reports one as SystemExit) there is no waiting: the other ranks may never arrive, and
    torchrun stops them."""
    try:
        yield
    except BaseException:
        _leave(completed=False)
        raise
    _leave(completed=True)


def _leave(completed: bool) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        return
    if completed:
        dist.barrier()
    dist.destroy_process_group()
