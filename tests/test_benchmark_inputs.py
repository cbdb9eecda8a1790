"""The benchmark (decode.evaluation.benchmark, run by scripts/benchmark.py) refuses bad input up front
(check_config), naming the option, before any model, Inception or FID reference loads."""
import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, load_script as _load


@pytest.fixture(scope="module")
def bench():
    import decode.evaluation.benchmark as library

    return library


@pytest.fixture
def cfg(tmp_path):
    """A small valid benchmark config; each test breaks one thing in it."""
    (tmp_path / "drafter").mkdir()
    return OmegaConf.create(dict(
        dtype="float32", num_prompts=4, seeds=[0, 1], batch_size=2, replot=None, out_dir=str(tmp_path / "out"),
        drafter_ckpt=str(tmp_path / "drafter"), sampling=dict(temperature=1.0, top_k=0, top_p=1.0),
        tree=dict(total_tokens=59, depth=4, top_k=10),
        runs=[dict(label="ar", method="ar"), dict(label="vvs_t05", method="vvs", options=dict(tau=0.5)),
              dict(label="lantern_t20_b1", method="lantern", batch_size=1, tree=dict(total_tokens=20))]))


def _with(cfg, **changes):
    return OmegaConf.merge(cfg, OmegaConf.create(changes))  # a list given here replaces the whole list


def _refused(bench, cfg, *words):
    with pytest.raises(ValueError) as err:
        bench.check_config(cfg)
    for word in words:
        assert word in str(err.value), f"{word!r} not in: {err.value}"
    return str(err.value)


def test_a_valid_config_passes(bench, cfg):
    bench.check_config(cfg)


def test_empty_runs_are_refused(bench, cfg):
    _refused(bench, _with(cfg, runs=[]), "runs", "non-empty", "vvs")  # and the methods to pick from


@pytest.mark.parametrize("n", [0, 1, 3, -3, "ten"])
def test_num_prompts_must_give_fid_and_precision_recall_enough_images(bench, cfg, n):
    _refused(bench, _with(cfg, num_prompts=n), "num_prompts", ">= 4", repr(n))  # k=3 needs more than 3


@pytest.mark.parametrize("seeds", [[], "0", [0, "a"]])
def test_seeds_must_be_a_non_empty_list_of_integers(bench, cfg, seeds):
    _refused(bench, _with(cfg, seeds=seeds), "seeds")


def test_an_unknown_method_names_the_run_and_lists_the_methods(bench, cfg):
    runs = [dict(label="ar", method="ar"), dict(label="x", method="vvss")]
    _refused(bench, _with(cfg, runs=runs), "run x", "'vvss'", "lantern_pp", "sjd_vp")


def test_an_unknown_option_key_names_the_run_the_key_and_the_known_ones(bench, cfg):
    _refused(bench, _with(cfg, runs=[dict(label="x", method="vvs", options=dict(tua=0.5))]), "run x", "tua", "tau")
    _refused(bench, _with(cfg, runs=[dict(label="x", method="vvs", options=0.5)]), "run x", "options")


def test_runs_need_a_label_and_a_method_and_no_unknown_keys(bench, cfg):
    _refused(bench, _with(cfg, runs=[dict(method="ar")]), "runs[0]", "label")
    _refused(bench, _with(cfg, runs=["ar"]), "runs[0]", "method")
    _refused(bench, _with(cfg, runs=[dict(label="x", method="ar", optoins=dict(tau=0.5))]), "run x", "optoins",
             "options")


def test_duplicate_labels_are_refused(bench, cfg):
    runs = [dict(label="a", method="ar"), dict(label="a", method="vvs")]
    _refused(bench, _with(cfg, runs=runs), "runs[1]", "label 'a'")


@pytest.mark.parametrize("size", [0, -1, "8"])
def test_batch_size_must_be_a_positive_integer(bench, cfg, size):
    _refused(bench, _with(cfg, batch_size=size), "batch_size", ">= 1")


def test_a_runs_own_batch_size_zero_is_refused_not_ignored(bench, cfg):
    _refused(bench, _with(cfg, runs=[dict(label="ar_b0", method="ar", batch_size=0)]), "run ar_b0", "batch_size")


def test_a_runs_tree_is_checked(bench, cfg):
    _refused(bench, _with(cfg, runs=[dict(label="t", method="lantern", tree=dict(size=20))]), "run t", "size",
             "total_tokens")
    _refused(bench, _with(cfg, runs=[dict(label="t", method="lantern", tree=dict(total_tokens=1))]), "run t",
             "total_tokens >= 2")


def test_drafter_methods_need_the_drafter_folder(bench, cfg, tmp_path):
    missing = str(tmp_path / "nowhere")
    _refused(bench, _with(cfg, drafter_ckpt=missing), "drafter_ckpt", "nowhere")
    bench.check_config(_with(cfg, drafter_ckpt=missing, runs=[dict(label="ar", method="ar"),
                                                              dict(label="sjd", method="sjd")]))


def test_a_learned_scheduler_needs_its_folder(bench, cfg, tmp_path):
    opts = dict(skipping="learned", scheduler_ckpt=str(tmp_path / "nowhere"))
    _refused(bench, _with(cfg, runs=[dict(label="l", method="vvs", options=opts)]), "run l", "scheduler_ckpt")


def test_dtype_and_sampling_are_checked(bench, cfg):
    _refused(bench, _with(cfg, dtype="fp8"), "dtype", "fp8")
    _refused(bench, _with(cfg, sampling=dict(top_p=0.0)), "sampling", "top_p")


def test_main_refuses_before_loading_anything_or_making_out_dir(bench, cfg, monkeypatch, capsys):
    def heavy(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(bench, "build_components", heavy)
    monkeypatch.setattr(bench, "pick_device", heavy)
    bad = _with(cfg, runs=[])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as stop:
        _load("benchmark").main.__wrapped__(bad)  # under Hydra: the checked main, reporting bad input in one line
    assert stop.value.code == 1 and capsys.readouterr().err.startswith("error: runs must be a non-empty list")
    assert not (REPO / bad.out_dir).exists()
