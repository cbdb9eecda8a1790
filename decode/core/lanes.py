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

import torch
from torch import Tensor

from decode.core.engine import Generation
from decode.core.host import to_device, wait_for
from decode.core.sampling import SamplingParams, sample
from decode.core.trees import Tree, ancestry_mask
from decode.models.target import Condition
from decode.strategies.lane_drafting import Guess, JacobiLanes


@torch.no_grad()
def generate_lanes(target, condition: Condition, *, num_tokens: int, sampling: SamplingParams, generators,
                   accept, schedule, width: int, height: int, drafting=None) -> Generation:
    """`drafting`: a LaneDrafting strategy (decode/strategies/protocols.py); None: JacobiLanes."""
    if not sampling.greedy and generators is None:
        raise ValueError("sampled decoding needs one generator per image")
    wait_for(target.device)
    t0 = time.perf_counter()
    made, passes = [], []
    for i in range(condition.batch):
        part = Condition(*(x[i:i + 1] if x is not None else None
                           for x in (condition.cond, condition.mask, condition.refined, condition.refined_mask)))
        tokens, n = _one_image(target, part, num_tokens, sampling, None if generators is None else generators[i],
                               accept, schedule, width, height, drafting)
        made.append(tokens)
        passes.append(n)
    wait_for(target.device)
    loop = time.perf_counter() - t0
    nfe = torch.tensor(passes)
    return Generation(tokens=torch.cat(made), nfe=nfe, steps=nfe, prefill_s=0.0, loop_s=loop,
                      skipped=torch.zeros_like(nfe), verified_tokens=torch.full_like(nfe, num_tokens - 1),
                      verify_s=loop, batch_passes=int(nfe.sum()), batch_steps=int(nfe.max()))


def _one_image(target, cond: Condition, num_tokens: int, sampling, gen, accept, schedule, width: int,
               height: int, drafting=None) -> tuple[Tensor, int]:
    """One image's tokens [1, N] and its target passes after the prefill."""
    from decode.core.wavefront import _plan  # ZipAR's lanes: which rows are in flight and what each predicts

    device, prefix = target.device, target.prefix_len
    gens = None if gen is None else [gen]
    cache, out = target.start(cond, num_tokens, extra_slots=schedule.max_rows * (schedule.lane_drafts + 1) + 1)
    made = [int(sample(out.logits[:, -1], sampling, gens))] + [-1] * (num_tokens - 1)
    count, fed, slots, passes = [1] + [0] * (height - 1), [0] * height, list(range(prefix)), 0
    drafts = (drafting or JacobiLanes()).start(target, width, sampling, gen)
    while sum(count) < num_tokens:
        lanes = _plan(count, fed, width, prefix, schedule)
        seq, pos, lane_of, real, chains = [], [], [], [], []
        for li, lane in enumerate(lanes):
            in_row = lane.keep and lane.predicts is not None and lane.predicts // width == lane.row
            room = _room(count, lane.row, lane.predicts, width, schedule) if in_row else 0
            chain = drafts.propose(lane.row, lane.predicts, room, made) if room else []
            chains.append(chain)
            for j, tok in enumerate([made[lane.token_at]] + [t for t, _ in chain]):
                seq.append(tok)
                pos.append(lane.position + j)
                lane_of.append(li)
                real.append(lane.keep and j == 0)
        p, which, real_t = torch.tensor(pos), torch.tensor(lane_of), torch.tensor(real)
        same, before = which[:, None] == which[None, :], p[None, :] < p[:, None]
        block = torch.eye(len(seq), dtype=torch.bool) | (before & (same | real_t[None, :]))
        out = target.extend(cache, to_device([seq], device), block_mask=to_device(block, device)[None],
                            positions=to_device(p, device)[None], slot_positions=to_device(slots, device)[None])
        logits, hidden = out.logits[0], out.hidden[:, 0]  # [n, V], [G, n, D]
        passes += 1
        keep = []
        for li, (lane, chain) in enumerate(zip(lanes, chains)):
            idx = [i for i, w in enumerate(lane_of) if w == li]
            if lane.predicts is None:  # a complete row's last token, fed for its KV only
                path, nxt = [0], None
            else:  # top row first: each image's generator is drawn in this order
                path, nxt = _accept(accept, [seq[i] for i in idx], chain, logits[idx], sampling, gens)
            if lane.keep:  # the newest token and the accepted guesses: real now, their KV kept
                keep += idx[:len(path)]
                slots += [lane.position + j for j in range(len(path))]
                fed[lane.row] += len(path)
            if nxt is None:
                continue
            for j in range(1, len(path)):
                made[lane.predicts + j - 1] = seq[idx[j]]
            made[lane.predicts + len(path) - 1] = nxt
            count[lane.predicts // width] += len(path)  # the row predicted (a complete row's: the next)
            drafts.observe(lane.row, lane.predicts, chain, len(path) - 1, logits[idx], hidden[:, idx])
        length = int(cache.host_length[0])
        src = torch.tensor([length + i for i in keep]).expand(target.groups, len(keep))
        cache.keep(to_device(src, device), torch.full((target.groups,), len(keep)))
    return torch.tensor([made], device=device), passes


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
