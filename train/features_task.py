"""`python -m train features`: dump a frozen target's features to shards (offline distillation).

python -m train features target=world codes='CODES/train-{000000..000029}.tar' out=FEATURES
then: python -m train drafter data.features='FEATURES/train-{000000..000059}.tar' ...
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from data.features import dump_features
from decode.models.target import load_target
from train.common import require_ints, require_shards


def run(cfg: DictConfig) -> dict[str, float]:
    if not cfg.codes or not cfg.out:
        raise ValueError("give codes=CODE_SHARDS (a brace pattern of data/preprocess.py shards) and out=FOLDER")
    require_ints(cfg, 1, "batch_size", "shard_size")
    require_shards(cfg, "codes")  # before the target is loaded
    args = {k: v for k, v in OmegaConf.to_container(cfg.target, resolve=True).items()
            if k not in ("_target_", "cfg_scale")}
    target = load_target(**args, cfg_scale=1.0)
    if cfg.device != "cpu":
        target.gpt.to(cfg.device)
    manifest = dump_features(cfg.codes, cfg.out, target=target, max_length=target.config.cls_token_num,
                             batch_size=cfg.batch_size, shard_size=cfg.shard_size, null_prob=cfg.null_prob,
                             seed=cfg.seed, prefix=cfg.prefix, target_name=str(args.get("ckpt")),
                             strict=bool(cfg.get("strict", False)))
    print(f"features: {manifest['count']} samples in {manifest['shards']} shards "
          f"({manifest['shards_written']} written now), {manifest['bytes_per_sample'] / 1024:.1f} KiB per sample "
          f"-> {cfg.out}/{manifest['pattern']}")
    return {"count": float(manifest["count"]), "bytes_per_sample": float(manifest["bytes_per_sample"])}
