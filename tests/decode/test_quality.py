"""The evaluator's caption parser and alignment, precision/recall and FID: invariants on tiny inputs."""
import pytest
import torch
from torch import nn

from data.world import SceneGenerator, evaluator_labels
from decode.evaluation.world_evaluator import (AttributeEvaluator, CaptionParser, EvaluatorConfig, Prediction,
                                                alignment_scores, attribute_accuracy, load_evaluator)
from decode.evaluation.quality import fid, inception_path, precision_recall


@pytest.fixture(scope="module")
def config() -> EvaluatorConfig:
    return EvaluatorConfig(**evaluator_labels(), width=8)


def test_parser_reads_every_generated_caption_back(config):
    parse, gen = CaptionParser(config), SceneGenerator(image_size=32, seed=3)
    for i in range(300):
        scene = gen.scene(i)
        assert parse(scene.caption) == scene.attributes, scene.caption


def test_parser_rejects_text_outside_the_grammar(config):
    parse = CaptionParser(config)
    assert parse("a photograph of the moon") is None
    assert parse("a small red circle in the center") is None  # no background: not a full world caption


def _prediction_from(targets: dict, batch: int) -> Prediction:
    return Prediction(**{k: v.clone() for k, v in targets.items()}, features=torch.zeros(batch, 1))


def test_alignment_is_one_for_the_truth_and_zero_when_all_is_wrong(config):
    gen = SceneGenerator(image_size=32, seed=0)
    attrs = [gen.scene(i).attributes for i in range(6)]
    targets = AttributeEvaluator(config).targets(attrs)
    assert torch.equal(alignment_scores(_prediction_from(targets, 6), targets), torch.ones(6))
    wrong = _prediction_from(targets, 6)
    wrong.cell_object = (wrong.cell_object + 1) % (1 + len(config.objects))
    wrong.cell_size = (wrong.cell_size + 1) % 3
    wrong.cell_colour = (wrong.cell_colour + 1) % (1 + len(config.colours))
    wrong.bg_pattern = (wrong.bg_pattern + 1) % len(config.patterns)
    wrong.bg_colour = (wrong.bg_colour + 1) % len(config.colours)
    assert torch.equal(alignment_scores(wrong, targets), torch.zeros(6))
    # an empty cell the caption does not mention never counts, whatever is predicted there
    extra = _prediction_from(targets, 6)
    extra.cell_object[targets["cell_object"] == 0] = 5
    assert torch.equal(alignment_scores(extra, targets), torch.ones(6))


def test_attribute_accuracy_tells_a_misplaced_object_from_a_missing_one(config):
    gen = SceneGenerator(image_size=32, seed=0)
    attrs = [gen.scene(i).attributes for i in range(6)]
    targets = AttributeEvaluator(config).targets(attrs)
    truth = attribute_accuracy(_prediction_from(targets, 6), targets)
    assert all(v == 1.0 for v in truth.values()), truth
    moved = _prediction_from(targets, 6)
    moved.cell_object = moved.cell_object.roll(1, dims=1)  # every object one cell on
    acc = attribute_accuracy(moved, targets)
    assert acc["object_anywhere"] == 1.0 and acc["object"] < 0.5 and acc["bg_pattern"] == 1.0
    gone = _prediction_from(targets, 6)
    gone.cell_object.zero_()
    assert attribute_accuracy(gone, targets)["object_anywhere"] == 0.0


def test_evaluator_round_trips_through_its_folder(config, tmp_path):
    from decode.models.checkpoint import save_model_folder

    model = AttributeEvaluator(config).eval()
    save_model_folder(tmp_path / "ev", model, config.to_dict(), kind="world_evaluator")
    loaded = load_evaluator(tmp_path / "ev")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(model.predict(x).features, loaded.predict(x).features)
    assert loaded.predict(torch.zeros(1, 3, 32, 32)).cell_object.shape == (1, 9)  # other sizes are resized


def test_precision_recall_bounds():
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x.clone()) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)
    # fakes collapsed onto one real sample: precise, but they cover little of the real set
    p, r = precision_recall(x, x[:1].repeat(40, 1) + 1e-6)
    assert p == 1.0 and r < 0.3
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(x[:3], x[:3])


class _TinyFeature(nn.Module):
    num_features = 4

    def forward(self, images):
        x = images.float().mean((2, 3))  # [B, 3]
        return torch.cat([x, x.std(1, keepdim=True)], 1)


def test_fid_is_zero_for_one_set_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 200, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    same = fid(real, real, feature=_TinyFeature())
    shifted = fid(real, real + 50, feature=_TinyFeature())
    assert abs(same) < 1e-3 and shifted > 100


def test_inception_weights_are_installed():
    assert inception_path().stat().st_size > 50_000_000


def tiny_clip(folder):
    """A randomly initialised CLIP with a character-level tokenizer, saved like a downloaded one."""
    import json
    import string

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase) + [",", "."]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    eos = vocab["<|endoftext|>"]
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(folder)
    image_proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_proc, tokenizer=tok).save_pretrained(folder)
    return folder


def test_clip_score_is_the_raw_cosine_with_the_prefixed_prompt(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    from decode.evaluation.quality import CLIPScorer

    folder = tiny_clip(tmp_path / "clip")
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    prompts = ["a red cat", "two blue dots"]
    scores = CLIPScorer(folder)(images, prompts)
    model, proc = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    x = proc(text=["A photo depicts " + p for p in prompts], images=list(images), return_tensors="pt", padding=True)
    out = model(**x)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    assert scores == pytest.approx(cos.tolist(), abs=1e-5)
    with pytest.raises(FileNotFoundError, match="CLIP folder"):
        CLIPScorer(tmp_path / "nothing")
