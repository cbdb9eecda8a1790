"""Next-set decoding: grid rows advance together as a staggered wavefront (ZipAR, arXiv 2412.04062;
docs/algorithms.md 2.6). The engine's other schedule, one raster-order frontier, is decode/core/engine.py.

Row g + 1 starts once row g has `window` tokens, and from then on every target pass extends each row
in flight by one token, so a pass makes up to `max_rows` tokens. Each token sees the tokens before
it in raster order that already exist: the rows above are complete up to about `window` columns to
its right, not further; that missing context is where the method loses quality (window = the grid
width is exact AR).

One pass feeds, per row in flight, its newest token (its KV is written and kept; its output predicts
the row's next token). The first token of a new row is predicted by a stand-in, as ZipAR's LlamaGen
code does: the newest token of the row above, placed at the position just before the new row (that
row's last column, which does not exist yet); its KV is discarded. When the row above is complete,
its real last token is that predictor instead, and the prediction is exact. Tokens out of raster order
live in the KV cache in the order they were made; each slot's position is kept, and a new token
attends to the committed slots at earlier positions only.

ZipAR's paper also checks the first token of a new row by rejection sampling once the row above is
complete; its LlamaGen code does not, and neither does this schedule (a rejection would discard the
row's later tokens). Every image of a batch advances on the same schedule (one token per row in
flight per pass), so the pass count is the schedule's, the same for every image.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from decode.core.engine import Generation, Method
from decode.core.host import to_device, wait_for
from decode.core.sampling import SamplingParams, sample
from decode.core.trees import root_only
from decode.strategies.acceptance import make_acceptance


@dataclass(frozen=True)
class NextSet:
    window: int = 6     # row g + 1 starts once row g has this many tokens (the grid width: exact AR)
    max_rows: int = 16  # rows in flight at once
    lane_drafts: int = 0  # Jacobi guesses each row in flight verifies per pass (0: ZipAR, one token per row)

    def check(self, width: int, height: int) -> None:
        if not 1 <= self.window <= width:
            raise ValueError(f"next-set window {self.window} must be in [1, {width}] (tokens of a grid row)")
        if not 1 <= self.max_rows <= height:
            raise ValueError(f"next-set max_rows {self.max_rows} must be in [1, {height}] (grid rows)")
        if not 0 <= self.lane_drafts < width:
            raise ValueError(f"next-set lane_drafts {self.lane_drafts} must be in [0, {width - 1}] (guesses within a row)")


def grid_shape(num_image_tokens: int, num_tokens: int) -> tuple[int, int]:
    """(width, rows) of the first `num_tokens` tokens of a square grid."""
    width = math.isqrt(num_image_tokens)
    if width * width != num_image_tokens:
        raise ValueError(f"next-set decoding needs a square token grid; the target makes {num_image_tokens} tokens")
    if num_tokens % width:
        raise ValueError(f"next-set decoding makes whole grid rows: num_tokens {num_tokens} is not a multiple of "
                         f"the grid width {width}")
    return width, num_tokens // width


@dataclass(frozen=True)
class _Lane:
    row: int
    token_at: int      # image index of the token fed
    position: int      # its absolute position (the stand-in's: the slot before the row)
    keep: bool         # a real token whose KV is kept (the stand-in's is discarded)
    predicts: int | None  # the image index its output predicts, None when its row is complete


def _plan(count: list[int], fed: list[int], width: int, prefix: int, schedule: NextSet) -> list[_Lane]:
    """The pass's inputs, top row first (`count` tokens made and `fed` tokens in the cache per row)."""
    lanes, in_flight = [], sum(1 for c in count if 0 < c < width)
    for g, made in enumerate(count):
        if made and fed[g] < made:  # its newest token is not in the cache yet
            nxt = g * width + made if made < width else None
            if nxt is None and g + 1 < len(count) and count[g + 1] == 0 and in_flight < schedule.max_rows:
                nxt, in_flight = (g + 1) * width, in_flight + 1  # the real last token predicts the next row
            lanes.append(_Lane(g, g * width + made - 1, prefix + g * width + made - 1, True, nxt))
        elif made == 0:
            starts = g > 0 and count[g - 1] >= schedule.window and in_flight < schedule.max_rows
            if starts and count[g - 1] < width:  # the stand-in: the row above's newest token, before the row
                lanes.append(_Lane(g, (g - 1) * width + count[g - 1] - 1, prefix + g * width - 1, False, g * width))
            break  # rows start in order
    return lanes


@torch.no_grad()
def generate_wavefront(target, condition, *, num_tokens: int, sampling: SamplingParams, generators,
                       method: Method, schedule: NextSet) -> Generation:
    """Decode `num_tokens` image tokens per row on the next-set schedule (module docstring)."""
    if not sampling.greedy and generators is None:
        raise ValueError(f"sampled decoding ({method.name}) needs one generator per image")
    width, height = grid_shape(target.num_image_tokens, num_tokens)
    schedule.check(width, height)
    device, b, prefix = target.device, condition.batch, target.prefix_len
    accept = method.acceptance or make_acceptance(sampling)
    if schedule.lane_drafts:  # rows advance by their own accepted lengths: each image has its own schedule
        from decode.core.lanes import generate_lanes

        return generate_lanes(target, condition, num_tokens=num_tokens, sampling=sampling, generators=generators,
                              accept=accept, schedule=schedule, width=width, height=height,
                              drafting=method.drafting, skipping=method.skipping)
    wait_for(device)
    t0 = time.perf_counter()
    cache, out = target.start(condition, num_tokens, extra_slots=schedule.max_rows + 1)
    made = torch.zeros(b, num_tokens, dtype=torch.long, device=device)
    made[:, 0] = sample(out.logits[:, -1], sampling, generators)
    wait_for(device)
    t1 = time.perf_counter()
    count, fed, slots, passes = [1] + [0] * (height - 1), [0] * height, list(range(prefix)), 0
    while sum(count) < num_tokens:
        lanes = _plan(count, fed, width, prefix, schedule)
        n = len(lanes)
        pos = torch.tensor([lane.position for lane in lanes])
        real = torch.tensor([lane.keep for lane in lanes])
        # new tokens see themselves and the real ones of this pass at earlier positions
        block = torch.eye(n, dtype=torch.bool) | (real[None, :] & (pos[None, :] < pos[:, None]))
        tokens = made[:, to_device([lane.token_at for lane in lanes], device)]  # [B, n]
        out = target.extend(cache, tokens, block_mask=to_device(block, device, torch.bool).expand(b, n, n),
                            positions=to_device(pos, device).expand(b, n),
                            slot_positions=to_device(slots, device).expand(b, len(slots)))
        passes += 1
        for i, lane in enumerate(lanes):  # top row first: each image's generator is drawn in this order
            if lane.predicts is not None:
                verdict = accept(root_only(tokens[:, i]), out.logits[:, i:i + 1], sampling, generators)
                made[:, lane.predicts] = verdict.next_tokens
                count[lane.predicts // width] += 1
        keep = [i for i, lane in enumerate(lanes) if lane.keep]
        length = int(cache.host_length[0])
        src = torch.tensor([length + i for i in keep]).expand(b * target.groups, len(keep))
        cache.keep(to_device(src, device), torch.full((b * target.groups,), len(keep)))
        for i in keep:
            fed[lanes[i].row] += 1
            slots.append(lanes[i].position)
    wait_for(device)
    t2 = time.perf_counter()
    steps = torch.full((b,), passes)
    return Generation(tokens=made, nfe=steps, steps=steps, prefill_s=t1 - t0, loop_s=t2 - t1,
                      skipped=torch.zeros(b, dtype=torch.long), verified_tokens=torch.full((b,), num_tokens - 1),
                      verify_s=t2 - t1, batch_passes=passes, batch_steps=passes)
