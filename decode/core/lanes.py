"""Next-set decoding whose rows verify drafts: every grid row in flight proposes a chain of Jacobi
guesses after its newest token, one target pass verifies every row's chain, and each row accepts by
the method's rule (SJD's exact rule, or a relaxed one). ZipAR's wavefront (decode/core/wavefront.py)
times the tokens a row accepts per pass: the spatial side of speculative decoding without a trained
head (SJD per row; shared/spec/ALGORITHMS.md 7 and 10).

Per pass, per row in flight (top row first), the input is [newest token ; guesses for the row's next
columns] at their raster positions. A token sees the committed tokens at earlier positions, its own
row's chain before it and the newest tokens of the rows above (real tokens of this pass); never
another row's guesses. The guesses come from a LaneDrafting strategy (decode/strategies/protocols.py):
JacobiLanes by default (the token one row up, then SJD's Jacobi redraws: each row's acceptance is exact
with respect to what the row sees); a trained right/below head is the other kind the contract is for.

A row never gets closer to the row above than ZipAR lets it (its count at most the row above's minus
`window` plus one, until the row above is complete), so every token keeps ZipAR's context; a row's
chain is cut to what that leaves, and to its own row. Rows then move at the pace the rows above
accept. New rows start as in ZipAR (the stand-in lane), without guesses. Rows accept different
lengths, so each image runs on its own schedule (one image at a time).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from decode.core.engine import Generation
from decode.core.host import to_device, wait_for
from decode.core.sampling import SamplingParams, sample
from decode.core.trees import HostTree, Tree, ancestry_mask
from decode.models.target import Condition
from decode.strategies.lane_drafting import Guess, JacobiLanes
from decode.strategies.skipping import SimilaritySkip, StepContext, path_similarity


@torch.no_grad()
def generate_lanes(target, condition: Condition, *, num_tokens: int, sampling: SamplingParams, generators,
                   accept, schedule, width: int, height: int, drafting=None, skipping=None) -> Generation:
    """`drafting`: a LaneDrafting strategy (decode/strategies/protocols.py); None: JacobiLanes. `skipping`:
    VVS's skipping per row (decode.strategies.skipping.Skipping; None or NeverSkip: every row verifies)."""
    if not sampling.greedy and generators is None:
        raise ValueError("sampled decoding needs one generator per image")
    wait_for(target.device)
    t0 = time.perf_counter()
    made, runs = [], []
    for i in range(condition.batch):
        part = Condition(*(x[i:i + 1] if x is not None else None
                           for x in (condition.cond, condition.mask, condition.refined, condition.refined_mask)))
        tokens, run = _one_image(target, part, num_tokens, sampling, None if generators is None else generators[i],
                                 accept, schedule, width, height, drafting, skipping)
        made.append(tokens)
        runs.append(run)
    wait_for(target.device)
    loop = time.perf_counter() - t0
    nfe = torch.tensor([r.passes for r in runs])
    skipped = torch.tensor([r.skipped for r in runs])
    return Generation(tokens=torch.cat(made), nfe=nfe, steps=torch.tensor([r.row_steps for r in runs]), prefill_s=0.0,
                      loop_s=loop, skipped=skipped, verified_tokens=torch.tensor([r.verified for r in runs]),
                      verify_s=loop, batch_passes=int(nfe.sum()), batch_steps=int(nfe.max()))


@dataclass
class _Count:
    """One image's run: target passes, row-steps (a row in flight verifying or skipping once), row-steps
    skipped, and tokens committed by verified row-steps."""
    passes: int = 0
    row_steps: int = 0
    skipped: int = 0
    verified: int = 0


def _one_image(target, cond: Condition, num_tokens: int, sampling, gen, accept, schedule, width: int,
               height: int, drafting=None, skipping=None) -> tuple[Tensor, _Count]:
    """One image's tokens [1, N] and what its run cost."""
    from decode.core.wavefront import _plan  # ZipAR's lanes: which rows are in flight and what each predicts

    device, prefix = target.device, target.prefix_len
    gens = None if gen is None else [gen]
    # a pass feeds per row in flight its unverified tokens (at most max_consecutive chains), newest and chain
    most = getattr(getattr(skipping, "limits", None), "max_consecutive", 0)
    cache, out = target.start(cond, num_tokens, extra_slots=schedule.max_rows * ((most + 1) * schedule.lane_drafts + 1) + 1)
    made = [int(sample(out.logits[:, -1], sampling, gens))] + [-1] * (num_tokens - 1)
    count, fed, slots, tally = [1] + [0] * (height - 1), [0] * height, list(range(prefix)), _Count()
    drafts = (drafting or JacobiLanes()).start(target, width, sampling, gen)
    skips = _LaneSkips(skipping, height, num_tokens)
    seeds = bool(getattr(drafts, "seeds_new_rows", False))
    while sum(count) < num_tokens:
        lanes = _plan(count, fed, width, prefix, schedule)
        avail = list(count)  # rooms are set by what the rows above had before this pass's skips
        seq, pos, lane_of, real, chains, unfed = [], [], [], [], [], []
        for li, lane in enumerate(lanes):
            # a new row's stand-in verifies guesses too when the drafting seeds new rows (a below head):
            # accepted, they are committed and fed (their KV) by the row's next pass, after the stand-in is gone
            in_row = ((lane.keep or seeds) and lane.predicts is not None and lane.predicts // width == lane.row)
            room = _room(avail, lane.row, lane.predicts, width, schedule) if in_row else 0
            chain = drafts.propose(lane.row, lane.predicts, room, made) if room else []
            if chain and skips.wants(lane.row, chain, drafts, sum(count), tally.row_steps):
                for j, (tok, _) in enumerate(chain):  # committed unverified; fed (their KV) by the row's next pass
                    made[lane.predicts + j] = tok
                count[lane.row] += len(chain)
                avail[lane.row] = fed[lane.row]  # rows below see what is in the cache: not its newest, not these
                tally.row_steps, tally.skipped = tally.row_steps + 1, tally.skipped + 1
                chains.append(None)
                unfed.append([])
                continue
            # tokens of the row committed unverified on skipped steps, then the newest, then the guesses
            before = list(range(lane.row * width + fed[lane.row], lane.token_at)) if lane.keep else []
            chains.append(chain)
            unfed.append(before)
            for j, tok in enumerate([made[i] for i in before] + [made[lane.token_at]] + [t for t, _ in chain]):
                seq.append(tok)
                pos.append(lane.position - len(before) + j)
                lane_of.append(li)
                real.append(lane.keep and j <= len(before))
        if not seq:  # every row in flight skipped: no target pass
            continue
        p, which, real_t = torch.tensor(pos), torch.tensor(lane_of), torch.tensor(real)
        same, earlier = which[:, None] == which[None, :], p[None, :] < p[:, None]
        block = torch.eye(len(seq), dtype=torch.bool) | (earlier & (same | real_t[None, :]))
        out = target.extend(cache, to_device([seq], device), block_mask=to_device(block, device)[None],
                            positions=to_device(p, device)[None], slot_positions=to_device(slots, device)[None])
        logits, hidden = out.logits[0], out.hidden[:, 0]  # [n, V], [G, n, D]
        tally.passes += 1
        keep = []
        for li, (lane, chain, before) in enumerate(zip(lanes, chains, unfed)):
            if chain is None:  # skipped this pass
                continue
            idx = [i for i, w in enumerate(lane_of) if w == li]
            node = idx[len(before):]  # [newest ; guesses]
            if lane.predicts is None:  # a complete row's last token, fed for its KV only
                path, nxt = [0], None
            else:  # top row first: each image's generator is drawn in this order
                path, nxt = _accept(accept, [seq[i] for i in node], chain, logits[node], sampling, gens)
            if lane.keep:  # the unverified tokens, the newest and the accepted guesses: real now, their KV kept
                keep += idx[:len(before) + len(path)]
                slots += [lane.position - len(before) + j for j in range(len(before) + len(path))]
                fed[lane.row] += len(before) + len(path)
                skips.verified(lane.row)
            if nxt is None:
                continue
            for j in range(1, len(path)):
                made[lane.predicts + j - 1] = seq[node[j]]
            made[lane.predicts + len(path) - 1] = nxt
            count[lane.predicts // width] += len(path)  # the row predicted (a complete row's: the next)
            tally.row_steps, tally.verified = tally.row_steps + 1, tally.verified + len(path)
            drafts.observe(lane.row, lane.predicts, chain, len(path) - 1, logits[node], hidden[:, node])
        length = int(cache.host_length[0])
        src = torch.tensor([length + i for i in keep]).expand(target.groups, len(keep))
        cache.keep(to_device(src, device), torch.full((target.groups,), len(keep)))
    return torch.tensor([made], device=device), tally


class _LaneSkips:
    """VVS's skipping for rows of a wavefront: a row in flight commits its drafted chain unverified
    (the target pass, run for the other rows, does not feed it), within the skip limits (warm-up over
    the image's tokens, consecutive skips per row). Rules: uniform (every interval-th row-step) and
    similarity, which compares the row's two drafts of the same tokens (the chain and the alternative
    the drafting offers: the below head's guesses beside the right heads') with VVS's path similarity."""

    def __init__(self, skipping, rows: int, num_tokens: int):
        self.skipping = skipping if getattr(skipping, "rule", None) is not None else None
        self.run, self.num_tokens = [0] * rows, num_tokens

    def wants(self, row: int, chain: list, drafts, made: int, step: int) -> bool:
        if self.skipping is None:
            return False
        other = drafts.alternative(row) if hasattr(drafts, "alternative") else []
        paths = [[t for t, _ in chain], other]
        tokens = torch.tensor([[0] + [t for p in paths for t in p]])
        parents, at = [-1], 1
        for p in paths:  # two chains under one root
            parents += [0] + list(range(at, at + len(p) - 1)) if p else []
            at += len(p)
        tree = HostTree(tokens, torch.tensor([parents]))
        ctx = StepContext(tree, step, torch.tensor([made]), torch.tensor([self.run[row]]), self.num_tokens)
        if not bool(self.skipping.limits.eligible(ctx)[0]):
            return False
        rule = self.skipping.rule
        if isinstance(rule, SimilaritySkip):
            skip = bool(path_similarity(tree, rule.latents, rule.decay, stride=1)[0] >= rule.tau)
        else:
            skip = bool(rule.wants_skip(ctx, torch.ones(1, dtype=torch.bool))[0])
        self.run[row] = self.run[row] + 1 if skip else self.run[row]
        return skip

    def verified(self, row: int) -> None:
        self.run[row] = 0


def _room(count: list[int], row: int, first: int, width: int, schedule) -> int:
    """How many guesses row `row` may verify after index `first`: within its row (its last prediction
    stays in the row), up to `lane_drafts`, and never closer to the row above than ZipAR's window."""
    room = min(schedule.lane_drafts, (row + 1) * width - first - 1)
    if row > 0 and count[row - 1] < width:
        room = min(room, count[row - 1] - schedule.window - count[row])
    return max(room, 0)


def _accept(accept, tokens: list[int], chain: list[Guess], logits: Tensor, sampling, gens) -> tuple[list[int], int]:
    """The lane's chain [newest ; guesses] through the acceptance rule: accepted nodes (root first) and
    the next token."""
    t, dev = len(tokens), logits.device
    parents = (torch.arange(t, device=dev) - 1)[None]
    q = None
    if not sampling.greedy:
        q = torch.zeros(1, t, logits.shape[-1], device=dev)
        for j, (tok, dist) in enumerate(chain, start=1):
            if dist is None:
                q[0, j, tok] = 1.0
            else:
                q[0, j] = dist
    tree = Tree(to_device([tokens], dev), parents, torch.arange(t, device=dev)[None], ancestry_mask(parents), q=q)
    verdict = accept(tree, logits[None], sampling, gens)
    return verdict.paths[0], int(verdict.next_tokens[0])
