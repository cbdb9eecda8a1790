"""The redundancy study's arithmetic on hand-made traces, and a real trace on the tiny world."""
import torch

from decode.evaluation.redundancy import Traced, redundancy_markdown, redundancy_summary, trace_steps
from decode.strategies.learned_skip import TraceStep


def _step(image, progress, sim, proposed, kept):
    feats = [sim, 0, 0, 0, 0, 0, progress, 0]
    return TraceStep(image, 0, feats, proposed, kept, 0.9 if kept == proposed else 0.2)


def test_redundant_share_rows_bins_and_the_best_case_compression():
    # 2 images of 16 tokens (grid 4), 10 verified steps each; 4 eligible steps, 2 of them redundant
    steps = [_step(0, 0.30, 0.8, 3, 3), _step(0, 0.55, 0.2, 2, 0), _step(1, 0.80, 0.9, 2, 2), _step(1, 0.10, 0.1, 4, 1)]
    r = redundancy_summary(Traced(steps, torch.tensor([10, 10]), 16), grid=4, bins=2)
    assert r["redundant_share"] == 0.5 and r["redundant_steps"] == 1.0 and r["eligible_steps"] == 2.0
    assert r["tokens_per_redundant_skip"] == 2.5
    assert r["step_compression"] == 32 / 20 and r["step_compression_if_skipped"] == 32 / 18
    assert r["by_row"] == {0: "0.000 (1 steps)", 1: "1.000 (1 steps)", 2: "0.000 (1 steps)", 3: "1.000 (1 steps)"}
    assert [share for _, _, share in r["by_similarity"]] == ["0.000 (2 steps)", "1.000 (2 steps)"]
    assert r["kept_share"] == (1 + 0 + 1 + 0.25) / 4
    text = redundancy_markdown({"lantern": r}, "note")
    assert "| lantern | 10.0 | 2.0 | 1.0 | 0.500 | 2.50 |" in text and text.rstrip().endswith("stale features).")


def test_tracing_a_real_decode_records_eligible_steps_and_changes_nothing():
    from decode.api import Components
    from decode.core.engine import generate
    from decode.core.sampling import row_generators
    from decode.core.trees import TreeParams
    from decode.strategies.registry import build_method
    from tests.decode.test_speculative import SAMPLED, world
    from tests.train.test_scheduler_task import _TinyText
    from types import SimpleNamespace

    target, drafter, _, codebook = world(1)
    vq = SimpleNamespace(quantize=SimpleNamespace(embedding=SimpleNamespace(weight=codebook)))
    parts = Components(target, vq, _TinyText(), drafter)
    method = build_method("lantern", sampling=SAMPLED, tree=TreeParams(12, 3, 4), drafter=drafter, codebook=codebook,
                          options={"lantern_k": 16})
    traced = trace_steps(parts, ["a", "b", "c"], method, [1, 2, 3], [7, 8, 9], SAMPLED, batch_size=3, progress=False)
    assert traced.steps and {s.image for s in traced.steps} == {0, 1, 2}
    assert all(s.features[6] * 64 > 5 for s in traced.steps)  # past the warm-up only
    cond = parts.text.encode(["a", "b", "c"])  # the same batch: this text double's captions depend on it
    from decode.models.target import Condition
    plain = generate(target, Condition(cond.emb, cond.mask), num_tokens=64, sampling=SAMPLED,
                     generators=row_generators([1, 2, 3]), method=method)
    assert torch.equal(traced.nfe, plain.nfe)  # recording never skips and never changes what is decoded
