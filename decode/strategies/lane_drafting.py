"""Drafts for grid rows that advance together (decode/core/lanes.py, the LaneDrafting contract in
decode/strategies/protocols.py).

JacobiLanes: a row's first guesses are the tokens one row up (the spatial prior; on the top row, the
left neighbour); after a pass, the guesses past the accepted ones are redrawn from that pass's
predictions, which become their draft distributions (SJD's Jacobi update), so each row's acceptance
stays exact with respect to what the row sees.

SpatialLanes: trained right / below heads (decode/models/spatial.py) on the target's features of a
pass. After a row's pass, the feature of its last accepted token (whose own LM head gives the row's
next token) feeds the right heads: their tokens are the row's next guesses. The below head reads the
feature of every accepted token and guesses the token under its successor, one row down: a row whose
right guesses run out (or a row that has just started) continues from those. Each guess is drawn from
its head's guided distribution under the run's sampling, which the acceptance rule reads as q.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from decode.core.sampling import SamplingParams, draw, probabilities

Guess = tuple[int, Tensor | None]  # a guessed token and the distribution it was drawn from (None: a copy)


def _copy_above(made: list[int], c: int, width: int, chain: list[Guess], first: int) -> Guess:
    """The spatial prior: the token one row up, else the token to the left."""
    above = made[c - width] if c >= width else -1
    return above if above >= 0 else (chain[-1][0] if chain else made[first - 1]), None


@dataclass(frozen=True)
class JacobiLanes:
    def start(self, target, width: int, sampling: SamplingParams, generator) -> "JacobiLaneRun":
        return JacobiLaneRun(width, sampling, generator)


class JacobiLaneRun:
    seeds_new_rows = False  # new rows start from ZipAR's stand-in alone

    def __init__(self, width: int, sampling: SamplingParams, generator):
        self.width, self.sampling, self.generator = width, sampling, generator
        self.kept: dict[int, list[Guess]] = {}  # row -> guesses redrawn last pass, for its next indices

    def propose(self, row: int, first: int, room: int, made: list[int]) -> list[Guess]:
        chain = list(self.kept.pop(row, [])[:room])
        while len(chain) < room:
            chain.append(_copy_above(made, first + len(chain), self.width, chain, first))
        return chain

    def observe(self, row: int, first: int, chain: list[Guess], accepted: int, logits: Tensor, hidden: Tensor) -> None:
        redrawn = []
        for node in range(accepted + 1, len(chain) + 1):
            q = probabilities(logits[node].float(), self.sampling)
            tok = int(q.argmax()) if self.sampling.greedy else int(draw(q[None], self.generator))
            redrawn.append((tok, q))
        self.kept[row] = redrawn


@dataclass(frozen=True)
class SpatialLanes:
    heads: object  # decode.models.spatial.SpatialHeads

    def start(self, target, width: int, sampling: SamplingParams, generator) -> "SpatialLaneRun":
        if self.heads.config.width != width:
            raise ValueError(f"spatial heads for a grid {self.heads.config.width} tokens wide; this decode's grid "
                             f"is {width} wide")
        return SpatialLaneRun(self.heads, target, width, sampling, generator)


class SpatialLaneRun:
    seeds_new_rows = True  # the below head drafts a new row's first tokens, verified beside its stand-in

    def __init__(self, heads, target, width: int, sampling: SamplingParams, generator):
        self.heads, self.target, self.width = heads, target, width
        self.sampling, self.generator = sampling, generator
        self.right = [n for n in heads.config.offsets() if n.startswith("right")]  # right1, right2, ...
        self.kept: dict[int, list[Guess]] = {}   # row -> the right heads' guesses for its next indices
        self.below: dict[int, Guess] = {}        # image index -> the below head's guess for it
        self.others: dict[int, list[int]] = {}   # row -> the below head's tokens for its last chain's indices

    def propose(self, row: int, first: int, room: int, made: list[int]) -> list[Guess]:
        chain = list(self.kept.pop(row, [])[:room])
        # the row's other draft of the right heads' tokens: the below head's, where it has one (past the right
        # heads the chain is the below head's own guesses, which cannot be compared with themselves)
        alt = []
        while len(alt) < len(chain) and first + len(alt) in self.below:
            alt.append(self.below[first + len(alt)][0])
        self.others[row] = alt
        while len(chain) < room:
            c = first + len(chain)
            chain.append(self.below.pop(c, None) or _copy_above(made, c, self.width, chain, first))
        return chain

    def alternative(self, row: int) -> list[int]:
        """The tokens the below head guessed for the indices the right heads drafted in the row's last
        proposed chain (a skip rule compares the two drafts; empty: nothing to compare, no skip)."""
        return self.others.get(row, [])

    def observe(self, row: int, first: int, chain: list[Guess], accepted: int, logits: Tensor, hidden: Tensor) -> None:
        # hidden [G, 1 + len(chain), D]; node j sits at image index first - 1 + j. The row predicted is
        # first's (a complete row's last token predicts the next row's first)
        row = first // self.width
        self.kept.pop(row, None)
        feats = hidden[:, :accepted + 1].to(next(self.heads.parameters()).dtype)
        names = self.right + (["below"] if "below" in self.heads.heads else [])
        guesses = self._guesses(feats, names)  # name -> [accepted + 1] guesses
        nxt = first + accepted  # the row's next token (sampled from node `accepted`), made by this pass
        row_end = (row + 1) * self.width
        self.kept[row] = [guesses[n][accepted] for j, n in enumerate(self.right, start=1) if nxt + j < row_end]
        if "below" in guesses:
            for j, g in enumerate(guesses["below"]):
                if first + j + self.width < self.heads.config.block_size:
                    self.below[first + j + self.width] = g

    def _guesses(self, feats: Tensor, names: list[str]) -> dict[str, list[Guess]]:
        """Each head's guided distribution at every fed position, and a token drawn from it."""
        out = {}
        for name in names:
            h = self.heads.heads[name](feats)                             # [G, m, D]
            logits = self.target.combine(self.target.logits(h)[:, None].float())[0]  # [m, V]
            q = probabilities(logits, self.sampling)
            toks = q.argmax(-1) if self.sampling.greedy else draw(q, self.generator)
            out[name] = [(int(t), q[i]) for i, t in enumerate(toks.tolist())]
        return out
