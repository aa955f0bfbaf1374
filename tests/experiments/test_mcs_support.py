"""saelib.experiments.feature_trees: the minimum support of directed MCS links (a child latent must fire on
at least ``min_support`` tokens), on hand-made activations whose links are known, and the argument for
the recommended floor on random unrelated latents."""

import pytest
import torch

from saelib.experiments import feature_trees as ft

N_TOKENS = 100


def three_levels() -> list[torch.Tensor]:
    """Binary activations over 100 tokens, every link known by hand.

    S/1: A0 on tokens 0-49, A1 on tokens 50-99.
    S/2: B0 on tokens 0-29 (a real child of A0: support 30), B1 on token 60 only (support 1: A1 is the
         only latent active there, so its directed cosine with A1 is 1 by chance).
    S/3: C0 on tokens 0-24 (a real child of B0: support 25), C1 on token 5 (support 1) and C2 on
         tokens 0 and 1 (support 2): both sit inside B0, so both get cosine 1 with it.
    With all activations 1, every max is 1, the factor max(B)/max(A) is 1 and each of these links
    scores exactly 1; every other pair scores 0 (the parent is silent on the child's tokens).
    """
    a, b, c = torch.zeros(N_TOKENS, 2), torch.zeros(N_TOKENS, 2), torch.zeros(N_TOKENS, 3)
    a[:50, 0], a[50:, 1] = 1.0, 1.0
    b[:30, 0], b[60, 1] = 1.0, 1.0
    c[:25, 0], c[5, 1], c[:2, 2] = 1.0, 1.0, 1.0
    return [a, b, c]


def test_a_one_token_child_links_by_chance_without_the_floor_and_not_with_it():
    a, b, _ = three_levels()
    expected = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # A0 -> B0 (real) and A1 -> B1 (one token)
    assert torch.equal(ft.directed_mcs(a, b), expected)
    assert torch.equal(ft.directed_mcs(a, b, min_support=None), expected)  # None: no floor, as before
    # B1 fires on 1 token < 20: its column is zeroed; B0 (30 tokens) keeps its score
    assert torch.equal(ft.directed_mcs(a, b, min_support=20), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    # the floor is "at least": a support of exactly 30 passes a floor of 30, not one of 31
    assert torch.equal(ft.directed_mcs(a, b, min_support=30), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(ft.directed_mcs(a, b, min_support=31), torch.zeros(2, 2))
    # the floor applies to the unscaled cosine as well
    assert torch.equal(ft.directed_mcs(a, b, scale_by_max=False, min_support=2), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_the_floor_zeroes_exactly_the_columns_of_rarely_active_children():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(300, 6, generator=g) * (torch.rand(300, 6, generator=g) < 0.4)
    # child j fires on the first 2 * j + 1 tokens where it would fire at random: supports 1, 3, 5, ...
    b = torch.rand(300, 8, generator=g) * (torch.rand(300, 8, generator=g) < 0.5)
    for j in range(8):
        on = b[:, j].nonzero().flatten()
        b[on[2 * j + 1:], j] = 0.0
    support = (b > 0).sum(0)
    assert support.tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    plain = ft.directed_mcs(a, b)
    floored = ft.directed_mcs(a, b, min_support=7)
    assert torch.equal(floored[:, :3], torch.zeros(6, 3))  # supports 1, 3, 5 < 7
    assert torch.equal(floored[:, 3:], plain[:, 3:])  # supports >= 7: untouched, bit for bit
    assert plain[:, :3].abs().sum() > 0  # (the zeroed columns did have scores)


def test_dag_without_floor_keeps_every_link_and_records_none_removed():
    dag = ft.build_feature_dag(three_levels())
    assert sorted(dag.edges) == [((0, 0), (1, 0)), ((0, 1), (1, 1)),
                                 ((1, 0), (2, 0)), ((1, 0), (2, 1)), ((1, 0), (2, 2))]
    assert all(d["score"] == 1.0 for _, _, d in dag.edges(data=True))
    assert dag.graph["min_support"] is None and dag.graph["removed_by_support"] == [0, 0]


def test_dag_floor_removes_the_rare_children_links_and_counts_them_per_level():
    dag = ft.build_feature_dag(three_levels(), min_support=ft.MIN_SUPPORT)
    assert sorted(dag.edges) == [((0, 0), (1, 0)), ((1, 0), (2, 0))]  # the two real links
    # S/1 -> S/2: A1 -> B1 (support 1); S/2 -> S/3: B0 -> C1 (support 1) and B0 -> C2 (support 2)
    assert dag.graph["removed_by_support"] == [1, 2] and dag.graph["min_support"] == 20
    # the rare children stay as nodes (alive latents), only their links go
    assert (1, 1) in dag and (2, 1) in dag and (2, 2) in dag
    # a floor of 2 keeps C2 (support 2) and removes the two one-token children
    low = ft.build_feature_dag(three_levels(), min_support=2)
    assert ((1, 0), (2, 2)) in low.edges and low.graph["removed_by_support"] == [1, 1]


def test_floor_applies_to_symmetric_links_too():
    # symmetric MCS of A1 and B1: on B1's one token the cosine is 1, so it links without the floor
    a, b, _ = three_levels()
    plain = ft.build_feature_dag([a, b], score="symmetric")
    floored = ft.build_feature_dag([a, b], score="symmetric", min_support=20)
    assert ((0, 1), (1, 1)) in plain.edges and ((0, 1), (1, 1)) not in floored.edges
    assert floored.graph["removed_by_support"] == [1]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "20"])
def test_min_support_must_be_a_positive_integer(bad):
    a, b, _ = three_levels()
    with pytest.raises(ValueError, match="min_support"):
        ft.directed_mcs(a, b, min_support=bad)
    with pytest.raises(ValueError, match="min_support"):
        ft.build_feature_dag([a, b], min_support=bad)


def test_recommended_floor_leaves_no_chance_link_between_unrelated_latents():
    # the module docstring's argument: 300 parents of density 0.03 (about L0 / d_sae of notebook 08's S/1)
    # and 100 children, all independent of each other. A child on 1 token links to every parent active
    # there whose score clears 0.6 (about 0.03 * 300 = 9 per child); a child on MIN_SUPPORT = 20 tokens
    # needs a parent under >= 36 % of its activation (about 8 of its 20 tokens, Binomial(20, 0.03)
    # tail 6e-8): no chance link among the 30,000 pairs.
    g = torch.Generator().manual_seed(0)
    n_tokens = 20_000
    parents = (0.5 + 0.5 * torch.rand(n_tokens, 300, generator=g)) * (torch.rand(n_tokens, 300, generator=g) < 0.03)

    def children(support: int) -> torch.Tensor:
        acts = torch.zeros(n_tokens, 100)
        for j in range(100):
            acts[torch.randperm(n_tokens, generator=g)[:support], j] = 0.5 + 0.5 * torch.rand(support, generator=g)
        return acts

    one_token = children(1)
    rare = ft.directed_mcs(parents, one_token) >= ft.MCS_THRESHOLD
    assert rare.sum() > 300 and rare.any(0).float().mean() > 0.6  # most one-token children link by chance
    assert (ft.directed_mcs(parents, children(ft.MIN_SUPPORT)) >= ft.MCS_THRESHOLD).sum() == 0
    # and the floor removes every one of the one-token children's links
    assert (ft.directed_mcs(parents, one_token, min_support=ft.MIN_SUPPORT) > 0).sum() == 0
