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

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from decode.acceptance import make_acceptance
from decode.sampling import SamplingParams, sample
from decode.skipping import FeatureCache, NeverSkip, Scheduler, StepContext, select_skip_tokens
from decode.target import Condition, LlamaGenTarget, TargetOutput
from decode.trees import StepOutcome, Tree, root_only


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _with_chain(tree: Tree, chains: list[list[int]]) -> tuple[Tensor, Tensor, Tensor, int]:
    """Target input [B, W + T]: each row's chain of unverified tokens (padded to W), then its tree.
    Chain tokens are causal; tree nodes see the row's whole chain and their ancestors; padding is
    seen by nobody. Returns tokens, block mask [B, W+T, W+T], depths [B, W+T], W."""
    b, t = tree.tokens.shape
    w = max((len(c) for c in chains), default=0)
    if w == 0:
        return tree.tokens, tree.mask, tree.depths, 0
    dev = tree.tokens.device
    tokens = torch.zeros(b, w + t, dtype=torch.long, device=dev)
    mask = torch.zeros(b, w + t, w + t, dtype=torch.bool, device=dev)
    depths = torch.zeros(b, w + t, dtype=torch.long, device=dev)
    tokens[:, w:], mask[:, w:, w:] = tree.tokens, tree.mask
    mask[:, torch.arange(w), torch.arange(w)] = True  # padding sees itself only (no empty rows)
    for r, chain in enumerate(chains):
        c = len(chain)
        tokens[r, :c] = torch.tensor(chain, device=dev)
        mask[r, :c, :c] = torch.ones(c, c, dtype=torch.bool, device=dev).tril()
        mask[r, w:, :c] = True
        depths[r, :c] = torch.arange(c, device=dev)
        depths[r, w:] = c + tree.depths[r]
    return tokens, mask, depths, w


@dataclass
class _Rows:
    """Per-row loop state (lists indexed by image row)."""
    made: list[list[int]]    # committed image tokens, the current root included
    chains: list[list[int]]  # committed on skipped steps, KV and features not yet filled
    counts: dict[str, Tensor]  # nfe, steps, skipped, verified_tokens, run (consecutive skips)

    @classmethod
    def start(cls, root: Tensor) -> "_Rows":
        b = root.shape[0]
        names = ("nfe", "steps", "skipped", "verified_tokens", "run")
        return cls([[int(r)] for r in root.tolist()], [[] for _ in range(b)],
                   {k: torch.zeros(b, dtype=torch.long) for k in names})


@dataclass
class _Commits:
    """What this step commits per row: node indices, the token after each, their features."""
    paths: list[list[int]]
    following: list[list[int]]
    feats: list


@torch.no_grad()
def generate(target: LlamaGenTarget, condition: Condition, *, num_tokens: int, sampling: SamplingParams,
             generators: list[torch.Generator] | None = None, method: Method = Method()) -> Generation:
    if not sampling.greedy and generators is None:
        raise ValueError(f"sampled decoding ({method.name}) needs one generator per image")
    device, g = target.device, target.groups
    b, p = condition.batch, target.prefix_len
    accept = method.acceptance or make_acceptance(sampling)
    skipping = not isinstance(method.scheduler, NeverSkip)
    _sync(device)
    t0 = time.perf_counter()
    drafting = method.drafting(target, b, num_tokens) if method.drafting else None
    cache, out = target.start(condition, num_tokens, extra_slots=256 if drafting else 1,
                              all_positions=drafting is not None)
    root = sample(out.logits[:, -1], sampling, generators)  # [B]
    if drafting:
        drafting.begin(out, cache.valid[:, :p], root)
    features = FeatureCache(g, b, num_tokens + 8, target.hidden_size, device, out.hidden.dtype) if skipping else None
    _sync(device)
    t1 = time.perf_counter()
    rows = _Rows.start(root)
    timing = {"draft": 0.0, "verify": 0.0, "schedule": 0.0}
    step = passes = 0
    while min(len(m) for m in rows.made) < num_tokens:
        live = torch.tensor([len(m) < num_tokens for m in rows.made])
        tick = time.perf_counter()
        tree = drafting.propose(root, sampling, generators) if drafting else root_only(root)
        tick = _lap(timing, "draft", tick, device)
        skip = torch.zeros(b, dtype=torch.bool)
        if skipping:
            made_n = torch.tensor([len(m) for m in rows.made])
            ctx = StepContext(tree, step, made_n, rows.counts["run"].clone(), num_tokens)
            skip = method.scheduler.decide(ctx) & live
            tick = _lap(timing, "schedule", tick, device)
        commits = _Commits([[] for _ in range(b)], [[] for _ in range(b)], [None] * b)
        logits = None
        verify = live & ~skip
        if verify.any():
            passes += 1
            logits = _verify(target, cache, tree, verify.nonzero().flatten().tolist(), rows, commits, accept,
                             sampling, generators, num_tokens, features)
        tick = _lap(timing, "verify", tick, device)
        _skip(tree, skip.nonzero().flatten().tolist(), rows, commits, generators, num_tokens, features,
              method.staleness)
        for r in range(b):
            if commits.paths[r]:
                rows.made[r].extend(commits.following[r])
                rows.counts["steps"][r] += 1
        if skipping:
            method.scheduler.after_step(commits.following)
        root = torch.tensor([f[-1] if f else int(root[r]) for r, f in enumerate(commits.following)], device=device)
        if drafting:
            drafting.observe(_outcome(tree, logits, commits, verify, target, device), sampling, generators)
        step += 1
    _sync(device)
    t2 = time.perf_counter()
    c = rows.counts
    return Generation(tokens=torch.tensor([m[:num_tokens] for m in rows.made], device=device), nfe=c["nfe"],
                      steps=c["steps"], prefill_s=t1 - t0, loop_s=t2 - t1, skipped=c["skipped"],
                      verified_tokens=c["verified_tokens"], draft_s=timing["draft"], verify_s=timing["verify"],
                      schedule_s=timing["schedule"], batch_passes=passes, batch_steps=step)


def _lap(timing: dict[str, float], phase: str, since: float, device) -> float:
    _sync(device)
    now = time.perf_counter()
    timing[phase] += now - since
    return now


def _verify(target, cache, tree: Tree, verify_rows: list[int], rows: _Rows, commits: _Commits, accept, sampling,
            generators, num_tokens: int, features: FeatureCache | None) -> Tensor:
    """One target pass over [chain ; tree] for the verifying rows, acceptance for them, KV compaction.
    Returns the tree logits [B, T, V] (zeros for the rows that sat the pass out)."""
    b, g = len(rows.made), target.groups
    tokens, mask, depths, w = _with_chain(tree, [rows.chains[r] if r in verify_rows else [] for r in range(b)])
    out = _pass(target, cache, tokens, mask, depths, verify_rows)
    logits, hidden = out.logits[:, w:], out.hidden[:, :, w:]
    verdict = accept(tree, logits, sampling, generators, rows=verify_rows)
    keep_src: list[list[int]] = [[] for _ in range(b)]
    length = cache.length.view(g, b)[0].tolist()
    for r in verify_rows:
        room = num_tokens - len(rows.made[r])
        path = verdict.paths[r][: room + 1]  # the root and at most `room` drafts
        c = len(rows.chains[r])
        keep_src[r] = [length[r] + i for i in range(c)] + [length[r] + w + n for n in path]
        commits.paths[r] = path
        commits.following[r] = tree.tokens[r, path[1:]].tolist() + [int(verdict.next_tokens[r])]
        commits.feats[r] = hidden[:, r, path]  # [G, n, D]
        if features is not None:
            features.append(r, out.hidden[:, r, :c])  # fresh features of the skipped tokens (deferred fill)
            features.append(r, commits.feats[r])
        rows.chains[r] = []
        rows.counts["nfe"][r] += 1
        rows.counts["verified_tokens"][r] += len(path)
        rows.counts["run"][r] = 0
    plain = w == 0 and all(pt in ([0], []) for pt in commits.paths)
    _compact(target, cache, keep_src, logits.device, plain=plain)
    return logits


def _pass(target, cache, tokens: Tensor, mask: Tensor, depths: Tensor, verify_rows: list[int]) -> TargetOutput:
    """The target pass of a step. Rows that skip this step or have finished sit it out; their
    entries in the returned logits [B, T, V] and hidden [G, B, T, D] are zeros, never read."""
    b = tokens.shape[0]
    if len(verify_rows) == b:
        return target.extend(cache, tokens, block_mask=mask, depths=depths)
    idx = torch.tensor(verify_rows, device=tokens.device)
    part = target.extend(cache, tokens[idx], block_mask=mask[idx], depths=depths[idx], rows=idx)
    logits = part.logits.new_zeros(b, *part.logits.shape[1:])
    hidden = part.hidden.new_zeros(part.hidden.shape[0], b, *part.hidden.shape[2:])
    logits[idx], hidden[:, idx] = part.logits, part.hidden
    return TargetOutput(logits=logits, hidden=hidden)


def _skip(tree: Tree, skip_rows: list[int], rows: _Rows, commits: _Commits, generators, num_tokens: int,
          features: FeatureCache | None, staleness: int) -> None:
    """VVS's skipped step for these rows: the selector's tokens are committed unverified, stale
    features stand in for the target's."""
    for r in skip_rows:
        nodes = select_skip_tokens(tree, r, generators[r] if generators else None)
        nodes = nodes[: num_tokens - len(rows.made[r]) + 1]
        commits.paths[r] = nodes[:-1]
        commits.following[r] = tree.tokens[r, nodes[1:]].tolist()
        commits.feats[r] = features.stale(r, len(nodes) - 1, staleness)
        rows.chains[r].extend(tree.tokens[r, nodes[:-1]].tolist())
        rows.counts["skipped"][r] += 1
        rows.counts["run"][r] += 1


def _compact(target: LlamaGenTarget, cache, keep_src: list[list[int]], device, plain: bool) -> None:
    """Commit each row's kept slots (chain, then accepted tree nodes) in order; AR just commits."""
    g, b = target.groups, len(keep_src)
    counts = torch.tensor([len(s) for s in keep_src], device=device)
    if plain:
        target.commit(cache, counts)
        return
    width = max(1, int(counts.max()))
    src = torch.zeros(b, width, dtype=torch.long, device=device)
    for r, s in enumerate(keep_src):
        if s:
            src[r, :len(s)] = torch.tensor(s, device=device)
    cache.keep(src.repeat(g, 1), counts.repeat(g))


def _outcome(tree: Tree, logits, commits: _Commits, verify: Tensor, target: LlamaGenTarget,
             device) -> StepOutcome:
    """Pack the per-row commits into padded tensors for the drafter."""
    feats, following = commits.feats, commits.following
    b = len(following)
    counts = torch.tensor([len(f) for f in following], device=device)
    width = max(1, int(counts.max()))
    ref = next((f for f in feats if f is not None), None)
    g, d = target.groups, target.hidden_size
    packed = torch.zeros(g, b, width, d, device=device, dtype=ref.dtype if ref is not None else torch.float32)
    nxt = torch.zeros(b, width, dtype=torch.long, device=device)
    for r in range(b):
        if following[r]:
            n = len(following[r])
            packed[:, r, :n] = feats[r]
            nxt[r, :n] = torch.tensor(following[r], device=device)
    return StepOutcome(feats=packed, following=nxt, counts=counts, tree=tree, logits=logits, verified=verify)


def generate_ar(target: LlamaGenTarget, condition: Condition, *, num_tokens: int, sampling: SamplingParams,
                generators: list[torch.Generator] | None = None) -> Generation:
    """Plain autoregressive decoding: one target forward per token."""
    return generate(target, condition, num_tokens=num_tokens, sampling=sampling, generators=generators)
