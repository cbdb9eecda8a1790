"""The decode loop: one engine for AR, speculative decoding (EAGLE-2, LANTERN, LANTERN++), VVS and
the Jacobi baselines. A method is a small bundle of policies (`Method`), not a loop of its own:

    prefill -> root
    every step, per image row:
      drafting.propose(root)           -> a tree (AR: the root alone; SJD: a chain of guesses)
      scheduler.decide(...)            -> skip verification? (VVS; default never)
      verify rows: one target pass over [skipped chain ; tree] (the chain fills the KV and features
                   of tokens committed unverified earlier: VVS's deferred fill, no extra pass);
                   acceptance walks the tree -> committed nodes + the next root; KV compacted
      skip rows:   the selector takes a path from the tree; its tokens are committed unverified,
                   stale features stand in for the target's (feature cache)
      drafting.observe(what was committed)
Rows are independent: each has its own tree, acceptance length, skips and generator, and rows
finish at different steps (a finished row idles until the batch is done).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from decode.strategies.acceptance import make_acceptance
from decode.core.host import to_device, wait_for
from decode.core.sampling import SamplingParams, sample
from decode.strategies.skipping import FeatureCache, NeverSkip, Scheduler, StepContext, select_skip_tokens
from decode.models.target import Condition, LlamaGenTarget, TargetOutput
from decode.core.trees import StepOutcome, Tree, root_only


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


@dataclass(frozen=True)
class Method:
    """Policies of a decoding method. `drafting(target, batch, num_tokens)` builds the per-batch
    drafter state (None: plain AR); `acceptance` defaults to greedy / exact sampled by `sampling`."""
    name: str = "ar"
    drafting: Callable | None = None
    acceptance: Callable | None = None
    scheduler: Scheduler = field(default_factory=NeverSkip)
    staleness: int = 0  # VVS: how many positions further back the reused stale features are


@dataclass
class _Rows:
    """Per-row loop state, on the host; the tokens themselves stay on the device."""
    made: list[int]          # committed image tokens per row, the current root included
    chains: list[list[int]]  # tokens committed on skipped steps, KV and features not yet filled
    counts: dict[str, list[int]]  # nfe, steps, skipped, verified_tokens, run (consecutive skips)

    @classmethod
    def start(cls, b: int) -> "_Rows":
        # Python ints: the loop bumps them per row and step, where a tensor element costs microseconds
        names = ("nfe", "steps", "skipped", "verified_tokens", "run")
        return cls([1] * b, [[] for _ in range(b)], {k: [0] * b for k in names})


@dataclass
class _Commits:
    """What this step commits per row, as host indices: the committed tree nodes (root first) and
    the tokens after them, as indices into [tree tokens ; the target's next token] (index T: the
    next token). Verified rows also say how many chain tokens the pass filled; skipped rows carry
    the stale features that stand in for the target's."""
    paths: list[list[int]]
    following: list[list[int]]
    filled: dict[int, int]
    stale: dict[int, Tensor]


@dataclass(frozen=True)
class _Verified:
    """The step's target pass: logits over the tree [B, T, V], features over the whole input
    [G, B, W + T, D] (the chain of W skipped tokens first) and the next token of each row [B]."""
    logits: Tensor
    hidden: Tensor
    chain_width: int
    next_tokens: Tensor


@torch.no_grad()
def generate(target: LlamaGenTarget, condition: Condition, *, num_tokens: int, sampling: SamplingParams,
             generators: list[torch.Generator] | None = None, method: Method = Method(),
             phase_times: bool | None = None) -> Generation:
    """Decode `num_tokens` image tokens per row.

    The loop reads the device at most once a step for a speculative method (acceptance's fetch;
    VVS adds one, for its scheduler, before the pass) and never for AR: the host keeps the counts,
    the device keeps the tokens. `phase_times` times drafting, verification and scheduling apart,
    which waits for the device three times a step: off on a GPU unless asked for, on on a CPU
    (where it costs nothing)."""
    if not sampling.greedy and generators is None:
        raise ValueError(f"sampled decoding ({method.name}) needs one generator per image")
    device, g = target.device, target.groups
    b, p = condition.batch, target.prefix_len
    accept = method.acceptance or make_acceptance(sampling)
    skipping = not isinstance(method.scheduler, NeverSkip)
    timing = {"draft": 0.0, "verify": 0.0, "schedule": 0.0}
    if phase_times is None:
        phase_times = device.type != "cuda"
    lap = functools.partial(_lap, timing, device if phase_times else None)
    wait_for(device)
    t0 = time.perf_counter()
    drafting = method.drafting(target, b, num_tokens) if method.drafting else None
    cache, out = target.start(condition, num_tokens, extra_slots=256 if drafting else 1,
                              all_positions=drafting is not None)
    root = sample(out.logits[:, -1], sampling, generators)  # [B]
    if drafting:
        drafting.begin(out, cache.valid[:, :p], root, generators)
    features = FeatureCache(g, b, num_tokens + 8, target.hidden_size, device, out.hidden.dtype) if skipping else None
    selectors = _selector_generators(generators) if skipping else None
    # made[:, :N] the image; column N takes a row's next root past its last token, N + 1 padding writes
    made = torch.zeros(b, num_tokens + 2, dtype=torch.long, device=device)
    made[:, 0] = root
    wait_for(device)
    t1 = time.perf_counter()
    rows = _Rows.start(b)
    step = passes = 0
    while min(rows.made) < num_tokens:
        live = [m < num_tokens for m in rows.made]  # host lists: a host tensor op costs microseconds
        tick = time.perf_counter()
        tree = drafting.propose(root, sampling, generators) if drafting else root_only(root)
        tick = lap("draft", tick)
        skip, picks = [False] * b, None
        if skipping and tree.size > 1:
            tree, picks = _fetch_for_scheduler(tree, selectors)
            ctx = StepContext(tree.host, step, torch.tensor(rows.made), torch.tensor(rows.counts["run"]), num_tokens)
            skip = [s and alive for s, alive in zip(method.scheduler.decide(ctx).tolist(), live)]
            tick = lap("schedule", tick)
        commits = _Commits([[] for _ in range(b)], [[] for _ in range(b)], {}, {})
        verified = None
        verify_rows = [r for r in range(b) if live[r] and not skip[r]]
        if verify_rows:
            passes += 1
            verified = _verify(target, cache, tree, verify_rows, rows, commits, accept, sampling, generators,
                               num_tokens)
        tick = lap("verify", tick)
        _skip(tree, [r for r in range(b) if skip[r]], picks, rows, commits, num_tokens, features, method.staleness)
        verify = torch.zeros(b, dtype=torch.bool)
        verify[verify_rows] = True
        outcome = _outcome(tree, verified, commits, verify, target)
        if features is not None and verified is not None:
            _remember(features, verified, outcome, commits)
        root = _commit_tokens(made, rows, outcome, root)
        if skipping:
            method.scheduler.after_step(outcome.following, outcome.counts)
        if drafting:
            drafting.observe(outcome, sampling, generators)
        step += 1
    wait_for(device)
    t2 = time.perf_counter()
    c = {k: torch.tensor(v) for k, v in rows.counts.items()}
    return Generation(tokens=made[:, :num_tokens], nfe=c["nfe"], steps=c["steps"], prefill_s=t1 - t0,
                      loop_s=t2 - t1, skipped=c["skipped"], verified_tokens=c["verified_tokens"],
                      draft_s=timing["draft"], verify_s=timing["verify"], schedule_s=timing["schedule"],
                      batch_passes=passes, batch_steps=step)


def _lap(timing: dict[str, float], device, phase: str, since: float) -> float:
    """Charge the time since `since` to `phase` (device None: phases are not timed)."""
    if device is None:
        return since
    wait_for(device)
    now = time.perf_counter()
    timing[phase] += now - since
    return now


def _selector_generators(generators) -> list[torch.Generator] | None:
    """The VVS selector's own stream per row, seeded from the row's seed: its path pick is drawn
    before the skip decision, and drawing it from the row's generator would change what a step
    that does not skip samples (a VVS that never skips decodes exactly what its base method does)."""
    if generators is None:
        return None
    mix = lambda seed: (seed * 6364136223846793005 + 1442695040888963407) % 2 ** 63  # noqa: E731
    return [torch.Generator(device=gen.device).manual_seed(mix(gen.initial_seed())) for gen in generators]


def _fetch_for_scheduler(tree: Tree, generators) -> tuple[Tree, list[float]]:
    """One wait before a skip decision: the tree's structure and a uniform draw per row (the
    selector's path pick, should the row skip) come to the host together."""
    b = tree.tokens.shape[0]
    u = (torch.stack([torch.rand((), generator=gen, device=gen.device) for gen in generators])
         if generators else torch.rand(b))
    (picks,), tree = tree.fetch_with(u)
    return tree, picks.tolist()


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


def _verify(target, cache, tree: Tree, verify_rows: list[int], rows: _Rows, commits: _Commits, accept, sampling,
            generators, num_tokens: int) -> _Verified:
    """One target pass over [chain ; tree] for the verifying rows, acceptance for them, KV compaction."""
    b, g = len(rows.made), target.groups
    tokens, mask, depths, w = _with_chain(tree, [rows.chains[r] if r in verify_rows else [] for r in range(b)])
    out = _pass(target, cache, tokens, mask, depths, verify_rows)
    logits = out.logits[:, w:]
    verdict = accept(tree, logits, sampling, generators, rows=verify_rows)
    keep_src: list[list[int]] = [[] for _ in range(b)]
    length = cache.host_length.view(g, b)[0].tolist()
    t = tree.size
    for r in verify_rows:
        room = num_tokens - rows.made[r]
        path = verdict.paths[r][: room + 1]  # the root and at most `room` drafts
        c = len(rows.chains[r])
        keep_src[r] = [length[r] + i for i in range(c)] + [length[r] + w + n for n in path]
        commits.paths[r], commits.following[r], commits.filled[r] = path, path[1:] + [t], c
        rows.chains[r] = []
        rows.counts["nfe"][r] += 1
        rows.counts["verified_tokens"][r] += len(path)
        rows.counts["run"][r] = 0
    plain = w == 0 and all(pt in ([0], []) for pt in commits.paths)
    _compact(target, cache, keep_src, logits.device, plain=plain)
    return _Verified(logits, out.hidden, w, verdict.next_tokens)


def _pass(target, cache, tokens: Tensor, mask: Tensor, depths: Tensor, verify_rows: list[int]) -> TargetOutput:
    """The target pass of a step. Rows that skip this step or have finished sit it out; their
    entries in the returned logits [B, T, V] and hidden [G, B, T, D] are zeros, never read."""
    b = tokens.shape[0]
    if len(verify_rows) == b:
        return target.extend(cache, tokens, block_mask=mask, depths=depths)
    idx = to_device(verify_rows, tokens.device)
    part = target.extend(cache, tokens[idx], block_mask=mask[idx], depths=depths[idx], rows=verify_rows)
    logits = part.logits.new_zeros(b, *part.logits.shape[1:])
    hidden = part.hidden.new_zeros(part.hidden.shape[0], b, *part.hidden.shape[2:])
    logits[idx], hidden[:, idx] = part.logits, part.hidden
    return TargetOutput(logits=logits, hidden=hidden)


def _skip(tree: Tree, skip_rows: list[int], picks: list[float] | None, rows: _Rows, commits: _Commits,
          num_tokens: int, features: FeatureCache | None, staleness: int) -> None:
    """VVS's skipped step for these rows: the selector's tokens are committed unverified, stale
    features stand in for the target's."""
    for r in skip_rows:
        nodes = select_skip_tokens(tree.host, r, picks[r])
        nodes = nodes[: num_tokens - rows.made[r] + 1]
        commits.paths[r], commits.following[r] = nodes[:-1], nodes[1:]
        commits.stale[r] = features.stale(r, len(nodes) - 1, staleness)
        rows.chains[r].extend(tree.host.tokens[r, nodes[:-1]].tolist())
        rows.counts["skipped"][r] += 1
        rows.counts["run"][r] += 1


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


def _outcome(tree: Tree, verified: _Verified | None, commits: _Commits, verify: Tensor,
             target: LlamaGenTarget) -> StepOutcome:
    """Pack the per-row commits into padded device tensors, with one copy of host indices: the
    committed nodes' features [G, B, W, D] and the token after each [B, W]; counts on the host."""
    dev, (b, t) = tree.tokens.device, tree.tokens.shape
    counts = torch.tensor([len(f) for f in commits.following])
    width = max(1, int(counts.max()))
    pad = lambda idx, fill: idx + [fill] * (width - len(idx))  # noqa: E731
    index = to_device(torch.tensor([pad(n, 0) for n in commits.paths] + [pad(f, t) for f in commits.following]), dev)
    nodes, after = index[:b], index[b:]  # [B, W] each
    nxt = verified.next_tokens if verified is not None else torch.zeros(b, dtype=torch.long, device=dev)
    following = torch.cat([tree.tokens, nxt[:, None]], 1).gather(1, after)
    g, d = target.groups, target.hidden_size
    if verified is not None:
        hidden = verified.hidden[:, :, verified.chain_width:]  # [G, B, T, D]
        feats = hidden.gather(2, nodes[None, :, :, None].expand(g, b, width, d))
    else:
        feats = torch.zeros(g, b, width, d, device=dev, dtype=target.gpt.output.weight.dtype)
    for r, stale in commits.stale.items():
        feats[:, r, :stale.shape[1]] = stale
    return StepOutcome(feats=feats, following=following, counts=counts, tree=tree,
                       logits=verified.logits if verified is not None else None, verified=verify)


def _remember(features: FeatureCache, verified: _Verified, outcome: StepOutcome, commits: _Commits) -> None:
    """VVS's feature cache: each verified row's fresh features, its filled chain's first."""
    for r, c in commits.filled.items():
        features.append(r, verified.hidden[:, r, :c])  # the skipped tokens' features (deferred fill)
        features.append(r, outcome.feats[:, r, :int(outcome.counts[r])])


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
