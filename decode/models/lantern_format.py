"""EAGLE drafters in LANTERN's published format: the key table, reading, checking and writing
LANTERN drafter folders, and conversion to and from this project's drafter folders.

LANTERN's LlamaGen drafters (jadohu/LANTERN `models/drafters/cnets_llamagen.py::Model`, loaded by
`EaModel.from_pretrained`) are Hugging Face-style folders: `config.json` (a LlamaConfig plus
`input_type`, optionally `bias`) and `pytorch_model.bin` or `model.safetensors` with the drafter's
own frozen `embed_tokens.weight`, `fc`, and Llama-named decoder layers. Ours (decode/models/drafter.py) is
`config.json` (kind `eagle_drafter`) + `model.safetensors`, reads the target's `tok_embeddings`, and
names its layers like the LlamaGen target.

`import_lantern` / `export_lantern` convert a folder for a given target (export copies the
embedding from the target's `tok_embeddings`), checking keys, shapes, geometry and the embedding,
and verify the written folder by a round trip. `load_gpt` builds the target from a project folder or
an official LlamaGen file, with the geometry `lantern_target_geometry` / `drafter_target_geometry`
read from the drafter folder. scripts/convert_drafter.py is the command line.

What the formats cannot say of each other (docs/algorithms.md 6; see `PREFIX_NOTE`):
- LANTERN feeds the embedding of token id 0 at the P-1 prefix slots; this project's drafters are
  trained with a zero embedding there unless `DrafterConfig.prefix_token` is 0. Import sets it to 0.
  Exporting a drafter trained with zeros warns (`zero_token0_embedding` zeroes row 0 of the exported
  embedding: exact at the prefix, wrong wherever code 0 is an input).
- LANTERN's drafter may carry an embedding other than the target's `tok_embeddings`. Import refuses
  that, naming which target matrix it matches, unless `allow_embedding_mismatch`.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from decode.models.checkpoint import DTYPES
from decode.models.checkpoint import (
    CheckpointError,
    load_state_dict_strict,
    read_model_meta,
    read_state_dict,
    state_problems,
)
from decode.models.drafter import KIND, Drafter, DrafterConfig, check_fits, load_drafter, save_drafter
from decode.models.target import LlamaGenGPT, build_gpt

# --- the key table ---------------------------------------------------------------------------------
# (ours, LANTERN's). "{i}" is the layer index. wqkv is LANTERN's q_proj ; k_proj ; v_proj stacked by
# rows (both split heads the same way and rotate interleaved pairs, so no permutation).
TOP_KEYS: list[tuple[str, str]] = [
    ("fc.weight", "fc.weight"),            # [D, 2D], input [E(token) ; feature] in both
    ("fc.bias", "fc.bias"),                # only with config `bias` (default true)
]
LAYER_KEYS: list[tuple[str, str | tuple[str, ...]]] = [
    ("layers.{i}.attention.wqkv.weight", ("layers.{i}.self_attn.q_proj.weight",
                                          "layers.{i}.self_attn.k_proj.weight",
                                          "layers.{i}.self_attn.v_proj.weight")),
    ("layers.{i}.attention.wo.weight", "layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.feed_forward.w1.weight", "layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.feed_forward.w3.weight", "layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.feed_forward.w2.weight", "layers.{i}.mlp.down_proj.weight"),
    ("layers.{i}.ffn_norm.weight", "layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.attention_norm.weight", "layers.{i}.input_layernorm.weight"),  # layers i >= 1 only
]
EMBED_KEY = "embed_tokens.weight"  # LANTERN only: [V, D], frozen; ours reads the target's instead

# LANTERN's `Model.__init__` fixes the geometry from `input_type`: (image tokens, drafter prefix rows).
INPUT_TYPES = {"t2i": (256, 119), "t2i2": (1024, 119), "c2i": (576, 0)}
LANTERN_ROPE_BASE = 10000.0
LANTERN_EPS_DEFAULT = 1e-6  # EConfig's default when config.json has no rms_norm_eps
PREFIX_NOTE = ("LANTERN feeds the embedding of token id 0 at the drafter's prefix slots; this drafter was "
               "trained with a zero embedding there (prefix_token null): under LANTERN's code the prefix values "
               "differ by a constant and every drafted feature moves with its attention mass on the prefix "
               "(--zero-token0-embedding makes the prefix exact, at the cost of code 0)")


def _layer_pairs(cfg: DrafterConfig):
    for i in range(cfg.n_layer):
        for ours, theirs in LAYER_KEYS:
            if i == 0 and ours.endswith("attention_norm.weight"):
                continue  # EAGLE: no input norm on layer 0 (Identity here, absent there)
            names = (theirs,) if isinstance(theirs, str) else theirs
            yield ours.format(i=i), tuple(n.format(i=i) for n in names)


def key_pairs(cfg: DrafterConfig) -> list[tuple[str, tuple[str, ...]]]:
    """Every (our key, LANTERN keys) of a drafter with this config."""
    top = [(o, (t,)) for o, t in TOP_KEYS if cfg.bias or o != "fc.bias"]
    return top + list(_layer_pairs(cfg))


def lantern_shapes(cfg: DrafterConfig) -> dict[str, tuple[int, ...]]:
    """LANTERN's state-dict keys and shapes for a drafter with this config (embedding included): the key
    table applied to a drafter of this config, built without memory."""
    with torch.device("meta"):
        ours = Drafter(cfg).state_dict()
    return {EMBED_KEY: (cfg.vocab_size, cfg.dim), **{k: tuple(v.shape) for k, v in to_lantern(ours, cfg).items()}}


def check_keys(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], source: str) -> None:
    """Refuse a state dict with missing or unexpected keys or wrong shapes, naming each."""
    problems = state_problems(state, expected, got="file", want="expected")
    if problems:
        raise CheckpointError(f"{source} is not a LANTERN drafter of this shape:\n  " + "\n  ".join(problems))


def to_lantern(state: dict[str, Tensor], cfg: DrafterConfig) -> dict[str, Tensor]:
    """Our drafter's state dict in LANTERN's key names (without the embedding)."""
    lc = cfg.layer_config()
    splits = [cfg.n_head * lc.head_dim, lc.kv_heads * lc.head_dim, lc.kv_heads * lc.head_dim]
    out = {}
    for ours, theirs in key_pairs(cfg):
        parts = state[ours].split(splits, dim=0) if len(theirs) == 3 else (state[ours],)
        out.update({k: p.detach().clone().contiguous() for k, p in zip(theirs, parts)})
    return out


def from_lantern(state: dict[str, Tensor], cfg: DrafterConfig) -> dict[str, Tensor]:
    """LANTERN's state dict (shapes already checked) in our key names; the embedding is left out."""
    return {ours: torch.cat([state[k] for k in theirs], dim=0) if len(theirs) > 1
            else state[theirs[0]].clone() for ours, theirs in key_pairs(cfg)}


# --- LANTERN folders -------------------------------------------------------------------------------
def read_lantern_config(folder: str | Path) -> dict:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a LANTERN drafter folder)")
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{folder / 'config.json'}: not valid JSON ({err})") from err
    if "kind" in config and "config" in config:
        raise CheckpointError(f"{folder} is a folder of this project (kind {config['kind']!r}); use `export`")
    return config


def read_lantern_folder(folder: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """(config.json, state dict) of a LANTERN drafter folder: pytorch_model.bin first, as
    `EaModel.from_pretrained` does, then model.safetensors. Tensors only (weights_only=True)."""
    folder = Path(folder)
    config = read_lantern_config(folder)
    bin_path, st_path = folder / "pytorch_model.bin", folder / "model.safetensors"
    if bin_path.is_file():
        try:
            obj = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickled objects besides tensors, truncated file, ...
            raise CheckpointError(f"{bin_path}: not a plain tensor state dict "
                                  f"({type(err).__name__}: {err})") from err
    elif st_path.is_file():
        obj = read_state_dict(st_path)  # a truncated file: a one-line CheckpointError
    else:
        raise FileNotFoundError(f"{folder}: neither pytorch_model.bin nor model.safetensors")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{folder}: the weights file holds a {type(obj).__name__}, not a state dict")
    return config, {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def lantern_geometry(config: dict, source: str) -> tuple[int, int]:
    """(image tokens, target prefix slots P) as LANTERN's `Model` sets them from `input_type`; an
    unknown type falls back to explicit `block_size` / `cls_token_num` (drafter rows, P - 1) keys."""
    kind = config.get("input_type")
    if kind in INPUT_TYPES:
        block, rows = INPUT_TYPES[kind]
    elif "block_size" in config and "cls_token_num" in config:
        block, rows = int(config["block_size"]), int(config["cls_token_num"])
    else:
        raise CheckpointError(f"{source}: input_type {kind!r} is none of {sorted(INPUT_TYPES)} and "
                              "config.json has no block_size / cls_token_num")
    return block, rows + 1


def config_from_lantern(config: dict, gpt: LlamaGenGPT, source: str) -> DrafterConfig:
    """Our DrafterConfig for a LANTERN config.json and the target it is imported for."""
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if key not in config:
            raise CheckpointError(f"{source}: config.json has no {key!r}")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {config['hidden_act']!r}; the drafter layer uses silu")
    if config.get("qkv_bias"):
        raise CheckpointError(f"{source}: qkv_bias is set; this project's attention has no q/k/v bias")
    block, prefix = lantern_geometry(config, source)
    t = gpt.config
    for name, theirs, target in (("hidden_size", config["hidden_size"], t.dim),
                                 ("vocab_size", config["vocab_size"], t.vocab_size),
                                 ("image tokens (input_type)", block, t.block_size),
                                 ("prefix slots (input_type)", prefix, t.cls_token_num)):
        if theirs != target:
            raise CheckpointError(f"{source}: the drafter's {name} is {theirs} but the target's is {target}")
    # LANTERN's Model forces base 10000 for known input types, else reads the config's rope_base
    rope_base = LANTERN_ROPE_BASE if config.get("input_type") in INPUT_TYPES else float(
        config.get("rope_base", LANTERN_ROPE_BASE))
    if t.rope_base != rope_base:
        warnings.warn(f"the target's RoPE base is {t.rope_base}; the LANTERN drafter's is {rope_base:g}")
    heads, kv = int(config["num_attention_heads"]), config.get("num_key_value_heads")
    cfg = DrafterConfig.for_target(
        gpt, n_layer=int(config["num_hidden_layers"]), n_head=heads,
        n_kv_head=None if kv in (None, heads) else int(kv), rope_base=rope_base,
        norm_eps=float(config.get("rms_norm_eps", LANTERN_EPS_DEFAULT)), bias=bool(config.get("bias", True)),
        prefix_token=0)  # LANTERN embeds token 0 at the prefix slots
    if config.get("target_fingerprint"):  # written by `export`: check_fits then compares it
        cfg = replace(cfg, target_fingerprint=config["target_fingerprint"])
    ffn = cfg.layer_config().ffn_dim
    if ffn != config["intermediate_size"]:
        raise CheckpointError(f"{source}: intermediate_size is {config['intermediate_size']} but the "
                              f"target's MLP rule (multiple_of {t.multiple_of}, ffn_dim_multiplier "
                              f"{t.ffn_dim_multiplier}) gives {ffn}")
    return cfg


def lantern_config(cfg: DrafterConfig, dtype: torch.dtype, caption_dim: int | None) -> dict:
    """LANTERN's config.json for our drafter (EConfig fields + `input_type` + `bias`). Explicit
    block_size / cls_token_num / rope_base keys let LANTERN's `Model` run a geometry that has no
    input_type."""
    lc = cfg.layer_config()
    rows = cfg.cls_token_num - 1
    kind = next((k for k, geo in INPUT_TYPES.items() if geo == (cfg.block_size, rows)), "custom")
    if cfg.rope_base != LANTERN_ROPE_BASE:
        kind = "custom"  # LANTERN's Model then takes rope_base (and the geometry) from these keys
    out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "hidden_size": cfg.dim, "intermediate_size": lc.ffn_dim, "num_attention_heads": cfg.n_head,
           "num_key_value_heads": lc.kv_heads, "num_hidden_layers": cfg.n_layer, "rms_norm_eps": cfg.norm_eps,
           "vocab_size": cfg.vocab_size, "max_position_embeddings": 2048, "initializer_range": 0.02,
           "pretraining_tp": 1, "rope_scaling": None, "tie_word_embeddings": False, "use_cache": True,
           "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": str(dtype).removeprefix("torch."),
           "input_type": kind, "bias": cfg.bias, "block_size": cfg.block_size, "cls_token_num": rows,
           "rope_base": cfg.rope_base, "target_fingerprint": cfg.target_fingerprint}
    if caption_dim is not None:
        out["caption_dim"] = caption_dim
    return out


def compare_embedding(emb: Tensor, gpt: LlamaGenGPT) -> dict[str, float]:
    """Max |difference| / max |target value| of the drafter's embedding against the target's
    token embedding and LM head (the matrix LANTERN's training code may have copied instead)."""
    e = emb.detach().float().cpu()
    out = {}
    for name, w in (("tok_embeddings", gpt.tok_embeddings.weight), ("output", gpt.output.weight)):
        w = w.detach().float().cpu()
        same = w.shape == e.shape
        out[name] = float((e - w).abs().max() / w.abs().max().clamp_min(1e-12)) if same else float("inf")
    return out


# --- import / export -------------------------------------------------------------------------------
def import_lantern(folder: str | Path, gpt: LlamaGenGPT, out: str | Path, embed_rtol: float = 1e-2,
                   allow_embedding_mismatch: bool = False) -> Path:
    """Write a LANTERN drafter folder as a project drafter folder for `gpt`; returns `out`."""
    src = str(folder)
    config, state = read_lantern_folder(folder)
    cfg = config_from_lantern(config, gpt, src)
    check_fits(cfg, gpt, src)
    check_keys(state, lantern_shapes(cfg), src)
    errs = compare_embedding(state[EMBED_KEY], gpt)
    if errs["tok_embeddings"] > embed_rtol:
        head = errs["output"] <= embed_rtol
        other = " it matches the target's LM head (output.weight) instead;" if head else ""
        msg = (f"{src}: the drafter's embed_tokens differs from the target's tok_embeddings (max relative "
               f"difference {errs['tok_embeddings']:.3g} > {embed_rtol:g});{other} this project's drafter "
               "reads the target's tok_embeddings, so every drafter input would change")
        if not allow_embedding_mismatch:
            raise CheckpointError(msg + " (--allow-embedding-mismatch imports it anyway)")
        warnings.warn(msg)
    drafter = Drafter(cfg)
    load_state_dict_strict(drafter, from_lantern(state, cfg), source=src)
    extra = {"imported_from": {"format": "lantern", "path": str(Path(folder).resolve()),
                               "input_type": config.get("input_type"), "embedding_relative_difference": errs,
                               "prefix_slots": "embed(token 0), as LANTERN (prefix_token 0)"}}
    save_drafter(out, drafter, extra=extra)
    # round trip: the written folder loads for this target and maps back to exactly the tensors read
    saved = load_drafter(out, gpt).state_dict()
    for k, v in to_lantern(saved, cfg).items():
        if not torch.equal(v, state[k].to(v.dtype)):
            raise CheckpointError(f"round trip failed for {k}")
    return Path(out)


def numerics(cfg: DrafterConfig) -> tuple:
    """The DrafterConfig fields that decide a drafter's outputs (not its bookkeeping)."""
    lc = cfg.layer_config()
    return (cfg.dim, cfg.n_head, lc.kv_heads, lc.ffn_dim, cfg.n_layer, cfg.vocab_size, cfg.block_size,
            cfg.cls_token_num, cfg.rope_base, cfg.norm_eps, cfg.bias)  # prefix_token: LANTERN's is always 0


def export_lantern(folder: str | Path, gpt: LlamaGenGPT, out: str | Path, fmt: str = "safetensors",
                   dtype: str | None = None, zero_token0_embedding: bool = False) -> Path:
    """Write a project drafter folder as a LANTERN drafter folder (embedding copied from `gpt`)."""
    drafter = load_drafter(folder, gpt)  # refuses a malformed folder, or one for another target, first
    cfg, ours = drafter.config, drafter.state_dict()
    tdtype = DTYPES[dtype] if dtype else ours["fc.weight"].dtype
    emb = gpt.tok_embeddings.weight.detach().cpu().clone()
    if zero_token0_embedding:
        emb[0] = 0  # LANTERN's prefix slots then see the zero embedding this drafter was trained with
    elif cfg.prefix_token is None:
        warnings.warn(PREFIX_NOTE)
    elif cfg.prefix_token != 0:
        warnings.warn(f"this drafter embeds token {cfg.prefix_token} at its prefix slots, LANTERN's code token 0: "
                      "under LANTERN's code its drafted features change (--zero-token0-embedding does not help)")
    lantern = {EMBED_KEY: emb, **to_lantern(ours, cfg)}
    lantern = {k: v.to(tdtype).contiguous() for k, v in lantern.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("pytorch_model.bin", "model.safetensors"):  # LANTERN reads the .bin first
        (out / stale).unlink(missing_ok=True)
    if fmt == "bin":
        torch.save(lantern, out / "pytorch_model.bin")
    elif fmt == "safetensors":
        save_file(lantern, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        raise ValueError(f"format must be 'safetensors' or 'bin', got {fmt!r}")
    caption = gpt.config.caption_dim if gpt.config.model_type == "t2i" else None
    written = lantern_config(cfg, tdtype, caption)
    (out / "config.json").write_text(json.dumps(written, indent=2) + "\n")
    # round trip: the written folder reads back, under the table, to our tensors
    config, back = read_lantern_folder(out)
    check_keys(back, lantern_shapes(cfg), str(out))
    if numerics(config_from_lantern(config, gpt, str(out))) != numerics(cfg):
        raise CheckpointError("round trip failed: the written config.json gives another DrafterConfig")
    for k, v in from_lantern(back, cfg).items():
        if not torch.equal(v, ours[k].to(tdtype)):
            raise CheckpointError(f"round trip failed for {k}")
    if written["input_type"] == "custom":
        warnings.warn(f"no LANTERN input_type has {cfg.block_size} image tokens, {cfg.cls_token_num} prefix "
                      f"slots and RoPE base {cfg.rope_base:g}: written as 'custom' with explicit "
                      "block_size / cls_token_num / rope_base keys (LANTERN's Model reads them; its "
                      "generate code assumes 120 prefix slots)")
    return out


# --- the target ------------------------------------------------------------------------------------
def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_gpt(target: str, size: str, geometry: dict, overrides: list[str]) -> LlamaGenGPT:
    """A project target folder, or an official file (`size`, the drafter's geometry, --set overrides)."""
    if Path(target).is_dir():
        return build_gpt(target)
    bad = [kv for kv in overrides if "=" not in kv]
    if bad:
        raise ValueError(f"--set {bad[0]!r}: expected KEY=VALUE, e.g. --set caption_dim=2048")
    sets = dict(kv.split("=", 1) for kv in overrides)
    return build_gpt(target, size=size, **{**geometry, **{k: _value(v) for k, v in sets.items()}})


def official_geometry(block: int, prefix: int, vocab: int) -> dict:
    """The official target's geometry for a drafter of `block` image tokens and `prefix` slots."""
    return {"model_type": "c2i" if prefix == 1 else "t2i", "block_size": block,  # c2i: one class slot
            "cls_token_num": prefix, "vocab_size": vocab}


def lantern_target_geometry(folder: str | Path) -> dict:
    """`load_gpt`'s geometry for the target of a LANTERN drafter folder (from its config.json)."""
    config = read_lantern_config(folder)
    block, prefix = lantern_geometry(config, str(folder))
    geo = official_geometry(block, prefix, config.get("vocab_size", 16384))
    if "caption_dim" in config:
        geo["caption_dim"] = config["caption_dim"]
    return geo


def drafter_target_geometry(folder: str | Path) -> dict:
    """`load_gpt`'s geometry for the target of a project drafter folder (from its config.json)."""
    c = read_model_meta(folder, kind=KIND)["config"]
    return official_geometry(c["block_size"], c["cls_token_num"], c["vocab_size"])
