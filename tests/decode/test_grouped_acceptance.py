"""GSD's grouped acceptance (ALGORITHMS.md 7.1): which tokens form a draft's group, the law of the
committed token (accept x with probability min(1, p(G) / q(G)), else the residual), that a group of
one is exact speculative sampling, and the method's composition by name."""
import pytest
import torch

from decode.core.sampling import SamplingParams, row_generators
from decode.core.trees import Tree, TreeParams, ancestry_mask
from decode.strategies.acceptance import Grouping, SampledAcceptance, make_acceptance
from decode.strategies.registry import build_method, resolve_method
from tests.decode.test_speculative import SAMPLED, world

V = 6
P = torch.tensor([0.05, 0.20, 0.15, 0.25, 0.10, 0.25])
# unit rows on a circle: tokens 1, 2, 4 close together (angles 0, 20, 30 degrees), the rest far apart
ANGLES = torch.tensor([180.0, 0.0, 20.0, 90.0, 30.0, 270.0]).deg2rad()
EMB = torch.stack([ANGLES.cos(), ANGLES.sin()], 1)


def test_a_group_holds_close_ranks_close_probabilities_and_close_embeddings():
    g = Grouping(EMB, ranks=7, p_gap=0.15, max_sq_dist=0.5)
    # token 1 (p 0.20): near in embedding are 2 (0.15) and 4 (0.10); 4 is 0.10 away in probability
    assert sorted(g.group(P, 1).tolist()) == [1, 2, 4]
    assert sorted(Grouping(EMB, ranks=7, p_gap=0.08).group(P, 1).tolist()) == [1, 2]  # 4 too unlikely now
    assert sorted(Grouping(EMB, ranks=1, p_gap=0.15).group(P, 1).tolist()) == [1, 2]  # 4 is two ranks below
    assert g.group(P, 3).tolist() == [3]  # nothing near it in embedding
    assert Grouping(EMB, ranks=0).group(P, 1).tolist() == [1]


def _first_tokens(grouping, child: int, n: int) -> torch.Tensor:
    parents = torch.tensor([[-1, 0]]).expand(n, -1)
    tokens = torch.tensor([[0, child]]).expand(n, -1)
    tree = Tree(tokens, parents, (parents >= 0).long(), ancestry_mask(parents[:1]).expand(n, -1, -1))
    logits = P.log().expand(n, 2, V).clone()
    verdict = SampledAcceptance(grouping)(tree, logits, SAMPLED, row_generators(list(range(n))))
    nxt = verdict.next_tokens.tolist()
    return torch.tensor([child if len(path) > 1 else nxt[r] for r, path in enumerate(verdict.paths)])


def test_the_committed_token_follows_the_grouped_rule():
    """Deterministic draft 1 (q one-hot): accepted w.p. p(G) = 0.45, else drawn from p with 1 zeroed."""
    n = 6000
    emp = torch.bincount(_first_tokens(Grouping(EMB), 1, n), minlength=V).double() / n
    residual = P.double().clone()
    residual[1] = 0
    law = 0.55 * residual / residual.sum()
    law[1] += 0.45
    assert 0.5 * (emp - law).abs().sum().item() < 0.03, (emp, law)
    assert emp[1] > P[1] + 0.15  # lossy by design: the draft is committed far more often than p says


def test_a_group_of_one_is_exact_speculative_sampling():
    exact = _first_tokens(None, 1, 500)
    grouped = _first_tokens(Grouping(EMB, ranks=0), 1, 500)
    assert torch.equal(exact, grouped)


def test_greedy_grouping_accepts_a_draft_whose_group_holds_the_argmax():
    accept = make_acceptance(SamplingParams(temperature=0.0), Grouping(EMB, p_gap=0.2))
    p = torch.tensor([0.05, 0.20, 0.30, 0.15, 0.10, 0.20])  # argmax 2, in 1's group
    assert accept.relax.greedy_accepts(p, 1)
    assert not accept.relax.greedy_accepts(p, 3)


def test_gsd_by_name_is_jacobi_with_grouped_acceptance_and_composes_with_the_tree():
    cfg = resolve_method("gsd")
    assert (cfg.drafting, cfg.acceptance, cfg.knobs["group_ranks"]) == ("jacobi", "gsd", 7)
    on_tree = resolve_method("eagle2", {"acceptance": "gsd", "group_p_gap": 0.3})
    assert (on_tree.drafting, on_tree.knobs["group_p_gap"]) == ("eagle", 0.3)
    with pytest.raises(ValueError, match="group_sq_dist"):
        resolve_method("gsd", {"group_sq_dist": 5.0})
    with pytest.raises(ValueError, match="codebook"):
        build_method("gsd", sampling=SAMPLED)


@pytest.mark.parametrize("name,opts", [("gsd", dict(window=4, init="random")), ("eagle2", dict(acceptance="gsd"))])
def test_gsd_decodes_in_fewer_passes_than_its_exact_counterpart(name, opts):
    target, drafter, cond, codebook = world(3)
    tree = TreeParams(12, 3, 4)
    n = target.num_image_tokens

    def passes(options):
        method = build_method(name, sampling=SAMPLED, tree=tree, drafter=drafter, codebook=codebook, options=options)
        from decode.core.engine import generate
        return generate(target, cond, num_tokens=n, sampling=SAMPLED, generators=row_generators([0, 1, 2]),
                        method=method).nfe.sum().item()

    exact = passes({**opts, "group_ranks": 0})
    grouped = passes({**opts, "group_p_gap": 1.0, "group_sq_dist": 4.0})  # every near rank joins the group
    assert grouped < exact
