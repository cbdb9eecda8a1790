"""`python -m train evaluator experiment=smoke` trains and writes a loadable evaluator."""
import json

import torch

from decode.evaluation.world_evaluator import load_evaluator
from tests.conftest import run_train


def test_smoke_run_writes_a_loadable_evaluator(tmp_path):
    res = run_train("evaluator", "experiment=smoke", f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path}/hydra")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "evaluator" / "metrics.json").read_text())
    assert 0.0 <= metrics["val/alignment"] <= 1.0 and "val/object_acc" in metrics
    pred = load_evaluator(tmp_path / "evaluator").predict(torch.zeros(2, 3, 64, 64))
    assert pred.cell_object.shape == (2, 9) and pred.features.shape[0] == 2


def test_fine_tuning_starts_from_the_given_weights_and_refuses_another_architecture(tmp_path):
    import pytest

    from data.world import evaluator_labels
    from decode.models.checkpoint import save_model_folder
    from decode.evaluation.world_evaluator import AttributeEvaluator, EvaluatorConfig
    from train.evaluator_task import start_from

    make = lambda width: AttributeEvaluator(EvaluatorConfig(**evaluator_labels(), image_size=64, width=width))  # noqa: E731
    torch.manual_seed(0)
    source, fresh = make(8), make(8)
    save_model_folder(tmp_path / "ev", source, source.config.to_dict(), kind="world_evaluator")
    start_from(fresh, str(tmp_path / "ev"))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), fresh.state_dict().values()))
    with pytest.raises(ValueError, match="width"):
        start_from(make(16), str(tmp_path / "ev"))


def test_fine_tuning_onto_another_world_keeps_all_but_the_object_head(tmp_path):
    from data.world import evaluator_labels
    from decode.models.checkpoint import save_model_folder
    from decode.evaluation.world_evaluator import AttributeEvaluator, EvaluatorConfig
    from train.evaluator_task import start_from

    torch.manual_seed(0)
    v2 = AttributeEvaluator(EvaluatorConfig(**evaluator_labels("v2"), image_size=64, width=8))
    v3 = AttributeEvaluator(EvaluatorConfig(**evaluator_labels("v3"), image_size=64, width=8))
    head_before = v3.object_head.weight.clone()
    save_model_folder(tmp_path / "ev", v2, v2.config.to_dict(), kind="world_evaluator")
    start_from(v3, str(tmp_path / "ev"))
    assert torch.equal(v3.trunk[0][0].weight, v2.trunk[0][0].weight)
    assert torch.equal(v3.object_head.weight, head_before)  # 24 labels against 303: it starts fresh
    assert v3.object_head.out_features == 1 + 8 + 16
