"""The learned skip scheduler: deterministic traces, the smoke experiment, refusal of a foreign one."""
import json

import pytest
import torch

from data.traces import image_records
from decode.models.drafter import Drafter, DrafterConfig
from decode.api import Components
from decode.strategies.registry import resolve_method
from decode.core.sampling import SamplingParams
from decode.strategies.learned_skip import SkipPolicy, load_scheduler_policy, save_scheduler
from decode.models.target import LlamaGenTarget
from decode.core.trees import TreeParams
from tests.conftest import run_train, tiny_gpt
from tests.decode.test_speculative import world


class _TinyText:
    """Caption features for tiny targets: a fixed random embedding per prompt."""

    def encode(self, prompts):
        from types import SimpleNamespace

        g = torch.Generator().manual_seed(sum(map(ord, "".join(prompts))))
        return SimpleNamespace(emb=torch.randn(len(prompts), 8, 12, generator=g),
                               mask=torch.ones(len(prompts), 8, dtype=torch.bool))


def test_traces_are_deterministic_for_a_seed():
    from types import SimpleNamespace

    from train.scheduler_task import record_traces

    target, drafter, _, codebook = world(1)
    vq = SimpleNamespace(quantize=SimpleNamespace(embedding=SimpleNamespace(weight=codebook)))
    parts = Components(target, vq, _TinyText(), drafter)
    kw = dict(seed=3, first_image=0, sampling=SamplingParams(1.0), tree=TreeParams(12, 3, 4),
              base=resolve_method("lantern", {"lantern_k": 16}), warmup=5, batch_size=2, progress=False)
    prompts = ["a", "b", "c"]
    one = record_traces(parts, prompts, **kw)
    two = record_traces(parts, prompts, **kw)
    assert [r["__key__"] for r in one] == ["00000000", "00000001", "00000002"]
    assert one == two
    other = record_traces(parts, prompts, **{**kw, "seed": 4})
    assert other != one
    assert image_records([], 0, 1)[0]["__key__"] == "00000000"


def test_smoke_experiment_trains_and_decode_uses_it(tmp_path):
    res = run_train("scheduler", "experiment=smoke", f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path}/h")
    assert res.returncode == 0, res.stderr[-3000:]
    folder = tmp_path / "scheduler"
    meta = json.loads((folder / "config.json").read_text())
    assert meta["kind"] == "vvs_skip_policy" and "drafter_fingerprint" in meta
    assert (folder / "README.md").is_file() and (tmp_path / "traces" / "traces.json").is_file()
    assert "OpenMoji" in (folder / "README.md").read_text()  # derived from the world target: its attribution
    assert "held-out AUROC" in res.stdout


def test_a_scheduler_for_another_target_or_drafter_is_refused(tmp_path):
    gpt = tiny_gpt(block_size=16)
    target = LlamaGenTarget(gpt, 2.0)
    torch.manual_seed(0)
    drafter = Drafter(DrafterConfig.for_target(gpt))
    save_scheduler(tmp_path / "s", SkipPolicy(), target, drafter)
    assert isinstance(load_scheduler_policy(tmp_path / "s", target, drafter), SkipPolicy)
    other_target = LlamaGenTarget(tiny_gpt(block_size=16, seed=5), 2.0)
    with pytest.raises(ValueError, match="another target"):
        load_scheduler_policy(tmp_path / "s", other_target, drafter)
    torch.manual_seed(1)
    with pytest.raises(ValueError, match="another drafter"):
        load_scheduler_policy(tmp_path / "s", target, Drafter(DrafterConfig.for_target(gpt)))


def test_held_out_comparison_gives_ordered_knob_quantiles_for_sweeps():
    from data.traces import Traces
    from decode.strategies.learned_skip import PolicyConfig
    from train.scheduler_task import compare_with_similarity_rule

    g = torch.Generator().manual_seed(0)
    n = 400
    feats = torch.rand(n, 8, generator=g)
    similarity = feats[:, 0] * 0.5 + 0.5 * torch.rand(n, generator=g)
    held = Traces(features=feats, proposed=torch.full((n,), 3), kept=(similarity * 4).long().clamp(max=3),
                  similarity=similarity, image=torch.arange(n) // 40)
    policy = SkipPolicy(PolicyConfig(num_features=8, hidden=4))
    policy.set_standardisation(feats)
    out = compare_with_similarity_rule(policy, held)
    for kind in ("threshold_q{}_learned", "tau_q{}_similarity_rule"):
        values = [out[f"heldout/{kind.format(q)}"] for q in (90, 75, 50, 25)]
        assert values == sorted(values, reverse=True) and values[0] > values[-1]
    assert out["heldout/tau_q50_similarity_rule"] == pytest.approx(float(feats[:, 0].quantile(0.5)))
