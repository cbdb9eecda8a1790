"""What the entry points share: OmegaConf resolvers, and how a user's mistake is reported.

`${repo:models/world/target}` is a path inside this repository, wherever the command is started
from, so configs can name the shipped models without depending on the working directory.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("repo"):
        OmegaConf.register_new_resolver("repo", lambda rel: str(REPO / rel))


def reporting_input_errors(run):
    """Wrap an entry point (`run(cfg)` under Hydra, or an argparse `main()`): the errors bad input raises (ValueError, a missing file, a
    checkpoint that is not one) end the process with their one-line message and exit status 1,
    not Hydra's traceback. HYDRA_FULL_ERROR=1 shows the traceback, as Hydra's own option does."""
    from decode.models.checkpoint import CheckpointError

    @functools.wraps(run)
    def wrapped(*args, **kwargs):
        try:
            return run(*args, **kwargs)
        except (ValueError, FileNotFoundError, NotADirectoryError, CheckpointError) as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {err}\n(HYDRA_FULL_ERROR=1 shows where it was raised)", file=sys.stderr)
            raise SystemExit(1) from None
    return wrapped
