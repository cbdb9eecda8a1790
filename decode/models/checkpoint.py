"""Reading official checkpoints and writing/reading the project's own model folders.

Official LlamaGen files are torch pickles whose state dict sits under `["model"]` (DDP),
`["module"]` (DeepSpeed), `["state_dict"]`, or at the top (FSDP export). The project's own models
are folders: `config.json` (the architecture plus a `kind` tag) and `model.safetensors`.
Loading is strict: a missing or unexpected key, or a shape mismatch, is an error that names it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CONTAINER_KEYS = ("model", "module", "state_dict")
# Model folders split their weights into shards of at most this size (Hugging Face's sharded
# layout: model-00001-of-00002.safetensors + model.safetensors.index.json), so no file in the
# repository exceeds the size limit of ordinary git hosting.
SHARD_BYTES = 10 * 2**20
INDEX = "model.safetensors.index.json"
# Buffers some official checkpoints carry that are recomputed here (RoPE table, KV caches, masks).
IGNORED_SUFFIXES = ("freqs_cis", "causal_mask", "kv_cache.k_cache", "kv_cache.v_cache")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # dtype= names


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model it is loaded into."""


class FolderConfig:
    """`to_dict` / `from_dict` for the dataclass configs a model folder's config.json holds. Keys the
    dataclass does not have are ignored (LlamaGen's `ModelArgs` carry dropouts and the like)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        if "weights_only" not in str(err):
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({err})") from err
        # Official training checkpoints also pickle argparse Namespaces; only open trusted files.
        warnings.warn(f"{path} holds pickled Python objects besides tensors; loading it with "
                      "weights_only=False (only do this for files you trust)")
        return torch.load(path, map_location="cpu", weights_only=False)


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict inside an official container, a bare state dict, or a .safetensors file."""
    path = Path(path)
    if path.is_dir():
        if (path / INDEX).is_file():
            return _read_shards(path)
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        obj = _torch_load(path)
    except (RuntimeError, EOFError, zipfile.BadZipFile, SafetensorError, OSError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path}: could not be read, the file is truncated or not a checkpoint "
                              f"({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    for key in CONTAINER_KEYS:
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise CheckpointError(f"{path}: no tensors found (top-level keys: {sorted(obj)[:10]})")
    return state


def state_problems(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], got: str = "checkpoint",
                   want: str = "model", limit: int | None = None) -> list[str]:
    """What keeps `state` from matching the expected keys and shapes: missing keys, unexpected keys,
    each shape mismatch (`got` and `want` name the two sides; `limit` caps each list)."""
    cut = lambda names: ", ".join(names[:limit]) + (" ..." if limit and len(names) > limit else "")  # noqa: E731
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [(k, tuple(state[k].shape), shape) for k, shape in expected.items()
             if k in state and tuple(state[k].shape) != shape]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {cut(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {cut(unexpected)}")
    problems += [f"shape mismatch for {k}: {got} {list(g)}, {want} {list(w)}" for k, g, w in wrong[:limit]]
    return problems


def load_state_dict_strict(module: nn.Module, state: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Copy `state` into `module`, failing with the offending keys and shapes named."""
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()
             if not k.endswith(IGNORED_SUFFIXES)}
    expected = module.state_dict()
    problems = state_problems(state, {k: tuple(v.shape) for k, v in expected.items()}, "checkpoint", "model", 8)
    if problems:
        raise CheckpointError(f"{source} does not fit {type(module).__name__}:\n  " + "\n  ".join(problems))
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def _read_shards(folder: Path) -> dict[str, Tensor]:
    try:
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"{folder / INDEX}: not a safetensors index ({err})") from err
    state: dict[str, Tensor] = {}
    for name in sorted(set(weight_map.values())):
        state.update(read_state_dict(folder / name))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointError(f"{folder}: the index names tensors no shard holds: {missing[:5]}")
    return state


def _shards(tensors: dict[str, Tensor], limit: int) -> list[dict[str, Tensor]]:
    """Consecutive groups of tensors of at most `limit` bytes each (a larger tensor goes alone)."""
    groups: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > limit:
            groups.append({})
            size = 0
        groups[-1][key] = t
        size += nbytes
    return groups


def save_model_folder(folder: str | os.PathLike, module: nn.Module, config: dict, kind: str,
                      extra: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write config.json + model.safetensors atomically (temporary names, then rename). `dtype`
    stores the floating-point weights in another precision (loading casts them back to the model's)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    return _write_folder(Path(folder), tensors, {"kind": kind, "config": config, **(extra or {})}, dtype)


def weights_fingerprint(items, *, legacy: bool = False) -> str:
    """sha256 (16 hex digits) of (label, tensor) pairs with the tensors rounded to float16 first, so that a
    model's float32 weights and the float16 copy a repository ships (cast_model_folder) give one value;
    `legacy`: their float32 bytes, what folders written before the rounding recorded."""
    h = hashlib.sha256()
    for label, t in items:
        t = t.detach().cpu()
        h.update(label.encode())
        h.update((t.float() if legacy else t.to(torch.float16)).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint_matches(stored: str, fingerprint) -> bool:
    """Whether a folder's recorded fingerprint is `fingerprint(legacy=False)` or, from an older folder,
    `fingerprint(legacy=True)` of the weights at hand."""
    return stored == fingerprint(legacy=False) or stored == fingerprint(legacy=True)  # the second only if needed


def cast_model_folder(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype) -> Path:
    """Copy a model folder of any kind with its floating-point weights stored as `dtype` (for example
    float16 to halve what a repository ships); the config and the other files are kept as they are."""
    src, dst = Path(src), Path(dst)
    try:
        meta = read_model_meta(src)
    except FileNotFoundError as err:
        raise CheckpointError(f"{src}: not a model folder of this project ({err})") from err
    if dst.resolve() != src.resolve():
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():  # model cards, metrics, pictures
            if f.is_file() and not f.name.startswith("model") and f.name != "config.json":
                shutil.copyfile(f, dst / f.name)
    return _write_folder(dst, read_state_dict(src), meta, dtype)


def _write_folder(folder: Path, tensors: dict[str, Tensor], meta: dict, dtype: torch.dtype | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        meta = {**meta, "weights_dtype": str(dtype).removeprefix("torch.")}
    groups = _shards(tensors, SHARD_BYTES)
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    for name, group in zip(names, groups):
        save_file(group, str(folder / f"{name}.tmp"))
        os.replace(folder / f"{name}.tmp", folder / name)
    index = folder / INDEX
    if len(groups) > 1:
        weight_map = {k: name for name, group in zip(names, groups) for k in group}
        (folder / f"{INDEX}.tmp").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")
        os.replace(folder / f"{INDEX}.tmp", index)
    else:
        index.unlink(missing_ok=True)
    for stale in folder.glob("model*.safetensors"):  # weights of an earlier save with another layout
        if stale.name not in names:
            stale.unlink()
    (folder / "config.json.tmp").write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(folder / "config.json.tmp", folder / "config.json")
    return folder


def read_model_folder(folder: str | os.PathLike, kind: str) -> tuple[dict, dict[str, Tensor]]:
    """(meta, state) of a folder written by `save_model_folder`; checks its kind."""
    return read_model_meta(folder, kind), read_state_dict(folder)


def read_model_meta(folder: str | os.PathLike, kind: str | None = None) -> dict:
    """The config.json of a folder written by `save_model_folder` (its weights not read); checks its kind
    (None: any kind)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    what = f"a {kind} model folder" if kind else "a model folder"
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist (expected {what})")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is a file; expected {what} (config.json + weights)")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (is this a model folder of this project?)")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({err})") from err
    if kind is None and "kind" not in meta:
        raise CheckpointError(f"{folder}: config.json has no kind (not a model folder of this project)")
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{folder} holds a {meta.get('kind')!r}, expected a {kind!r}")
    return meta
