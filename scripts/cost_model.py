"""Wall-clock cost model (decode/evaluation/cost_model.py): time each component at a model size,
combine with a benchmark's acceptance statistics, predict each method's speed-up over AR.

python scripts/cost_model.py size=world results=outputs/benchmark/world_cpu/results.json batch=8 threads=1
python scripts/cost_model.py size=XL results=outputs/benchmark/world_cpu/results.json batch=1
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from decode.evaluation.cost_model import run_cost_model  # noqa: E402
from decode.resolvers import register_resolvers, reporting_input_errors  # noqa: E402


@hydra.main(version_base="1.3", config_path=str(REPO / "conf"), config_name="cost_model")
@reporting_input_errors  # bad input: its one-line message, exit status 1
def main(cfg: DictConfig) -> None:
    run_cost_model(cfg)


if __name__ == "__main__":
    register_resolvers()
    main()
