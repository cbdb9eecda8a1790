"""Speculative decoding with an EAGLE drafter: draft a tree, verify it in one target pass, accept.

Per step and per image row b (rows run batched, each with its own tree and acceptance length):
1. the drafter consumes its pending entries (target features of the tokens committed last step,
   paired with the next token: EAGLE's shift) and commits them to its own KV cache;
2. it grows an EAGLE-2 dynamic tree from the root (the token the target chose last): `top_k`
   children per frontier node, `depth` expansion rounds, the frontier and the final
   `total_tokens - 1` nodes chosen by cumulative log-probability (ALGORITHMS.md 2.2);
3. the target verifies root + tree in one forward (tree attention mask, positions = depth);
4. acceptance walks the tree; the accepted nodes' KV is compacted into place and the target's
   choice after the last accepted node becomes the next root.
Classifier-free guidance: drafter and target run on cond + null rows; both combine logits with the
target's scale, and both halves share the tokens.

Acceptance implemented here: greedy (the tokens equal greedy AR decoding). Sampled acceptance
(exact, LANTERN) and verification skipping (VVS) plug into `accept` and the step loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from decode.cache import KVCache
from decode.drafter import Drafter
from decode.engine import Generation, _sync
from decode.sampling import SamplingParams, probabilities, sample
from decode.target import Condition, LlamaGenTarget


@dataclass(frozen=True)
class TreeParams:
    total_tokens: int = 59  # root + drafted nodes verified per step (LANTERN/VVS on LlamaGen: 59)
    depth: int = 4          # expansion rounds after the first level: up to depth + 1 draft levels
    top_k: int = 10

    def __post_init__(self):
        if self.total_tokens < 2 or self.depth < 0 or self.top_k < 1:
            raise ValueError(f"tree needs total_tokens >= 2, depth >= 0, top_k >= 1; got {self}")


@dataclass
class Tree:
    tokens: Tensor   # [B, T] root first, parents before children
    parents: Tensor  # [B, T] index of the parent node (-1 for the root)
    depths: Tensor   # [B, T]
    mask: Tensor     # [B, T, T] bool: node i attends to node j (j an ancestor of i, or i itself)
    q: Tensor | None = None  # [B, T, V] sampled drafts: the drafter distribution each node was drawn from


@dataclass
class Pending:
    """Drafter entries not yet in its cache: (feature, token embedding) pairs, per row `count`."""
    emb: Tensor     # [G*B, M, D]
    feats: Tensor   # [G*B, M, D]
    valid: Tensor   # [G*B, M] attendable (caption padding is not)
    count: Tensor   # [B] entries per row (>= 1; the last one is the current root's entry)


def ancestry_mask(parents: Tensor) -> Tensor:
    """[B, T] parent pointers (parents precede children) -> [B, T, T] self-or-ancestor mask."""
    b, t = parents.shape
    mask = torch.eye(t, dtype=torch.bool, device=parents.device).expand(b, t, t).clone()
    rows = torch.arange(b, device=parents.device)
    for i in range(1, t):
        mask[:, i] |= mask[rows, parents[:, i].clamp_min(0)] & (parents[:, i] >= 0)[:, None]
    return mask


class EagleDrafting:
    """The drafter side of one generation: its KV cache and the dynamic tree."""

    def __init__(self, drafter: Drafter, target: LlamaGenTarget, tree: TreeParams, rows: int, capacity: int):
        self.drafter, self.target, self.params = drafter, target, tree
        self.cache: KVCache = drafter.new_cache(rows, capacity)

    def _logp(self, hidden: Tensor) -> Tensor:
        """Drafter features [G*B, T, D] -> CFG-combined log-probabilities [B, T, V]."""
        return self.target.guide(hidden).logits.float().log_softmax(-1)

    def consume(self, pending: Pending) -> Tensor:
        """Feed the pending entries; commit them; returns the root's predicted feature [G*B, 1, D]."""
        g = self.target.groups
        count = pending.count.repeat(g)
        m = pending.emb.shape[1]
        causal = torch.ones(m, m, dtype=torch.bool, device=count.device).tril()
        block = causal[None] & (pending.valid[:, None, :] | torch.eye(m, dtype=torch.bool, device=count.device))
        pos = self.cache.length[:, None] + torch.arange(m, device=count.device)
        upto = int(self.cache.length.max()) + m
        out = self.drafter(pending.emb, pending.feats, pos, self.cache.attention_mask(block, upto), self.cache)
        self.cache.commit(count, key_valid=pending.valid)
        return out[torch.arange(out.shape[0]), count - 1][:, None]  # the root's entry is each row's last

    def _draw(self, hidden: Tensor, sampling: SamplingParams, generators) -> tuple[Tensor, Tensor, Tensor]:
        """Sampled drafting (a chain: top_k = 1): one child per node drawn from the drafter's
        processed distribution q. hidden [G*B, 1, D] -> (log q(child) [B, 1], child [B, 1], q [B, 1, V])."""
        q = probabilities(self.target.guide(hidden).logits[:, 0], sampling)  # [B, V]
        child = torch.cat([torch.multinomial(qb[None], 1, generator=gen)[0] for qb, gen in zip(q, generators)])
        return q.gather(1, child[:, None]).clamp_min(1e-30).log(), child[:, None], q[:, None]

    def grow(self, root_token: Tensor, root_feat: Tensor, sampling: SamplingParams | None = None,
             generators=None) -> Tree:
        """EAGLE-2 dynamic tree from the root token [B] and the root's predicted feature [G*B, 1, D].
        With non-greedy `sampling` (and top_k = 1), the chain's tokens are drawn from the drafter."""
        k, g = self.params.top_k, self.target.groups
        drawn = sampling is not None and not sampling.greedy
        b = root_token.shape[0]
        dev = root_token.device
        if drawn:
            logp, idx, pool_q = self._draw(root_feat, sampling, generators)
        else:
            logp, idx = self._logp(root_feat)[:, 0].topk(k, dim=-1)  # level 1: [B, k]
        frontier = torch.arange(k, device=dev).expand(b, k)  # pool indices of the nodes to expand
        frontier_feat = root_feat.expand(-1, k, -1)          # each frontier node's input feature
        # the candidate pool: every node drafted this step (token, cumulative log-prob, parent, depth)
        pool_tokens, pool_scores = idx, logp
        pool_parents = torch.full((b, k), -1, dtype=torch.long, device=dev)  # -1: the root
        pool_depth = torch.ones(b, k, dtype=torch.long, device=dev)
        written = 0  # scratch entries of this step in the drafter cache (one per expanded node)
        scratch_anc = torch.zeros(b, 0, 0, dtype=torch.bool, device=dev)
        root_pos = self.cache.length.view(g, b)[0] - 1  # drafter position of the root's entry
        previous = frontier  # the frontier expanded at the previous level (pool indices)
        for level in range(1, self.params.depth + 1):
            # ancestry of the frontier among the scratch entries written so far (earlier frontiers)
            par_scratch = self._scratch_index_of(pool_parents, frontier, previous, written, k)
            anc = self._frontier_mask(scratch_anc, par_scratch, written, k)
            emb = self.target.gpt.embed_tokens(pool_tokens.gather(1, frontier)).repeat(g, 1, 1)
            pos = (root_pos + level)[:, None].expand(b, k).repeat(g, 1)
            upto = int(self.cache.length.max()) + written + k
            mask = self.cache.attention_mask(anc.repeat(g, 1, 1), upto)
            out = self.drafter(emb.to(frontier_feat.dtype), frontier_feat, pos, mask, self.cache, offset=written)
            scratch_anc = self._grow_scratch(scratch_anc, anc)
            written += k
            if drawn:
                child_logp, child_tok, q = self._draw(out, sampling, generators)
                child_logp, child_tok = child_logp[:, :, None], child_tok[:, :, None]  # [B, 1, 1]
                pool_q = torch.cat([pool_q, q], 1)
            else:
                child_logp, child_tok = self._logp(out).topk(k, dim=-1)  # [B, k, k]
            cum = pool_scores.gather(1, frontier)[:, :, None] + child_logp
            new_parents = frontier[:, :, None].expand(b, k, k).reshape(b, k * k)
            base = pool_tokens.shape[1]
            pool_tokens = torch.cat([pool_tokens, child_tok.reshape(b, k * k)], 1)
            pool_scores = torch.cat([pool_scores, cum.reshape(b, k * k)], 1)
            pool_parents = torch.cat([pool_parents, new_parents], 1)
            pool_depth = torch.cat([pool_depth, torch.full((b, k * k), level + 1, device=dev)], 1)
            best = cum.reshape(b, k * k).topk(k, dim=-1).indices  # next frontier among the new children
            frontier_feat = out.view(g, b, k, -1).repeat_interleave(k, dim=2).reshape(g * b, k * k, -1)
            frontier_feat = frontier_feat.gather(1, best.repeat(g, 1)[:, :, None].expand(-1, -1, out.shape[-1]))
            previous, frontier = frontier, base + best
        tree = self._select(root_token, pool_tokens, pool_scores, pool_parents, pool_depth)
        if drawn:  # a chain keeps every node in pool order: q lines up with the tree after the root
            tree.q = torch.cat([torch.zeros_like(pool_q[:, :1]), pool_q[:, : tree.tokens.shape[1] - 1]], 1)
        return tree

    # --- bookkeeping of the tree's scratch entries in the drafter cache -------------------------
    @staticmethod
    def _scratch_index_of(pool_parents: Tensor, frontier: Tensor, previous: Tensor, written: int, k: int) -> Tensor:
        """Scratch index of each frontier node's parent (-1 for the root's children)."""
        if written == 0:
            return torch.full_like(frontier, -1)
        parent = pool_parents.gather(1, frontier)  # pool index of the parent: one of the previous frontier
        # position of `parent` within the previous frontier -> its scratch slot (written - k + j)
        match = parent[:, :, None] == previous[:, None, :]
        return written - k + match.float().argmax(-1)

    @staticmethod
    def _frontier_mask(scratch_anc: Tensor, par_scratch: Tensor, written: int, k: int) -> Tensor:
        """[B, k, written + k]: each frontier node sees its ancestors' scratch entries and itself."""
        b = par_scratch.shape[0]
        mask = torch.zeros(b, k, written + k, dtype=torch.bool, device=par_scratch.device)
        if written:
            has = par_scratch >= 0
            rows = scratch_anc[torch.arange(b)[:, None], par_scratch.clamp_min(0)]  # [B, k, written]
            mask[:, :, :written] = rows & has[:, :, None]
        mask[:, :, written:] = torch.eye(k, dtype=torch.bool, device=par_scratch.device)
        return mask

    @staticmethod
    def _grow_scratch(scratch_anc: Tensor, anc: Tensor) -> Tensor:
        """Append the new frontier's rows to the [B, W, W] ancestry of all scratch entries."""
        b, k, width = anc.shape
        old = scratch_anc.shape[1]
        grown = torch.zeros(b, width, width, dtype=torch.bool, device=anc.device)
        grown[:, :old, :old] = scratch_anc
        grown[:, old:, :] = anc
        return grown

    def _select(self, root: Tensor, tokens: Tensor, scores: Tensor, parents: Tensor, depth: Tensor) -> Tree:
        """Keep the `total_tokens - 1` best nodes by cumulative score, parents first, root prepended."""
        b, n = tokens.shape
        keep = min(self.params.total_tokens - 1, n)
        chosen = scores.topk(keep, dim=-1).indices.sort(dim=-1).values  # pool order: parents first
        # pool index -> position in the tree (0 = root); a parent outside the kept set cannot happen
        # for a child inside it, since scores only fall along a path
        where = torch.full((b, n), -1, dtype=torch.long, device=tokens.device)
        where.scatter_(1, chosen, torch.arange(1, keep + 1, device=tokens.device).expand(b, keep))
        par_pool = parents.gather(1, chosen)
        par_tree = torch.where(par_pool < 0, torch.zeros_like(par_pool), where.gather(1, par_pool.clamp_min(0)))
        tree_tokens = torch.cat([root[:, None], tokens.gather(1, chosen)], 1)
        tree_parents = torch.cat([torch.full((b, 1), -1, device=tokens.device, dtype=torch.long), par_tree], 1)
        tree_depths = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=tokens.device),
                                 depth.gather(1, chosen)], 1)
        return Tree(tree_tokens, tree_parents, tree_depths, ancestry_mask(tree_parents))


def accept_greedy(tree: Tree, logits: Tensor) -> tuple[list[list[int]], Tensor]:
    """Walk each row's tree along the target's argmax: (accepted node indices incl. the root, the
    target's next token after the last accepted node [B])."""
    choice = logits.argmax(-1).cpu()  # [B, T]
    tokens, parents = tree.tokens.cpu(), tree.parents.cpu()
    paths, nxt = [], []
    for b in range(tokens.shape[0]):
        node, path = 0, [0]
        while True:
            children = ((parents[b] == node) & (tokens[b] == choice[b, node])).nonzero()
            if len(children) == 0:
                break
            node = int(children[0])
            path.append(node)
        paths.append(path)
        nxt.append(int(choice[b, node]))
    return paths, torch.tensor(nxt, device=logits.device)


def accept_sampled(tree: Tree, logits: Tensor, sampling: SamplingParams,
                   generators: list[torch.Generator]) -> tuple[list[list[int]], Tensor]:
    """Speculative sampling along a drafted chain (exact: the committed tokens follow the target's
    distribution). At each node the child x drawn from q is accepted with probability
    min(1, p(x) / q(x)); on rejection the next token is drawn from norm(max(p - q, 0)); after the
    last accepted node it is drawn from p."""
    p_all = probabilities(logits.float(), sampling)  # [B, T, V]
    parents = tree.parents.cpu()
    paths, nxt = [], []
    for b, gen in enumerate(generators):
        node, path, token = 0, [0], None
        while True:
            child = (parents[b] == node).nonzero()
            p = p_all[b, node]
            if len(child) == 0:
                break
            c = int(child[0])
            x, q = int(tree.tokens[b, c]), tree.q[b, c].float()
            u = torch.rand((), generator=gen, device=gen.device)
            if u * q[x] <= p[x]:  # accept with probability min(1, p(x) / q(x))
                node = c
                path.append(c)
                continue
            residual = (p - q).clamp_min(0)
            p = residual / residual.sum() if residual.sum() > 0 else p
            token = int(torch.multinomial(p[None], 1, generator=gen)[0])
            break
        if token is None:
            token = int(torch.multinomial(p_all[b, node][None], 1, generator=gen)[0])
        paths.append(path)
        nxt.append(token)
    return paths, torch.tensor(nxt, device=logits.device)


@torch.no_grad()
def generate_eagle(target: LlamaGenTarget, condition: Condition, *, drafter: Drafter, num_tokens: int,
                   sampling: SamplingParams, tree: TreeParams,
                   generators: list[torch.Generator] | None = None) -> Generation:
    """EAGLE-2 speculative decoding: greedy acceptance (token for token equal to greedy AR), or, with
    sampling and a chain (tree.top_k = 1), exact speculative sampling (the target's distribution)."""
    if not sampling.greedy and tree.top_k != 1:
        raise NotImplementedError("sampled speculative decoding here drafts a chain: use tree.top_k=1, or "
                                  "sampling.temperature=0 for trees (sampled trees and LANTERN are not in this "
                                  "version yet)")
    if not sampling.greedy and generators is None:
        raise ValueError("sampled speculative decoding needs one generator per image")
    if tree.top_k > target.vocab_size:
        raise ValueError(f"tree.top_k={tree.top_k} exceeds the vocabulary ({target.vocab_size})")
    device, g = target.device, target.groups
    _sync(device)
    t0 = time.perf_counter()
    cache, out = target.start(condition, num_tokens, extra_slots=tree.total_tokens + 1, all_positions=True)
    b, p = condition.batch, target.prefix_len
    root = sample(out.logits[:, -1], sampling, generators)  # [B]
    # first drafter entries: the prefix features, no tokens (zero embeddings) except the root's
    emb = torch.zeros_like(out.hidden.reshape(g * b, p, -1))
    emb[:, -1] = target.gpt.embed_tokens(root).repeat(g, 1).to(emb.dtype)
    pending = Pending(emb=emb, feats=out.hidden.reshape(g * b, p, -1), valid=cache.valid[:, :p].clone(),
                      count=torch.full((b,), p, dtype=torch.long, device=device))
    drafting = EagleDrafting(drafter, target, tree, g * b, p + num_tokens + tree.depth * tree.top_k + 8)
    _sync(device)
    t1 = time.perf_counter()
    made = [[int(r)] for r in root.tolist()]
    nfe = torch.zeros(b, dtype=torch.long)
    steps = torch.zeros(b, dtype=torch.long)
    while min(len(m) for m in made) < num_tokens:
        live = torch.tensor([len(m) < num_tokens for m in made])
        root_feat = drafting.consume(pending)
        t = drafting.grow(root, root_feat, sampling, generators)
        verified = target.extend(cache, t.tokens, block_mask=t.mask, depths=t.depths)
        if sampling.greedy:
            paths, nxt = accept_greedy(t, verified.logits)
        else:
            paths, nxt = accept_sampled(t, verified.logits, sampling, generators)
        for i in range(b):  # a finished row keeps its state; its results are dropped
            if not live[i]:
                paths[i] = []
            else:
                room = num_tokens - len(made[i])  # root already counted; drafts + the next token
                paths[i] = paths[i][: room + 1]  # the root and at most `room` drafts
        counts = torch.tensor([len(pt) for pt in paths], device=device)
        width = max(1, int(counts.max()))
        idx = torch.zeros(b, width, dtype=torch.long, device=device)
        for i, pt in enumerate(paths):
            if pt:
                idx[i, :len(pt)] = torch.tensor(pt, device=device)
        src = cache.length.view(g, b)[0][:, None] + idx  # absolute slots of the accepted nodes
        cache.keep(src.repeat(g, 1), counts.repeat(g))
        tok_idx = idx.clamp_max(t.tokens.shape[1] - 1)
        accepted_tokens = t.tokens.gather(1, tok_idx)  # [B, W] root first
        for i, pt in enumerate(paths):
            if pt:
                made[i].extend(accepted_tokens[i, 1:len(pt)].tolist())
                if len(made[i]) < num_tokens:
                    made[i].append(int(nxt[i]))
                nfe[i] += 1
                steps[i] += 1
        # next drafter entries: features of the accepted nodes paired with the following token
        feats = verified.hidden.gather(2, idx[None, :, :, None].expand(g, -1, -1, verified.hidden.shape[-1]))
        next_tokens = torch.cat([accepted_tokens[:, 1:], nxt[:, None]], 1)  # [B, W]
        for i, pt in enumerate(paths):
            if pt:
                next_tokens[i, len(pt) - 1] = nxt[i]
        emb = target.gpt.embed_tokens(next_tokens).repeat(g, 1, 1).to(feats.dtype)
        pending = Pending(emb=emb, feats=feats.reshape(g * b, width, -1),
                          valid=torch.ones(g * b, width, dtype=torch.bool, device=device), count=counts)
        root = torch.where(counts > 0, nxt, root)
    _sync(device)
    t2 = time.perf_counter()
    tokens = torch.tensor([m[:num_tokens] for m in made], device=device)
    return Generation(tokens=tokens, nfe=nfe, steps=steps, prefill_s=t1 - t0, loop_s=t2 - t1)
