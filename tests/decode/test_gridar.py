"""GridAR and Best-of-N on the engine: anchors, costs, the verifier contract, the world verifier, inputs."""
import hashlib

import pytest
import torch

from decode.api import Components
from decode.core.engine import Method
from decode.models.text import TextFeatures
from decode.models.vq import load_vq
from decode.resolvers import REPO
from decode.scaling.config import split_scaling
from decode.scaling.gridar import GridAR, anchors, best_of_n, gridar, tiled_canvas
from decode.scaling.verifiers import WorldVerifier, visible_cell_rows
from decode.strategies.registry import build_method
from tests.decode.test_speculative import SAMPLED, world


class HashText:
    """A text encoder stand-in: each prompt's features are drawn from its hash (8 slots of 12)."""
    dim, max_length = 12, 8

    def encode(self, prompts):
        rows = [torch.randn(8, 12, generator=torch.Generator().manual_seed(
            int.from_bytes(hashlib.sha256(p.encode()).digest()[:4], "little"))) for p in prompts]
        return TextFeatures(emb=torch.stack(rows), mask=torch.ones(len(prompts), 8, dtype=torch.bool))


class Scripted:
    """A verifier that answers from a script and records what it was asked."""

    def __init__(self, prune_answers, refined=None):
        self.prune_answers, self.refined, self.asked = list(prune_answers), refined, []

    def prune(self, prompts, canvases, visible):
        self.asked.append(("prune", len(prompts), tuple(canvases.shape), visible))
        return self.prune_answers.pop(0)

    def reformulate(self, prompts, canvases, visible):
        self.asked.append(("reformulate", len(prompts), visible))
        return [self.refined or p for p in prompts]

    def rank(self, prompts, images):
        self.asked.append(("rank", len(prompts)))
        return [float(i) for i in range(len(prompts))]  # the last candidate wins


def parts():
    target, drafter, _, codebook = world(1)
    vq = load_vq(None, codebook_size=64, encoder_ch_mult=[1, 1, 1], decoder_ch_mult=[1, 1, 1], z_channels=32, ch=32)
    return Components(target, vq.eval(), HashText(), drafter), codebook


def test_impossible_candidates_take_a_possible_one_of_their_group_round_robin():
    assert anchors([False, True, False, False]) == ([1, 1, 1, 1], 0)
    assert anchors([True, False, True, False, False, False, False, False]) == ([0, 0, 2, 2, 4, 5, 6, 7], 1)


def test_a_partial_canvas_tiles_its_rows_down():
    tokens = torch.arange(8).view(1, 8)  # two rows of a 4-wide grid
    assert tiled_canvas(tokens, 4, 4).view(4, 4)[:, 0].tolist() == [0, 4, 0, 4]


def test_gridar_anchors_copies_and_counts_its_cost():
    p, codebook = parts()
    verifier = Scripted([[False, True, True, True], [True] * 4])
    out = gridar(p, "a prompt", Method(), [0, 1, 2, 3], SAMPLED, verifier)
    k1 = 2 * 8  # the top quarter of an 8 x 8 grid: 2 rows
    assert torch.equal(out.tokens[0, :k1], out.tokens[1, :k1])   # slot 0 continued from candidate 1's anchor
    assert not torch.equal(out.tokens[0, k1:], out.tokens[1, k1:])  # with its own random stream
    assert out.target_passes == 4 * 64  # AR: one pass per token and candidate, the stages' prefills included
    assert out.verifier_calls == 4 * 2 + 4 * 2 + 4 and out.pruned == [1, 0] and out.best == 3
    assert [a[0] for a in verifier.asked] == ["prune", "reformulate", "prune", "reformulate", "rank"]
    assert verifier.asked[0][3] == 0.25 and verifier.asked[2][3] == 0.5
    assert out.guided_rows == 2 * 16 * 4 + 3 * 16 * 4 + 3 * 32 * 4  # 3-way guidance after the first reformulation


@pytest.mark.parametrize("name", ["eagle2", "vvs"])
def test_gridar_candidates_decode_with_speculative_methods(name):
    p, codebook = parts()
    method = build_method(name, sampling=SAMPLED, drafter=p.drafter, codebook=codebook, options=None)
    out = gridar(p, "a prompt", method, [0, 1, 2, 3], SAMPLED, Scripted([[True] * 4] * 2, refined="other"))
    assert out.tokens.shape == (4, 64) and out.prompts == ["other"] * 4
    assert out.target_passes < 4 * 64  # drafts were accepted


def test_best_of_n_ranks_every_candidate():
    p, _ = parts()
    out = best_of_n(p, "a prompt", Method(), list(range(8)), SAMPLED, Scripted([]))
    assert out.best == 7 and out.target_passes == 8 * 64 and out.verifier_calls == 8


def test_the_world_verifier_reads_its_captions_and_writes_what_is_left():
    from data.world import SceneGenerator
    from decode.evaluation.world_evaluator import load_evaluator

    evaluator = load_evaluator(REPO / "models" / "world" / "evaluator")
    verifier = WorldVerifier(evaluator)
    gen = SceneGenerator(64, seed=11, world=evaluator.config.world)
    scenes = [gen.scene(i) for i in range(24)]
    for s in scenes:  # its own captions parse back to the scene
        a = s.attributes
        assert verifier.parse(verifier.caption(a["objects"], a["background"])) == verifier.parse(s.caption)
    images = torch.stack([torch.from_numpy(__import__("numpy").array(s.image)).permute(2, 0, 1) for s in scenes])
    images = images.float() / 127.5 - 1
    own = verifier.prune([s.caption for s in scenes], images, 0.5)
    swapped = verifier.prune([scenes[(i + 1) % 24].caption for i in range(24)], images, 0.5)
    assert sum(own) >= 22 and sum(swapped) <= 6  # confident contradictions only (~2 % and ~92 % judged impossible)
    # nothing wholly visible yet, or nothing left: the prompt stays; else the objects still to draw
    caption = scenes[0].caption
    assert verifier.reformulate([caption], images[:1], 0.25) == [caption]
    left = [o for o in scenes[0].attributes["objects"] if o["cell"] not in evaluator.config.cells[:3]]
    refined = verifier.reformulate([caption], images[:1], 0.5)[0]
    if left and len(left) < len(scenes[0].attributes["objects"]):
        assert verifier.parse(refined)["objects"] == left
    else:
        assert refined == caption
    assert visible_cell_rows(0.25) == 0 and visible_cell_rows(0.5) == 1 and visible_cell_rows(1.0) == 3
    with pytest.raises(ValueError, match="world's grammar"):
        verifier.rank(["a photo of a cat"], images[:1])


@pytest.mark.parametrize("options, match", [
    ({"name": "gridar", "candidates": 6}, "multiple of 4"),
    ({"name": "gridar", "stages": [0.5, 0.25]}, "increasing"),
    ({"name": "gridar", "verifier": "/no/such/vlm"}, "no such folder"),
    ({"name": "gridar", "certainty": 0.3}, "certainty"),
    ({"name": "gridar", "verifier": str(REPO / "docs")}, "not a model folder"),
    ({"name": "best_of_n", "stages": [0.25]}, "GridAR knob"),
    ({"name": "vvs", "candidates": 4}, "test-time scaling"),
    ({"name": "gridar", "decode": "best_of_n"}, "is a scaling"),
])
def test_bad_scaling_settings_fail_before_any_model_loads(options, match):
    with pytest.raises(ValueError, match=match):
        split_scaling(options)


def test_gridar_config_splits_into_its_settings_and_the_candidates_method():
    plan, name, options = split_scaling({"name": "gridar", "decode": "vvs", "tau": 0.8, "candidates": 8})
    assert name == "vvs" and options == {"tau": 0.8}
    assert plan.gridar == GridAR(8) and plan.verifier == "world"
    with pytest.raises(ValueError, match="multiple of 4"):
        GridAR(2)


def test_stages_that_round_to_the_same_row_or_the_whole_grid_are_refused():
    from decode.scaling.gridar import stage_ends

    assert stage_ends([0.25, 0.5], 16, 16) == [64, 128]
    with pytest.raises(ValueError, match=r"round to grid rows \[1, 1\] of 4"):
        stage_ends([0.2, 0.3], 4, 4)
    with pytest.raises(ValueError, match="before the last row"):
        stage_ends([0.5, 0.97], 16, 16)
