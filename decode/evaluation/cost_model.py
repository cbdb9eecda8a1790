"""Wall-clock cost model: time each component at a given model size, combine with acceptance
statistics measured on the embedded world, and predict each method's speed-up over AR.

Components (median of `repeats` timings, averaged over caches filled to 1/4, 1/2 and 3/4 of the
image, on this process's device and dtype, at `batch` images, x2 rows under CFG):
  t_ar      one AR decode step (1 token per row, sampled with the benchmark's settings)
  t_verify  one target pass over a draft tree (the default EAGLE-2 tree) / a Jacobi chain
            (`_part`: the same over half of the rows, as when the other rows skip or have finished)
  t_draft   one drafter round: consume the last step's entries + grow the tree (`_static`: LANTERN++'s
            static tree, drafts sampled)
  t_jacobi  one SJD Jacobi round: update the window after a pass, propose the next chain
  t_sched   one VVS similarity decision
  t_accept  one sampled acceptance over the verified tree, the target's fetched distributions
            walked on the host: exact (eagle2), `_relaxed` (LANTERN's delta bound: lantern, vvs_u,
            vvs), `_static` (LANTERN++'s lambda bound on its sampled static tree), `_chain` (SJD)
Prediction per image of N tokens: AR = N t_ar; a drafted method = NFE (t_verify + t_accept) +
steps t_draft (+ steps t_sched for vvs), with NFE = N / step compression and steps = NFE / (1 - skip
ratio); SJD = NFE (t_verify(window + 1) + t_accept_chain + t_jacobi). Step compression and skip
ratio come from a benchmark's results.json (scripts/benchmark.py), as are the measured speed-ups the model is checked against
when `size=world`.

python scripts/cost_model.py size=world results=outputs/benchmark/world_cpu/results.json batch=8 threads=1
python scripts/cost_model.py size=XL results=outputs/benchmark/world_cpu/results.json batch=1
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from decode.resolvers import REPO

from decode.strategies.acceptance import Relaxation, SampledAcceptance
from decode.models.drafter import Drafter, DrafterConfig, load_drafter
from decode.strategies.drafting import EagleDrafting
from decode.core.engine import generate_ar
from decode.core.host import wait_for
from decode.strategies.jacobi import JacobiDrafting
from decode.api import DTYPES, compile_models, pick_device
from decode.core.sampling import SamplingParams, row_generators, sample
from decode.strategies.skipping import path_similarity
from decode.strategies.registry import relaxation, resolve_method
from decode.models.target import Condition, LlamaGenTarget, build_gpt
from decode.core.trees import StepOutcome, Tree, TreeParams
from decode.models.vq import load_vq

# which acceptance timing each method pays once per target pass
ACCEPT_KIND = {"eagle2": "t_accept", "lantern": "t_accept_relaxed", "vvs_u": "t_accept_relaxed",
               "vvs": "t_accept_relaxed", "lantern_pp": "t_accept_static", "sjd": "t_accept_chain",
               "sjd_vp": "t_accept_chain"}
# which drafting timing each method pays once per step (t_draft otherwise)
DRAFT_KIND = {"lantern_pp": "t_draft_static", "sjd": "t_jacobi", "sjd_vp": "t_jacobi_vp"}


def timed(fn, repeats: int, device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        wait_for(device)
        t0 = time.perf_counter()
        fn()
        wait_for(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build(cfg: DictConfig, device, dtype):
    if cfg.size == "world":
        gpt = build_gpt(str(REPO / "models/world/target"))
        drafter = load_drafter(REPO / "models/world/drafter", gpt)
    else:
        gpt = build_gpt(None, size=cfg.size, model_type="t2i", vocab_size=cfg.vocab_size, block_size=cfg.block_size,
                        cls_token_num=cfg.cls_token_num, caption_dim=cfg.caption_dim)
        drafter = Drafter(DrafterConfig.for_target(gpt)).eval()
    gpt.to(device=device, dtype=dtype)
    drafter.to(device=device, dtype=dtype)
    return LlamaGenTarget(gpt, cfg_scale=cfg.cfg_scale), drafter


def load_codebook(cfg: DictConfig, vocab: int, device) -> torch.Tensor:
    """The VQ codebook LANTERN's neighbourhoods come from: the world's, or random rows at other sizes."""
    if cfg.size == "world":
        return load_vq(str(REPO / "models/world/tokenizer")).quantize.embedding.weight.detach().to(device)
    return torch.randn(vocab, 8, generator=torch.Generator().manual_seed(0)).to(device)


def knobs(cfg: DictConfig, name: str) -> dict:
    """Method `name`'s knobs: the registry's defaults with the config's `<name>.*` overrides."""
    return resolve_method(name, OmegaConf.to_container(cfg[name], resolve=True)).knobs


def relaxations(cfg: DictConfig, codebook: torch.Tensor) -> dict[str, Relaxation]:
    """LANTERN's (delta bound) and LANTERN++'s (lambda bound) latent neighbourhoods."""
    return {name: relaxation(resolve_method(name, OmegaConf.to_container(cfg[name], resolve=True)), codebook)
            for name in ("lantern", "lantern_pp")}


class Drafts:
    """The drafting side of one cache fill: an EAGLE drafter (dynamic tree or a static shape) whose
    cache holds the prefix and the `filled` image tokens, and the tree it proposes."""

    def __init__(self, target: LlamaGenTarget, drafter: Drafter, params: TreeParams, fill: "Fill", sampling, gens):
        b, p = fill.root.shape[0], target.prefix_len
        self.target, self.sampling, self.gens, self.root = target, sampling, gens, fill.root
        self.drafting = EagleDrafting(drafter, target, params, b, target.num_image_tokens)
        self.drafting.begin(fill.out, fill.cache.valid[:, :p], fill.root[:, None])
        self.tree = self.drafting.propose(fill.root, sampling, gens)  # consumes the prefix entries
        if fill.tokens.shape[1]:  # the drafter's cache also holds one entry per image token
            n = fill.tokens.shape[1]
            self.drafting.observe(StepOutcome(fill.hidden[:, :, :n], fill.tokens, torch.full((b,), n), self.tree),
                                  sampling, gens)  # host counts
            self.tree = self.drafting.propose(fill.root, sampling, gens)

    def round(self) -> Tree:
        """One drafter round: consume the entries of ~3 committed tokens, grow the tree."""
        g, (b, d) = self.target.groups, (self.root.shape[0], self.target.hidden_size)
        dev, dtype = self.root.device, next(self.drafting.drafter.parameters()).dtype
        feats = torch.randn(g, b, 3, d, device=dev, dtype=dtype)
        following = torch.randint(self.target.vocab_size, (b, 3), device=dev)
        self.drafting.observe(StepOutcome(feats, following, torch.full((b,), 3), self.tree), self.sampling, self.gens)
        return self.drafting.propose(self.root, self.sampling, self.gens)


@dataclass
class Fill:
    """The target's cache with `filled` random image tokens committed after a random caption."""
    cache: object
    out: object
    tokens: torch.Tensor  # [B, filled]
    hidden: torch.Tensor | None
    root: torch.Tensor    # [B]

    @classmethod
    def make(cls, target: LlamaGenTarget, batch: int, filled: int, device) -> "Fill":
        p, c = target.prefix_len, target.config.caption_dim
        cond = Condition(torch.randn(batch, p, c, device=device) * 0.1,
                         torch.ones(batch, p, dtype=torch.bool, device=device))
        cache, out = target.start(cond, target.num_image_tokens, extra_slots=256, all_positions=True)
        tokens = torch.randint(target.vocab_size, (batch, filled), device=device)
        hidden = target.extend(cache, tokens).hidden if filled else None
        target.commit(cache, filled)
        return cls(cache, out, tokens, hidden, torch.randint(target.vocab_size, (batch,), device=device))

    def verify(self, target: LlamaGenTarget, tree: Tree, rows: torch.Tensor | None = None):
        """One target pass over `tree` (over `rows` only, when given); nothing is committed."""
        if rows is None:
            return target.extend(self.cache, tree.tokens, block_mask=tree.mask, depths=tree.depths)
        return target.extend(self.cache, tree.tokens[rows], block_mask=tree.mask[rows], depths=tree.depths[rows],
                             rows=rows)


def jacobi_chain(fill: Fill, target: LlamaGenTarget, window: int, sampling, gens, vp_beta: float = 0.0,
                 vp_cap: float = 10.0):
    """SJD at this fill: its drafting, the chain it proposes, and a Jacobi round (the update after a
    pass that committed 3 nodes per row, the measured compression's order, then the next proposal).
    With vp_beta > 0 the round is SJD-VP's: from the second round on, each redrawn slot is reweighted
    by its probability's rise since the round before."""
    b, dev = fill.root.shape[0], fill.root.device
    jacobi = JacobiDrafting(target, b, target.num_image_tokens, window=window, vp_beta=vp_beta, vp_cap=vp_cap)
    jacobi.begin(fill.out, fill.cache.valid[:, :target.prefix_len], fill.root[:, None], gens)
    chain = jacobi.propose(fill.root, sampling, gens)
    logits = fill.verify(target, chain).logits
    following = torch.randint(target.vocab_size, chain.tokens.shape, device=dev)

    def round_() -> Tree:
        step = StepOutcome(torch.zeros(0), following, torch.full((b,), 3), chain, logits=logits)
        jacobi.observe(step, sampling, gens)
        return jacobi.propose(fill.root, sampling, gens)
    return chain, logits, round_


@torch.no_grad()
def times_at(cfg: DictConfig, target: LlamaGenTarget, drafter: Drafter, relax: dict[str, Relaxation], device,
             filled: int) -> dict[str, float]:
    """Component timings with `filled` image tokens already in the target's and the drafter's caches."""
    b, r = cfg.batch, cfg.repeats
    sampling, gens = SamplingParams(**cfg.sampling), row_generators(range(b), device)
    fill = Fill.make(target, b, filled, device)
    dynamic = Drafts(target, drafter, TreeParams(**cfg.tree), fill, sampling, gens)  # EAGLE-2: top-k, processed
    static = Drafts(target, drafter, TreeParams(static=knobs(cfg, 'lantern_pp')['static_tree']), fill, sampling, gens)
    chain, chain_logits, jacobi_round = jacobi_chain(fill, target, cfg.sjd_window, sampling, gens)
    *_, vp_round = jacobi_chain(fill, target, cfg.sjd_window, sampling, gens, knobs(cfg, 'sjd_vp')['vp_beta'],
                                  knobs(cfg, 'sjd_vp')['vp_cap'])
    vp_round()  # the first round has no earlier prediction to compare with; time the ones that do
    tree, s_tree = dynamic.tree, static.tree
    logits, s_logits = fill.verify(target, tree).logits, fill.verify(target, s_tree).logits
    exact = SampledAcceptance()
    relaxed, relaxed_pp = SampledAcceptance(relax["lantern"]), SampledAcceptance(relax["lantern_pp"])
    latents = torch.randn(target.vocab_size, 8)
    half = torch.arange(max(1, b // 2), device=device)  # a pass over part of the batch (rows that verify)
    return {
        "t_ar": timed(lambda: sample(target.extend(fill.cache, fill.root[:, None]).logits[:, -1], sampling, gens),
                      r, device),  # the engine's AR step: the pass and the sampled next token
        "t_verify": timed(lambda: fill.verify(target, tree), r, device),
        "t_verify_chain": timed(lambda: fill.verify(target, chain), r, device),
        "t_verify_part": timed(lambda: fill.verify(target, tree, half), r, device),
        "t_verify_chain_part": timed(lambda: fill.verify(target, chain, half), r, device),
        "t_draft": timed(dynamic.round, min(r, 10), device),
        "t_draft_static": timed(static.round, min(r, 10), device),
        "t_jacobi": timed(jacobi_round, min(r, 10), device),
        "t_jacobi_vp": timed(vp_round, min(r, 10), device),
        "t_sched": timed(lambda: path_similarity(tree, latents), r, device),
        "t_accept": timed(lambda: exact(tree, logits, sampling, gens), r, device),
        "t_accept_relaxed": timed(lambda: relaxed(tree, logits, sampling, gens), r, device),
        "t_accept_static": timed(lambda: relaxed_pp(s_tree, s_logits, sampling, gens), r, device),
        "t_accept_chain": timed(lambda: exact(chain, chain_logits, sampling, gens), r, device),
        "tree_nodes": float(tree.tokens.shape[1]),
    }


@torch.no_grad()
def plain_ar(target: LlamaGenTarget, cond: Condition, n: int) -> torch.Tensor:
    """A plain eager loop (prefill, then one cached forward and a greedy pick per token): what the
    engine's AR baseline is checked against, so that speed-ups are not taken over a slow baseline."""
    cache, out = target.start(cond, n)
    token = out.logits[:, -1].argmax(-1)
    for _ in range(n - 1):
        out = target.extend(cache, token[:, None])
        target.commit(cache, 1)
        token = out.logits[:, -1].argmax(-1)
    return token


def ar_throughput(cfg: DictConfig, target: LlamaGenTarget, device, plain_loop: bool = True) -> dict[str, float]:
    """Tokens per second of greedy AR for `ar_tokens` tokens (prefill included): the engine's
    `generate_ar` and (`plain_loop`) the plain loop, on the same inputs."""
    b, n = cfg.batch, min(cfg.ar_tokens, target.num_image_tokens)
    p, c = target.prefix_len, target.config.caption_dim
    cond = Condition(torch.randn(b, p, c, device=device) * 0.1, torch.ones(b, p, dtype=torch.bool, device=device))
    greedy = SamplingParams(temperature=0.0)
    out = {"ar_tokens_per_s_engine": b * n / timed(lambda: generate_ar(target, cond, num_tokens=n, sampling=greedy),
                                                    3, device)}
    if plain_loop:
        out["ar_tokens_per_s_plain_loop"] = b * n / timed(lambda: plain_ar(target, cond, n), 3, device)
    return out


def component_times(cfg: DictConfig, target: LlamaGenTarget, drafter: Drafter, device) -> dict[str, float]:
    """Mean over cache fills of 1/4, 1/2 and 3/4 of the image: the average over a whole decode
    (attention cost grows with the cache)."""
    n = target.num_image_tokens
    relax = relaxations(cfg, load_codebook(cfg, target.vocab_size, device))
    probes = [times_at(cfg, target, drafter, relax, device, int(f * n)) for f in (0.25, 0.5, 0.75)]
    return {k: sum(pr[k] for pr in probes) / len(probes) for k in probes[0]}


def predict(times: dict[str, float], row: dict, n: int, batch: int = 1) -> float:
    """Predicted speed-up over AR for one benchmark row. With the row's batch counts (benchmarks
    record them), the batch's own passes and steps are used: a batch runs as many steps as its
    slowest row needs. Otherwise, per image: NFE = n / step compression, steps = NFE / (1 - skip)."""
    ar = n * times["t_ar"]
    if row["method"] == "ar":
        return 1.0
    kind = "t_verify_chain" if row["method"] in ("sjd", "sjd_vp") else "t_verify"
    accept = times.get(ACCEPT_KIND.get(row["method"], ""), 0.0)  # 0: timings from before acceptance was timed
    if "batch_passes" in row:
        passes, steps = row["batch_passes"], row["batch_steps"]
        verify = pass_cost(times, kind, batch, passes, row_passes=row["nfe"] * batch)
        verify += row["nfe"] * accept  # acceptance walks each verifying row: t_accept / batch per row
    else:
        passes = n / row["step_compression"]  # the measured compression carried to this token count
        steps = passes / max(1e-9, 1 - row["skip_ratio"])
        verify = passes * (times[kind] + accept)
    sched = steps * times["t_sched"] if row["method"] in ("vvs",) else 0.0
    return ar / (verify + steps * draft_time(times, row["method"]) + sched)


def draft_time(times: dict[str, float], method: str) -> float:
    """One step's drafting: a drafter round (a static tree's for LANTERN++) or SJD's Jacobi round.
    Timings saved before these were split off fall back to the dynamic tree's round, SJD-VP's to
    SJD's, and to nothing for SJD."""
    kind = DRAFT_KIND.get(method, "t_draft")
    if kind == "t_jacobi_vp" and kind not in times:
        kind = "t_jacobi"
    return times.get(kind, 0.0 if kind == "t_jacobi" else times["t_draft"])


def pass_cost(times: dict[str, float], kind: str, batch: int, passes: float, row_passes: float) -> float:
    """Time of `passes` target passes that served `row_passes` rows in all (a pass runs over the
    verifying rows only). A pass over r rows costs a + b r, fitted to the timings over the whole
    batch and over half of it; without the half timing (batch 1), every pass costs a full one."""
    full, part = times[kind], times.get(f"{kind}_part")
    if part is None or batch < 2:
        return passes * full
    slope = (full - part) / (batch - batch // 2)
    return passes * (full - slope * batch) + row_passes * slope


def _per_image(row: dict) -> dict:
    """Another size: only the compression and skip ratio carry over, not the world's batch counts."""
    return {k: v for k, v in row.items() if k not in ("batch_passes", "batch_steps")}


def run_cost_model(cfg: DictConfig) -> None:
    """Time the components (or read them from cfg.times_from), predict, write cost_model_<size>.md/json."""
    torch.set_grad_enabled(False)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = pick_device(cfg.device)
    target, drafter = build(cfg, device, DTYPES[cfg.dtype])
    if cfg.times_from:  # reuse timings written by an earlier run (e.g. on a GPU machine)
        saved_times = json.loads(Path(cfg.times_from).read_text())
        times, name, scope = saved_times["times"], saved_times["device"], saved_times.get("compile")
    else:
        ar = ar_throughput(cfg, target, device)  # eager, the plain loop beside it
        scope = compile_models(cfg.compile, target.gpt, drafter)
        if scope:  # from here on compiled: AR again, then the components
            ar["ar_tokens_per_s_engine_compiled"] = ar_throughput(cfg, target, device, plain_loop=False)[
                "ar_tokens_per_s_engine"]
        times = {**component_times(cfg, target, drafter, device), **ar}
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    lines = [f"# Cost model: {cfg.size} (dim {target.hidden_size}, {target.config.n_layer} layers, vocab "
             f"{target.vocab_size}, {target.num_image_tokens} tokens), {name}, {cfg.dtype}, batch {cfg.batch}", "",
             "| component | ms |", "|---|---|"]
    lines += [f"| {k} | {v * 1e3:.2f} |" for k, v in times.items() if k.startswith("t_")]
    lines += [f"| tree nodes | {times['tree_nodes']:.0f} |", ""]
    if "ar_tokens_per_s_engine" in times:
        compiled = times.get("ar_tokens_per_s_engine_compiled")
        lines += [f"AR baseline, greedy, {min(cfg.ar_tokens, target.num_image_tokens)} tokens x {cfg.batch} images "
                  f"(prefill included): a plain eager loop {times['ar_tokens_per_s_plain_loop']:.0f} tokens/s, the "
                  f"engine's `generate_ar` {times['ar_tokens_per_s_engine']:.0f} tokens/s eager"
                  + (f", {compiled:.0f} tokens/s with compiled layers" if compiled else "") + ".", ""]
    if scope:
        lines += [f"Component times are with compiled layers (compile={scope}).", ""]
    if cfg.results:
        saved = json.loads(Path(cfg.results).read_text())
        # a speed-up measured at another size, or on another kind of device, is no check of this prediction
        same_device = saved["meta"]["device"].split(" (")[0] == name.split(" (")[0]
        same = cfg.size == "world" and same_device
        other = "size" if cfg.size != "world" else "device"
        lines += ["| run | seed | step compression | skip ratio | predicted speed-up | measured (benchmark) | "
                  "measured / predicted | FID | alignment |", "|---|---|---|---|---|---|---|---|---|"]
        for row in saved["rows"]:
            pred = predict(times, row if cfg.size == "world" else _per_image(row), target.num_image_tokens,
                           batch=saved["meta"]["batch_size"])
            measured = f"{row['speedup_vs_ar']:.3f}" if same else f"n/a (other {other})"
            ratio = f"{row['speedup_vs_ar'] / pred:.2f}" if same else ""
            lines.append(f"| {row['label']} | {row['seed']} | {row['step_compression']:.2f} | {row['skip_ratio']:.3f} | "
                         f"{pred:.3f} | {measured} | {ratio} | {row['fid']:.1f} | {row['alignment']:.3f} |")
        lines += ["", "FID and alignment are the benchmark's, of the world's images (the quality each speed-up "
                      "comes with; at another size they are the world's, not that model's).",
                  f"Acceptance statistics from {cfg.results} ({saved['meta']['num_prompts']} world prompts, "
                      f"batch {saved['meta']['batch_size']}, {saved['meta']['device']}). The model counts target "
                      "passes, " + ("acceptances, drafting rounds (the drafter's, or SJD's Jacobi update) "
                                   if "t_accept" in times else "drafter rounds ") +
                      "and scheduler decisions only (the engine's per-row bookkeeping is left out" + ("" if "t_accept" in times else "; these timings predate the acceptance "
                                    "timings, so acceptance is left out too") + "); at the world's size it uses the benchmark's batch passes and steps (a pass over r "
                      "of the batch's rows costs a + b r, fitted to t_verify and t_verify_part), at another size the "
                      "per-image step compression and skip ratio."]
    text = "\n".join(lines) + "\n"
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"cost_model_{cfg.size}.md").write_text(text)
    (out / f"cost_model_{cfg.size}.json").write_text(json.dumps({"times": times, "device": name, "compile": scope}, indent=2) + "\n")
    print(text)

