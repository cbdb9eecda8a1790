"""The decode loop waits for the device at most once a step (VVS and SJD: twice), and AR never: counted
on a CPU by decode.core.host.SyncCounter, which models where a CUDA run would wait."""
import warnings

import pytest
import torch

from decode.core.engine import Method
from decode.core.host import SyncCounter, cuda_sync_sites, cuda_syncs, fetch, to_device
from decode.strategies.registry import build_method
from decode.core.sampling import draw
from decode.core.trees import TreeParams
from tests.decode.test_speculative import GREEDY, SAMPLED, run, world


def counted(target, drafter, cond, method, sampling, n):
    counter = SyncCounter(target.gpt, drafter)
    with counter:
        gen = run(target, cond, method, sampling, n=n)
    return counter, gen


def test_the_counter_sees_device_reads_and_ignores_host_bookkeeping():
    layer = torch.nn.Linear(4, 4)
    counter = SyncCounter(layer)
    with counter:
        y = layer(to_device(torch.ones(2, 4), "cpu"))  # a device tensor (made from the parameters)
        host = torch.tensor([1, 2, 3])       # host bookkeeping
        assert int(host.sum()) == 6 and host.tolist() == [1, 2, 3]
        assert counter.waits == 0
        int(y.argmax())                      # a host read
        y[y > 0]                             # a boolean mask: its size is on the device
        torch.tensor([0, 1], device=y.device)  # a blocking copy down
        y[torch.tensor([0, 1])]              # a host index into a device tensor: an implicit copy
        (copy,) = fetch(y)                   # the planned wait; its result is on the host
        float(copy.sum())
        y[to_device([0, 1], y.device)]       # a staged copy down: no wait
        torch.multinomial(y.softmax(-1), 1)  # checks its input on the host inside PyTorch
        draw(y.softmax(-1))                  # the same draw without the checks: no wait
    assert counter.counts == {"read": 3, "copy": 1, "mixed": 1, "fetch": 1}


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED])
def test_ar_never_waits_for_the_device_inside_the_loop(sampling):
    target, drafter, cond, _ = world(2)
    prefill, _ = counted(target, drafter, cond, Method(), sampling, n=1)
    full, gen = counted(target, drafter, cond, Method(), sampling, n=24)
    assert gen.batch_steps == 23 and full.waits == prefill.waits, full.sites


@pytest.mark.parametrize("name,options,per_step", [
    ("eagle2", dict(), 1),
    ("lantern", dict(lantern_k=16), 1),
    ("lantern_pp", dict(lantern_k=16, static_tree="balanced_25"), 1),
    ("vvs_u", dict(lantern_k=16, interval=2, warmup=2), 2),  # + the scheduler's look at the tree
    ("sjd", dict(window=4), 2),  # + the Jacobi update's redrawn window
    ("sjd", dict(window=4, init="random"), 2),  # random guesses drawn ahead, read with it
])
def test_speculative_steps_wait_once_and_vvs_twice(name, options, per_step):
    target, drafter, cond, codebook = world(2)
    method = build_method(name, sampling=SAMPLED, tree=TreeParams(12, 3, 4), options=options, drafter=drafter,
                          codebook=codebook)
    prefill, _ = counted(target, drafter, cond, method, SAMPLED, n=1)
    full, gen = counted(target, drafter, cond, method, SAMPLED, n=40)
    in_loop = {k: full.counts[k] - prefill.counts.get(k, 0) for k in full.counts}
    assert {k for k, v in in_loop.items() if v} == {"fetch"}, full.sites
    assert gen.batch_steps < in_loop["fetch"] + 1 <= per_step * gen.batch_steps + 1
    if name == "vvs_u":
        assert gen.skipped.sum() > 0  # skipped steps ran no pass, hence no acceptance fetch


def _waits_on_the_device():
    warnings.warn("called a synchronizing CUDA operation")  # what the sync debug mode raises here


def test_cuda_sync_sites_name_the_line_that_waited(monkeypatch):
    """The real count's attribution, without a GPU: the sync debug mode's warning stands in."""
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)

    def decode_like():
        _waits_on_the_device()
        _waits_on_the_device()
        warnings.warn("an unrelated warning")

    sites = cuda_sync_sites(decode_like, under="tests")
    assert sites == {f"test_host_syncs._waits_on_the_device:{_waits_on_the_device.__code__.co_firstlineno + 1}": 2}
    assert cuda_syncs(decode_like) == 2
