"""The benchmark's table and plot, and the cost model's prediction (pure functions; no timing)."""
import pytest



ROWS = [dict(label=label, curve=curve, method=method, seed=seed, images=4, nfe=nfe, step_compression=256 / nfe,
             tau=2.0, tau_all=2.0, skip_ratio=skip, latency_s=lat, speedup_vs_ar=1.0 / lat, draft_s=0.1, verify_s=0.2,
             schedule_s=0.0, fid=fid, alignment=0.3, precision=0.9, recall=0.5)
        for label, curve, method, nfe, skip, lat, fid in [("ar", "ar", "ar", 255, 0.0, 1.0, 100.0),
                                                          ("vvs_t0.7", "vvs", "vvs", 80, 0.1, 2.0, 110.0),
                                                          ("vvs_t0.5", "vvs", "vvs", 70, 0.2, 1.8, 115.0)]
        for seed in (0, 1)]
META = dict(device="cpu (1 threads)", batch_size=8, num_prompts=4, cfg_scale=4.0, sampling={}, tree={},
            fid_floor=50.0, alignment_real=0.8)


def test_benchmark_writes_a_table_and_a_plot(tmp_path):
    import decode.evaluation.benchmark as bench
    text = bench.markdown(ROWS, META)
    assert text.count("\n| vvs_t0.5 |") == 2 and "speed-up vs AR" in text and "floor" in text
    assert "compile" not in text  # older results did not record how the layers ran: no claim either way
    assert "| 1.00 | n/a | 1.000 |" in text  # latency per image; no images/s recorded in older results
    rated = bench.markdown([{**ROWS[0], "images_per_s": 4.0}], META)
    assert "| 1.00 | 4.00 | 1.000 |" in rated and "wall-clock per image" in rated
    swept = [{**r, "batch_size": 8, "tree_size": 59, "tree_depth": 4, "tree_top_k": 10} for r in ROWS]
    swept[2] = {**swept[2], "batch_size": 1, "tree_size": 20}
    tree = dict(total_tokens=59, depth=4, top_k=10)
    text = bench.markdown(swept, {**META, "tree": tree})
    assert "\n| vvs_t0.7 (batch 1, tree 20/4/10) | 0 |" in text and "\n| vvs_t0.7 | 1 |" in text
    compiled = bench.markdown(ROWS, {**META, "compiled": True, "warmup": True})
    assert "layers torch.compile'd (stack), one untimed warm-up batch per run" in compiled
    assert "torch.compile'd (layer)" in bench.markdown(ROWS, {**META, "compiled": "layer", "warmup": False})
    bench.plot(swept, tmp_path / "results.png", META)
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_benchmark_without_fid_says_so(tmp_path):
    import decode.evaluation.benchmark as bench
    rows, meta = [{**r, "fid": float("nan")} for r in ROWS], {**META, "fid_floor": float("nan")}
    text = bench.markdown(rows, meta)
    assert "FID not computed (fid=false" in text and "floor with another" not in text
    assert "| nan | n/a | n/a | 0.300 |" in text  # FID reads nan; rows without FD-world / NLL say n/a
    assert "FID not computed" not in bench.markdown(ROWS, META)
    bench.plot(rows, tmp_path / "results.png", meta)
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_benchmark_table_shows_each_quality_figure_with_its_interval():
    import decode.evaluation.benchmark as bench
    row = {**ROWS[0], "fd_world": 12.34, "fd_world_lo": 10.0, "fd_world_hi": 15.5, "target_nll": 2.5,
           "target_nll_lo": 2.4, "target_nll_hi": 2.6, "alignment_lo": 0.25, "alignment_hi": 0.35}
    text = bench.markdown([row], {**META, "fd_world_floor": 3.0})
    assert "| 12.3 [10.0, 15.5] | 2.500 [2.400, 2.600] | 0.300 [0.250, 0.350] |" in text
    assert "real-vs-real floor with another held-out set: 3.0" in text and "bootstrap interval" in text
    assert set(bench.COLUMNS) >= {"fd_world", "fd_world_lo", "fd_world_hi", "target_nll", "target_nll_lo",
                                  "target_nll_hi", "alignment_lo", "alignment_hi"}


def test_cost_model_prediction_combines_timings_with_acceptance():
    import decode.evaluation.cost_model as cm
    times = dict(t_ar=1.0, t_verify=2.0, t_verify_chain=1.5, t_draft=1.0, t_sched=0.0)
    row = dict(method="eagle2", step_compression=4.0, skip_ratio=0.0)  # 64 target passes for 256 tokens
    assert cm.predict(times, row, 256) == 256 / (64 * 2.0 + 64 * 1.0)
    skipping = dict(method="vvs_u", step_compression=256 / 48, skip_ratio=0.25)  # 64 steps, 16 skipped
    assert cm.predict(times, skipping, 256) == pytest.approx(256 / (48 * 2.0 + 64 * 1.0))
    assert cm.predict(times, dict(method="sjd", step_compression=2.56, skip_ratio=0.0), 256) == pytest.approx(256 / 150)
    # the compression carries over to another token count: 1024 tokens, 4x the passes
    assert cm.predict(times, row, 1024) == pytest.approx(cm.predict(times, row, 256))


def test_cost_model_charges_each_method_its_own_acceptance_and_drafting():
    import decode.evaluation.cost_model as cm
    times = dict(t_ar=1.0, t_verify=2.0, t_verify_chain=1.5, t_draft=1.0, t_draft_static=3.0, t_jacobi=0.5,
                 t_jacobi_vp=0.75, t_sched=0.5, t_accept=0.25, t_accept_relaxed=0.5, t_accept_static=0.75, t_accept_chain=0.1)
    row = dict(method="eagle2", step_compression=4.0, skip_ratio=0.0)  # 64 passes, 64 steps
    assert cm.predict(times, row, 256) == pytest.approx(256 / (64 * (2.0 + 0.25) + 64 * 1.0))
    assert cm.predict(times, dict(row, method="lantern"), 256) == pytest.approx(256 / (64 * 2.5 + 64 * 1.0))
    assert cm.predict(times, dict(row, method="lantern_pp"), 256) == pytest.approx(256 / (64 * 2.75 + 64 * 3.0))
    sjd = dict(method="sjd", step_compression=2.56, skip_ratio=0.0)  # 100 passes
    assert cm.predict(times, sjd, 256) == pytest.approx(256 / (100 * (1.5 + 0.1 + 0.5)))
    assert cm.predict(times, dict(sjd, method="sjd_vp"), 256) == pytest.approx(256 / (100 * (1.5 + 0.1 + 0.75)))
    # SJD-VP's timings from before its reweighting was timed: SJD's round
    no_vp = {k: v for k, v in times.items() if k != "t_jacobi_vp"}
    assert cm.predict(no_vp, dict(sjd, method="sjd_vp"), 256) == pytest.approx(256 / (100 * (1.5 + 0.1 + 0.5)))
    # with the batch's counts: acceptance walks each verifying row, t_accept / batch per row pass
    vvs = dict(method="vvs", step_compression=4.0, skip_ratio=0.1, batch_passes=80.0, batch_steps=90.0, nfe=64.0)
    assert cm.predict(times, vvs, 256, batch=8) == pytest.approx(256 / (80 * 2.0 + 64 * 0.5 + 90 * (1.0 + 0.5)))
    # timings saved before acceptance and the per-method drafting were timed: as before
    old = dict(t_ar=1.0, t_verify=2.0, t_verify_chain=1.5, t_draft=1.0, t_sched=0.0)
    assert cm.predict(old, dict(row, method="lantern_pp"), 256) == pytest.approx(256 / (64 * 2.0 + 64 * 1.0))
    assert cm.predict(old, sjd, 256) == pytest.approx(256 / 150)


def test_cost_model_times_every_component_on_a_tiny_model():
    import torch
    from omegaconf import OmegaConf

    import decode.evaluation.cost_model as cm
    cfg = OmegaConf.create(dict(size="tiny", vocab_size=64, block_size=16, cls_token_num=4, caption_dim=8,
                                cfg_scale=2.0, batch=2, repeats=1, tree=dict(total_tokens=8, depth=2, top_k=3),
                                sjd_window=4, sampling=dict(temperature=1.0, top_k=0, top_p=1.0),
                                lantern=dict(lantern_k=4, delta=0.2),
                                lantern_pp=dict(lantern_k=2, lam=5.0, static_tree="balanced_25"),
                                sjd_vp=dict(vp_beta=1.0, vp_cap=10.0)))
    cpu = torch.device("cpu")
    target, drafter = cm.build(cfg, cpu, torch.float32)
    relax = cm.relaxations(cfg, cm.load_codebook(cfg, target.vocab_size, cpu))
    times = cm.times_at(cfg, target, drafter, relax, cpu, filled=4)
    assert set(cm.ACCEPT_KIND.values()) | set(cm.DRAFT_KIND.values()) <= set(times)
    assert all(v > 0 for v in times.values()) and times["tree_nodes"] == 8


def test_benchmark_logs_its_table_to_wandb_offline(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    import decode.evaluation.benchmark as bench
    monkeypatch.setenv("WANDB_MODE", "offline")
    bench.plot(ROWS, tmp_path / "results.png", META)
    bench.log_wandb(ROWS, tmp_path, OmegaConf.create({"wandb": True, "wandb_project": "test"}))
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_cost_model_uses_the_batch_counts_when_the_benchmark_recorded_them():
    import decode.evaluation.cost_model as cm
    times = dict(t_ar=1.0, t_verify=2.0, t_verify_chain=1.5, t_draft=1.0, t_sched=0.5)
    row = dict(method="vvs", step_compression=4.0, skip_ratio=0.1, batch_passes=80.0, batch_steps=90.0, nfe=64.0)
    assert cm.predict(times, row, 256) == pytest.approx(256 / (80 * 2.0 + 90 * 1.0 + 90 * 0.5))
    assert "batch_passes" not in cm._per_image(row)
    # a pass over 4 of 8 rows took 1.2 of the full 2.0: a pass costs 0.4 + 0.2 r; 80 passes served 64 x 8 rows
    with_part = dict(times, t_verify_part=1.2)
    assert cm.predict(with_part, row, 256, batch=8) == pytest.approx(256 / (80 * 0.4 + 512 * 0.2 + 90 * 1.5))
    full_rows = dict(row, nfe=80.0)  # every pass over every row: the full-pass cost again
    assert cm.predict(with_part, full_rows, 256, batch=8) == pytest.approx(cm.predict(times, full_rows, 256))


def test_a_run_can_set_its_own_tree_and_batch_size():
    from omegaconf import OmegaConf

    import decode.evaluation.benchmark as bench
    cfg = OmegaConf.create({"batch_size": 8, "tree": {"total_tokens": 59, "depth": 4, "top_k": 10}})
    tree, batch = bench.run_settings(cfg, OmegaConf.create({"label": "a", "method": "lantern"}))
    assert (tree.total_tokens, tree.depth, tree.top_k, batch) == (59, 4, 10, 8)
    run = OmegaConf.create({"label": "b", "method": "lantern", "tree": {"total_tokens": 20}, "batch_size": 1})
    tree, batch = bench.run_settings(cfg, run)
    assert (tree.total_tokens, tree.depth, tree.top_k, batch) == (20, 4, 10, 1)
    with pytest.raises(ValueError, match="run c: batch_size"):
        bench.run_settings(cfg, OmegaConf.create({"label": "c", "method": "ar", "batch_size": -2}))


def test_pareto_front_keeps_runs_no_other_beats_on_speed_and_quality():
    from decode.evaluation.frontier import pareto_front

    pts = {"ar": dict(step_compression=1.0, target_nll=2.6, alignment=0.20),
           "fast_close": dict(step_compression=3.0, target_nll=2.5, alignment=0.15),
           "slow_far": dict(step_compression=2.0, target_nll=2.0, alignment=0.18)}
    assert pareto_front(pts, "target_nll", 2.6) == ["ar", "fast_close"]  # two-sided: distance from AR
    assert pareto_front(pts, "alignment", None) == ["ar", "slow_far", "fast_close"]


def test_the_fastest_run_at_ars_quality_is_picked_per_method_and_named_in_the_table():
    import decode.evaluation.benchmark as bench
    import decode.evaluation.frontier as frontier

    def run(label, method, sc, nll, fd, align):
        return dict(ROWS[0], label=label, curve=label, method=method, step_compression=sc, target_nll=nll,
                    target_nll_lo=nll - 0.1, target_nll_hi=nll + 0.1, fd_world=fd, fd_world_lo=fd - 5,
                    fd_world_hi=fd + 5, alignment=align, alignment_lo=align - 0.05, alignment_hi=align + 0.05)

    rows = [run("ar", "ar", 1.0, 2.5, 50, 0.50),
            run("vvs_a", "vvs", 3.0, 2.55, 52, 0.48),
            run("vvs_b", "vvs", 5.0, 2.9, 52, 0.48),   # NLL out of AR's interval [2.4, 2.6]
            run("vvs_c", "vvs", 4.0, 2.45, 40, 0.60),  # better FD-world and alignment: no loss
            run("lantern", "lantern", 3.5, 2.2, 50, 0.5),  # mode-seeking: below the interval is a change too
            run("eagle2", "eagle2", 2.0, 2.5, 56, 0.5)]    # FD-world past AR's worse end (55)
    pts = frontier._points(rows, ["target_nll", "fd_world", "alignment"])
    assert frontier.at_ar_quality(pts, ["target_nll", "fd_world", "alignment"]) == {"vvs": "vvs_c"}
    assert frontier.at_ar_quality(pts, ["target_nll"]) == {"vvs": "vvs_c", "eagle2": "eagle2"}
    text = bench.markdown(rows, META)
    assert "Fastest run of each method at AR's quality" in text and "- vvs: vvs_c (4.00x)" in text
    assert "at AR's quality" not in bench.markdown(ROWS, META)  # no intervals: no claim


def test_seen_vs_heldout_measures_each_set_and_refuses_a_set_too_small(tmp_path):
    import importlib.util

    import torch

    from data.code_shards import collate_code_samples, read_code_shards
    from decode.models.checkpoint import save_model_folder
    from decode.models.target import Condition, LlamaGenTarget
    from tests.conftest import tiny_gpt
    from tests.data.test_code_shards_corrupt import DIM, _code_record
    from tests.data.test_sources import _tar

    spec = importlib.util.spec_from_file_location("seen_vs_heldout", "scripts/seen_vs_heldout.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    gpt = tiny_gpt(caption_dim=DIM).eval()
    save_model_folder(tmp_path / "target", gpt, gpt.config.to_dict(), kind="llamagen_gpt")
    seen = _tar(tmp_path / "seen-000000.tar", [_code_record(k, i) for i, k in enumerate("abcd")])
    heldout = _tar(tmp_path / "heldout-000000.tar", [_code_record(k, i + 10) for i, k in enumerate("efgh")])
    common = ["--max-length", "8", "--batch-size", "3"]
    (row,) = script.main([str(tmp_path / "target"), "--seen", seen, "--heldout", heldout, "--num", "2", *common])

    # the first two samples of each set, one at a time
    def nll(urls):
        samples = list(read_code_shards(urls, max_length=8))[:2]
        with torch.no_grad():
            return sum(torch.nn.functional.cross_entropy(
                LlamaGenTarget(gpt, cfg_scale=1.0).teacher_forced(Condition(b.text, b.mask), b.codes).logits[0],
                b.codes[0]).item() for b in (collate_code_samples([s]) for s in samples)) / 2

    assert row["nll_seen"] == pytest.approx(nll(seen), abs=1e-4)
    assert row["nll_heldout"] == pytest.approx(nll(heldout), abs=1e-4)
    assert row["gap"] == pytest.approx(row["nll_heldout"] - row["nll_seen"])
    with pytest.raises(ValueError, match="fewer than --num 5"):
        script.main([str(tmp_path / "target"), "--seen", seen, "--heldout", heldout, "--num", "5", *common])
