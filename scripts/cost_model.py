"""Wall-clock cost model: time each component at a given model size, combine with acceptance
statistics measured on the embedded world, and predict each method's speed-up over AR.

Components (median of `repeats` timings, averaged over caches filled to 1/4, 1/2 and 3/4 of the
image, on this process's device and dtype, at `batch` images, x2 rows under CFG):
  t_ar      one AR decode step (1 token per row)
  t_verify  one target pass over a draft tree (the default EAGLE-2 tree) / a Jacobi chain
            (`_part`: the same over half of the rows, as when the other rows skip or have finished)
  t_draft   one drafter round: consume the last step's entries + grow the tree
  t_sched   one VVS similarity decision
Prediction per image of N tokens: AR = N t_ar; a drafted method = NFE t_verify + steps t_draft
(+ steps t_sched for vvs), with NFE = N / step compression and steps = NFE / (1 - skip ratio);
SJD = NFE t_verify(window + 1). Step compression and skip ratio come from a benchmark's
results.json (scripts/benchmark.py), as are the measured speed-ups the model is checked against
when `size=world`.

python scripts/cost_model.py size=world results=outputs/benchmark/world_cpu/results.json batch=8 threads=1
python scripts/cost_model.py size=XL results=outputs/benchmark/world_cpu/results.json batch=1
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from decode.drafter import Drafter, DrafterConfig, load_drafter  # noqa: E402
from decode.drafting import EagleDrafting  # noqa: E402
from decode.engine import _sync, generate_ar  # noqa: E402
from decode.pipeline import DTYPES, compile_models, pick_device  # noqa: E402
from decode.resolvers import register_resolvers  # noqa: E402
from decode.sampling import SamplingParams  # noqa: E402
from decode.skipping import path_similarity  # noqa: E402
from decode.target import Condition, LlamaGenTarget, build_gpt  # noqa: E402
from decode.trees import StepOutcome, TreeParams  # noqa: E402


def timed(fn, repeats: int, device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
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


@torch.no_grad()
def times_at(cfg: DictConfig, target: LlamaGenTarget, drafter: Drafter, device, filled: int) -> dict[str, float]:
    """Component timings with `filled` image tokens already in the target's and the drafter's caches."""
    b, n = cfg.batch, target.num_image_tokens
    p, c, g = target.prefix_len, target.config.caption_dim, target.groups
    cond = Condition(torch.randn(b, p, c, device=device) * 0.1, torch.ones(b, p, dtype=torch.bool, device=device))
    cache, out = target.start(cond, n, extra_slots=256, all_positions=True)
    tokens = torch.randint(target.vocab_size, (b, filled), device=device)
    hidden = target.extend(cache, tokens).hidden if filled else None
    target.commit(cache, filled)
    root = torch.randint(target.vocab_size, (b,), device=device)
    drafting = EagleDrafting(drafter, target, TreeParams(**cfg.tree), b, n)
    drafting.begin(out, cache.valid[:, :p], root)
    tree = drafting.propose(root, None, None)  # consumes the prefix entries
    if filled:  # the drafter's cache also holds one entry per image token
        drafting.observe(StepOutcome(hidden[:, :, :filled], tokens, torch.full((b,), filled), tree),  # host counts
                         None, None)
        tree = drafting.propose(root, None, None)

    def draft_round():  # consume the entries of ~3 committed tokens, grow the tree
        feats = torch.randn(g, b, 3, target.hidden_size, device=device, dtype=out.hidden.dtype)
        following = torch.randint(target.vocab_size, (b, 3), device=device)
        drafting.observe(StepOutcome(feats, following, torch.full((b,), 3), tree), None, None)
        return drafting.propose(root, None, None)

    chain = torch.randint(target.vocab_size, (b, cfg.sjd_window + 1), device=device)
    latents = torch.randn(target.vocab_size, 8)
    half = torch.arange(max(1, b // 2), device=device)  # a pass over part of the batch (rows that verify)
    return {
        "t_ar": timed(lambda: target.extend(cache, root[:, None]), cfg.repeats, device),
        "t_verify": timed(lambda: target.extend(cache, tree.tokens, block_mask=tree.mask, depths=tree.depths),
                          cfg.repeats, device),
        "t_verify_chain": timed(lambda: target.extend(cache, chain), cfg.repeats, device),
        "t_verify_part": timed(lambda: target.extend(cache, tree.tokens[half], block_mask=tree.mask[half],
                                                     depths=tree.depths[half], rows=half), cfg.repeats, device),
        "t_verify_chain_part": timed(lambda: target.extend(cache, chain[half], rows=half), cfg.repeats, device),
        "t_draft": timed(draft_round, min(cfg.repeats, 10), device),
        "t_sched": timed(lambda: path_similarity(tree, latents), cfg.repeats, device),
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
    probes = [times_at(cfg, target, drafter, device, int(f * n)) for f in (0.25, 0.5, 0.75)]
    return {k: sum(pr[k] for pr in probes) / len(probes) for k in probes[0]}


def predict(times: dict[str, float], row: dict, n: int, batch: int = 1) -> float:
    """Predicted speed-up over AR for one benchmark row. With the row's batch counts (benchmarks
    record them), the batch's own passes and steps are used: a batch runs as many steps as its
    slowest row needs. Otherwise, per image: NFE = n / step compression, steps = NFE / (1 - skip)."""
    ar = n * times["t_ar"]
    if row["method"] == "ar":
        return 1.0
    kind = "t_verify_chain" if row["method"] in ("sjd", "sjd_vp") else "t_verify"
    if "batch_passes" in row:
        passes, steps = row["batch_passes"], row["batch_steps"]
        verify = pass_cost(times, kind, batch, passes, row_passes=row["nfe"] * batch)
    else:
        passes = n / row["step_compression"]  # the measured compression carried to this token count
        steps = passes / max(1e-9, 1 - row["skip_ratio"])
        verify = passes * times[kind]
    if row["method"] in ("sjd", "sjd_vp"):
        return ar / verify
    sched = steps * times["t_sched"] if row["method"] in ("vvs",) else 0.0
    return ar / (verify + steps * times["t_draft"] + sched)


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


@hydra.main(version_base="1.3", config_path=str(REPO / "conf"), config_name="cost_model")
def main(cfg: DictConfig) -> None:
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
        lines += ["| run | seed | step compression | skip ratio | predicted speed-up | measured (benchmark) | "
                  "measured / predicted |", "|---|---|---|---|---|---|---|"]
        for row in saved["rows"]:
            pred = predict(times, row if cfg.size == "world" else _per_image(row), target.num_image_tokens,
                           batch=saved["meta"]["batch_size"])
            same = cfg.size == "world"
            measured = f"{row['speedup_vs_ar']:.3f}" if same else "n/a (other size)"
            ratio = f"{row['speedup_vs_ar'] / pred:.2f}" if same else ""
            lines.append(f"| {row['label']} | {row['seed']} | {row['step_compression']:.2f} | {row['skip_ratio']:.3f} | "
                         f"{pred:.3f} | {measured} | {ratio} |")
        lines += ["", f"Acceptance statistics from {cfg.results} ({saved['meta']['num_prompts']} world prompts, "
                      f"batch {saved['meta']['batch_size']}, {saved['meta']['device']}). The model counts target "
                      "passes, drafter rounds and scheduler decisions only (the engine's per-row bookkeeping is "
                      "left out); at the world's size it uses the benchmark's batch passes and steps (a pass over r "
                      "of the batch's rows costs a + b r, fitted to t_verify and t_verify_part), at another size the "
                      "per-image step compression and skip ratio."]
    text = "\n".join(lines) + "\n"
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"cost_model_{cfg.size}.md").write_text(text)
    (out / f"cost_model_{cfg.size}.json").write_text(json.dumps({"times": times, "device": name, "compile": scope}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    register_resolvers()
    main()
