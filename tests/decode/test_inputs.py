"""Bad decode input fails early, with the option named (no model is loaded here)."""
import pytest
import torch
from omegaconf import OmegaConf

from decode.__main__ import integer

from decode.pipeline import check_run_folder, record_run_folder
from decode.api import pick_device
from decode.strategies.registry import resolve_method


@pytest.mark.parametrize("name,knob,value,words", [
    ("lantern", "lantern_k", 0, "method.lantern_k must be >= 1"),
    ("sjd", "window", 0, "method.window"),
    ("sjd", "init", "bogus", "method.init must be one of"),
    ("lantern_pp", "static_tree", "oak", "method.static_tree must be one of"),
    ("vvs_u", "interval", 0, "method.interval"),
    ("lantern", "delta", 5.0, r"method.delta must be in \[0, 1\]"),
    ("lantern_pp", "lam", 0.5, "method.lam must be >= 1"),
    ("eagle2", "tau", 0.5, "method.tau is not read by this composition: eagle2 .*never skipping"),
    ("vvs", "tua", 0.5, "method.tua is unknown"),
])
def test_method_knobs_out_of_range_name_themselves(name, knob, value, words):
    with pytest.raises(ValueError, match=words):
        resolve_method(name, {knob: value})


def test_the_edges_of_each_range_are_fine():
    resolve_method("vvs", dict(base="lantern", tau=1.0, lantern_k=1, delta=0.0))
    resolve_method("sjd", dict(window=1, init="random"))
    resolve_method("lantern_pp", dict(static_tree="chain", lam=1.0))


@pytest.mark.parametrize("overrides,words", [
    ({"base": "oak"}, "method.base='oak' is unknown"),
    ({"skipping": "often"}, "method.skipping='often' is unknown"),
    ({"base": "sjd"}, "needs a drafter's tree"),
])
def test_bad_compositions_are_refused(overrides, words):
    with pytest.raises(ValueError, match=words):
        resolve_method("vvs", overrides)


def test_vvs_composes_over_any_base_with_a_tree():
    m = resolve_method("vvs", {"base": "lantern_pp", "tau": 0.5})
    assert (m.drafting, m.acceptance, m.skipping) == ("static", "lantern_pp", "similarity")
    # VVS's own lambda (2, its frontier pick) stays; the base brings its parts, and knobs only where it has its own
    assert m.knobs["lam"] == 2.0 and m.knobs["tau"] == 0.5 and "delta" not in m.knobs
    m = resolve_method("vvs", {"base": "eagle2"})
    assert (m.drafting, m.acceptance) == ("eagle", "exact") and "lam" not in m.knobs and m.knobs["tau"] == 0.6
    m = resolve_method("eagle2", {"skipping": "uniform"})
    assert (m.acceptance, m.skipping, m.knobs["interval"]) == ("exact", "uniform", 5)
    assert resolve_method("sjd_vp").knobs["vp_beta"] == 1.0 and resolve_method("sjd").knobs["vp_beta"] == 0.0


def test_a_tau_above_one_warns_that_vvs_will_never_skip():
    with pytest.warns(UserWarning, match="never skips"):
        resolve_method("vvs", dict(tau=2.0))


def test_integer_options_name_the_option():
    cfg = OmegaConf.create({"n": "two", "batch_size": -1, "seed": 3})
    with pytest.raises(ValueError, match="n must be an integer, got 'two'"):
        integer(cfg, "n")
    with pytest.raises(ValueError, match="batch_size must be >= 1, got -1"):
        integer(cfg, "batch_size", least=1)
    assert integer(cfg, "seed") == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_device_that_is_not_there_is_refused():
    with pytest.raises(ValueError, match="sees no CUDA device"):
        pick_device("cuda")
    with pytest.raises(ValueError, match="device='gpu' is not a device"):
        pick_device("gpu")
    assert pick_device("auto").type == "cpu"


def test_a_run_folder_resumes_only_with_its_own_settings(tmp_path):
    settings = {"prompts": ["a"], "n": 2, "seed": 0, "method": {"name": "ar"}}
    check_run_folder(tmp_path / "new", settings)  # nothing there yet
    record_run_folder(tmp_path, settings)
    check_run_folder(tmp_path, {**settings, "seed": 1})  # no images yet: nothing to mix up
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "00000_000.png").write_bytes(b"png")
    check_run_folder(tmp_path, dict(settings))  # the same settings resume
    with pytest.raises(ValueError, match=r"other settings \(method, seed differ"):
        check_run_folder(tmp_path, {**settings, "seed": 1, "method": {"name": "vvs"}})
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_run_folder(tmp_path / "file", settings)


def test_a_model_folder_that_is_missing_or_a_file_says_so(tmp_path):
    from decode.models.checkpoint import read_model_folder

    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_model_folder(tmp_path / "nope", kind="eagle_drafter")
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file"):
        read_model_folder(tmp_path / "f", kind="eagle_drafter")


def test_a_run_folder_takes_more_prompts_but_not_other_prompts_for_its_images(tmp_path):
    settings = {"prompts": ["a", "b"], "seed": 0, "method": "ar"}
    record_run_folder(tmp_path, settings)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "00001_000.png").write_bytes(b"png")  # made from prompt 1, "b"
    check_run_folder(tmp_path, {**settings, "prompts": ["a", "b", "c"]})  # appended prompts extend the run
    check_run_folder(tmp_path, {**settings, "prompts": ["x", "b"]})  # prompt 0 has no image yet
    with pytest.raises(ValueError, match=r"\(prompts differ"):
        check_run_folder(tmp_path, {**settings, "prompts": ["a", "y"]})


def test_run_settings_ignore_what_cannot_change_the_images(tmp_path):
    from decode.__main__ import run_settings
    from decode.resolvers import REPO, register_resolvers

    register_resolvers()
    assert "threshold" not in resolve_method("vvs").knobs and "tau" in resolve_method("vvs").knobs
    assert "tau" not in resolve_method("lantern").knobs and resolve_method("ar").knobs == {}
    base = {"n": 2, "seed": 0, "dtype": "float32", "method": {"name": "ar"}, "sampling": {"top_k": 0},
            "tree": {"total_tokens": 59}, "target": {"ckpt": "${repo:models/world/target}"}}
    one = run_settings(OmegaConf.create(base), resolve_method("ar"), ["p"])
    other = OmegaConf.create({**base, "n": 4, "tree": {"total_tokens": 20},
                              "target": {"ckpt": str(REPO / "models" / "world" / ".." / "world" / "target")}})
    assert run_settings(other, resolve_method("ar"), ["p"]) == one  # n, AR's tree, the path's spelling
    assert one["target"] == {"ckpt": "models/world/target"}
    assert run_settings(OmegaConf.create(base), resolve_method("vvs", {"tau": 0.1}), ["p"]) != \
        run_settings(OmegaConf.create(base), resolve_method("vvs"), ["p"])


def test_a_cuda_device_keeps_attention_off_cudnn(monkeypatch):
    """cuDNN plans anew for every key length, which a decode changes at every step (docs/results.md)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        pick_device("cpu")
        assert torch.backends.cuda.cudnn_sdp_enabled()  # a CPU run leaves the process's settings alone
        pick_device("cuda")
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


@pytest.mark.parametrize("name,size,words", [
    ("lantern_pp", 100, "naive_extend_57: 58"),
    ("vvs", 1, "2 <= size"),
    ("eagle2", 9, "drafts with eagle"),
])
def test_a_static_size_the_method_cannot_keep_is_named_before_any_load(name, size, words):
    from omegaconf import OmegaConf
    from decode.__main__ import check_static_size
    with pytest.raises(ValueError, match=words):
        check_static_size(resolve_method(name), OmegaConf.create({"tree": {"static_size": size}}))
    check_static_size(resolve_method("lantern_pp"), OmegaConf.create({"tree": {"static_size": 9}}))  # fits
