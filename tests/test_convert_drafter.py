"""decode/models/lantern_format.py and its command line scripts/convert_drafter.py: LANTERN <-> project
drafter folders (docs/algorithms.md 6)."""
import json
import math
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from decode.models.checkpoint import CheckpointError, save_model_folder
from decode.models.drafter import Drafter, DrafterConfig, load_drafter, prefix_embedding, save_drafter
from decode.models.lantern_format import (
    drafter_target_geometry,
    export_lantern,
    import_lantern,
    lantern_target_geometry,
    load_gpt,
    official_geometry,
)
from decode.models.target.llamagen_gpt import rope_table_2d
from tests.conftest import load_script, tiny_gpt

conv = load_script("convert_drafter")  # the command line only

# LANTERN's names for a 2-layer drafter (cnets_llamagen.py::Model): written out, not derived from the table
LANTERN_LAYER = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                 "post_attention_layernorm.weight"]
LANTERN_KEYS = ({"embed_tokens.weight", "fc.weight", "fc.bias", "layers.1.input_layernorm.weight"}
                | {f"layers.{i}.{k}" for i in (0, 1) for k in LANTERN_LAYER})


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _drafter(gpt, n_layer=2, seed=0):
    torch.manual_seed(seed)
    d = Drafter(DrafterConfig.for_target(gpt, n_layer=n_layer)).eval()
    with torch.no_grad():
        for p in d.parameters():  # norms away from 1, so a mis-mapped weight shows
            p.add_(0.1 * torch.randn_like(p))
    return d


def _inputs(gpt, seed=0, b=2):
    """Drafter inputs over the prefix rows and all image tokens: ids (0 at the prefix), features, positions."""
    g = torch.Generator().manual_seed(seed)
    p, n = gpt.config.cls_token_num - 1, gpt.config.block_size
    ids = torch.cat([torch.zeros(b, p, dtype=torch.long), torch.randint(1, gpt.config.vocab_size, (b, n), generator=g)], 1)
    feats = torch.randn(b, p + n, gpt.config.dim, generator=g)
    return ids, feats, torch.arange(p + n).expand(b, -1)


@torch.no_grad()
def _ours(drafter, gpt, ids, feats, pos):
    emb = gpt.embed_tokens(ids)
    p = drafter.prefix_len  # the prefix slots: zeros, or token 0's embedding (prefix_token=0, LANTERN's)
    emb[:, :p] = prefix_embedding(gpt, drafter.config.prefix_token, emb[:, :p])
    t = ids.shape[1]
    return drafter(emb, feats, pos, torch.ones(t, t, dtype=torch.bool).tril().expand(ids.shape[0], t, t))


@torch.no_grad()
def _lantern_reference(sd, config, ids, feats):
    """The published drafter's computation, written from docs/algorithms.md 6 with LANTERN's key names:
    fc([embed_tokens(ids) ; h]), layers (no input norm on layer 0), interleaved 2D RoPE with zero
    prefix rows, no final norm."""
    d, h = config["hidden_size"], config["num_attention_heads"]
    dh, eps, prefix = d // h, config["rms_norm_eps"], config["cls_token_num"]
    rope = rope_table_2d(math.isqrt(config["block_size"]), dh, 10000.0, prefix, 20)[: ids.shape[1]]

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rot(x):  # [B, T, H, Dh]
        xp = x.reshape(*x.shape[:-1], -1, 2)
        c, s = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
        return torch.stack([xp[..., 0] * c - xp[..., 1] * s, xp[..., 1] * c + xp[..., 0] * s], -1).flatten(3)

    x = F.linear(torch.cat([sd["embed_tokens.weight"][ids], feats], -1), sd["fc.weight"], sd.get("fc.bias"))
    b, t, _ = x.shape
    for i in range(config["num_hidden_layers"]):
        a = x if i == 0 else rms(x, sd[f"layers.{i}.input_layernorm.weight"])
        q, k, v = (F.linear(a, sd[f"layers.{i}.self_attn.{n}_proj.weight"]).view(b, t, -1, dh) for n in "qkv")
        q, k = rot(q).transpose(1, 2), rot(k).transpose(1, 2)
        att = (q @ k.transpose(2, 3) / math.sqrt(dh)).masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), -1e30)
        o = (att.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(b, t, d)
        x = x + F.linear(o, sd[f"layers.{i}.self_attn.o_proj.weight"])
        m = rms(x, sd[f"layers.{i}.post_attention_layernorm.weight"])
        gate, up = (F.linear(m, sd[f"layers.{i}.mlp.{n}_proj.weight"]) for n in ("gate", "up"))
        x = x + F.linear(F.silu(gate) * up, sd[f"layers.{i}.mlp.down_proj.weight"])
    return x


def _export(tmp_path, gpt, drafter, name="lantern", **kw):
    save_drafter(tmp_path / "ours", drafter)
    return export_lantern(tmp_path / "ours", gpt, tmp_path / name, **kw)


def test_export_writes_lanterns_keys_shapes_and_config(tmp_path):
    gpt = tiny_gpt()
    d = _drafter(gpt)
    out = _export(tmp_path, gpt, d)
    sd, config = load_file(out / "model.safetensors"), json.loads((out / "config.json").read_text())
    assert set(sd) == LANTERN_KEYS
    dim, ffn = gpt.config.dim, d.config.layer_config().ffn_dim
    assert sd["fc.weight"].shape == (dim, 2 * dim) and sd["layers.0.mlp.gate_proj.weight"].shape == (ffn, dim)
    assert sd["layers.1.self_attn.q_proj.weight"].shape == (dim, dim)
    torch.testing.assert_close(sd["embed_tokens.weight"], gpt.tok_embeddings.weight, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([sd[f"layers.0.self_attn.{n}_proj.weight"] for n in "qkv"]),
                               d.layers[0].attention.wqkv.weight, rtol=0, atol=0)
    assert config["hidden_size"] == dim and config["intermediate_size"] == ffn
    assert config["num_hidden_layers"] == 2 and config["num_attention_heads"] == gpt.config.n_head
    assert config["rms_norm_eps"] == d.config.norm_eps and config["bias"] is True
    assert config["input_type"] == "custom" and config["cls_token_num"] == gpt.config.cls_token_num - 1


def test_exported_weights_compute_what_lanterns_drafter_computes(tmp_path):
    gpt = tiny_gpt()
    d = _drafter(gpt)
    ids, feats, pos = _inputs(gpt)
    ours = _ours(d, gpt, ids, feats, pos)
    # with row 0 of the embedding zeroed, LANTERN's embed(token 0) at the prefix is our zero embedding
    out = _export(tmp_path, gpt, d, zero_token0_embedding=True)
    ref = _lantern_reference(load_file(out / "model.safetensors"), json.loads((out / "config.json").read_text()),
                             ids, feats)
    torch.testing.assert_close(ref, ours, atol=1e-5, rtol=1e-5)
    # the plain export keeps the true embedding of code 0: LANTERN's prefix slots then differ (the documented gap)
    out = _export(tmp_path, gpt, d, name="plain")
    ref = _lantern_reference(load_file(out / "model.safetensors"), json.loads((out / "config.json").read_text()),
                             ids, feats)
    p = d.prefix_len
    assert (ref[:, p:] - ours[:, p:]).abs().max() > 1e-3
    # imported back, the drafter embeds token 0 at the prefix as LANTERN does: the same outputs as LANTERN's
    import_lantern(out, gpt, tmp_path / "imported")
    imported = load_drafter(tmp_path / "imported", gpt)
    assert imported.config.prefix_token == 0
    torch.testing.assert_close(_ours(imported, gpt, ids, feats, pos), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt,dtype", [("safetensors", None), ("bin", "float16")])
def test_import_round_trip_gives_equal_weights_and_outputs(tmp_path, fmt, dtype):
    gpt = tiny_gpt()
    d = _drafter(gpt)
    lantern = _export(tmp_path, gpt, d, fmt=fmt, dtype=dtype)
    assert (lantern / ("pytorch_model.bin" if fmt == "bin" else "model.safetensors")).is_file()
    import_lantern(lantern, gpt, tmp_path / "back")
    back = load_drafter(tmp_path / "back", gpt)
    assert back.config.norm_eps == d.config.norm_eps and back.config.n_layer == 2
    assert back.config.prefix_token == 0  # LANTERN's prefix slots: token 0's embedding
    ref = Drafter(replace(d.config, prefix_token=0)).eval()
    rounded = dtype is not None  # the float16 file holds the weights rounded
    ref.load_state_dict({k: v.half().float() if rounded else v for k, v in d.state_dict().items()})
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    ids, feats, pos = _inputs(gpt, seed=1)
    assert torch.equal(_ours(back, gpt, ids, feats, pos), _ours(ref, gpt, ids, feats, pos))


def test_import_carries_lanterns_norm_eps(tmp_path):
    gpt = tiny_gpt()
    lantern = _export(tmp_path, gpt, _drafter(gpt))
    config = json.loads((lantern / "config.json").read_text())
    config["rms_norm_eps"] = 1e-6  # the published LlamaGen drafters' value (the target's is 1e-5)
    (lantern / "config.json").write_text(json.dumps(config))
    import_lantern(lantern, gpt, tmp_path / "back")
    back = load_drafter(tmp_path / "back", gpt)
    assert back.config.norm_eps == 1e-6
    assert back.layers[0].ffn_norm.eps == 1e-6 and back.layers[1].attention_norm.eps == 1e-6


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.pop("layers.0.mlp.up_proj.weight"), r"missing keys \(1\): layers\.0\.mlp\.up_proj\.weight"),
    (lambda sd: sd.__setitem__("layers.0.input_layernorm.weight", torch.ones(64)),
     r"unexpected keys \(1\): layers\.0\.input_layernorm\.weight"),
    (lambda sd: sd.__setitem__("fc.bias", torch.zeros(65)), r"shape mismatch for fc\.bias: file \[65\], expected \[64\]"),
])
def test_a_malformed_lantern_folder_is_refused_naming_the_key(tmp_path, edit, message):
    gpt = tiny_gpt()
    lantern = _export(tmp_path, gpt, _drafter(gpt))
    sd = load_file(lantern / "model.safetensors")
    edit(sd)
    save_file(sd, str(lantern / "model.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        import_lantern(lantern, gpt, tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_an_embedding_other_than_the_targets_is_refused_unless_allowed(tmp_path):
    gpt = tiny_gpt()
    lantern = _export(tmp_path, gpt, _drafter(gpt))
    sd = load_file(lantern / "model.safetensors")
    sd["embed_tokens.weight"] = gpt.output.weight.detach().clone()  # LANTERN's fallback: the LM head
    save_file(sd, str(lantern / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"matches the target's LM head"):
        import_lantern(lantern, gpt, tmp_path / "back")
    with pytest.warns(UserWarning, match="differs from the target's tok_embeddings"):
        import_lantern(lantern, gpt, tmp_path / "back", allow_embedding_mismatch=True)
    assert load_drafter(tmp_path / "back", gpt).config.n_layer == 2


def test_export_refuses_a_drafter_of_another_target(tmp_path):
    gpt = tiny_gpt()
    save_drafter(tmp_path / "ours", _drafter(gpt))
    with pytest.raises(CheckpointError, match="fingerprint"):
        export_lantern(tmp_path / "ours", tiny_gpt(seed=1), tmp_path / "lantern")


def test_target_geometry_of_either_folder_builds_the_official_target(tmp_path):
    gpt = tiny_gpt()
    lantern = _export(tmp_path, gpt, _drafter(gpt))  # also writes our folder at tmp_path / "ours"
    geo = {"model_type": "t2i", "block_size": 16, "cls_token_num": 8, "vocab_size": 64}
    assert drafter_target_geometry(tmp_path / "ours") == geo
    assert lantern_target_geometry(lantern) == {**geo, "caption_dim": 12}  # export writes the t2i caption_dim
    assert official_geometry(576, 1, 16384)["model_type"] == "c2i"  # one class slot
    torch.save({"model": gpt.state_dict()}, tmp_path / "target.pt")
    built = load_gpt(str(tmp_path / "target.pt"), "tiny", geo, ["caption_dim=12"])
    assert torch.equal(built.tok_embeddings.weight, gpt.tok_embeddings.weight)
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        load_gpt(str(tmp_path / "target.pt"), "tiny", geo, ["caption_dim"])


def test_command_line_with_an_official_target_file_and_a_target_folder(tmp_path, capsys):
    gpt = tiny_gpt()
    torch.save({"model": gpt.state_dict()}, tmp_path / "target.pt")
    save_model_folder(tmp_path / "target", gpt, gpt.config.to_dict(), kind="llamagen_gpt")
    save_drafter(tmp_path / "ours", _drafter(gpt))
    official = ["--target", str(tmp_path / "target.pt"), "--size", "tiny", "--set", "caption_dim=12"]
    assert conv.main(["export", str(tmp_path / "ours"), "--out", str(tmp_path / "lantern"), "--format", "bin",
                      *official]) == 0
    assert conv.main(["import", str(tmp_path / "lantern"), "--out", str(tmp_path / "back"), *official]) == 0
    assert conv.main(["import", str(tmp_path / "lantern"), "--out", str(tmp_path / "back2"),
                      "--target", str(tmp_path / "target")]) == 0
    a, b = load_drafter(tmp_path / "back", gpt), load_drafter(tmp_path / "ours", gpt)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    # refusals are one line on stderr and exit status 2, not a traceback
    assert conv.main(["import", str(tmp_path / "ours"), "--out", str(tmp_path / "x"), *official]) == 2
    assert "use `export`" in capsys.readouterr().err
