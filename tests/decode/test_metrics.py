"""The end-of-run summary: per-image latency, decode throughput, and quality beside speed."""
from decode.evaluation.metrics import ImageStats, summary_table


def _stats(latency: float, i: int, alignment=None) -> ImageStats:
    return ImageStats(prompt_index=i, sample_index=0, prompt="a red circle", seed=i, method="vvs", tokens=256,
                      nfe=64, step_compression=4.0, latency_s=latency, prefill_s=0.1, text_encode_s=0.0,
                      vq_decode_s=0.0, batch_size=2, device="cpu", dtype="float32", image=f"{i}.png",
                      alignment=alignment)


def test_summary_reports_latency_per_batch_throughput_and_quality():
    rows = [_stats(1.0, 0), _stats(1.0, 1), _stats(3.0, 2), _stats(3.0, 3)]  # two batches of two
    text = summary_table(rows, wall_s=10.0)
    assert "latency per batch   2.000 s" in text
    assert "1.00 images/s decoding" in text and "0.40 images/s over the whole run" in text
    assert "quality             not measured" in text
    scored = summary_table([_stats(1.0, 0, alignment=0.5), _stats(1.0, 1, alignment=1.0)], wall_s=4.0)
    assert "alignment           0.750" in scored and "not measured" not in scored


def test_speed_stats_follow_their_definitions():
    # 256 tokens: the prefill's token, 200 over 60 verified steps (bonus tokens included), 55 over 10 skipped
    from types import SimpleNamespace

    import torch

    from decode.evaluation.metrics import speed_stats

    gen = SimpleNamespace(tokens=torch.zeros(1, 256, dtype=torch.long), nfe=torch.tensor([60]),
                          steps=torch.tensor([70]), skipped=torch.tensor([10]), verified_tokens=torch.tensor([200]),
                          draft_s=0.1, verify_s=0.2, schedule_s=0.0, batch_passes=61)
    s = speed_stats(gen, 0)
    assert s["step_compression"] == 256 / 60  # per target pass, not per step
    assert s["tau"] == 200 / 60 and s["tau_all"] == 255 / 70
    assert s["skip_ratio"] == 10 / 70 and s["tokens_per_skip"] == 55 / 10
    assert s["nfe"] == 60 and s["steps"] == 70 and s["batch_passes"] == 61


def test_summary_gives_target_nll_with_its_interval_when_there_are_enough_images():
    import dataclasses

    rows = [dataclasses.replace(_stats(1.0, i), target_nll=2.0 + 0.1 * (i % 3)) for i in range(12)]
    text = summary_table(rows, wall_s=10.0)
    line = next(x for x in text.splitlines() if x.startswith("target NLL"))
    assert line.startswith("target NLL          2.100 [") and "not measured" not in text
    few = summary_table(rows[:4], wall_s=1.0)
    assert "no interval: 4 images, fewer than 8" in few
