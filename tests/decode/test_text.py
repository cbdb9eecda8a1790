"""Text encoders: LlamaGen's left padding, empty and over-long prompts, FLAN-T5 and MiniLM loading."""
import logging

import pytest
import torch

from decode.models.text import left_pad, load_text_encoder


def test_left_pad_moves_valid_tokens_to_the_end_and_zeroes_padding():
    emb = torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1) + 1
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    out = left_pad(emb, mask)
    assert out.emb[0, :, 0].tolist() == [0, 0, 0, 1, 2]
    assert out.mask[0].tolist() == [False, False, False, True, True]
    assert torch.equal(out.emb[1], emb[1]) and out.mask[1].all()


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm", max_length=16)


def test_minilm_shapes_and_padding(minilm):
    feats = minilm.encode(["a cat face, on a blue background", "star"])
    assert feats.emb.shape == (2, 16, 384) and feats.mask.shape == (2, 16)
    assert feats.mask[1].sum() == 3  # [CLS] star [SEP]
    assert feats.mask[1, -3:].all() and not feats.mask[1, :-3].any()
    assert feats.emb[1, :-3].abs().sum() == 0


def test_empty_prompt_is_an_error(minilm):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        minilm.encode(["a cat", "   "])


def test_over_long_prompt_is_truncated_with_a_warning(minilm, caplog):
    with caplog.at_level(logging.WARNING):
        feats = minilm.encode(["red " * 40])
    assert "truncated" in caplog.text
    assert feats.mask.all()


def test_flan_t5_folder_loads_with_left_padding(tmp_path):
    """The T5 path: a tiny random T5 encoder saved locally, loaded as a user's FLAN-T5 folder."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from decode.models.text import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())  # any local tokenizer: no hub here
    cfg = T5Config(vocab_size=tok.vocab_size, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    T5EncoderModel(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    enc = load_text_encoder("t5", path=str(tmp_path), max_length=12)
    feats = enc.encode(["a small red star"])
    assert enc.dim == 16 and feats.emb.shape == (1, 12, 16)
    n = int(feats.mask.sum())
    assert feats.mask[0, -n:].all() and feats.emb[0, :-n].abs().sum() == 0
    # LlamaGen's caption cleaning runs first for T5 (a URL is dropped), and can be turned off
    torch.testing.assert_close(enc.encode(["a small red star https://example.com/star.png"]).emb, feats.emb)
    raw = load_text_encoder("t5", path=str(tmp_path), max_length=12, clean_captions=False)
    assert not torch.equal(raw.encode(["a small red star https://example.com/star.png"]).emb, feats.emb)
    with pytest.raises(ValueError, match="prompt 0 .* nothing left after LlamaGen's caption cleaning"):
        enc.encode(["https://example.com/star.png"])


def test_unknown_kind_is_named():
    with pytest.raises(ValueError, match="'minilm', 't5' or 'precomputed'"):
        load_text_encoder("clip")


def test_clean_caption_normalises_prompts_as_llamagen_does_before_t5():
    from decode.models.text import clean_caption

    assert clean_caption("  A Photo of a RED Fox  ") == "a photo of a red fox"
    assert clean_caption("a%20red+fox") == "a red fox"  # URL-unquoted
    messy = "<b>Two</b> cats &amp; a dog — see https://example.com/x?y=1 or www.example.org @someone"
    assert clean_caption(messy) == "two cats a dog - see or"
    assert clean_caption("\u201cquoted\u201d, ") == "quoted"
    # LlamaGen's outputs for typed prompts (its regexes run on these by a review)
    assert clean_caption("A cat (orange) & a dog") == "a cat orange a dog"
    assert clean_caption('"a red car"') == "a red car"
    assert clean_caption("a dog... running") == "a dog running"
    assert clean_caption("red,blue") == "red, blue"
    assert clean_caption("cats/dogs on a *table*") == "cats dogs on a table"
    assert clean_caption(clean_caption("Mixed CASE, twice")) == clean_caption("Mixed CASE, twice")


def test_precomputed_captions_are_the_encoders_and_unknown_prompts_are_named(tmp_path):
    import pytest

    from decode.models.text import TextFeatures, load_text_encoder, precompute_captions

    class Fixed:  # a stand-in encoder: features from the prompt's length
        dim, max_length = 4, 6

        def encode(self, prompts):
            emb = torch.stack([torch.full((6, 4), float(len(p))) for p in prompts])
            return TextFeatures(emb=emb, mask=torch.ones(len(prompts), 6, dtype=torch.bool))

    precompute_captions(Fixed(), ["a cat", "a large dog", "a cat"], str(tmp_path / "c.pt"))
    text = load_text_encoder("precomputed", path=str(tmp_path / "c.pt"), max_length=6)
    assert (text.dim, text.max_length) == (4, 6)
    assert torch.equal(text.encode(["a large dog", "a cat"]).emb, Fixed().encode(["a large dog", "a cat"]).emb)
    with pytest.raises(KeyError, match="'a bird'"):
        text.encode(["a bird"])
    with pytest.raises(ValueError, match="6 slots; the target needs 48"):
        load_text_encoder("precomputed", path=str(tmp_path / "c.pt"), max_length=48)
