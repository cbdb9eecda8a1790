"""The Lumina-mGPT (Chameleon) adapter over transformers: the engine's compact image vocabulary, the
forced row-end newline, header-only unconditional guidance, cached tree passes = teacher forcing, and
greedy AR through the engine = a greedy loop over the model's own forward."""
import pytest
import torch

from decode.core.engine import Method, generate
from decode.core.sampling import SamplingParams, row_generators
from decode.core.trees import ancestry_mask
from decode.models.target import Condition
from decode.models.target.chameleon import load_chameleon
from decode.strategies.registry import build_method

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def lumina():
    return load_chameleon(tiny_random=True, grid=4, cfg_scale=3.0, max_prompt=8)


def prompt(batch=1, length=8, seed=0):
    body = torch.randint(10, 40, (batch, length - 4), generator=torch.Generator().manual_seed(seed)) + 60
    header = torch.tensor([[5, 20, 20]]).expand(batch, 3)  # <boi>, two size tokens
    return torch.cat([torch.ones(batch, 1, dtype=torch.long), body, header], 1)


def own_greedy(t, ids, n):
    """Greedy image decoding by the transformers model's own forward, re-run over the whole sequence each
    token (no cache): CFG against the header alone, the newline forced at row ends, image codes elsewhere.
    The model's forward masks image ids out of its logits (it generates text), so they come from its head."""
    model, cols, out = t.model, t.columns, []
    for j in range(n):
        made = cols[torch.tensor(out, dtype=torch.long)][None]
        cond, uncond = (model.lm_head(model.model(input_ids=torch.cat([s, made], 1)).last_hidden_state[:, -1])[:, cols]
                        for s in (ids, ids[:, -3:]))
        guided = uncond + 3.0 * (cond - uncond)
        out.append(len(cols) - 1 if j % 5 == 4 else int(guided[:, :-1].argmax(-1)))
    return torch.tensor([out])


def test_greedy_ar_through_the_engine_equals_greedy_decoding_by_the_models_forward(lumina):
    ids = prompt()
    mine = generate(lumina, Condition(ids, torch.ones_like(ids, dtype=torch.bool)), num_tokens=20, sampling=GREEDY,
                    method=Method()).tokens
    assert torch.equal(mine, own_greedy(lumina, ids, 20))
    assert len(set(lumina.codes(mine)[0].tolist())) > 3


def test_sampled_images_keep_the_row_structure(lumina):
    ids = prompt(batch=3, seed=1)
    out = generate(lumina, Condition(ids, torch.ones_like(ids, dtype=torch.bool)), num_tokens=20,
                   sampling=SamplingParams(temperature=1.0), method=Method(), generators=row_generators([0, 1, 2]))
    assert lumina.codes(out.tokens).shape == (3, 16)  # raises if a newline is missing or misplaced


def test_a_tree_verified_over_the_cache_gives_each_nodes_teacher_forced_logits(lumina):
    ids = prompt(length=6)
    cond = Condition(ids, torch.ones_like(ids, dtype=torch.bool))
    prefix = torch.tensor([[3, 7, 1, 9, 32, 5]])  # one row and its newline, then a code
    parents = torch.tensor([[-1, 0, 0, 1, 3]])
    nodes = torch.tensor([[2, 30, 11, 32, 4]])
    cache, _ = lumina.start(cond, 14, extra_slots=8)
    lumina.extend(cache, prefix)
    lumina.commit(cache, 6)
    out = lumina.extend(cache, nodes, block_mask=ancestry_mask(parents), depths=torch.tensor([[0, 1, 1, 2, 3]])).logits
    for n in range(5):
        path, m = [], n
        while m >= 0:
            path.insert(0, int(nodes[0, m]))
            m = int(parents[0, m])
        seq = torch.cat([prefix, torch.tensor([path])], 1)
        forced = lumina.teacher_forced(cond, torch.cat([seq, seq[:, :1]], 1)).logits[:, seq.shape[1]]
        torch.testing.assert_close(out[:, n], forced, rtol=1e-4, atol=1e-4)


def test_exact_jacobi_decoding_equals_ar_on_lumina(lumina):
    ids = prompt(batch=2, seed=2)
    cond = Condition(ids, torch.ones_like(ids, dtype=torch.bool))
    ar = generate(lumina, cond, num_tokens=20, sampling=GREEDY, method=Method()).tokens
    sjd = generate(lumina, cond, num_tokens=20, sampling=GREEDY, method=build_method("sjd", sampling=GREEDY,
                   options={"window": 4}), generators=row_generators([0, 1])).tokens
    assert torch.equal(sjd, ar)


def test_bad_chameleon_inputs_are_refused(lumina, tmp_path):
    with pytest.raises(ValueError, match="row structure"):
        lumina.codes(torch.zeros(1, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="positions"):
        load_chameleon(tiny_random=True, grid=40)  # the tiny model has 256 positions
    (tmp_path / "config.json").write_text('{"model_type": "janus"}')
    with pytest.raises(ValueError, match="expects Lumina-mGPT"):
        load_chameleon(str(tmp_path))


def test_greedy_eagle2_gives_greedy_ar_on_lumina(lumina):
    from decode.models.drafter import Drafter, DrafterConfig

    torch.manual_seed(0)
    drafter = Drafter(DrafterConfig.for_target(lumina)).eval()
    ids = prompt(batch=2, seed=3)
    cond = Condition(ids, torch.ones_like(ids, dtype=torch.bool))
    ar = generate(lumina, cond, num_tokens=20, sampling=GREEDY, method=Method()).tokens
    method = build_method("eagle2", sampling=GREEDY, drafter=drafter, codebook=lumina.codebook())
    assert torch.equal(generate(lumina, cond, num_tokens=20, sampling=GREEDY, method=method).tokens, ar)


def test_a_prompt_without_the_image_header_is_refused(lumina):
    ids = prompt()
    with pytest.raises(ValueError, match=r"must end in the image header \[5, 20, 20\]; row 0 ends in"):
        lumina.teacher_forced(Condition(ids[:, :-1], torch.ones_like(ids[:, :-1], dtype=torch.bool)),
                              torch.zeros(1, 4, dtype=torch.long))


def test_lumina_mgpts_header_reads_its_reserved_size_tokens():
    """<reservedN> is token id N + 4 (the newline <reserved08799> is 8803): 768 px, 24 patches of 32 px, is
    <reserved08824> = 8828; the adapter's default header follows the grid."""
    from decode.models.target.chameleon import ChameleonTarget, tiny_chameleon_model

    t = ChameleonTarget(tiny_chameleon_model(0), grid=4, newline_id=4, max_prompt=8)
    assert t.prompt_end == (8197, 8806, 8806)
    from omegaconf import OmegaConf

    from tests.conftest import REPO
    assert OmegaConf.load(REPO / "conf" / "text_encoder" / "lumina_mgpt_prompt.yaml").suffix == [8197, 8828, 8828]
