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
from decode.target import Condition, LlamaGenTarget
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
    made = [[int(r)] for r in root.tolist()]  # committed image tokens (the root included)
    chains: list[list[int]] = [[] for _ in range(b)]  # committed without KV yet (skipped steps)
    nfe, steps, skipped, ver_tokens = (torch.zeros(b, dtype=torch.long) for _ in range(4))
    run = torch.zeros(b, dtype=torch.long)
    draft_s = verify_s = schedule_s = 0.0
    step = 0
    while min(len(m) for m in made) < num_tokens:
        live = torch.tensor([len(m) < num_tokens for m in made])
        ta = time.perf_counter()
        tree = drafting.propose(root, sampling, generators) if drafting else root_only(root)
        _sync(device)
        tb = time.perf_counter()
        draft_s += tb - ta
        skip = torch.zeros(b, dtype=torch.bool)
        if skipping:
            made_n = torch.tensor([len(m) for m in made])
            skip = method.scheduler.decide(StepContext(tree, step, made_n, run.clone(), num_tokens)) & live
            schedule_s += time.perf_counter() - tb
            tb = time.perf_counter()
        verify = live & ~skip
        paths: list[list[int]] = [[] for _ in range(b)]
        following = [[] for _ in range(b)]
        feats = [None] * b
        logits = None
        if verify.any():
            rows = verify.nonzero().flatten().tolist()
            tokens, mask, depths, w = _with_chain(tree, [chains[r] if verify[r] else [] for r in range(b)])
            out = target.extend(cache, tokens, block_mask=mask, depths=depths)
            logits, hidden = out.logits[:, w:], out.hidden[:, :, w:]
            verdict = accept(tree, logits, sampling, generators, rows=rows)
            keep_src = [[] for _ in range(b)]
            length = cache.length.view(g, b)[0].tolist()
            for r in rows:
                room = num_tokens - len(made[r])
                path = verdict.paths[r][: room + 1]  # the root and at most `room` drafts
                paths[r] = path
                c = len(chains[r])
                keep_src[r] = [length[r] + i for i in range(c)] + [length[r] + w + n for n in path]
                following[r] = tree.tokens[r, path[1:]].tolist() + [int(verdict.next_tokens[r])]
                feats[r] = hidden[:, r, path]  # [G, n, D]
                if features is not None:
                    features.append(r, out.hidden[:, r, :c])  # fresh features of the skipped tokens
                    features.append(r, feats[r])
                chains[r] = []
                nfe[r] += 1
                ver_tokens[r] += len(path)
                run[r] = 0
            _compact(target, cache, keep_src, device, plain=(w == 0 and all(pt in ([0], []) for pt in paths)))
        _sync(device)
        verify_s += time.perf_counter() - tb
        for r in skip.nonzero().flatten().tolist():
            nodes = select_skip_tokens(tree, r, generators[r] if generators else None)
            nodes = nodes[: num_tokens - len(made[r]) + 1]
            paths[r] = nodes[:-1]
            following[r] = tree.tokens[r, nodes[1:]].tolist()
            chains[r].extend(tree.tokens[r, nodes[:-1]].tolist())
            feats[r] = features.stale(r, len(nodes) - 1, method.staleness)
            skipped[r] += 1
            run[r] += 1
        for r in range(b):
            if paths[r]:
                made[r].extend(following[r])
                steps[r] += 1
        if skipping:
            method.scheduler.after_step(following)
        root = torch.tensor([f[-1] if f else int(root[r]) for r, f in enumerate(following)], device=device)
        if drafting:
            drafting.observe(_outcome(tree, logits, feats, following, verify, target, device), sampling, generators)
        step += 1
    _sync(device)
    t2 = time.perf_counter()
    tokens = torch.tensor([m[:num_tokens] for m in made], device=device)
    return Generation(tokens=tokens, nfe=nfe, steps=steps, prefill_s=t1 - t0, loop_s=t2 - t1, skipped=skipped,
                      verified_tokens=ver_tokens, draft_s=draft_s, verify_s=verify_s, schedule_s=schedule_s)


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


def _outcome(tree: Tree, logits, feats: list, following: list[list[int]], verify: Tensor,
             target: LlamaGenTarget, device) -> StepOutcome:
    """Pack the per-row commits into padded tensors for the drafter."""
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
