"""Bad input to `python -m train TASK` stops before any model is built, with an error that names
the option; a finished run is never trained over by accident. In-process: milliseconds per case."""
import importlib

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from decode.resolvers import register_resolvers
from train.__main__ import CONF_DIR, TASKS
from train.common import output_dir, resume_step

MODEL_TASKS = ["drafter", "target", "tokenizer", "evaluator", "scheduler"]


def run_task(task: str, *overrides: str):
    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(f"train_{task}", overrides=list(overrides))
    return importlib.import_module(TASKS[task][0]).run(cfg)


def finished_run(out, task):
    (out / task).mkdir(parents=True)
    (out / task / "model.safetensors").write_bytes(b"old model")
    (out / "checkpoints").mkdir()
    torch.save({"global_step": 5}, out / "checkpoints" / "last.ckpt")  # readable: a resume checks it
    return (out / "checkpoints" / "last.ckpt").read_bytes()


@pytest.mark.parametrize("task", MODEL_TASKS)
def test_a_finished_run_is_not_trained_over(tmp_path, task):
    old_run = finished_run(tmp_path, task)
    with pytest.raises(ValueError, match=r"out_dir=.* already holds a run .*ckpt_path=last.*overwrite=true"):
        run_task(task, f"out_dir={tmp_path}")
    assert (tmp_path / task / "model.safetensors").read_bytes() == b"old model"
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == old_run


def test_an_interrupted_run_is_refused_too_and_a_fresh_folder_is_not(tmp_path):
    cfg = OmegaConf.create({"out_dir": str(tmp_path / "run"), "ckpt_path": None, "overwrite": False})
    assert output_dir(cfg, "drafter").is_dir()  # new, or empty: fine
    (tmp_path / "run" / "checkpoints").mkdir()
    assert output_dir(cfg, "drafter") == tmp_path / "run"  # an empty checkpoints folder holds nothing
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"step 5")
    with pytest.raises(ValueError, match="already holds a run"):
        output_dir(cfg, "drafter")


def test_resume_is_allowed_and_overwrite_deletes_the_old_checkpoints(tmp_path):
    finished_run(tmp_path, "drafter")
    cfg = OmegaConf.create({"out_dir": str(tmp_path), "ckpt_path": "last", "overwrite": False})
    output_dir(cfg, "drafter")
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()  # a resume keeps everything
    output_dir(OmegaConf.merge(cfg, {"ckpt_path": None, "overwrite": True}), "drafter")
    assert not (tmp_path / "checkpoints").exists()  # a later ckpt_path=last cannot resume the old run
    assert (tmp_path / "drafter" / "model.safetensors").is_file()  # replaced only when the new run ends


@pytest.mark.parametrize("task", ["drafter", "target"])
def test_max_steps_must_be_positive_where_the_lr_schedule_needs_it(tmp_path, task):
    with pytest.raises(ValueError, match=r"trainer.max_steps must be a whole number >= 1, got -1"):
        run_task(task, "trainer.max_steps=-1", f"out_dir={tmp_path / 'run'}")
    assert not (tmp_path / "run").exists()  # stopped before anything was made


@pytest.mark.parametrize("task", [*MODEL_TASKS, "features"])
def test_batch_size_must_be_positive(tmp_path, task):
    key = "batch_size" if task == "features" else "data.batch_size"
    extra = ["codes=c.tar", f"out={tmp_path}"] if task == "features" else [f"out_dir={tmp_path / 'run'}"]
    with pytest.raises(ValueError, match=rf"{key} must be a whole number >= 1, got 0"):
        run_task(task, f"{key}=0", *extra)


@pytest.mark.parametrize("task", ["drafter", "target"])
def test_missing_code_shards_are_named_before_the_model_is_built(tmp_path, task):
    (tmp_path / "train-000000.tar").write_bytes(b"")
    train = f"data.train_urls='{tmp_path}/train-{{000000..000003}}.tar'"
    with pytest.raises(FileNotFoundError, match=r"data.train_urls=.*3 of 4 shards not found"):
        run_task(task, train, f"data.heldout_urls={tmp_path}/train-000000.tar", f"out_dir={tmp_path / 'run'}")
    with pytest.raises(FileNotFoundError, match=r"data.heldout_urls=.*heldout-000000.tar"):
        run_task(task, f"data.train_urls={tmp_path}/train-000000.tar",
                 f"data.heldout_urls={tmp_path}/heldout-000000.tar", f"out_dir={tmp_path / 'run'}")


def test_features_names_missing_code_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"codes=.*nope.tar"):
        run_task("features", f"codes={tmp_path}/nope.tar", f"out={tmp_path / 'f'}")


def test_an_unreadable_checkpoint_is_named(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"global_step": 7, "state_dict": {"w": torch.zeros(3)}}, good)
    cfg = lambda path: OmegaConf.create({"ckpt_path": str(path), "out_dir": str(tmp_path)})  # noqa: E731
    assert resume_step(cfg(good), tmp_path) == 7
    (tmp_path / "trunc.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "text.ckpt").write_text("not a checkpoint\n" * 10)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "weights.pt")  # torch's, but not Lightning's
    for bad, why in (("trunc.ckpt", "not a torch.save zip"), ("text.ckpt", "not a torch.save zip"),
                     ("weights.pt", "KeyError: 'global_step'")):
        with pytest.raises(ValueError, match=rf"{bad} is not a readable Lightning checkpoint \({why}"):
            resume_step(cfg(tmp_path / bad), tmp_path)


@pytest.mark.parametrize("task", MODEL_TASKS)
def test_every_task_checks_its_checkpoint_before_building_anything(tmp_path, task):
    (tmp_path / "x.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="x.ckpt is not a readable Lightning checkpoint"):
        run_task(task, f"ckpt_path={tmp_path / 'x.ckpt'}", f"out_dir={tmp_path / 'run'}")


def test_ckpt_path_last_without_out_dir_says_to_give_the_earlier_runs_folder(tmp_path):
    fresh = OmegaConf.create({"ckpt_path": "last", "out_dir": None})
    with pytest.raises(FileNotFoundError, match=r"without out_dir= .*give out_dir=<the earlier run's folder>"):
        resume_step(fresh, tmp_path / "hydra_run")
    with pytest.raises(FileNotFoundError, match=r"is that the earlier run's folder"):
        resume_step(OmegaConf.merge(fresh, {"out_dir": str(tmp_path)}), tmp_path)


def test_drafter_lr_schedules_warm_up_then_decay():
    from train.drafter_task import lr_factor

    kw = dict(warmup=10, total=110)
    assert lr_factor(0, **kw) == pytest.approx(0.1) and lr_factor(9, **kw) == pytest.approx(1.0)
    assert lr_factor(10, **kw) == pytest.approx(1.0) and lr_factor(110, **kw) == pytest.approx(0.1)  # cosine to 10%
    assert lr_factor(60, **kw, decay="linear") == pytest.approx(0.5)
    assert lr_factor(110, **kw, decay="linear") == 0.0 and lr_factor(500, **kw, decay="linear") == 0.0


def test_no_held_out_batches_is_refused_before_training(tmp_path):
    # the task ends by measuring its model on held-out data for the card: refusing late would lose the run
    with pytest.raises(ValueError, match="trainer.limit_val_batches=0"):
        run_task("tokenizer", f"out_dir={tmp_path}", "trainer.limit_val_batches=0")
    assert not (tmp_path / "checkpoints").exists()
