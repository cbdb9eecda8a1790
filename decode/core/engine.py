"""The decode loop: one engine for AR, speculative decoding (EAGLE-2, LANTERN, LANTERN++), VVS and
the Jacobi baselines. A method is three strategies (`Method`), not a loop of its own; the loop
follows VVS's Algorithm 2 (docs/algorithms.md 1):

    prefill -> root
    every step, per image row:
      drafting.propose(root)        -> a tree (AR: the root alone; SJD: a chain of guesses)
      skipping.plan(tree)           -> which rows skip verification, with the nodes they take
      verifying rows: one target pass over [unverified ; tree] (the unverified tokens, committed on
                      skipped steps, get their KV and features from this pass: no extra pass);
                      acceptance walks the tree -> committed nodes + the next root; KV compacted
      skipping rows:  the planned nodes are committed unverified, with stand-in features
      skipping.observe, drafting.observe(what was committed)
Rows are independent: each has its own tree, acceptance length, skips and generator, and rows
finish at different steps (a finished row idles until the batch is done).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from decode.core.host import to_device, wait_for
from decode.core.sampling import SamplingParams, sample
from decode.core.trees import StepOutcome, Tree, root_only
from decode.models.target import Condition, LlamaGenTarget, TargetOutput
from decode.strategies.acceptance import make_acceptance
from decode.strategies.protocols import Acceptance, Drafting, Skipping
from decode.strategies.skipping import NeverSkip, Progress


@dataclass(frozen=True)
class Generation:
    tokens: Tensor  # [B, N] image tokens, raster order
    nfe: Tensor  # [B] target forwards after the prefill (verified steps)
    steps: Tensor  # [B] decode steps after the prefill (verified + skipped)
    prefill_s: float  # wall-clock of the prefill (batch)
    loop_s: float  # wall-clock of the steps after the prefill (batch)
    skipped: Tensor | None = None  # [B] skipped steps
    verified_tokens: Tensor | None = None  # [B] tokens committed on verified steps
    draft_s: float = 0.0  # drafting (drafter passes, tree building), batch
    verify_s: float = 0.0  # target passes and acceptance, batch
    schedule_s: float = 0.0  # skip decisions (VVS schedulers), batch
    batch_passes: int = 0  # target passes the batch ran (a step runs one, over its verifying rows, if any)
    batch_steps: int = 0  # loop steps the batch ran (as many as its slowest row needs)
    step_times: list[tuple[float, float, float]] | None = None  # per step (draft, verify, whole) s, with phase_times


@dataclass(frozen=True)
class Method:
    """A decoding method as three strategies (decode/strategies/protocols.py) and a schedule.
    `drafting` None: no drafts (plain AR); `acceptance` None: greedy / exact sampled by the run's
    `sampling`; `schedule` None: one raster-order frontier (this loop), or a next-set wavefront of
    grid rows (decode.core.wavefront.NextSet: ZipAR)."""
    name: str = "ar"
    drafting: Drafting | None = None
    acceptance: Acceptance | None = None
    skipping: Skipping = field(default_factory=NeverSkip)
    schedule: object | None = None


@dataclass(frozen=True)
class RowCommit:
    """What one row commits in a step: tree nodes (root first) and, for each, the token after it as
    an index into [tree tokens ; the target's next token] (index T: the next token)."""
    nodes: list[int]
    following: list[int]
    verified: bool
    filled: int = 0             # verified: unverified tokens of earlier steps this pass filled in
    stale: Tensor | None = None  # skipped: [G, n, D] features standing in for the target's


@dataclass
class _Rows:
    """Per-row loop state, on the host (Python ints: a tensor element costs microseconds a touch);
    the tokens themselves stay on the device."""
    made: list[int]               # committed image tokens per row, the current root included
    unverified: list[list[int]]   # tokens committed on skipped steps, KV and features not yet filled
    counts: dict[str, list[int]]  # nfe, steps, skipped, verified_tokens

    @classmethod
    def start(cls, b: int, made: int = 1) -> "_Rows":
        return cls([made] * b, [[] for _ in range(b)], {k: [0] * b for k in ("nfe", "steps", "skipped", "verified_tokens")})

    def record(self, commits: dict[int, RowCommit], tree: Tree) -> None:
        for r, c in commits.items():
            if c.verified:
                self.counts["nfe"][r] += 1
                self.counts["verified_tokens"][r] += len(c.nodes)
                self.unverified[r] = []
            else:
                self.counts["skipped"][r] += 1
                self.unverified[r].extend(tree.host.tokens[r, c.nodes].tolist())


@dataclass(frozen=True)
class _Verified:
    """The step's target pass: logits over the tree [B, T, V], features over the whole input
    [G, B, W + T, D] (the W unverified tokens first) and the next token of each row [B]."""
    logits: Tensor
    hidden: Tensor
    chain_width: int
    next_tokens: Tensor


@torch.no_grad()
def generate(target: LlamaGenTarget, condition: Condition, *, num_tokens: int, sampling: SamplingParams,
             generators: list[torch.Generator] | None = None, method: Method = Method(),
             phase_times: bool | None = None, prefix: Tensor | None = None, static_shapes: bool = False) -> Generation:
    """Decode `num_tokens` image tokens per row; with `prefix` [B, k], the first k are given (GridAR's
    anchors: prefilled with the caption in one pass, then decoding continues after them; they count
    in `tokens` but not in nfe or steps).

    The loop reads the device at most once a step for a speculative method (acceptance's fetch;
    skipping adds one, before the pass) and never for AR: the host keeps the counts, the device
    keeps the tokens. `phase_times` times drafting, verification and scheduling apart, which waits
    for the device three times a step: off on a GPU unless asked for, on on a CPU (free there).

    `static_shapes`: every pass of a kind has one shape, so layers compiled `static` trace once
    (docs/algorithms.md 1, static shapes): the caches are static (passes read all slots, masked), each
    verification runs the whole batch (rows that sit it out write scratch slots only) padded to the
    widest [unverified ; tree] the method can make, and the drafter's steps are padded alike. The
    tokens are those of the dynamic shapes (up to float rounding in the longer reductions)."""
    k = 0 if prefix is None else prefix.shape[1]
    if not 0 <= k < num_tokens:
        raise ValueError(f"a prefix of {k} image tokens leaves nothing to decode of {num_tokens}")
    if static_shapes:
        _check_static_shapes(target, method)
    if method.schedule is not None:
        if k:
            raise ValueError(f"method {method.name}: a next-set schedule starts from an empty grid (no image prefix)")
        from decode.core.wavefront import generate_wavefront  # it builds on this module's types

        return generate_wavefront(target, condition, num_tokens=num_tokens, sampling=sampling, generators=generators,
                                  method=method, schedule=method.schedule)
    if not sampling.greedy and generators is None:
        raise ValueError(f"sampled decoding ({method.name}) needs one generator per image")
    device, b = target.device, condition.batch
    accept = method.acceptance or make_acceptance(sampling)
    timing = {"draft": 0.0, "verify": 0.0, "schedule": 0.0}
    if phase_times is None:
        phase_times = device.type != "cuda"
    lap = functools.partial(_lap, timing, device if phase_times else None)
    wait_for(device)
    t0 = time.perf_counter()
    start = _prefill(target, condition, method, sampling, generators, num_tokens, prefix, static_shapes)
    drafts, width, cache, made, root, skips = (start.drafts, start.width, start.cache, start.made, start.root,
                                                 start.skips)
    wait_for(device)
    t1 = time.perf_counter()
    rows, step, passes = _Rows.start(b, k + 1), 0, 0
    step_times = [] if phase_times else None
    while min(rows.made) < num_tokens:
        live = [m < num_tokens for m in rows.made]
        tick = began = time.perf_counter()
        spent = timing["draft"], timing["verify"]
        tree = drafts.propose(root, sampling, generators) if drafts else root_only(root)
        tick = lap("draft", tick)
        tree, skip = skips.plan(tree, Progress(step, rows.made, live, num_tokens))
        tick = lap("schedule", tick)
        verify_rows = [r for r in range(b) if live[r] and r not in skip]
        verified, commits = None, {}
        if verify_rows:
            passes += 1
            verified, commits = _verify(target, cache, tree, verify_rows, rows, accept, sampling, generators,
                                        num_tokens, width)
        tick = lap("verify", tick)
        for r, nodes in skip.items():
            nodes = nodes[: num_tokens - rows.made[r] + 1]  # what the image has room for
            commits[r] = _skipped(nodes, skips.stale_features(r, len(nodes) - 1))
        rows.record(commits, tree)
        outcome = _outcome(tree, verified, commits, target)
        skips.observe(outcome, {r: verified.hidden[:, r, :c.filled] for r, c in commits.items() if c.verified})
        root = _commit_tokens(made, rows, outcome, root)
        if drafts:
            drafts.observe(outcome, sampling, generators)
        if step_times is not None:
            step_times.append((timing["draft"] - spent[0], timing["verify"] - spent[1], time.perf_counter() - began))
        step += 1
    wait_for(device)
    t2 = time.perf_counter()
    c = {k: torch.tensor(v) for k, v in rows.counts.items()}
    return Generation(tokens=made[:, :num_tokens], nfe=c["nfe"], steps=c["steps"], prefill_s=t1 - t0,
                      loop_s=t2 - t1, skipped=c["skipped"], verified_tokens=c["verified_tokens"],
                      draft_s=timing["draft"], verify_s=timing["verify"], schedule_s=timing["schedule"],
                      batch_passes=passes, batch_steps=step, step_times=step_times)


@dataclass(frozen=True)
class _Start:
    """What the prefill leaves for the loop: the drafting and skipping states, the cache, the image so
    far `made` [B, N + 2] (column N takes a row's next root past its last token, N + 1 padding writes)
    and each row's root token [B]."""
    drafts: object | None
    width: int | None
    cache: object
    made: Tensor
    root: Tensor
    skips: object


def _prefill(target, condition: Condition, method: Method, sampling: SamplingParams, generators,
             num_tokens: int, prefix: Tensor | None, static_shapes: bool) -> _Start:
    """One pass over the caption (and the given image prefix), then the first root token sampled."""
    b, k = condition.batch, 0 if prefix is None else prefix.shape[1]
    drafts, width = _start_drafting(target, method, b, num_tokens, static_shapes)
    cache, out = target.start(condition, num_tokens - k, extra_slots=max(256 if drafts else 1, width or 0),
                              all_positions=drafts is not None, image_prefix=prefix,
                              **({"static": True} if static_shapes else {}))
    root = sample(out.logits[:, -1], sampling, generators)  # [B]
    made = torch.zeros(b, num_tokens + 2, dtype=torch.long, device=target.device)
    if k:
        made[:, :k] = prefix.to(target.device)
    made[:, k] = root
    if drafts:
        drafts.begin(out, cache.valid[:, :target.prefix_len + k], made[:, :k + 1], generators)
    p = target.prefix_len  # with a drafter the prefill returns every position's feature: the given tokens' too
    given = out.hidden[:, :, p:p + k] if k and out.hidden.shape[2] >= p + k else None
    skips = method.skipping.start(target, b, num_tokens, generators, out.hidden.dtype, given=given)
    return _Start(drafts, width, cache, made, root, skips)


def _check_static_shapes(target, method: Method) -> None:
    """Static shapes cover the raster-order loop with a drafting that pads its passes to fixed widths
    (EAGLE's, or none) on a LlamaGen target."""
    if not isinstance(target, LlamaGenTarget):
        raise ValueError(f"static_shapes: a LlamaGen target only, not {type(target).__name__}")
    if method.schedule is not None or not (method.drafting is None or getattr(method.drafting, "static_shapes", False)):
        raise ValueError(f"static_shapes: method {method.name} has no fixed pass widths (AR and the EAGLE-drafted "
                         f"methods have: ar, eagle2, lantern, lantern_pp, vvs and their skip policies)")


def _start_drafting(target, method: Method, batch: int, num_tokens: int, static_shapes: bool):
    """The drafting's run (None for AR) and, with static shapes, the width every verify pass pads to."""
    if method.drafting is None:
        return None, (1 if static_shapes else None)
    if not static_shapes:
        return method.drafting.start(target, batch, num_tokens), None
    drafts = method.drafting.start(target, batch, num_tokens, static=True)
    return drafts, _verify_width(method, drafts)


def _verify_width(method: Method, drafts) -> int:
    """The widest target input a step can make: the tree, after the longest run of unverified tokens
    that skipping allows (each skipped step commits at most a tree path)."""
    run = getattr(method.skipping, "max_skip_run", None)
    if run is None:
        raise ValueError(f"static_shapes: method {method.name}'s skipping ({type(method.skipping).__name__}) does not "
                         f"say how many steps it skips in a row (max_skip_run), which sizes the verify pass")
    return run * drafts.longest_path + drafts.tree_size


def _skipped(nodes: list[int], stale: Tensor) -> RowCommit:
    """A skipping row's commit: the planned nodes but the last (which becomes the next root), with
    stand-in features [G, n, D]."""
    return RowCommit(nodes[:-1], nodes[1:], verified=False, stale=stale)


def _lap(timing: dict[str, float], device, phase: str, since: float) -> float:
    """Charge the time since `since` to `phase` (device None: phases are not timed)."""
    if device is None:
        return since
    wait_for(device)
    now = time.perf_counter()
    timing[phase] += now - since
    return now


def _with_chain(tree: Tree, chains: list[list[int]]) -> tuple[Tensor, Tensor, Tensor, int]:
    """Target input [B, W + T]: each row's chain of unverified tokens (padded to W), then its tree.
    Chain tokens are causal; tree nodes see the row's whole chain and their ancestors; padding is
    seen by nobody. The chains are host lists, so their part is built on the host and sent down
    without a wait. Returns tokens, block mask [B, W+T, W+T], depths [B, W+T], W."""
    w = max((len(c) for c in chains), default=0)
    if w == 0:
        return tree.tokens, tree.mask, tree.depths, 0
    lens = torch.tensor([len(c) for c in chains])
    dev, (b, t) = tree.tokens.device, tree.tokens.shape
    ar = torch.arange(w)
    in_chain = ar[None, :] < lens[:, None]  # [B, W]
    # the chain's columns, seen by: chain tokens (causally), padding (itself only), tree nodes (all)
    head = torch.zeros(b, w + t, w, dtype=torch.bool)
    head[:, :w] = torch.ones(w, w, dtype=torch.bool).tril()[None] & in_chain[:, :, None]
    head[:, :w] |= torch.eye(w, dtype=torch.bool)[None] & ~in_chain[:, :, None]
    head[:, w:] = in_chain[:, None, :]
    tail = torch.cat([torch.zeros(b, w, t, dtype=torch.bool, device=dev), tree.mask], 1)  # the tree's columns
    chain_tokens = torch.tensor([c + [0] * (w - len(c)) for c in chains])
    tokens = torch.cat([to_device(chain_tokens, dev), tree.tokens], 1)
    mask = torch.cat([to_device(head, dev), tail], 2)
    depths = torch.cat([to_device(ar * in_chain, dev), to_device(lens, dev)[:, None] + tree.depths], 1)
    return tokens, mask, depths, w


def _verify(target, cache, tree: Tree, verify_rows: list[int], rows: _Rows, accept, sampling, generators,
            num_tokens: int, width: int | None) -> tuple[_Verified, dict[int, RowCommit]]:
    """One target pass over [unverified ; tree] for the verifying rows (static shapes: all rows,
    `width` entries), acceptance for them, KV compaction; each row's commit."""
    b, g, t = len(rows.made), target.groups, tree.size
    chains = [rows.unverified[r] if r in verify_rows else [] for r in range(b)]
    tokens, mask, depths, w = _with_chain(tree, chains)
    out = _pass(target, cache, tokens, mask, depths, verify_rows, width)
    logits = out.logits[:, w:]
    verdict = accept(tree, logits, sampling, generators, rows=verify_rows)
    length = cache.host_length.view(g, b)[0].tolist()
    keep_src: list[list[int]] = [[] for _ in range(b)]
    commits = {}
    for r in verify_rows:
        path = verdict.paths[r][: num_tokens - rows.made[r] + 1]  # the root and at most `room` drafts
        c = len(chains[r])
        keep_src[r] = [length[r] + i for i in range(c)] + [length[r] + w + n for n in path]
        commits[r] = RowCommit(path, path[1:] + [t], verified=True, filled=c)
    plain = w == 0 and all(c.nodes == [0] for c in commits.values())
    _compact(target, cache, keep_src, logits.device, plain=plain)
    return _Verified(logits, out.hidden, w, verdict.next_tokens), commits


def _pass(target, cache, tokens: Tensor, mask: Tensor, depths: Tensor, verify_rows: list[int],
          width: int | None) -> TargetOutput:
    """The target pass of a step. Rows that skip this step or have finished sit it out; their
    entries in the returned logits [B, T, V] and hidden [G, B, T, D] are zeros (static shapes: the
    pass's output over their scratch), never read."""
    b = tokens.shape[0]
    if width is not None:
        return target.extend(cache, tokens, block_mask=mask, depths=depths, pad_to=width)
    if len(verify_rows) == b:
        return target.extend(cache, tokens, block_mask=mask, depths=depths)
    idx = to_device(verify_rows, tokens.device)
    part = target.extend(cache, tokens[idx], block_mask=mask[idx], depths=depths[idx], rows=verify_rows)
    logits = part.logits.new_zeros(b, *part.logits.shape[1:])
    hidden = part.hidden.new_zeros(part.hidden.shape[0], b, *part.hidden.shape[2:])
    logits[idx], hidden[:, idx] = part.logits, part.hidden
    return TargetOutput(logits=logits, hidden=hidden)


def _compact(target: LlamaGenTarget, cache, keep_src: list[list[int]], device, plain: bool) -> None:
    """Commit each row's kept slots (chain, then accepted tree nodes) in order; AR just commits."""
    g = target.groups
    counts = torch.tensor([len(s) for s in keep_src])
    if plain:
        target.commit(cache, counts)
        return
    width = max(1, int(counts.max()))
    src = torch.tensor([s + [0] * (width - len(s)) for s in keep_src])
    cache.keep(to_device(src, device).repeat(g, 1), counts.repeat(g))


def _outcome(tree: Tree, verified: _Verified | None, commits: dict[int, RowCommit],
             target: LlamaGenTarget) -> StepOutcome:
    """Pack the per-row commits into padded device tensors, with one copy of host indices: the
    committed nodes' features [G, B, W, D] and the token after each [B, W]; counts on the host."""
    dev, (b, t) = tree.tokens.device, tree.tokens.shape
    empty = RowCommit([], [], verified=False)
    per_row = [commits.get(r, empty) for r in range(b)]
    counts = torch.tensor([len(c.following) for c in per_row])
    width = max(1, int(counts.max()))
    pad = lambda idx, fill: idx + [fill] * (width - len(idx))  # noqa: E731
    index = to_device(torch.tensor([pad(c.nodes, 0) for c in per_row] + [pad(c.following, t) for c in per_row]), dev)
    nodes, after = index[:b], index[b:]  # [B, W] each
    nxt = verified.next_tokens if verified is not None else torch.zeros(b, dtype=torch.long, device=dev)
    following = torch.cat([tree.tokens, nxt[:, None]], 1).gather(1, after)
    g, d = target.groups, target.hidden_size
    if verified is not None:
        hidden = verified.hidden[:, :, verified.chain_width:]  # [G, B, T, D]
        feats = hidden.gather(2, nodes[None, :, :, None].expand(g, b, width, d))
    else:
        feats = torch.zeros(g, b, width, d, device=dev, dtype=target.dtype)
    for r, c in enumerate(per_row):
        if c.stale is not None:
            feats[:, r, :c.stale.shape[1]] = c.stale
    return StepOutcome(feats=feats, following=following, counts=counts, tree=tree,
                       logits=verified.logits if verified is not None else None,
                       verified=torch.tensor([c.verified for c in per_row]))


def _commit_tokens(made: Tensor, rows: _Rows, outcome: StepOutcome, root: Tensor) -> Tensor:
    """Write each row's new tokens into `made` (host-known positions, one copy down) and return the
    next roots [B]: each row's last new token (a row that did nothing keeps its root)."""
    b, width = outcome.following.shape
    counts = outcome.counts.tolist()
    dump = made.shape[1] - 1
    pos = torch.tensor([[rows.made[r] + j if j < counts[r] else dump for j in range(width)] for r in range(b)])
    last = torch.tensor([max(n - 1, 0) for n in counts])
    index = to_device(torch.cat([pos, last[:, None], (outcome.counts > 0).long()[:, None]], 1), made.device)
    made.scatter_(1, index[:, :width], outcome.following)
    for r in range(b):
        if counts[r]:
            rows.made[r] += counts[r]
            rows.counts["steps"][r] += 1
    new_root = outcome.following.gather(1, index[:, width:width + 1])[:, 0]
    return torch.where(index[:, width + 1].bool(), new_root, root)


def generate_ar(target: LlamaGenTarget, condition: Condition, *, num_tokens: int, sampling: SamplingParams,
                generators: list[torch.Generator] | None = None) -> Generation:
    """Plain autoregressive decoding: one target forward per token."""
    return generate(target, condition, num_tokens=num_tokens, sampling=sampling, generators=generators)
