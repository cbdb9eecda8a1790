"""OmegaConf resolvers the entry points share.

`${repo:models/world/target}` is a path inside this repository, wherever the command is started
from, so configs can name the shipped models without depending on the working directory.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("repo"):
        OmegaConf.register_new_resolver("repo", lambda rel: str(REPO / rel))
