"""Distributed strategies from the `trainer.strategy` config entry.

`strategy: ddp` (a string) goes to Lightning as is. A mapping `{name: deepspeed, stage: 2, ...}`
builds Lightning's DeepSpeedStrategy; on a CPU it builds `CPUDeepSpeedStrategy`, the same
strategy with the CUDA-only check removed and gloo as the backend, so ZeRO runs here and in tests
(ECOSYSTEM.md). On GPUs the stock strategy is used unchanged.
"""
from __future__ import annotations

import contextlib

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    def setup_environment(self) -> None:
        # DeepSpeedStrategy.setup_environment only adds the CUDA check before this
        DDPStrategy.setup_environment(self)


def build_strategy(spec, accelerator: str, devices) -> object:
    """`spec` is a strategy name or a mapping with `name` and that strategy's arguments."""
    if spec is None or isinstance(spec, str):
        return spec or "auto"
    spec = dict(spec)
    name = spec.pop("name", None)
    if name != "deepspeed":
        raise ValueError(f"trainer.strategy.name must be 'deepspeed' for a mapping, got {name!r}; "
                         f"other strategies are given by name (ddp, ddp_spawn, auto)")
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu:
        return DeepSpeedStrategy(**spec)
    count = devices if isinstance(devices, int) and devices > 0 else 1
    return CPUDeepSpeedStrategy(**spec, process_group_backend="gloo",
                                parallel_devices=[torch.device("cpu", i) for i in range(count)])


@contextlib.contextmanager
def full_parameters(trainer, module: torch.nn.Module):
    """Inside, `module`'s parameters are whole on every rank (ZeRO-3 partitions them: a
    state_dict taken outside would hold empty tensors). A collective: enter it on all ranks."""
    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield
    else:
        yield
