"""`python -m train TASK [hydra overrides]`: the training tasks of the project.

Each task is a module `train.<task>` with `run(cfg) -> dict[str, float]` and a root config
`conf/train_<task>.yaml`. Task-specific config groups (its `experiment=smoke`, for one) live in
`conf/train/<task>/`, which is added to Hydra's search path for that task only.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# task -> (module, what it trains, issue that brings it)
TASKS: dict[str, tuple[str, str]] = {
    "tokenizer": ("train.tokenizer_task", "the VQ tokenizer of the embedded world"),
    "target": ("train.target_task", "the LlamaGen text-to-image target of the embedded world"),
    "evaluator": ("train.evaluator_task", "the attribute classifier that scores alignment in the embedded world"),
    "features": ("train.features_task", "target features dumped to shards, for offline drafter distillation"),
    "drafter": ("train.drafter_task", "an EAGLE-style drafter distilled from a target's features"),
    "scheduler": ("train.scheduler_task", "VVS's learned skip scheduler"),
}


def available(task: str) -> bool:
    return importlib.util.find_spec(TASKS[task][0]) is not None


def usage() -> str:
    lines = ["usage: python -m train TASK [key=value ...]   (python -m train TASK --help: its options)", "",
             "tasks:"]
    for name, (_, what) in TASKS.items():
        state = "" if available(name) else "   [not in this version yet]"
        lines.append(f"  {name:<10} {what}{state}")
    lines += ["", "common options: experiment=smoke (a ~1 minute CPU run), trainer=cpu|gpu|ddp|deepspeed,",
              "logger=csv|wandb, out_dir=FOLDER, ckpt_path=last (resume the run in out_dir),",
              "overwrite=true (train over a finished run in out_dir), seed=N"]
    return "\n".join(lines)


TASK_ENV = "VVS_TRAIN_TASK"


def pop_task(argv: list[str]) -> str:
    """The task word, removed from argv (Hydra's grammar accepts only key=value after it).

    Lightning's DDP launcher starts the other ranks as `python -m train <argv[1:]>` with the argv
    Hydra saw, which no longer holds the task word: they find it in the environment instead.
    """
    if len(argv) > 1 and "=" not in argv[1]:
        task = argv.pop(1)
        os.environ[TASK_ENV] = task
        return task
    if os.environ.get(TASK_ENV) in TASKS and os.environ.get("LOCAL_RANK") not in (None, "0"):
        return os.environ[TASK_ENV]
    return argv.pop(1) if len(argv) > 1 else ""


def in_run_dir(run):
    """`run(cfg)` with an unset `out_dir` pointing at Hydra's run directory (read here, at the entry
    point, so the tasks themselves never ask Hydra)."""
    import functools

    @functools.wraps(run)
    def job(cfg):
        if "out_dir" in cfg and not cfg.out_dir:
            from hydra.core.hydra_config import HydraConfig
            from omegaconf import open_dict

            from train.common import resume_step

            run_dir = HydraConfig.get().runtime.output_dir
            if cfg.get("ckpt_path") == "last":  # a fresh run folder holds nothing to resume: say which to give
                resume_step(cfg, Path(run_dir))
            with open_dict(cfg):
                cfg.out_dir = run_dir
        return run(cfg)
    return job


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    task = pop_task(sys.argv)
    if task not in TASKS:
        sys.exit(f"unknown task {task!r}\n\n{usage()}")
    if not available(task):
        sys.exit(f"task {task!r} is not in this version of the project yet\n\n{usage()}")
    import hydra

    from decode.resolvers import register_resolvers, reporting_input_errors

    register_resolvers()
    if not any(a.startswith("hydra.searchpath=") for a in sys.argv):  # a DDP child already has it
        sys.argv.append(f"hydra.searchpath=[file://{CONF_DIR / 'train' / task}]")
    run = importlib.import_module(TASKS[task][0]).run
    from decode.distributed import group_left_at_end

    with group_left_at_end():  # DDP ranks: gloo threads can abort the exit if the group is left in place
        hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=f"train_{task}")(
            reporting_input_errors(in_run_dir(run)))()


if __name__ == "__main__":
    main()
