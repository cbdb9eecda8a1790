"""The Janus-Pro adapter over transformers: its passes equal the model's own, tree verification over the
engine's cache equals teacher forcing, and greedy AR through the engine equals the model's `generate`."""
import pytest
import torch

from decode.core.engine import Method, generate
from decode.core.sampling import SamplingParams, row_generators
from decode.core.trees import ancestry_mask
from decode.models.target import Condition
from decode.models.target.janus import load_janus
from decode.strategies.registry import build_method

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def janus():
    return load_janus(tiny_random=True, seed=0, cfg_scale=3.0, max_prompt=8)


def prompt_ids(batch=2, length=5, seed=0):
    body = torch.randint(3, 100, (batch, length - 2), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.ones(batch, 1, dtype=torch.long), body, torch.full((batch, 1), 2)], 1)  # BOS ... BOI


def own_logits(model, ids, tokens, scale):
    """The model's own forward: text embeddings of the prompt, generation embeddings of the image tokens."""
    uncond = torch.where((ids == 1) | (ids == 2), ids, torch.zeros_like(ids))
    out = []
    for x in (ids, uncond):
        emb = torch.cat([model.get_input_embeddings()(x), model.prepare_embeddings_for_image_generation(tokens)], 1)
        h = model.model.language_model(inputs_embeds=emb).last_hidden_state
        out.append(model.model.generation_head(h[:, x.shape[1] - 1:-1]))
    return out[1] + scale * (out[0] - out[1])


def test_teacher_forced_logits_equal_the_models_own_forward(janus):
    ids = prompt_ids(length=8)  # a full-length prompt: no padding, the model's positions are ours
    tokens = torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(1))
    mine = janus.teacher_forced(Condition(ids, torch.ones_like(ids, dtype=torch.bool)), tokens).logits
    torch.testing.assert_close(mine, own_logits(janus.model, ids, tokens, 3.0), rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_a_prompts_logits(janus):
    ids = prompt_ids(length=5)
    tokens = torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(2))
    padded = janus.teacher_forced(Condition(ids, torch.ones_like(ids, dtype=torch.bool)), tokens).logits
    torch.testing.assert_close(padded, own_logits(janus.model, ids, tokens, 3.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_the_adapters_masks_hold_under_every_attention_implementation(attention):
    """The adapter's 4-D masks reach transformers' attention as given: right under eager attention (which
    adds the mask to the scores) as under sdpa."""
    janus = load_janus(tiny_random=True, seed=0, cfg_scale=3.0, max_prompt=8)
    janus.model.set_attn_implementation(attention)
    ids = prompt_ids(length=5)  # padded to 8: the padding is masked out
    tokens = torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(2))
    mine = janus.teacher_forced(Condition(ids, torch.ones_like(ids, dtype=torch.bool)), tokens).logits
    torch.testing.assert_close(mine, own_logits(janus.model, ids, tokens, 3.0), rtol=1e-5, atol=1e-5)


def test_a_tree_verified_over_the_cache_gives_each_nodes_teacher_forced_logits(janus):
    ids = prompt_ids(batch=1, length=6)
    cond = Condition(ids, torch.ones_like(ids, dtype=torch.bool))
    prefix = torch.randint(64, (1, 5), generator=torch.Generator().manual_seed(3))
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2, 4]])
    nodes = torch.randint(64, (1, 7), generator=torch.Generator().manual_seed(4))
    cache, _ = janus.start(cond, 11, extra_slots=8)
    janus.extend(cache, prefix)
    janus.commit(cache, 5)
    depth = torch.tensor([[0, 1, 1, 2, 2, 2, 3]])
    out = janus.extend(cache, nodes, block_mask=ancestry_mask(parents), depths=depth).logits
    for n in range(7):
        path, m = [], n
        while m >= 0:
            path.insert(0, int(nodes[0, m]))
            m = int(parents[0, m])
        seq = torch.cat([prefix, torch.tensor([path])], 1)
        forced = janus.teacher_forced(cond, torch.cat([seq, seq[:, :1]], 1)).logits[:, seq.shape[1]]
        torch.testing.assert_close(out[:, n], forced, rtol=1e-4, atol=1e-4)


def test_greedy_ar_through_the_engine_equals_the_models_generate(janus):
    ids = prompt_ids(batch=1, length=8)
    mine = generate(janus, Condition(ids, torch.ones_like(ids, dtype=torch.bool)), num_tokens=16, sampling=GREEDY,
                    method=Method()).tokens
    own = janus.model.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", do_sample=False,
                               guidance_scale=3.0)
    assert len(set(own[0].tolist())) > 3  # a model that draws something, or the test proves little
    assert torch.equal(mine, own)


@pytest.mark.parametrize("name", ["sjd", "mc_sjd", "zipar"])
def test_training_free_methods_run_on_janus(janus, name):
    ids = prompt_ids(batch=2, length=6)
    cond = Condition(ids, torch.ones_like(ids, dtype=torch.bool))
    ar = generate(janus, cond, num_tokens=16, sampling=GREEDY, method=Method()).tokens
    options = {"row_window": 4, "max_rows": 4} if name == "zipar" else {"window": 4}  # zipar: a whole-row window
    method = build_method(name, sampling=GREEDY, options=options)
    out = generate(janus, cond, num_tokens=16, sampling=GREEDY, method=method, generators=row_generators([0, 1]))
    assert torch.equal(out.tokens, ar)  # exact methods, and next-set decoding whose window is a whole row: AR


def test_a_folder_of_another_family_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "chameleon"}')
    with pytest.raises(ValueError, match="expects a Janus-Pro"):
        load_janus(str(tmp_path))
    with pytest.raises(ValueError, match="no config.json"):
        load_janus(str(tmp_path / "missing"))


@pytest.mark.parametrize("name", ["eagle2", "lantern_pp"])
def test_greedy_drafts_of_an_eagle_drafter_give_greedy_ar_on_janus(janus, name):
    from decode.models.drafter import Drafter, DrafterConfig

    torch.manual_seed(0)
    drafter = Drafter(DrafterConfig.for_target(janus)).eval()  # untrained: exactness does not need a good one
    ids = prompt_ids(batch=2, length=6)
    cond = Condition(ids, torch.ones_like(ids, dtype=torch.bool))
    ar = generate(janus, cond, num_tokens=16, sampling=GREEDY, method=Method()).tokens
    options = {"lam": 1.0} if name == "lantern_pp" else None  # lambda 1: LANTERN++'s rule is exact
    method = build_method(name, sampling=GREEDY, drafter=drafter, codebook=janus.codebook(), options=options)
    assert torch.equal(generate(janus, cond, num_tokens=16, sampling=GREEDY, method=method).tokens, ar)


def test_a_prompt_that_does_not_end_in_begin_of_image_is_refused(janus):
    ids = prompt_ids(length=5)[:, :-1]
    with pytest.raises(ValueError, match=r"must end in the image header \[2\]"):
        janus.teacher_forced(Condition(ids, torch.ones_like(ids, dtype=torch.bool)), torch.zeros(2, 4, dtype=torch.long))
