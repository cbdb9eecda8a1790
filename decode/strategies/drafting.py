"""EAGLE drafting: the drafter's cache and pending entries, and the draft trees it grows.

Per step and per image row b (rows run batched, each with its own tree):
1. the drafter consumes its pending entries (target features of the tokens committed last step,
   each paired with the token after it: EAGLE's shift) and commits them to its own KV cache; on a
   VVS skipped step the features are stale ones from the feature cache, never recomputed;
2. it grows a tree from the root (the token committed last):
   - dynamic (EAGLE-2, docs/algorithms.md 2.2): `top_k` children per frontier node, `depth` expansion
     rounds, frontier and the final `total_tokens - 1` nodes chosen by cumulative log-probability;
     the drafts are deterministic (q = 1 for sampled acceptance, as in LANTERN);
   - static (LANTERN++): a fixed shape; children drawn without replacement from the drafter's
     processed distribution when sampling (each node keeps the q it was drawn from).
Classifier-free guidance: the drafter runs on cond + null rows with the same tokens and combines
logits with the target's scale (`target.guide`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from decode.core.cache import KVCache, pad_entries
from decode.models.drafter import Drafter, prefix_embedding
from decode.core.host import to_device
from decode.core.sampling import SamplingParams, draw, filter_logits, probabilities
from decode.models.target import LlamaGenTarget
from decode.models.target.llamagen import TargetOutput
from decode.core.trees import StaticShape, StepOutcome, Tree, TreeParams, ancestry_mask, static_shape


@dataclass
class Pending:
    """Drafter entries not yet in its cache: (feature, token embedding) pairs, per row `count`."""
    emb: Tensor     # [G*B, M, D]
    feats: Tensor   # [G*B, M, D]
    valid: Tensor   # [G*B, M] attendable (caption padding is not)
    count: Tensor   # [B] on the host: entries per row (>= 1 for live rows; the last is the current root's)


@dataclass(frozen=True)
class StaticPlan:
    """What a static shape fixes once for every step: each node's children, the nodes expanded at
    each level with their ancestry among expanded nodes, and the tree's parents, depths and mask."""
    kids: list[list[int]]
    levels: list[tuple[int, list[int], Tensor]]  # (level, expanded nodes, [n, earlier + n] ancestry)
    parents: Tensor  # [T]
    depths: Tensor   # [T]
    mask: Tensor     # [T, T]

    def to(self, device) -> "StaticPlan":
        """The plan with its tensors on `device` (moved once, not at every step)."""
        return StaticPlan(self.kids, [(lv, nodes, anc.to(device)) for lv, nodes, anc in self.levels],
                          self.parents.to(device), self.depths.to(device), self.mask.to(device))


def plan_static(shape: StaticShape) -> StaticPlan:
    kids = [shape.children(n) for n in range(shape.size)]
    depths = shape.depths()
    levels, expanded = [], []
    for level in range(1, max(depths)):
        nodes = [n for n in range(shape.size) if depths[n] == level and kids[n]]
        if not nodes:
            break
        slot = {n: i for i, n in enumerate(expanded + nodes)}
        anc = torch.zeros(len(nodes), len(expanded) + len(nodes), dtype=torch.bool)
        for j, n in enumerate(nodes):  # each node sees its expanded ancestors and itself
            a = n
            while a > 0:
                anc[j, slot[a]] = True
                a = shape.parents[a]
        levels.append((level, nodes, anc))
        expanded.extend(nodes)
    parents = torch.tensor(shape.parents)
    return StaticPlan(kids, levels, parents, torch.tensor(depths), ancestry_mask(parents[None])[0])


@dataclass(frozen=True)
class EagleDrafts:
    """Drafting with an EAGLE drafter: the dynamic tree of `tree`, or its static shape."""
    drafter: Drafter
    tree: TreeParams
    static_shapes = True  # its runs pad their passes to fixed widths when started `static`

    def start(self, target: LlamaGenTarget, batch: int, num_tokens: int, static: bool = False) -> "EagleDrafting":
        return EagleDrafting(self.drafter, target, self.tree, batch, num_tokens, static)


class EagleDrafting:
    """The drafter side of one generation: its KV cache, its pending entries, and the trees.

    `static` (static shapes): the drafter's cache is static and each step's pending entries are
    padded to `longest_path`, so every drafter pass of a kind has one shape."""

    def __init__(self, drafter: Drafter, target: LlamaGenTarget, tree: TreeParams, batch: int, num_tokens: int,
                 static: bool = False):
        self.drafter, self.target, self.params = drafter, target, tree
        self.shape = static_shape(tree.static, tree.static_size) if tree.static else None
        self.plan = plan_static(self.shape).to(target.device) if self.shape else None
        widest = max(len(k) for k in self.plan.kids) if self.plan else tree.top_k
        if widest > target.vocab_size:
            raise ValueError(f"the draft tree gives a node {widest} children; the vocabulary has {target.vocab_size}")
        scratch = self.shape.size if self.shape else tree.depth * tree.top_k
        self.static = static
        capacity = target.prefix_len + num_tokens + scratch + 16 + (self.longest_path if static else 0)
        self.cache: KVCache = drafter.new_cache(target.groups * batch, capacity, static=static)
        self.pending: Pending | None = None

    @property
    def tree_size(self) -> int:
        """Nodes of every tree this drafting proposes, the root included (fixed, static or dynamic)."""
        if self.shape is not None:
            return self.shape.size
        k, depth = self.params.top_k, self.params.depth
        return 1 + min(self.params.total_tokens - 1, k + depth * k * k)  # `_select` keeps this many of the pool

    @property
    def longest_path(self) -> int:
        """Nodes on the longest root-to-leaf path: the most a step commits (and the drafter then consumes)."""
        return 1 + (max(self.shape.depths()) if self.shape is not None else self.params.depth + 1)

    # --- the engine's interface -----------------------------------------------------------------
    def begin(self, prefix: TargetOutput, prefix_valid: Tensor, following: Tensor, generators=None) -> None:
        """First entries: the prefix features, each paired with the token after it: none over the
        caption (the drafter's prefix embedding) but at its last slot, which takes image token 0; the
        image tokens given before the root, if any, and the root last (`following` [B, k + 1])."""
        g, b, p = prefix.hidden.shape[:3]
        feats = prefix.hidden.reshape(g * b, p, -1)
        emb = prefix_embedding(self.target, self.drafter.config.prefix_token, feats)
        k = following.shape[1]
        emb[:, -k:] = self.target.embed_tokens(following).repeat(g, 1, 1).to(emb.dtype)
        self.pending = Pending(emb=emb, feats=feats, valid=prefix_valid.clone(), count=torch.full((b,), p))

    def propose(self, root: Tensor, sampling: SamplingParams, generators) -> Tree:
        root_feat = self.consume(self.pending)
        if self.shape is not None:
            return self.grow_static(root, root_feat, sampling, generators)
        return self.grow(root, root_feat, sampling)

    def observe(self, step: StepOutcome, sampling: SamplingParams, generators) -> None:
        """Next entries: the feature of each committed node paired with the token after it."""
        g = self.target.groups
        emb = self.target.embed_tokens(step.following).repeat(g, 1, 1)
        feats = step.feats.flatten(0, 1)  # [G, B, W, D] -> [G*B, W, D]
        self.pending = Pending(emb=emb.to(feats.dtype), feats=feats,
                               valid=torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device),
                               count=step.counts)

    def _logp(self, hidden: Tensor, sampling: SamplingParams) -> Tensor:
        """Drafter features [G*B, T, D] -> CFG-combined log-probabilities [B, T, V], after the
        sampling's logits processor (temperature, top-k, top-p) as in the released EAGLE-2 code; the
        processor changes the cumulative scores and so the tree's shape. Greedy: none."""
        logits = self.target.guide(hidden).logits.float()
        if not sampling.greedy:
            logits = filter_logits(logits, sampling)
        return logits.log_softmax(-1)

    def consume(self, pending: Pending) -> Tensor:
        """Feed the pending entries; commit them; returns the root's predicted feature [G*B, 1, D]."""
        g, dev = self.target.groups, pending.emb.device
        count = pending.count.repeat(g)  # host
        if self.static and pending.emb.shape[1] < self.longest_path:  # a t2i prefill's entries keep their own width
            emb, feats, valid = pad_entries(self.longest_path, pending.emb, pending.feats, pending.valid)
            pending = Pending(emb, feats, valid, pending.count)
        m = pending.emb.shape[1]
        causal = torch.ones(m, m, dtype=torch.bool, device=dev).tril()
        block = causal[None] & (pending.valid[:, None, :] | torch.eye(m, dtype=torch.bool, device=dev))
        pos = self.cache.length[:, None] + torch.arange(m, device=dev)
        upto = self.cache.longest + m
        out = self.drafter(pending.emb, pending.feats, pos, self.cache.attention_mask(block, upto), self.cache)
        self.cache.commit(count, key_valid=pending.valid)
        last = to_device(count - 1, dev)  # the root's entry is each row's last
        return out[torch.arange(out.shape[0], device=dev), last][:, None]

    def grow(self, root_token: Tensor, root_feat: Tensor, sampling: SamplingParams) -> Tree:
        """EAGLE-2 dynamic tree from the root token [B] and the root's predicted feature [G*B, 1, D]:
        deterministic top-k children (LANTERN treats these drafts as q = 1 when sampling)."""
        k, g = self.params.top_k, self.target.groups
        b = root_token.shape[0]
        dev = root_token.device
        logp, idx = self._logp(root_feat, sampling)[:, 0].topk(k, dim=-1)  # level 1: [B, k]
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
            out = self._expand(pool_tokens.gather(1, frontier), frontier_feat, root_pos + level, anc, written)
            scratch_anc = self._grow_scratch(scratch_anc, anc)
            written += k
            child_logp, child_tok = self._logp(out, sampling).topk(k, dim=-1)  # [B, k, k]
            cum = pool_scores.gather(1, frontier)[:, :, None] + child_logp
            new_parents = frontier[:, :, None].expand(b, k, k).reshape(b, k * k)
            base = pool_tokens.shape[1]
            pool_tokens = torch.cat([pool_tokens, child_tok.reshape(b, k * k)], 1)
            pool_scores = torch.cat([pool_scores, cum.reshape(b, k * k)], 1)
            pool_parents = torch.cat([pool_parents, new_parents], 1)
            pool_depth = torch.cat([pool_depth, torch.full((b, k * k), level + 1, device=dev)], 1)
            best = cum.reshape(b, k * k).topk(k, dim=-1).indices  # next frontier among the new children
            # [G*B, k, D] -> each of the k*k children inherits its parent's output feature
            frontier_feat = out.view(g, b, k, -1).repeat_interleave(k, dim=2).reshape(g * b, k * k, -1)
            frontier_feat = frontier_feat.gather(1, best.repeat(g, 1)[:, :, None].expand(-1, -1, out.shape[-1]))
            previous, frontier = frontier, base + best
        return self._select(root_token, pool_tokens, pool_scores, pool_parents, pool_depth)

    def _expand(self, tokens: Tensor, feats: Tensor, positions: Tensor, anc: Tensor, written: int) -> Tensor:
        """One drafter pass over frontier nodes tokens [B, n] (input features [G*B, n, D]) at drafter
        positions [B], seeing committed entries and their scratch ancestors anc [B, n, written + n]."""
        g, (b, n) = self.target.groups, tokens.shape
        emb = self.target.embed_tokens(tokens).repeat(g, 1, 1)
        pos = positions[:, None].expand(b, n).repeat(g, 1)
        upto = self.cache.longest + written + n
        mask = self.cache.attention_mask(anc.repeat(g, 1, 1), upto)
        return self.drafter(emb.to(feats.dtype), feats, pos, mask, self.cache, offset=written)

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
            rows = scratch_anc[torch.arange(b, device=par_scratch.device)[:, None], par_scratch.clamp_min(0)]
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
        # A stable sort: scores never rise along a path, but they can stay equal (a log-probability
        # of 0, or -inf for codes the sampling's top-k / top-p filtered out); on a tie the parent,
        # earlier in the pool, comes first, so no kept node loses its parent.
        best = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :keep]
        chosen = best.sort(dim=-1).values  # pool order: parents first
        # pool index -> position in the tree (0 = root)
        where = torch.full((b, n), -1, dtype=torch.long, device=tokens.device)
        where.scatter_(1, chosen, torch.arange(1, keep + 1, device=tokens.device).expand(b, keep))
        par_pool = parents.gather(1, chosen)
        par_tree = torch.where(par_pool < 0, torch.zeros_like(par_pool), where.gather(1, par_pool.clamp_min(0)))
        tree_tokens = torch.cat([root[:, None], tokens.gather(1, chosen)], 1)
        tree_parents = torch.cat([torch.full((b, 1), -1, device=tokens.device, dtype=torch.long), par_tree], 1)
        tree_depths = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=tokens.device),
                                 depth.gather(1, chosen)], 1)
        tree_scores = torch.cat([torch.zeros(b, 1, device=tokens.device), scores.gather(1, chosen)], 1)
        return Tree(tree_tokens, tree_parents, tree_depths, ancestry_mask(tree_parents), scores=tree_scores)



    # --- static trees (LANTERN++): fixed shape, children drawn from the drafter ------------------
    def grow_static(self, root_token: Tensor, root_feat: Tensor, sampling: SamplingParams, generators) -> Tree:
        """Fill the static shape level by level: each node with children is expanded once; its
        children are the drafter's top picks (greedy) or draws without replacement from its
        processed distribution q, each stored with the q it was drawn from (q minus earlier siblings)."""
        shape, plan, b, dev = self.shape, self.plan, root_token.shape[0], root_token.device
        drawn = not sampling.greedy
        tokens = torch.zeros(b, shape.size, dtype=torch.long, device=dev)
        tokens[:, 0] = root_token
        scores = torch.zeros(b, shape.size, device=dev)
        q = torch.zeros(b, shape.size, self.target.vocab_size, device=dev) if drawn else None
        out_of = {0: root_feat}  # node -> the drafter's output feature there [G*B, 1, D]
        self._draw_children(0, root_feat, tokens, scores, q, sampling, generators)
        written = 0  # scratch entries of this step (one per expanded node)
        root_pos = self.cache.length.view(self.target.groups, b)[0] - 1
        for level, nodes, anc in plan.levels:
            feats = torch.cat([out_of[shape.parents[n]] for n in nodes], 1)
            out = self._expand(tokens[:, nodes], feats, root_pos + level, anc.expand(b, -1, -1), written)
            written += len(nodes)
            for j, n in enumerate(nodes):
                out_of[n] = out[:, j:j + 1]
                self._draw_children(n, out_of[n], tokens, scores, q, sampling, generators)
        return Tree(tokens, plan.parents.expand(b, -1), plan.depths.expand(b, -1), plan.mask.expand(b, -1, -1),
                    q=q, scores=scores)

    def _draw_children(self, node: int, feat: Tensor, tokens: Tensor, scores: Tensor, q: Tensor | None,
                       sampling: SamplingParams, generators) -> None:
        kids = self.plan.kids[node]
        if not kids:
            return
        logits = self.target.guide(feat).logits[:, 0].float()  # [B, V]
        if q is None:  # greedy: the top picks in rank order
            logp, top = logits.log_softmax(-1).topk(len(kids), dim=-1)
            tokens[:, kids] = top
            scores[:, kids] = scores[:, node:node + 1] + logp
            return
        dist = probabilities(logits, sampling)
        placeholder = torch.zeros_like(dist)
        placeholder[:, 0] = 1.0
        for kid in kids:
            total = dist.sum(-1, keepdim=True)
            # q minus the siblings drawn before; a row whose support ran out (top-k / top-p sampling
            # smaller than the shape) gets token 0 as a placeholder with q = 0, which acceptance never
            # takes (chosen on the device: the host never looks)
            cur = torch.where(total > 0, dist / total.clamp_min(1e-30), torch.zeros_like(dist))
            draw_from = torch.where(total > 0, cur, placeholder)
            x = torch.cat([draw(c[None], g) for c, g in zip(draw_from, generators)])
            tokens[:, kid] = x
            q[:, kid] = cur
            scores[:, kid] = scores[:, node] + cur.gather(1, x[:, None])[:, 0].clamp_min(1e-30).log()
            dist = dist.scatter(1, x[:, None], 0.0)
