"""Every decode config composes; the random-weight ones also instantiate and fit together."""
import itertools
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from decode.api import build_components
from decode.api import check_compatible
from decode.resolvers import register_resolvers
from tests.conftest import REPO

CONF = REPO / "conf"


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("target,tokenizer,text_encoder", list(itertools.product(
    _options("target"), _options("tokenizer"), _options("text_encoder"))))
def test_decode_configs_compose(target, tokenizer, text_encoder):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("decode", overrides=[f"target={target}", f"tokenizer={tokenizer}",
                                           f"text_encoder={text_encoder}", "prompt=x"])
    assert cfg.target._target_ and (cfg.tokenizer.get("own") or cfg.tokenizer._target_) and cfg.text_encoder._target_


TARGET_USERS = sorted(p.stem for p in CONF.glob("*.yaml") if "\n  - target:" in p.read_text())
# transformers targets (Janus-Pro, Lumina-mGPT) choose their tokenizer and prompt encoder: offline feature
# dumps (train_features), which take neither group, are for LlamaGen targets only
TRANSFORMERS = [t for t in _options("target") if "hf_target" in (CONF / "target" / f"{t}.yaml").read_text()
                or "tokenizer@_global_.tokenizer: own" in (CONF / "target" / f"{t}.yaml").read_text()]
PAIRS = [(c, t) for c, t in itertools.product(TARGET_USERS, _options("target"))
         if not (t in TRANSFORMERS and c == "train_features")]


@pytest.mark.parametrize("config,target", PAIRS)
def test_every_target_composes_in_every_config_that_takes_one(config, target):
    register_resolvers()
    task = CONF / "train" / config.removeprefix("train_")
    search = [f"hydra.searchpath=[file://{task}]"] if config.startswith("train_") and task.is_dir() else []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config, overrides=[f"target={target}", *search])
    assert cfg.target._target_ and "sampling" in cfg  # a llamagen_* target's sampling override found its group


@pytest.mark.parametrize("target,top_k", [("world", 0), ("llamagen_t2i_xl_stage2", 1000), ("llamagen_c2i_xl", 2000)])
def test_llamagen_targets_sample_with_their_published_top_k(target, top_k):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("decode", overrides=[f"target={target}", "prompt=x"])
        mine = compose("decode", overrides=[f"target={target}", "prompt=x", "sampling.top_k=7"])
    assert cfg.sampling.top_k == top_k and "sampling" not in cfg.target
    assert mine.sampling.top_k == 7  # the command line still wins


def test_default_decode_config_instantiates_compatible_parts():
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("decode", overrides=["prompt=x"])
    parts = build_components(cfg, torch.device("cpu"), torch.float32)
    # the caption length follows the target when the text encoder does not set it
    assert parts.text.max_length == parts.target.config.cls_token_num


def test_mismatched_parts_are_named():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("decode", overrides=["prompt=x", "target=tiny_random_t2i", "tokenizer=tiny_random",
                                           "target.block_size=16", "target.vocab_size=512"])
    with pytest.raises(ValueError, match=r"codebook \(1024\) != target vocab_size \(512\)"):
        check_compatible(instantiate(cfg.target), instantiate(cfg.tokenizer), None)


def test_every_method_config_builds_its_method():
    """conf/method/*.yaml: one per method of decode.strategies.registry, naming it and nothing else
    (the defaults live in the registry); decode.yaml's method block lists every knob, null."""
    from omegaconf import OmegaConf

    from decode.core.sampling import SamplingParams
    from decode.models.drafter import Drafter, DrafterConfig
    from decode.models.spatial import SpatialConfig, SpatialHeads
    from decode.strategies.registry import KNOBS, METHODS, build_method, resolve_method
    from tests.conftest import tiny_gpt

    from decode.scaling.config import SCALING, split_scaling

    files = sorted((REPO / "conf" / "method").glob("*.yaml"))
    assert sorted(f.stem for f in files) == sorted([*METHODS, *SCALING])
    gpt = tiny_gpt()
    drafter = Drafter(DrafterConfig.for_target(gpt))
    for f in files:
        assert OmegaConf.to_container(OmegaConf.load(f)) == {"name": f.stem}
        plan, name, options = split_scaling({"name": f.stem})
        assert (plan is not None) == (f.stem in SCALING)
        spatial = resolve_method(name, options).needs_spatial
        method = build_method(name, sampling=SamplingParams(), options=options, codebook=torch.randn(64, 8),
                              drafter=SpatialHeads(SpatialConfig(gpt.config.dim, 64, 16, 8)) if spatial else drafter)
        assert method.name == (f.stem if plan is None else "ar")
    block = OmegaConf.to_container(OmegaConf.load(CONF / "decode.yaml"))["method"]
    knobs = {k for part in KNOBS.values() for kn in part.values() for k in kn} | {"base", *KNOBS}
    knobs |= {k for kn in SCALING.values() for k in kn}
    assert set(block) == knobs and all(v is None for v in block.values())


@pytest.mark.parametrize("name", ["benchmark", "benchmark_schedulers", "benchmark_trees", "benchmark_instrument", "benchmark_spatial",
                                  "benchmark_frontier", "cost_model"])
def test_script_configs_compose_and_resolve(name):
    """The scripts' root configs compose, and their runs name known methods, knobs and trees."""
    from omegaconf import OmegaConf

    from decode.api import tree_setting
    from decode.strategies.registry import METHODS, resolve_method

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(name)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for run in resolved.get("runs", []):
        assert run["method"] in METHODS
        opts = dict(run.get("options") or {})
        ckpt = resolve_method(run["method"], opts).knobs.get("scheduler_ckpt")
        assert ckpt is None or (REPO / "models" / "world" / "scheduler" / "config.json").is_file()
        mine = run.get("tree") or {}
        tree_setting(mine if mine.get("auto") else {**resolved["tree"], **mine})


TASKS = sorted(p.stem.removeprefix("train_") for p in CONF.glob("train_*.yaml"))


def _train_choices():
    """(task, override): every experiment of every training task, and every trainer and logger
    option with each task that trains (`features` dumps target features: its defaults alone)."""
    out = []
    for task in TASKS:
        out.append((task, None))
        out += [(task, f"experiment={p.stem}") for p in sorted((CONF / "train" / task / "experiment").glob("*.yaml"))]
        if (CONF / "train" / task / "experiment" / "smoke.yaml").is_file():
            out += [(task, f"trainer={t}") for t in _options("trainer")]
            out += [(task, f"logger={g}") for g in _options("logger")]
    return out


@pytest.mark.parametrize("task,override", _train_choices())
def test_training_configs_compose_and_resolve(task, override):
    register_resolvers()
    groups = CONF / "train" / task  # the task's own groups, as `python -m train` adds them
    search = [f"hydra.searchpath=[file://{groups}]"] if groups.is_dir() else []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(f"train_{task}", overrides=search + ([override] if override else []))
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if "trainer" not in cfg:  # `features` trains nothing
        assert resolved["codes"] is None or isinstance(resolved["codes"], str)
        return
    assert resolved["trainer"]["max_steps"] > 0
    assert (CONF / "train" / task / "experiment" / "smoke.yaml").is_file(), f"{task} has no experiment=smoke"
