"""Wall-clock cost model: time each component at a given model size, combine with acceptance
statistics measured on the embedded world, and predict each method's speed-up over AR.

Components (median of `repeats` timings, on this process's device and dtype, at `batch` images,
x2 rows under CFG):
  t_ar      one AR decode step (1 token per row) at mid-image cache length
  t_verify  one target pass over a draft tree (the default EAGLE-2 tree) / a Jacobi chain
  t_draft   one drafter round: consume the last step's entries + grow the tree
  t_sched   one VVS similarity decision
Prediction per image: AR = N t_ar; a drafted method = NFE (t_draft + t_verify) + skipped steps
(t_draft + t_sched) + all steps t_sched; SJD = NFE t_verify(window + 1). NFE and skipped steps come
from a benchmark's results.json (scripts/benchmark.py), as are the measured speed-ups the model is
checked against when `size=world`.

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
from decode.engine import _sync  # noqa: E402
from decode.resolvers import register_resolvers  # noqa: E402
from decode.skipping import path_similarity  # noqa: E402
from decode.target import Condition, LlamaGenTarget, build_gpt  # noqa: E402
from decode.trees import StepOutcome, TreeParams  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
def component_times(cfg: DictConfig, target: LlamaGenTarget, drafter: Drafter, device) -> dict[str, float]:
    b, n = cfg.batch, target.num_image_tokens
    p, c = target.prefix_len, target.config.caption_dim
    cond = Condition(torch.randn(b, p, c, device=device) * 0.1, torch.ones(b, p, dtype=torch.bool, device=device))
    tree_params = TreeParams(**cfg.tree)
    cache, out = target.start(cond, n, extra_slots=256, all_positions=True)
    half = torch.randint(target.vocab_size, (b, n // 2), device=device)
    target.extend(cache, half)
    target.commit(cache, n // 2)  # mid-image: the cache holds the prefix and half the tokens
    root = torch.randint(target.vocab_size, (b,), device=device)
    drafting = EagleDrafting(drafter, target, tree_params, b, n)
    drafting.begin(out, cache.valid[:, :p], root)
    tree = drafting.propose(root, None, None)  # consumes the prefix entries once

    def draft_round():
        g = target.groups
        feats = torch.randn(g, b, 3, target.hidden_size, device=device, dtype=out.hidden.dtype)
        following = torch.randint(target.vocab_size, (b, 3), device=device)
        drafting.observe(StepOutcome(feats, following, torch.full((b,), 3, device=device), tree), None, None)
        return drafting.propose(root, None, None)

    chain = torch.randint(target.vocab_size, (b, cfg.sjd_window + 1), device=device)
    latents = torch.randn(target.vocab_size, 8)
    return {
        "t_ar": timed(lambda: target.extend(cache, root[:, None]), cfg.repeats, device),
        "t_verify": timed(lambda: target.extend(cache, tree.tokens, block_mask=tree.mask, depths=tree.depths),
                          cfg.repeats, device),
        "t_verify_chain": timed(lambda: target.extend(cache, chain), cfg.repeats, device),
        "t_draft": timed(draft_round, min(cfg.repeats, 20), device),
        "t_sched": timed(lambda: path_similarity(tree, latents), cfg.repeats, device),
        "tree_nodes": float(tree.tokens.shape[1]),
    }


def predict(times: dict[str, float], row: dict, n: int) -> float:
    """Predicted speed-up over AR for one benchmark row (per image, same batch)."""
    ar = n * times["t_ar"]
    nfe = row["nfe"]
    steps = nfe / max(1e-9, 1 - row["skip_ratio"])
    if row["method"] == "ar":
        return 1.0
    if row["method"] in ("sjd", "sjd_vp"):
        return ar / (nfe * times["t_verify_chain"])
    sched = steps * times["t_sched"] if row["method"] in ("vvs",) else 0.0
    return ar / (nfe * times["t_verify"] + steps * times["t_draft"] + sched)


@hydra.main(version_base="1.3", config_path=str(REPO / "conf"), config_name="cost_model")
def main(cfg: DictConfig) -> None:
    torch.set_grad_enabled(False)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    target, drafter = build(cfg, device, DTYPES[cfg.dtype])
    times = component_times(cfg, target, drafter, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    lines = [f"# Cost model: {cfg.size} (dim {target.hidden_size}, {target.config.n_layer} layers, vocab "
             f"{target.vocab_size}, {target.num_image_tokens} tokens), {name}, {cfg.dtype}, batch {cfg.batch}", "",
             "| component | ms |", "|---|---|"]
    lines += [f"| {k} | {v * 1e3:.2f} |" for k, v in times.items() if k.startswith("t_")]
    lines += [f"| tree nodes | {times['tree_nodes']:.0f} |", ""]
    if cfg.results:
        saved = json.loads(Path(cfg.results).read_text())
        lines += ["| run | seed | NFE | skip ratio | predicted speed-up | measured (benchmark) |", "|---|---|---|---|---|---|"]
        for row in saved["rows"]:
            pred = predict(times, row, target.num_image_tokens)
            measured = f"{row['speedup_vs_ar']:.3f}" if cfg.size == "world" else "n/a (other size)"
            lines.append(f"| {row['label']} | {row['seed']} | {row['nfe']:.1f} | {row['skip_ratio']:.3f} | "
                         f"{pred:.3f} | {measured} |")
        lines += ["", f"Acceptance statistics from {cfg.results} ({saved['meta']['num_prompts']} world prompts, "
                      f"batch {saved['meta']['batch_size']}, {saved['meta']['device']})."]
    text = "\n".join(lines) + "\n"
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"cost_model_{cfg.size}.md").write_text(text)
    (out / f"cost_model_{cfg.size}.json").write_text(json.dumps({"times": times, "device": name}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    register_resolvers()
    main()
