"""The project's LlamaGen target and VQ tokenizer reproduce the public implementation's outputs
(tests/fixtures/llamagen), loaded through the same path a user takes with an official file."""
import torch

from decode.core.engine import generate_ar
from decode.core.sampling import SamplingParams
from decode.models.target import Condition, GPTConfig, load_target
from decode.models.vq import VQConfig, load_vq


def _target(fixtures_dir, cfg_scale):
    io = torch.load(fixtures_dir / "llamagen_t2i_tiny_io.pt")
    arch = GPTConfig.from_dict(io["config"]).to_dict()  # LlamaGen ModelArgs -> our fields
    target = load_target(ckpt=str(fixtures_dir / "llamagen_t2i_tiny.pt"), cfg_scale=cfg_scale, size="tiny", **arch)
    return target, io


def test_teacher_forced_logits_match_reference_through_kv_cache(fixtures_dir):
    target, io = _target(fixtures_dir, cfg_scale=1.0)
    cond, tokens = Condition(io["cond"], io["emb_mask"].bool()), io["tokens"]
    cache, out = target.start(cond, tokens.shape[1])
    logits = [out.logits]
    for j in range(tokens.shape[1] - 1):
        out = target.extend(cache, tokens[:, j:j + 1])
        target.commit(cache, 1)
        logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), io["logits_teacher_forced"], atol=1e-4, rtol=0)


def test_teacher_forced_logits_match_reference_full_forward(fixtures_dir):
    target, io = _target(fixtures_dir, cfg_scale=1.0)
    with torch.no_grad():
        out = target.teacher_forced(Condition(io["cond"], io["emb_mask"].bool()), io["tokens"])
    torch.testing.assert_close(out.logits, io["logits_teacher_forced"], atol=1e-4, rtol=0)


def test_greedy_cfg_tokens_identical(fixtures_dir):
    target, io = _target(fixtures_dir, cfg_scale=io_scale(fixtures_dir))
    gen = generate_ar(target, Condition(io["cond"], io["emb_mask"].bool()), num_tokens=16,
                      sampling=SamplingParams(temperature=0.0), generators=None)
    assert torch.equal(gen.tokens, io["greedy_cfg_tokens"])


def io_scale(fixtures_dir) -> float:
    return float(torch.load(fixtures_dir / "llamagen_t2i_tiny_io.pt")["cfg_scale"])


def test_vq_codes_identical_and_decode_close(fixtures_dir):
    io = torch.load(fixtures_dir / "llamagen_vq_tiny_io.pt")
    arch = VQConfig.from_dict(io["config"]).to_dict()
    vq = load_vq(ckpt=str(fixtures_dir / "llamagen_vq_tiny.pt"), **arch)
    assert torch.equal(vq.encode(io["image"]), io["codes"])
    with torch.no_grad():
        decoded = vq.decode_codes(io["codes"], grid=(8, 8))
    torch.testing.assert_close(decoded, io["decoded"], atol=1e-4, rtol=0)
