"""`method=gridar` and `method=best_of_n`: test-time scaling around any decoding method.

Their method config names the scaling and the method the candidates decode with (`method.decode`,
default ar; GridAR + VVS: `method=gridar method.decode=vvs`); every other `method.*` key goes to that
method, whose knobs are checked as usual. Defaults live here (SCALING), the published ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from decode.scaling.gridar import GridAR

SCALING: dict[str, dict] = {  # name -> its knobs with their published defaults (GridAR's Janus-Pro configs)
    "gridar": {"decode": "ar", "candidates": 4, "stages": (0.25, 0.5), "reformulate": True, "three_way": True,
               "verifier": "world", "certainty": 0.99},
    "best_of_n": {"decode": "ar", "candidates": 8, "verifier": "world"},
}


@dataclass(frozen=True)
class ScalingPlan:
    """A resolved scaling: `gridar` (its settings) or `best_of_n`, the candidates per image, and the
    verifier: `world` (the world evaluator of the run's `evaluator`) or a VLM folder (transformers)."""
    name: str
    candidates: int
    verifier: str
    certainty: float = 0.99
    gridar: GridAR | None = None

    def describe(self) -> str:
        if self.gridar is None:
            return f"best_of_n (N={self.candidates}, ranked by the {self.verifier} verifier)"
        g = self.gridar
        return (f"gridar (N={g.candidates}, stages {list(g.stages)}, reformulate {g.reformulate}, 3-way guidance "
                f"{g.three_way}, {self.verifier} verifier)")


def split_scaling(options: dict) -> tuple[ScalingPlan | None, str, dict]:
    """A `method` config -> (the scaling or None, the decoding method's name, its overrides). Fails,
    naming the value, on N not a multiple of 4 (GridAR), bad stages, or a verifier folder that is not there."""
    name = options.get("name")
    if name not in SCALING:
        return None, name, {k: v for k, v in options.items() if k not in SCALING["gridar"]
                            or _refuse_scaling_key(name, k, v)}
    given = {k: v for k, v in options.items() if v is not None and k != "name"}
    knobs = {k: given.pop(k, v) for k, v in SCALING[name].items()}
    for k in set(SCALING["gridar"]) - set(knobs):
        if given.pop(k, None) is not None:
            raise ValueError(f"method.{k} is a GridAR knob; method=best_of_n reads {', '.join(SCALING['best_of_n'])}")
    if knobs["decode"] in SCALING:
        raise ValueError(f"method.decode={knobs['decode']} is a scaling; the candidates decode with a decoding method")
    verifier = str(knobs["verifier"])
    if verifier != "world" and not Path(verifier).is_dir():
        raise ValueError(f"method.verifier={verifier!r}: world (the world evaluator) or a folder holding a "
                         f"vision-language model saved by transformers; no such folder")
    if verifier != "world" and not (Path(verifier) / "config.json").is_file():
        raise ValueError(f"method.verifier={verifier!r} is not a model folder: no config.json (a vision-language "
                         f"model saved by transformers' save_pretrained)")
    n = int(knobs["candidates"])
    if name == "best_of_n":
        if n < 1:
            raise ValueError(f"method.candidates must be >= 1, got {n}")
        return ScalingPlan(name, n, verifier), knobs["decode"], given
    certainty = float(knobs["certainty"])
    if not 0.5 <= certainty < 1:
        raise ValueError(f"method.certainty must be in [0.5, 1) (impossible only when this sure), got {certainty}")
    grid = GridAR(n, tuple(float(s) for s in knobs["stages"]), bool(knobs["reformulate"]), bool(knobs["three_way"]))
    return ScalingPlan(name, n, verifier, certainty, grid), knobs["decode"], given


def _refuse_scaling_key(name: str, key: str, value) -> bool:
    if value is not None:
        raise ValueError(f"method.{key} belongs to test-time scaling (method=gridar or best_of_n), not method={name}")
    return False


def make_verifier(plan: ScalingPlan, parts):
    """The plan's verifier over the run's components (decode.api.Components)."""
    if plan.verifier == "world":
        if parts.scorer is None:
            raise ValueError("the world verifier is the world evaluator: keep evaluator=world (not ~evaluator)")
        from decode.scaling.verifiers import WorldVerifier

        return WorldVerifier(parts.scorer.evaluator, plan.certainty)
    from decode.scaling.vlm import VLMVerifier

    return VLMVerifier.from_folder(plan.verifier, device=parts.target.device)
