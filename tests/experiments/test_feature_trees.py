"""Tests for saelib.experiments.feature_trees: the batched MCS scores against hand-computed values and a
brute-force loop over latent pairs, and the DAG / tree / absorption helpers on hand-made
three-level activations whose parent -> child structure is known."""

import math

import networkx as nx
import pytest
import torch
from matplotlib.figure import Figure

from saelib.experiments import feature_trees as ft


# ---------------------------------------------------------------------------- brute force
def _cos(u: list[float], v: list[float]) -> float:
    nu = math.sqrt(sum(x * x for x in u))
    nv = math.sqrt(sum(x * x for x in v))
    return 0.0 if nu == 0 or nv == 0 else sum(x * y for x, y in zip(u, v)) / (nu * nv)


def brute_directed(A: torch.Tensor, B: torch.Tensor, scale: bool = True) -> torch.Tensor:
    out = torch.zeros(A.shape[1], B.shape[1], dtype=torch.float64)
    for i in range(A.shape[1]):
        for j in range(B.shape[1]):
            toks = [t for t in range(A.shape[0]) if B[t, j] > 0]
            c = _cos([A[t, i].item() for t in toks], [B[t, j].item() for t in toks])
            if scale:
                ma, mb = A[:, i].max().item(), B[:, j].max().item()
                c = c * (mb / ma) if ma > 0 else 0.0
            out[i, j] = c
    return out


def brute_symmetric(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(A.shape[1], B.shape[1], dtype=torch.float64)
    for i in range(A.shape[1]):
        for j in range(B.shape[1]):
            best = 0.0
            for mask in ([t for t in range(A.shape[0]) if A[t, i] > 0], [t for t in range(A.shape[0]) if B[t, j] > 0]):
                best = max(best, _cos([A[t, i].item() for t in mask], [B[t, j].item() for t in mask]))
            out[i, j] = best
    return out


def sparse_acts(n: int, d: int, p: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g) * (torch.rand(n, d, generator=g) < p)


# ---------------------------------------------------------------------------- scores
def test_directed_mcs_by_hand():
    a = torch.tensor([[1.0], [2.0], [0.0], [3.0]])
    b = torch.tensor([[0.0], [2.0], [1.0], [0.0]])
    # B active on tokens 1, 2: a = (2, 0), b = (2, 1): cos = 4 / (2 sqrt 5); max ratio 2 / 3
    expected_cos = 4 / (2 * math.sqrt(5))
    assert ft.directed_mcs(a, b, scale_by_max=False).item() == pytest.approx(expected_cos, rel=1e-6)
    assert ft.directed_mcs(a, b).item() == pytest.approx(expected_cos * 2 / 3, rel=1e-6)
    # the other direction (b narrower, a wider): a active on 0, 1, 3: b = (0, 2, 0)
    expected_rev = 4 / (2 * math.sqrt(14))
    assert ft.directed_mcs(b, a, scale_by_max=False).item() == pytest.approx(expected_rev, rel=1e-6)
    assert ft.symmetric_mcs(a, b).item() == pytest.approx(max(expected_cos, expected_rev), rel=1e-6)


def test_child_on_subset_scores_one():
    """A child equal to its parent on half of the parent's tokens: cosine 1, ratio of maxima."""
    parent = torch.tensor([[1.0], [2.0], [3.0], [4.0], [0.0]])
    child = torch.tensor([[1.0], [2.0], [0.0], [0.0], [0.0]])
    assert ft.directed_mcs(parent, child, scale_by_max=False).item() == pytest.approx(1.0)
    assert ft.directed_mcs(parent, child).item() == pytest.approx(2 / 4)
    assert ft.symmetric_mcs(parent, child).item() == pytest.approx(1.0)
    assert ft.fraction_outside(parent, child).item() == 0.0
    assert ft.fraction_outside(child, parent).item() == pytest.approx(0.5)
    # parent (1, 2, 3, 4) where the child is silent on tokens 2, 3: mass (3 + 4) / 10
    assert ft.fraction_outside(child, parent, weighted=True).item() == pytest.approx(0.7)


@pytest.mark.parametrize("chunk", [3, 1000])
def test_batched_matches_brute_force(chunk):
    A = sparse_acts(40, 5, 0.4, seed=0)
    B = sparse_acts(40, 7, 0.3, seed=1)
    A[:, 2] = 0.0  # a dead parent
    B[:, 4] = 0.0  # a dead child
    assert torch.allclose(ft.directed_mcs(A, B, chunk_size=chunk).double(), brute_directed(A, B), atol=1e-6)
    assert torch.allclose(ft.directed_mcs(A, B, scale_by_max=False, chunk_size=chunk).double(),
                          brute_directed(A, B, scale=False), atol=1e-6)
    assert torch.allclose(ft.symmetric_mcs(A, B, chunk_size=chunk).double(), brute_symmetric(A, B), atol=1e-6)
    out = ft.fraction_outside(A, B, chunk_size=chunk)
    out_mass = ft.fraction_outside(A, B, weighted=True, chunk_size=chunk)
    for i in range(5):
        for j in range(7):
            on_b = B[:, j] > 0
            expected = 0.0 if on_b.sum() == 0 else ((A[:, i] == 0) & on_b).sum().item() / on_b.sum().item()
            assert out[i, j].item() == pytest.approx(expected)
            mass = B[:, j].sum().item()
            expected_mass = 0.0 if mass == 0 else B[:, j][A[:, i] == 0].sum().item() / mass
            assert out_mass[i, j].item() == pytest.approx(expected_mass, abs=1e-6)
    assert torch.isfinite(ft.directed_mcs(A, B)).all()


@pytest.mark.parametrize(
    "a, b, match",
    [
        (torch.ones(4, 2), torch.ones(5, 2), "same tokens"),
        (-torch.ones(4, 2), torch.ones(4, 2), "negative"),
        (torch.ones(4), torch.ones(4, 2), "n_tokens, d_sae"),
        (torch.full((4, 2), float("nan")), torch.ones(4, 2), "NaN"),
    ],
)
def test_scores_reject_bad_inputs(a, b, match):
    with pytest.raises(ValueError, match=match):
        ft.directed_mcs(a, b)


@pytest.mark.parametrize("score", [ft.directed_mcs, ft.symmetric_mcs, ft.fraction_outside])
def test_scores_reject_zero_tokens(score):
    with pytest.raises(ValueError, match=r"at least one token, got n_tokens=0 \(shapes \(0, 2\) and \(0, 3\)\)"):
        score(torch.zeros(0, 2), torch.zeros(0, 3))


# ---------------------------------------------------------------------------- graphs
def three_levels() -> list[torch.Tensor]:
    """12 tokens. Level 0: P fires on 0-7, Q on 8-11.
    Level 1: C0 on 0-3, C1 on 4-7 (children of P), C2 on 8-11 (child of Q),
             C3 on 3-4 and 8 (overlaps P and Q), C4 dead.
    Level 2: G0 on 0-1 (child of C0), G1 on 2-3 (child of C0; C3 covers half of it),
             G2 on 6-9 (half on C1's tokens, half on C2's)."""
    n = 12
    on = lambda idx, v=1.0: torch.tensor([v if t in idx else 0.0 for t in range(n)])
    lvl0 = torch.stack([on(range(0, 8)), on(range(8, 12))], dim=1)
    lvl1 = torch.stack([on(range(0, 4)), on(range(4, 8)), on(range(8, 12)), on([3, 4, 8]), torch.zeros(n)], dim=1)
    lvl2 = torch.stack([on([0, 1]), on([2, 3]), on([6, 7, 8, 9])], dim=1)
    return [lvl0, lvl1, lvl2]


def test_dag_edges_match_hand_analysis():
    acts = three_levels()
    dag = ft.build_feature_dag(acts, threshold=0.6)
    assert (1, 4) not in dag  # dead latents are left out
    assert dag.number_of_nodes() == 2 + 4 + 3
    # binary activations: directed score = 1 on the child's tokens where the parent fires
    # (fraction f of them) gives cos = sqrt(f), times max ratio 1.
    expected = {
        ((0, 0), (1, 0)): 1.0, ((0, 0), (1, 1)): 1.0, ((0, 1), (1, 2)): 1.0,
        ((0, 0), (1, 3)): math.sqrt(2 / 3),  # C3: 2 of 3 tokens under P
        ((1, 0), (2, 0)): 1.0, ((1, 0), (2, 1)): 1.0,
        ((1, 3), (2, 1)): math.sqrt(1 / 2),  # C3 fires on token 3 of G1's tokens 2, 3
        ((1, 1), (2, 2)): math.sqrt(2 / 4), ((1, 2), (2, 2)): math.sqrt(2 / 4),  # 0.707 each
    }
    got = {(p, c): d["score"] for p, c, d in dag.edges(data=True)}
    assert set(got) == set(expected)
    for e, s in expected.items():
        assert got[e] == pytest.approx(s, rel=1e-6)
    assert dag.edges[(0, 0), (1, 3)]["outside"] == pytest.approx(1 / 3)
    assert dag.edges[(0, 0), (1, 3)]["cosine"] == pytest.approx(math.sqrt(2 / 3))  # max ratio 1 here
    # symmetric MCS of Q and C3: on Q's tokens C3 fires on 1 of 4 (cos sqrt(1/4) = 0.5), on C3's
    # tokens Q fires on 1 of 3 (cos sqrt(1/3) = 0.58): both below 0.6, no edge.
    sym = ft.build_feature_dag(acts, threshold=0.6, score="symmetric")
    assert not sym.has_edge((0, 1), (1, 3))
    assert sym.has_edge((0, 0), (1, 3))


def test_multi_parent_best_parent_and_chain():
    dag = ft.build_feature_dag(three_levels(), threshold=0.6, labels=[["P", "Q"], ["C0", "C1", "C2", "C3", "C4"], ["G0", "G1", "G2"]])
    multi = ft.multi_parent_latents(dag)
    assert [m[0] for m in multi] == [(2, 1), (2, 2)]
    assert [p for p, _ in multi[0][1]] == [(1, 0), (1, 3)]  # best first: 1.0 then 0.707
    assert [p for p, _ in multi[1][1]] == [(1, 1), (1, 2)]  # equal scores: lower index first
    tree = ft.best_parent_tree(dag)
    assert all(tree.in_degree(n) <= 1 for n in tree.nodes)
    assert set(tree.predecessors((2, 2))) == {(1, 1)}
    assert set(tree.predecessors((2, 1))) == {(1, 0)}
    assert tree.number_of_nodes() == dag.number_of_nodes()
    assert len(ft.longest_chain(tree)) == 3  # P -> C0 -> G0: a two-level chain
    sub = ft.descendants_dag(dag, (0, 0))
    assert set(sub.nodes) == {(0, 0), (1, 0), (1, 1), (1, 3), (2, 0), (2, 1), (2, 2)}
    assert dag.nodes[(1, 3)]["label"] == "C3"
    with pytest.raises(KeyError):
        ft.descendants_dag(dag, (5, 0))


def test_absorption_candidates():
    dag = ft.build_feature_dag(three_levels(), threshold=0.6)
    rows = ft.absorption_candidates(dag, min_outside=0.2, by="tokens")
    # G2 fires on 8, 9 without C1 and on 6, 7 without C2 (1/2); G1 fires on 2 without C3 (1/2);
    # C3 fires on token 8 without P (1/3)
    assert [(r["parent"], r["child"]) for r in rows] == [
        ((1, 1), (2, 2)), ((1, 2), (2, 2)), ((1, 3), (2, 1)), ((0, 0), (1, 3))]
    assert [r["outside"] for r in rows] == pytest.approx([0.5, 0.5, 0.5, 1 / 3])
    assert ft.absorption_candidates(dag, min_outside=0.6, by="tokens") == []
    # binary activations: the mass share equals the token share
    assert [r["outside_mass"] for r in ft.absorption_candidates(dag, 0.2)] == pytest.approx([0.5, 0.5, 0.5, 1 / 3])
    with pytest.raises(ValueError, match="by"):
        ft.absorption_candidates(dag, by="count")
    with pytest.raises(ValueError, match="min_outside"):
        ft.absorption_candidates(dag, min_outside=1.5)


def test_build_rejects_bad_input():
    with pytest.raises(ValueError, match="at least two"):
        ft.build_feature_dag([torch.ones(3, 2)])
    with pytest.raises(ValueError, match="labels\\[1\\]"):
        ft.build_feature_dag([torch.ones(3, 2), torch.ones(3, 3)], labels=[["a", "b"], ["c"]])
    with pytest.raises(ValueError, match="score"):
        ft.build_feature_dag([torch.ones(3, 2), torch.ones(3, 3)], score="cosine")


def test_build_rejects_zero_tokens():
    with pytest.raises(ValueError, match=r"acts\[0\] has no tokens \(n_tokens=0, shape \(0, 2\)\)"):
        ft.build_feature_dag([torch.zeros(0, 2), torch.zeros(0, 3)])


# ---------------------------------------------------------------------------- drawing
def test_tree_layout_parents_centred_over_children():
    tree = nx.DiGraph([((0, 0), (1, 0)), ((0, 0), (1, 1)), ((1, 0), (2, 0)), ((1, 0), (2, 1)), ((0, 1), (1, 2))])
    pos = ft.tree_layout(tree)
    assert pos[(2, 0)] == (0.0, -2.0) and pos[(2, 1)] == (1.0, -2.0)
    assert pos[(1, 0)] == (0.5, -1.0)
    assert pos[(1, 1)] == (2.0, -1.0)
    assert pos[(0, 0)][0] == pytest.approx(1.25)
    assert pos[(1, 2)] == (3.0, -1.0) and pos[(0, 1)] == (3.0, 0.0)
    given = ft.tree_layout(tree, x={n: 10.0 * n[1] for n in tree.nodes})
    assert given[(1, 2)] == (20.0, -1.0)
    with pytest.raises(ValueError, match="forest"):
        ft.tree_layout(nx.DiGraph([((0, 0), (1, 0)), ((0, 1), (1, 0))]))


def test_draw_feature_tree_returns_figure():
    dag = ft.build_feature_dag(three_levels(), threshold=0.6)
    tree = ft.best_parent_tree(dag)
    fig = ft.draw_feature_tree(tree, level_names=["S/1", "S/2", "S/3"], extra_edges=dag, title="t")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["S/1", "S/2", "S/3"]
    assert len(ax.collections[0].get_offsets()) == tree.number_of_nodes()
    assert len(ax.texts) == tree.number_of_nodes()
    n_dashed = sum(1 for line in ax.lines if line.get_linestyle() == "--")
    assert n_dashed == dag.number_of_edges() - tree.number_of_edges()
    with pytest.raises(ValueError, match="level_names"):
        ft.draw_feature_tree(tree, level_names=["S/1"])


def test_descendants_at_level_and_duplicates():
    dag = ft.build_feature_dag(three_levels(), threshold=0.6)
    assert ft.descendants_at_level(dag, (0, 0), 2) == [(2, 0), (2, 1), (2, 2)]
    assert ft.descendants_at_level(dag, (0, 1), 1) == [(1, 2)]
    # latents 0 and 2 are the same latent at two scales; 1 differs; 3 is dead
    a = torch.tensor([[1.0, 0.0, 2.0, 0.0], [2.0, 1.0, 4.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    assert ft.duplicate_groups(a, threshold=0.95) == [[0, 2], [1]]
    # latent 1 = (0, 1, 1) vs latent 0 = (1, 2, 0): cos 2 / (sqrt 5 sqrt 2) = 0.632
    assert ft.duplicate_groups(a, threshold=0.63) == [[0, 1, 2]]
    assert ft.duplicate_groups(a, threshold=0.64) == [[0, 2], [1]]
    # a child on a subset of its parent's tokens is not a copy (its MCS with the parent is 1)
    nested = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert ft.symmetric_mcs(nested[:, :1], nested[:, 1:]).item() == pytest.approx(1.0)
    assert ft.duplicate_groups(nested, threshold=0.95) == [[0], [1]]


def test_draw_subtree_limits_levels():
    dag = ft.build_feature_dag(three_levels(), threshold=0.6)
    tree = ft.best_parent_tree(dag)
    fig = ft.draw_subtree(tree, (0, 0), max_level=1, dag=dag, x={n: float(n[1]) for n in dag})
    assert len(fig.axes[0].collections[0].get_offsets()) == 4  # P, C0, C1, C3
    fig = ft.draw_subtree(tree, (0, 1))
    assert len(fig.axes[0].collections[0].get_offsets()) == 2  # Q, C2 (G2's best parent is C1)


def test_top_token_labels():
    # 6 tokens with ids 5, 7, 5, 9, 7, 5; latent 0 highest on ids 7 (0.9), 5 (0.8, 0.7), 9 (0.1)
    token_ids = torch.tensor([5, 7, 5, 9, 7, 5])
    acts = torch.tensor([[0.8, 0.0, 0.0], [0.9, 0.0, 0.0], [0.7, 0.0, 1.0], [0.1, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
    vocab = {5: " the", 7: "cat", 9: "\n"}
    decode = lambda ids: [vocab[i] for i in ids]
    labels = ft.top_token_labels(acts, token_ids, decode, k=2, n_top=4)
    assert labels == ["·the / cat", "dead", "·the"]
    assert ft.top_token_labels(acts, token_ids, decode, k=3, n_top=4)[0] == "·the / cat / \\n"
    # among the top 2 only: 7 (0.9) then 5 (0.8), one each: tie kept in activation order
    assert ft.top_token_labels(acts, token_ids, decode, k=2, n_top=2)[0] == "cat / ·the"
    with pytest.raises(ValueError, match="token_ids"):
        ft.top_token_labels(acts, token_ids[:3], decode)


def test_plot_mcs_comparison_counts():
    d = torch.tensor([[0.9, 0.7, 0.1], [0.0, 0.2, 0.65]])
    s = torch.tensor([[0.8, 0.3, 0.7], [0.0, 0.1, 0.9]])
    fig = ft.plot_mcs_comparison(d, s, threshold=0.6)
    text = fig.axes[0].texts[0].get_text()
    assert text == "both: 2\ndirected only: 1\nsymmetric only: 1"
    assert len(fig.axes[0].collections[0].get_offsets()) == 5  # the pair at (0, 0) is left out
    with pytest.raises(ValueError, match="must match"):
        ft.plot_mcs_comparison(d, s[:1])


def test_link_summary_counts_links_by_hand():
    import networkx as nx

    from saelib.experiments.feature_trees import link_summary

    dag = nx.DiGraph(removed_by_support=[2, 1])
    edges = {((0, 0), (1, 0)): (0.9, 0.1), ((0, 1), (1, 0)): (0.5, 0.7), ((1, 0), (2, 0)): (0.7, 0.2),
             ((0, 1), (1, 1)): (0.4, 0.3)}
    for (p, c), (cos, outside) in edges.items():
        dag.add_edge(p, c, score=cos + 0.2, cosine=cos, outside=outside)
    s = link_summary(dag, threshold=0.6, n_boot=200)
    assert s.n_links == 4 and s.removed_by_support == 3
    assert set(s.by_factor) == {((0, 1), (1, 0)), ((0, 1), (1, 1))}  # cosine below 0.6
    assert set(s.inside) == {((0, 0), (1, 0)), ((1, 0), (2, 0)), ((0, 1), (1, 1))}  # outside < 0.5
    assert s.inside_frac.estimate == pytest.approx(0.75) and s.inside_frac.unit == "links"
    assert s.by_factor_frac.estimate == pytest.approx(0.5)
    assert [n for n, _ in s.multi] == [(1, 0)] and s.chain == [(0, 0), (1, 0), (2, 0)]
    assert link_summary(nx.DiGraph()).inside_frac is None


# ---------------------------------------------------------------------------- row chunks
@pytest.mark.parametrize("bad, match", [(float("nan"), "NaN"), (-0.5, "negative")])
def test_bad_value_in_a_later_row_chunk_is_rejected(monkeypatch, bad, match):
    monkeypatch.setattr(ft, "_CHECK_ROWS", 3)  # 10 rows: chunks 0-2, 3-5, 6-8, 9
    a = torch.ones(10, 2)
    a[9, 1] = bad  # only in the last, partial chunk
    with pytest.raises(ValueError, match=match):
        ft.directed_mcs(a, torch.ones(10, 2))
    with pytest.raises(ValueError, match=match):
        ft.build_feature_dag([torch.ones(10, 2), a])


def test_node_frequency_and_floor_count_every_row_chunk(monkeypatch):
    monkeypatch.setattr(ft, "_CHECK_ROWS", 4)
    n = 10  # level 1 latent 0 fires on rows 0, 5 and 9 (three chunks), latent 1 on rows 1-8
    parent = torch.ones(n, 1)
    child = torch.zeros(n, 2)
    child[[0, 5, 9], 0] = 1.0
    child[1:9, 1] = 1.0
    dag = ft.build_feature_dag([parent, child], threshold=0.0, min_support=4)
    assert dag.nodes[(1, 0)]["frequency"] == pytest.approx(3 / 10)
    assert dag.nodes[(1, 1)]["frequency"] == pytest.approx(8 / 10)
    assert dag.nodes[(0, 0)]["frequency"] == 1.0
    # support 3 < 4: the link to latent 0 is removed and counted; support 8 keeps latent 1's link
    assert list(dag.edges) == [((0, 0), (1, 1))]
    assert dag.graph["removed_by_support"] == [1]
