"""GridAR's VLM verifier over a tiny random LLaVA built here (no download): it loads from a folder, reads
its answers from the first token's probabilities, falls back to the prompt, and refuses folders that are
not image-text models."""
import shutil

import pytest
import torch

from decode.scaling.config import make_verifier, split_scaling
from decode.scaling.vlm import VLMVerifier, first_token_ids

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "possible", "impossible", "yes", "Yes", "no", "USER:",
         "ASSISTANT:"] + [f"w{i}" for i in range(60)]
TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
            "<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    """A tiny random LLaVA (CLIP vision 32 px, a 1-layer Llama) with a word-level tokenizer, saved."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                   crop_size={"height": 32, "width": 32}),
                               tokenizer=fast, patch_size=16, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=TEMPLATE)
    config = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                        num_attention_heads=2, image_size=32, patch_size=16),
                         text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=len(WORDS),
                                                 max_position_embeddings=128),
                         image_token_id=vocab["<image>"], vision_feature_select_strategy="default")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_vlm")
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def favour(verifier: VLMVerifier, word: str) -> None:
    """Make the model's head put (nearly) all first-token mass on `word`."""
    head = verifier.model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight.data.copy_(head.weight.data)
    biased.bias.data.zero_()
    biased.bias.data[WORDS.index(word)] = 100.0
    verifier.model.lm_head = biased


def canvases(n=4):
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_the_verifier_answers_the_contract(tiny_vlm):
    v = VLMVerifier.from_folder(str(tiny_vlm))
    prompts = ["w1 w2"] * 4
    assert len(v.prune(prompts, canvases(), 0.25)) == 4
    scores = v.rank(prompts, canvases())
    assert len(scores) == 4 and all(0.0 <= s <= 1.0 for s in scores)
    refined = v.reformulate(prompts, canvases(), 0.5)
    assert all(r == "w1 w2" or "w1 w2" in r for r in refined)  # a random model's text does not keep the prompt


@pytest.mark.parametrize("word,possible", [("impossible", False), ("possible", True)])
def test_pruning_reads_the_answers_first_token(tiny_vlm, word, possible):
    v = VLMVerifier.from_folder(str(tiny_vlm))
    favour(v, word)
    assert v.prune(["w1"] * 3, canvases(3), 0.5) == [possible] * 3


@pytest.mark.parametrize("word,high", [("yes", True), ("Yes", True), ("no", False)])
def test_ranking_is_the_probability_of_yes(tiny_vlm, word, high):
    v = VLMVerifier.from_folder(str(tiny_vlm))
    assert v.answer_ids["yes"] == sorted([WORDS.index("yes"), WORDS.index("Yes")])
    favour(v, word)
    assert all((s > 0.99) if high else (s < 0.01) for s in v.rank(["w1"] * 2, canvases(2)))


def test_reformulating_keeps_an_answer_only_when_it_keeps_the_prompt(tiny_vlm):
    """Greedy text through generate: "w1 w1 ..." keeps the prompt "w1"; "possible possible ..." drops it."""
    v = VLMVerifier.from_folder(str(tiny_vlm))
    v.max_new_tokens = 6
    favour(v, "w1")
    assert v.reformulate(["w1", "w1 w2"], canvases(2), 0.25) == ["w1 w1 w1 w1 w1 w1", "w1 w2"]
    favour(v, "possible")
    assert v.reformulate(["w1"], canvases(1), 0.25) == ["w1"]


def test_answer_tokens_skip_whitespace_pieces():
    """A SentencePiece-like tokenizer splits " yes" into a lone "▁" and "yes": the answer is "yes"."""
    class Pieces:
        unk_token_id = 0
        vocab = {"<unk>": 0, "▁": 1, "yes": 2, "Yes": 3}

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": ([1] if text.startswith(" ") else []) + [self.vocab.get(text.strip(), 0)]}

        def decode(self, ids):
            return " " if ids == [1] else next(w for w, i in self.vocab.items() if i == ids[0])

    assert first_token_ids(Pieces(), ("yes", "Yes", "YES")) == [2, 3]


def test_a_refined_prompt_must_keep_the_original():
    assert VLMVerifier._refined("a red cat", ' "A red cat, on the left" ') == "A red cat, on the left"
    assert VLMVerifier._refined("a red cat", "a dog") == "a red cat"
    assert VLMVerifier._refined("a red cat", "") == "a red cat"
    assert VLMVerifier._refined("a red cat.", 'Sure: "a red  cat, on the left".') == "a red cat, on the left"


def test_folders_that_are_not_vision_language_models_are_refused(tmp_path, tiny_vlm):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="a_file' is not a folder"):
        VLMVerifier.from_folder(str(tmp_path / "a_file"))
    with pytest.raises(ValueError, match="no config.json"):
        VLMVerifier.from_folder(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not an image-text-to-text"):
        VLMVerifier.from_folder(str(tmp_path))
    bare = tmp_path / "weights_only"
    bare.mkdir()
    shutil.copy(tiny_vlm / "config.json", bare)
    with pytest.raises(ValueError, match="weights_only has no processor"):
        VLMVerifier.from_folder(str(bare))
    chatless = tmp_path / "chatless"
    shutil.copytree(tiny_vlm, chatless)
    (chatless / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="chatless has no chat template"):
        VLMVerifier.from_folder(str(chatless))
    plan, _, _ = split_scaling({"name": "gridar", "verifier": str(tiny_vlm)})

    class Parts:
        class target:
            device = torch.device("cpu")

    assert isinstance(make_verifier(plan, Parts()), VLMVerifier)


def test_gridar_searches_a_transformers_target_with_the_vlm_verifier(tiny_vlm):
    """The real-target path end to end: tiny Janus-Pro candidates, judged and ranked by the tiny VLM."""
    from decode.api import Components
    from decode.core.engine import Method
    from decode.core.sampling import SamplingParams
    from decode.models.prompt_ids import HashIds
    from decode.models.target.hf_target import OwnTokenizer
    from decode.models.target.janus import load_janus
    from decode.scaling.gridar import GridAR, gridar

    target = load_janus(tiny_random=True, max_prompt=16)
    parts = Components(target, OwnTokenizer(target), HashIds(max_length=16))
    verifier = VLMVerifier.from_folder(str(tiny_vlm))
    favour(verifier, "impossible")  # every candidate impossible: groups are kept whole and counted
    out = gridar(parts, "a red star", Method(), [0, 1, 2, 3], SamplingParams(temperature=1.0), verifier, GridAR())
    assert out.tokens.shape == (4, 16) and out.images.shape == (4, 3, 64, 64)
    assert out.pruned == [4, 4] and out.all_impossible == [1, 1] and out.verifier_calls == 20
