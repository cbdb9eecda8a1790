"""The three strategies a decoding method is made of, as the engine sees them.

A method (decode.core.engine.Method) is one of each:
- Drafting: proposes a tree of candidate tokens after each root (EAGLE-2's dynamic tree, a static
  tree, a Jacobi window on the target itself); `None` for plain AR.
- Acceptance: walks a verified tree and says which nodes become image tokens (exact, LANTERN's
  delta, LANTERN++'s lambda).
- Skipping: says which rows skip verification this step and which nodes they take unverified
  (never, uniform, path similarity, a learned policy).
Each strategy is a small frozen object built once per run; `start` makes the per-generation state
(caches, random streams), so one strategy object serves every batch. The implementations live
beside this file; decode/strategies/registry.py names the published compositions.
"""
from __future__ import annotations

from typing import Protocol

from torch import Tensor

from decode.core.sampling import SamplingParams
from decode.core.trees import StepOutcome, Tree


class DraftRun(Protocol):
    """One generation's drafter state."""

    def begin(self, prefix, prefix_valid: Tensor, following: Tensor, generators) -> None:
        """Told the prefill's output (target features of the prefix [G, B, P + k, D]: the caption,
        then the k image tokens given before decoding starts, if any), which prefix slots are real
        [G*B, P + k] and the token after each of the last k + 1 slots [B, k + 1]: those image tokens
        then the first root."""

    def propose(self, root: Tensor, sampling: SamplingParams, generators) -> Tree:
        """A tree [B, T] rooted at each row's root [B]."""

    def observe(self, outcome: StepOutcome, sampling: SamplingParams, generators) -> None:
        """Told what the step committed (features and following tokens of the committed nodes)."""


class Drafting(Protocol):
    def start(self, target, batch: int, num_tokens: int) -> DraftRun:
        ...


class Acceptance(Protocol):
    def __call__(self, tree: Tree, logits: Tensor, sampling: SamplingParams, generators,
                 rows: list[int] | None = None):
        """-> decode.strategies.acceptance.Verdict: per asked row, the accepted path (root first)
        and the next root, from the target's logits over the tree [B, T, V]."""


class SkipRun(Protocol):
    """One generation's skipping state."""

    def plan(self, tree: Tree, progress) -> tuple[Tree, dict[int, list[int]]]:
        """The rows that skip this step -> their nodes (root first; the last is the next root). May
        return the tree with its host copy fetched."""

    def stale_features(self, row: int, n: int) -> Tensor:
        """[G, n, D] features that stand in for the target's on a skipped row."""

    def observe(self, outcome: StepOutcome, filled: dict[int, Tensor]) -> None:
        """Told the step's outcome, and per verified row the fresh features [G, c, D] of the c
        tokens it had committed unverified before."""


class Skipping(Protocol):
    def start(self, target, batch: int, num_tokens: int, generators, dtype, given: Tensor | None = None) -> SkipRun:
        """`given` [G, B, k, D]: the target's features of the k image tokens given as a prefix."""


class LaneRun(Protocol):
    """One image's drafts for grid rows that advance together (decode/core/lanes.py): each row in flight
    verifies a chain of guesses after its newest token in every pass."""

    def propose(self, row: int, first: int, room: int, made: list[int]) -> list[tuple[int, Tensor | None]]:
        """Up to `room` guesses for image indices first, first + 1, ... of grid row `row`, each with the
        distribution it was drawn from (None: a deterministic copy), given the tokens made (-1: not yet)."""

    def observe(self, row: int, first: int, chain: list, accepted: int, logits: Tensor, hidden: Tensor) -> None:
        """Told how many of the row's guesses were accepted, the target's logits [1 + len(chain), V] and
        features [G, 1 + len(chain), D] over [newest ; chain] (node j at image index first - 1 + j,
        predicting index first + j)."""


class LaneDrafting(Protocol):
    """Drafts for rows advancing together: Jacobi guesses (decode.strategies.lane_drafting.JacobiLanes), or
    trained right / below heads on the target's features (SpatialLanes)."""

    def start(self, target, width: int, sampling: SamplingParams, generator) -> LaneRun:
        ...
