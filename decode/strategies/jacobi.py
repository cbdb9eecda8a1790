"""Training-free drafting on the target itself: Speculative Jacobi Decoding (SJD) and SJD-VP.

The "draft" is a window of `window` guessed tokens after the root, verified as a chain in one
target pass. Each draft keeps the distribution q it was drawn from, so the engine's sampled
acceptance (min(1, p / q), residual max(p - q, 0)) is exactly SJD's rule. After a step the Jacobi
update replaces the unaccepted tail by fresh draws from the target's predictions at their parents
in this pass (those become their q), and new guesses refill the window:
- init `random`: uniform codes, q one-hot; `repeat_horizon`: the left neighbour's token (LlamaGen's
  setting in SJD); `repeat_vertical`: the token one grid row above.
SJD-VP ("verification prediction"; its paper's exact rule and numbers were not available): when a
window slot is redrawn, tokens whose target probability rose since the previous iteration at that
slot are favoured: q ∝ p_k * clamp(p_k / p_{k-1}, 1, cap) ** beta. The draft is still drawn from
the q used in acceptance, so decoding stays exact; only which drafts are proposed changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from decode.core.host import fetch, to_device
from decode.core.sampling import SamplingParams, draw, probabilities
from decode.models.target import LlamaGenTarget
from decode.models.target.llamagen import TargetOutput
from decode.core.trees import StepOutcome, Tree, ancestry_mask

INITS = ("random", "repeat_horizon", "repeat_vertical")


@dataclass(frozen=True)
class JacobiDrafts:
    """Jacobi drafting on the target itself: SJD (vp_beta 0), SJD-VP, and MC-SJD (coupled)."""
    window: int = 16
    init: str = "repeat_horizon"
    vp_beta: float = 0.0
    vp_cap: float = 10.0
    coupled: bool = False
    pac_width: int = 1   # SJD-PAC's proactive drafting: candidates at each of the first pac_depth slots
    pac_depth: int = 0

    def start(self, target: LlamaGenTarget, batch: int, num_tokens: int) -> "JacobiDrafting":
        return JacobiDrafting(target, batch, num_tokens, window=self.window, init=self.init, vp_beta=self.vp_beta,
                              vp_cap=self.vp_cap, coupled=self.coupled, pac_width=self.pac_width,
                              pac_depth=self.pac_depth)


def coupled_draw(q: Tensor, previous: int, q_previous: Tensor | None, generator) -> Tensor:
    """MC-SJD's redraw of a window slot (docs/algorithms.md 2.4): keep the slot's previous draft x with
    probability min(1, q(x) / q_prev(x)), else draw from norm(max(0, q - q_prev)). This maximal
    coupling of q_prev and q leaves the draft's marginal exactly q, so acceptance stays exact, while
    drafts stop churning where the prediction barely moved. q_prev None: x was a one-hot guess.
    [INFER: the rule is written from the abstract of arXiv 2510.24211, whose code we did not read.]
    Always draws both the uniform and the residual sample, so the row's stream advances alike."""
    if q_previous is None:
        q_previous = torch.zeros_like(q)
        q_previous[previous] = 1.0
    u = torch.rand((), generator=generator, device=q.device)
    keep = u * q_previous[previous] < q[previous]
    residual = (q - q_previous).clamp_min(0)
    total = residual.sum()
    fresh = draw(torch.where(total > 0, residual / total.clamp_min(1e-30), q)[None], generator)
    return torch.where(keep, torch.tensor([previous], device=q.device), fresh)


class JacobiDrafting:
    def __init__(self, target: LlamaGenTarget, batch: int, num_tokens: int, *, window: int = 16,
                 init: str = "repeat_horizon", vp_beta: float = 0.0, vp_cap: float = 10.0, coupled: bool = False,
                 pac_width: int = 1, pac_depth: int = 0):
        if window < 1:
            raise ValueError(f"sjd window must be >= 1, got {window}")
        if init not in INITS:
            raise ValueError(f"sjd init {init!r} unknown; known: {', '.join(INITS)}")
        self.target, self.window, self.init, self.beta, self.cap = target, int(window), init, vp_beta, vp_cap
        self.grid = int(math.isqrt(target.num_image_tokens))
        self.history: list[list[int]] = [[] for _ in range(batch)]  # committed tokens per row
        self.drafts: list[list[int]] = [[] for _ in range(batch)]
        self.q: list[list[Tensor | None]] = [[] for _ in range(batch)]     # None: a one-hot guess
        self.prev: list[list[Tensor | None]] = [[] for _ in range(batch)]  # last target prediction there
        self.roots: list[int] = []  # each row's current root, on the host (read with the step's fetch)
        self.spare: list[list[int]] = [[] for _ in range(batch)]  # init=random: guesses drawn ahead
        self.num_tokens = num_tokens
        self.coupled = coupled
        self.pac = (int(pac_width) - 1, min(int(pac_depth), self.window)) if pac_width > 1 else (0, 0)

    def begin(self, prefix: TargetOutput, prefix_valid: Tensor, following: Tensor, generators=None) -> None:
        """The first roots (and, for init=random, the first window of guesses), read in the prefill;
        image tokens given before the root (`following` [B, k + 1]) start each row's history."""
        b = following.shape[0]
        gens = generators or [None] * b
        fresh = [g for r in range(b) for g in self._guesses(self.window, gens[r])]
        known, *guesses = fetch(following, *fresh)
        self.history = [row[:-1] for row in known.tolist()]
        self.roots, self.spare = known[:, -1].tolist(), [g.tolist() for g in guesses] or self.spare

    def propose(self, root: Tensor, sampling: SamplingParams, generators) -> Tree:
        b, dev, v = root.shape[0], root.device, self.target.vocab_size
        for r in range(b):
            self._refill(r, self.roots[r])
        t = 1 + self.window
        tokens = to_device([[self.roots[r]] + self.drafts[r] for r in range(b)], dev)
        q = torch.zeros(b, t, v, device=dev)
        for r in range(b):
            for j, (tok, dist) in enumerate(zip(self.drafts[r], self.q[r])):
                if dist is None:
                    q[r, j + 1, tok] = 1.0
                else:
                    q[r, j + 1] = dist
        parents = (torch.arange(t, device=dev) - 1).expand(b, t)
        depth = torch.arange(t, device=dev).expand(b, t)
        if self.pac[0] and self.pac[1] and not sampling.greedy:
            tokens, parents, depth, q = self._proactive(tokens, parents, depth, q, generators)
        return Tree(tokens, parents, depth, ancestry_mask(parents), q=q)

    def _proactive(self, tokens: Tensor, parents: Tensor, depth: Tensor, q: Tensor, generators):
        """SJD-PAC's proactive drafting: at each of the first pac_depth slots, pac_width - 1 siblings of the
        chain's draft, drawn from the slot's q without replacement (the chain's draft excluded), each
        carrying q with the tokens before it removed, renormalised: the acceptance's residual walk over them
        is then recursive rejection sampling, exact. Slots holding a one-hot guess get none (q zero: skipped).
        Siblings are leaves after the chain (tree indices window + 1 ...), children of the chain node above."""
        extra, d = self.pac
        b = tokens.shape[0]
        sib_tok, sib_q, sib_par, sib_depth = [], [], [], []
        for slot in range(1, d + 1):
            base = q[:, slot].clone()                                  # [B, V]
            base[torch.arange(b), tokens[:, slot]] = 0                 # the chain's draft is the first candidate
            noise = torch.stack([torch.empty_like(base[r]).exponential_(1, generator=generators[r]) for r in range(b)])
            order = (base / noise).topk(extra, dim=-1).indices          # [B, extra] a draw without replacement
            removed = torch.zeros_like(base)
            removed[torch.arange(b), tokens[:, slot]] = 1
            for k in range(extra):
                left = q[:, slot] * (1 - removed)
                total = left.sum(-1, keepdim=True)
                ok = (total > 0) & (left.gather(1, order[:, k:k + 1]) > 0)  # [B, 1]
                sib_q.append(torch.where(ok, left / total.clamp_min(1e-30), torch.zeros_like(left)))
                sib_tok.append(order[:, k])
                sib_par.append(slot - 1)
                sib_depth.append(slot)
                removed[torch.arange(b), order[:, k]] = 1
        dev = tokens.device
        tokens = torch.cat([tokens, torch.stack(sib_tok, 1)], 1)
        parents = torch.cat([parents, torch.tensor(sib_par, device=dev).expand(b, -1)], 1)
        depth = torch.cat([depth, torch.tensor(sib_depth, device=dev).expand(b, -1)], 1)
        q = torch.cat([q, torch.stack(sib_q, 1)], 1)
        return tokens, parents, depth, q

    def observe(self, step: StepOutcome, sampling: SamplingParams, generators) -> None:
        """Jacobi update from this pass: accepted drafts leave the window, the tail is redrawn (on the
        device; the new drafts, the committed tokens and the next roots come up in one fetch)."""
        counts = step.counts.tolist()
        rows = [r for r, c in enumerate(counts) if c]
        draws = []
        for r in rows:
            tail = range(counts[r] + 1, 1 + self.window)  # old chain nodes past the new root
            new_q, new_p = [], []
            for node in tail:
                p = probabilities(step.logits[r, node - 1].float(), sampling)
                q = self._favour(p, self.prev[r][node - 1]) if self.beta > 0 else p
                if sampling.greedy:
                    draws.append(q.argmax()[None])
                elif self.coupled:
                    draws.append(coupled_draw(q, self.drafts[r][node - 1], self.q[r][node - 1], generators[r]))
                else:
                    draws.append(draw(q[None], generators[r]))
                new_q.append(q)
                new_p.append(p)
            self.q[r], self.prev[r] = new_q, new_p
            draws += self._guesses(self.window - len(tail), generators[r] if generators else None)
        following, *drawn = fetch(step.following, *([torch.cat(draws)] if draws else []))
        drawn = drawn[0].tolist() if drawn else []
        for r in rows:
            c = counts[r]  # committed: the root, then the tokens after each committed node but the last
            self.history[r].extend([self.roots[r]] + following[r, :c - 1].tolist())
            k = len(range(c + 1, 1 + self.window))
            self.drafts[r], drawn = drawn[:k], drawn[k:]
            if self.init == "random":  # the guesses the next refill takes
                self.spare[r], drawn = drawn[:self.window - k], drawn[self.window - k:]
            self.roots[r] = int(following[r, c - 1])

    # --- helpers ---------------------------------------------------------------------------------
    def _guesses(self, n: int, gen: torch.Generator | None) -> list[Tensor]:
        """init=random: n uniform codes drawn ahead on the row's generator (they come up with the
        step's fetch, so a refill reads nothing); other inits draw nothing."""
        if self.init != "random" or n <= 0:
            return []
        return [torch.randint(self.target.vocab_size, (n,), generator=gen, device=gen.device if gen else "cpu")]

    def _favour(self, p: Tensor, before: Tensor | None) -> Tensor:
        """SJD-VP: boost tokens whose probability rose since the last prediction at this slot."""
        if before is None:
            return p
        gain = (p / before.clamp_min(1e-12)).clamp(1.0, self.cap) ** self.beta
        q = p * gain
        return q / q.sum()

    def _refill(self, r: int, root: int) -> None:
        """Top the window up to `window` guesses after the root."""
        while len(self.drafts[r]) < self.window:
            pos = len(self.history[r]) + 1 + len(self.drafts[r])  # raster position of the new guess
            seq = self.history[r] + [root] + self.drafts[r]
            if self.init == "random":
                tok = self.spare[r].pop(0)
            elif self.init == "repeat_vertical" and pos >= self.grid:
                tok = seq[pos - self.grid]
            else:
                tok = seq[pos - 1]
            self.drafts[r].append(tok)
            self.q[r].append(None)
            self.prev[r].append(None)
