"""Drafts for grid rows that advance together (decode/core/lanes.py, the LaneDrafting contract in
decode/strategies/protocols.py).

JacobiLanes: a row's first guesses are the tokens one row up (the spatial prior; on the top row, the
left neighbour); after a pass, the guesses past the accepted ones are redrawn from that pass's
predictions, which become their draft distributions (SJD's Jacobi update), so each row's acceptance
stays exact with respect to what the row sees.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from decode.core.sampling import SamplingParams, draw, probabilities

Guess = tuple[int, Tensor | None]  # a guessed token and the distribution it was drawn from (None: a copy)


@dataclass(frozen=True)
class JacobiLanes:
    def start(self, width: int, sampling: SamplingParams, generator) -> "JacobiLaneRun":
        return JacobiLaneRun(width, sampling, generator)


class JacobiLaneRun:
    def __init__(self, width: int, sampling: SamplingParams, generator):
        self.width, self.sampling, self.generator = width, sampling, generator
        self.kept: dict[int, list[Guess]] = {}  # row -> guesses redrawn last pass, for its next indices

    def propose(self, row: int, first: int, room: int, made: list[int]) -> list[Guess]:
        chain = list(self.kept.pop(row, [])[:room])
        while len(chain) < room:
            c = first + len(chain)
            above = made[c - self.width] if c >= self.width else -1
            chain.append((above if above >= 0 else (chain[-1][0] if chain else made[first - 1]), None))
        return chain

    def observe(self, row: int, chain: list[Guess], accepted: int, logits: Tensor) -> None:
        redrawn = []
        for node in range(accepted + 1, len(chain) + 1):
            q = probabilities(logits[node].float(), self.sampling)
            tok = int(q.argmax()) if self.sampling.greedy else int(draw(q[None], self.generator))
            redrawn.append((tok, q))
        self.kept[row] = redrawn
