"""Every decode config composes; the random-weight ones also instantiate and fit together."""
import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from decode.pipeline import check_compatible
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
    assert cfg.target._target_ and cfg.tokenizer._target_ and cfg.text_encoder._target_


def test_default_decode_config_instantiates_compatible_parts():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("decode", overrides=["prompt=x", "target.block_size=16"])
    target, vq, text = instantiate(cfg.target), instantiate(cfg.tokenizer), instantiate(cfg.text_encoder)
    check_compatible(target, vq, text)


def test_mismatched_parts_are_named():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("decode", overrides=["prompt=x", "target.block_size=16", "target.vocab_size=512"])
    with pytest.raises(ValueError, match=r"codebook \(1024\) != target vocab_size \(512\)"):
        check_compatible(instantiate(cfg.target), instantiate(cfg.tokenizer), None)
