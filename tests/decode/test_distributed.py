"""decode.distributed: torchrun's environment is read strictly, and a process leaves its group waiting
for the others only after a completed run (after an error the others may never arrive)."""
from contextlib import nullcontext

import pytest
import torch.distributed as dist

from decode.distributed import Ranks, group_left_at_end, ranks_from_env


def test_ranks_come_from_torchruns_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert ranks_from_env() == Ranks(0, 1, 0) and not ranks_from_env().distributed
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ranks_from_env() == Ranks(1, 2, 1) and ranks_from_env().distributed and not ranks_from_env().main
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        ranks_from_env()


@pytest.mark.parametrize("completed", [True, False])
def test_the_group_is_left_waiting_for_the_others_only_after_a_completed_run(tmp_path, monkeypatch, completed):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    barriers = []
    real_barrier = dist.barrier
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: (barriers.append(1), real_barrier(*a, **k)))
    try:
        with pytest.raises(RuntimeError, match="a failed run") if not completed else nullcontext():
            with group_left_at_end():
                if not completed:
                    raise RuntimeError("a failed run")
        assert not dist.is_initialized()
        assert barriers == ([1] if completed else [])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    with group_left_at_end():  # outside a group: nothing to do
        pass
