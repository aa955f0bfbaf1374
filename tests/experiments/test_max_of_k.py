"""Tests for saelib.experiments.max_of_k: sequence sampling, the model's architecture and training, residual
collection, ground-truth variables and latent labels, each against values worked out by hand or
by brute-force enumeration."""

import itertools
import math

import pytest
import torch

from saelib.experiments import max_of_k as mk


def small_cfg(**kw) -> mk.MaxOfKConfig:
    """A small max-of-K run that trains in about a second."""
    return mk.MaxOfKConfig(**{"d_vocab": 12, "n_ctx": 3, "d_model": 16, "d_head": 16,
                              "steps": 400, "batch_size": 64, "lr": 3e-3, "progress": False, **kw})


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize("kw, match", [({"d_vocab": 1}, "d_vocab"), ({"n_ctx": 0}, "n_ctx"),
                                       ({"steps": 0}, "steps"), ({"lr": 0.0}, "lr")])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        mk.MaxOfKConfig(**kw)


def test_default_config_is_gross_max_of_4():
    hc = mk.MaxOfKConfig().hooked_config()
    assert (hc.n_layers, hc.n_heads, hc.d_model, hc.d_head, hc.d_vocab, hc.n_ctx) == (1, 1, 32, 32, 64, 4)
    assert hc.attn_only and hc.normalization_type is None


# ---------------------------------------------------------------------------- sampling
def test_uniform_sequences_in_range():
    t = mk.sample_sequences(5000, 7, 4, torch.Generator().manual_seed(0))
    assert t.shape == (5000, 4) and t.dtype == torch.long
    assert t.min() == 0 and t.max() == 6


def test_uniform_max_matches_brute_force_conditional():
    """Maximum uniform; given the maximum, the number of copies follows the exact enumeration."""
    d_vocab, n_ctx, n = 6, 3, 120_000
    t = mk.sample_sequences(n, d_vocab, n_ctx, torch.Generator().manual_seed(1), "uniform_max")
    mx = t.max(-1).values
    freq = torch.bincount(mx, minlength=d_vocab).double() / n
    assert torch.allclose(freq, torch.full((d_vocab,), 1 / d_vocab, dtype=torch.float64), atol=0.006)
    for m in range(d_vocab):
        seqs = [s for s in itertools.product(range(m + 1), repeat=n_ctx) if max(s) == m]
        expected = torch.zeros(n_ctx + 1, dtype=torch.float64)
        for s in seqs:
            expected[s.count(m)] += 1 / len(seqs)
        sel = t[mx == m]
        got = torch.bincount((sel == m).sum(-1), minlength=n_ctx + 1).double() / len(sel)
        assert torch.allclose(got, expected, atol=0.02), (m, got, expected)
        if m >= 1:  # the position of the query token is max with the enumerated probability
            p_query_max = sum(1 for s in seqs if s[-1] == m) / len(seqs)
            assert abs((sel[:, -1] == m).double().mean().item() - p_query_max) < 0.02


def test_sampling_rejects_unknown_distribution():
    with pytest.raises(ValueError, match="zipf"):
        mk.sample_sequences(4, 5, 3, torch.Generator(), "zipf")


# ---------------------------------------------------------------------------- model
def test_model_biases_zero_and_frozen():
    model = mk.make_model(small_cfg())
    names = {n for n, _ in model.named_parameters()}
    assert not any(".mlp" in n or "ln" in n for n in names)  # attention-only, no norm
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1].startswith("b_"):
            assert not p.requires_grad and torch.all(p == 0), name
        else:
            assert p.requires_grad, name


def test_final_residual_is_what_the_unembedding_reads():
    model = mk.make_model(small_cfg())
    t = mk.sample_sequences(50, 12, 3, torch.Generator().manual_seed(0))
    resid = mk.final_residual(model, t, batch_size=16)
    assert resid.shape == (50, 16)
    with torch.no_grad():
        logits = model(t)[:, -1]
    assert torch.allclose(resid @ model.W_U, logits, atol=1e-5)


def test_training_is_deterministic_and_learns_the_max(single_thread):  # tiny models: one thread is faster
    m1, l1 = mk.train_max_of_k(small_cfg())
    m2, l2 = mk.train_max_of_k(small_cfg())
    assert l1 == l2
    test = mk.sample_sequences(4000, 12, 3, torch.Generator().manual_seed(5))
    acc = mk.accuracy(m1, test, batch_size=1000)
    assert acc > 0.9  # chance is about 1/12; predicting the last token is right 1/3 + ... < 0.5
    assert mk.accuracy(m2, test) == acc
    assert sum(l1[-20:]) / 20 < 0.5 * sum(l1[:20]) / 20


# ---------------------------------------------------------------------------- labels
def test_ground_truth_by_hand():
    t = torch.tensor([[3, 7, 7, 1], [5, 5, 5, 5], [0, 2, 1, 2], [4, 1, 0, 9]])
    gt = mk.ground_truth(t)
    assert gt["max"].tolist() == [7, 5, 2, 9]
    assert gt["query"].tolist() == [1, 5, 2, 9]
    assert gt["nonmax"].tolist() == [3, -1, 1, 4]
    assert gt["copies"].tolist() == [2, 4, 2, 1]


def test_activation_histogram_by_hand():
    acts = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    values = torch.tensor([0, 2, 2, 1])
    h = mk.activation_histogram(acts, values, 3)
    assert torch.allclose(h, torch.tensor([[0.25, 0.0, 0.75], [0.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="values must lie"):
        mk.activation_histogram(acts, torch.tensor([0, 3, 0, 0]), 3)
    with pytest.raises(ValueError, match="non-negative"):
        mk.activation_histogram(-acts, values, 3)


def test_max_range_shortest_window():
    hist = torch.tensor([[0.0, 0.5, 0.1, 0.4], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0]])
    assert mk.max_range(hist, 0.8).tolist() == [[1, 3], [0, 3], [-1, -1]]
    assert mk.max_range(hist, 0.5).tolist() == [[1, 1], [0, 1], [-1, -1]]  # ties: lowest start
    with pytest.raises(ValueError, match="mass"):
        mk.max_range(hist, 0.0)


def test_label_latents_on_indicator_latents():
    """Latent 0 = [max = 10]: pure, no gain beyond the max. Latent 1 = [max = 10 and query = 10]:
    its query gain is -log P(query = max | max = 10), counted directly here."""
    t = mk.sample_sequences(40_000, 16, 4, torch.Generator().manual_seed(2), "uniform_max")
    gt = mk.ground_truth(t)
    is10 = gt["max"] == 10
    q10 = is10 & (gt["query"] == 10)
    acts = torch.stack([is10.float(), 2.0 * q10.float(), torch.zeros(len(t))], dim=1)
    lab = mk.label_latents(acts, t, 16)
    assert lab.alive.tolist() == [True, True, False]
    assert lab.max_top[:2].tolist() == [10, 10] and lab.max_top[2] == -1
    assert torch.allclose(lab.max_purity[:2], torch.ones(2))
    assert lab.max_mean[0] == pytest.approx(10.0)
    assert abs(lab.gain["query"][0].item()) < 1e-5 and abs(lab.gain["copies"][0].item()) < 1e-5
    expected = -math.log(q10.sum().item() / is10.sum().item())
    assert lab.gain["query"][1].item() == pytest.approx(expected, rel=1e-4)
    assert lab.secondary[1] == "query" and lab.secondary_top[1] == 10
    assert lab.describe(0) == "max 10"
    assert lab.describe(1) == "max 10 | query=10"
    assert lab.describe(2) == "dead"
    assert lab.frequency[0].item() == pytest.approx(is10.float().mean().item())


def test_label_latents_copies_gain():
    """A latent firing only on sequences with exactly 2 copies of the max (any max) selects copies.
    (All 4 copies would tie with ``nonmax = -1``, which is the same event.)"""
    t = mk.sample_sequences(40_000, 8, 4, torch.Generator().manual_seed(3), "uniform_max")
    gt = mk.ground_truth(t)
    acts = (gt["copies"] == 2).float()[:, None]
    lab = mk.label_latents(acts, t, 8)
    assert lab.secondary == ["copies"] and lab.secondary_top.tolist() == [2]
    assert lab.gain["copies"][0] > lab.gain["query"][0]


def test_variance_explained_on_constructed_residual():
    """resid = e_max (one-hot of the max in 4 dims) + 0.5 * e_query in 4 other dims."""
    t = mk.sample_sequences(20_000, 4, 3, torch.Generator().manual_seed(4))
    gt = mk.ground_truth(t)
    onehot = lambda v: torch.nn.functional.one_hot(v, 4).double()
    resid = torch.cat([onehot(gt["max"]), 0.5 * onehot(gt["query"])], dim=1)
    ve = mk.variance_explained(resid, t, 4)
    assert ve["max+query"] == pytest.approx(1.0)
    # explained by max alone: the max block fully, the query block by its mean given the max
    var = lambda x: (x - x.mean(0)).square().sum().item()
    q = 0.5 * onehot(gt["query"])
    means = torch.stack([q[gt["max"] == m].mean(0) for m in range(4)])
    expected = 1 - (q - means[gt["max"]]).square().sum().item() / (var(onehot(gt["max"])) + var(q))
    assert ve["max"] == pytest.approx(expected, rel=1e-9)
    assert 0.0 < ve["query"] < ve["max+query"]


def test_summarize_labels_by_hand():
    t = torch.tensor([[1, 2, 3, 3], [0, 1, 2, 0], [3, 0, 0, 1], [2, 2, 0, 1]])  # maxima 3, 2, 3, 2
    acts = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    s = mk.summarize_labels(mk.label_latents(acts, t, 4))
    assert s["alive"] == 2 and s["pure"] == 1 and s["maxima_covered"] == 1
    assert s["median_span"] == 1.5  # spans 1 (latent 0: max 3) and 2 (latent 1: max 2-3)
    assert s["latents_per_max"] == 1.0


def test_plot_max_histograms_drops_dead_rows():
    h = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    fig = mk.plot_max_histograms({"width 3": h})
    img = fig.axes[0].images[0].get_array()
    assert img.shape == (2, 3)
    assert img[0].tolist() == [1.0, 0.0, 0.0]  # sorted by mean max: 0.0 then 1.5


# ---------------------------------------------------------------------------- split nesting and coverage
import networkx as nx

from saelib.experiments import feature_trees as ft


def _rows(*masses: dict[int, float], n_values: int = 8) -> torch.Tensor:
    """``[len(masses), n_values]`` histogram rows from ``{maximum: mass}`` dicts."""
    h = torch.zeros(len(masses), n_values)
    for i, m in enumerate(masses):
        for v, w in m.items():
            h[i, v] = w
    return h


# level 0: A on maxima 0-3, B on 4-7 (0.25 each: the shortest range holding 0.8 is all four);
# level 1: c0 on 0, c1 on 1-2, c2 on 5, c3 on 6-7
HISTS = [_rows({0: .25, 1: .25, 2: .25, 3: .25}, {4: .25, 5: .25, 6: .25, 7: .25}),
         _rows({0: 1.0}, {1: .5, 2: .5}, {5: 1.0}, {6: .5, 7: .5})]
A, B = (0, 0), (0, 1)
C = [(1, j) for j in range(4)]


def test_nested_tree_scores_one():
    s = mk.split_nesting([(A, C[0]), (A, C[1]), (B, C[2]), (B, C[3])], HISTS)
    assert s.n_links == 4 and s.fraction_nested == 1.0 and s.fraction_range_nested == 1.0
    assert s.violations == [] and s.by_level == {0: 1.0}
    assert s.parent_range.tolist() == [[0, 3], [0, 3], [4, 7], [4, 7]]
    assert s.inside_mass.tolist() == [1.0] * 4


def test_one_crossing_link_scores_n_minus_one_over_n_and_is_named():
    g = nx.DiGraph([(A, C[0]), (A, C[1]), (A, C[2]), (B, C[3])])  # c2 (max 5) hangs under A (0-3)
    s = mk.split_nesting(g, HISTS)
    assert s.fraction_nested == 3 / 4
    assert s.links[2] == (A, C[2]) and s.nested.tolist() == [True, True, False, True]
    (v,) = s.violations
    assert (v.parent, v.child, v.parent_range, v.child_range) == (A, C[2], (0, 3), (5, 5))
    assert (v.inside_mass, v.mass_below, v.mass_above, v.side) == (0.0, 0.0, 1.0, "above")
    assert v.child_mean == 5.0 and v.distance == 2.0  # 5 is two maxima above the range's end 3
    assert v.describe() == "0/0 (max 0-3) -> 1/2 (max 5): 1.00 of its mass above, mean max 5.0"


def test_mass_criterion_and_range_criterion():
    # child straddling the parent's upper end: half its mass on 3 (inside), half on 4 (outside)
    hists = [HISTS[0], _rows({3: .5, 4: .5}, {3: .85, 4: .15}, {0: .25, 1: .25, 2: .25, 3: .25})]
    s = mk.split_nesting([(A, (1, 0)), (A, (1, 1)), (A, (1, 2))], hists)
    assert s.inside_mass.tolist() == pytest.approx([0.5, 0.85, 1.0])
    assert s.nested.tolist() == [False, True, True]  # a copy of the parent (1, 2) is nested
    assert s.range_nested.tolist() == [False, True, True]  # (1, 1)'s 0.8-range is [3, 3]
    assert mk.split_nesting([(A, (1, 1))], hists, nested_mass=0.9).fraction_nested == 0.0


def test_nesting_on_a_dag_built_from_indicator_latents():
    # maxima 0..7 equally often; width 2: "max < 4" and "max >= 4"; width 8: one latent per maximum.
    # Directed MCS of a right parent is 1, of the wrong one 0: the DAG is the nested tree.
    m = torch.arange(8).repeat(50)
    a0 = torch.stack([(m < 4), (m >= 4)], -1).float()
    a1 = torch.nn.functional.one_hot(m, 8).float()
    dag = ft.build_feature_dag([a0, a1])
    hists = [mk.activation_histogram(a, m, 8) for a in (a0, a1)]
    s = mk.split_nesting(ft.best_parent_tree(dag), hists)
    assert s.n_links == 8 and s.fraction_nested == 1.0
    assert [p for p, _ in s.links] == [A] * 4 + [B] * 4


def test_split_nesting_edge_cases_and_errors():
    empty = mk.split_nesting([], HISTS)
    assert empty.n_links == 0 and math.isnan(empty.fraction_nested) and empty.by_level == {}
    dead = [HISTS[0], torch.cat([HISTS[1], torch.zeros(1, 8)])]
    with pytest.raises(ValueError, match="dead latent"):
        mk.split_nesting([(A, (1, 4))], dead)
    with pytest.raises(ValueError, match="no histogram row"):
        mk.split_nesting([(A, (2, 0))], HISTS)
    with pytest.raises(ValueError, match="range_mass"):
        mk.split_nesting([], HISTS, range_mass=0.0)
    with pytest.raises(ValueError, match="nested_mass"):
        mk.split_nesting([], HISTS, nested_mass=1.5)
    with pytest.raises(ValueError, match="one n_values"):
        mk.split_nesting([], [HISTS[0], torch.zeros(2, 9)])


def test_maxima_coverage_by_hand():
    # every pair of tokens in [0, 8): maximum m occurs 2m + 1 times
    tokens = torch.tensor(list(itertools.product(range(8), repeat=2)))
    mx = mk.ground_truth(tokens)["max"]
    acts = torch.zeros(len(tokens), 9)
    for k in range(5):
        acts[:, k] = (mx == k).float()  # dedicated to maxima 0..4
    acts[:, 5] = (mx == 2).float()  # a second latent for maximum 2
    acts[:, 6] = (mx >= 5).float() / (2 * mx + 1).float()  # coarse: 1/3 of its mass on each of 5, 6, 7
    # latents 7 and 8 are dead
    labels = mk.label_latents(acts, tokens, 8)
    cov = mk.maxima_coverage(labels, 8, purity=0.5)
    assert cov.dedicated.tolist() == [1, 1, 2, 1, 1, 0, 0, 0]
    assert (cov.covered, cov.exactly_one, cov.uncovered, cov.fraction) == (5, 4, [5, 6, 7], 5 / 8)
    assert cov.covered == mk.summarize_labels(labels, 0.5)["maxima_covered"]
    assert mk.maxima_coverage(labels, 8, purity=0.3).covered == 6  # the coarse latent (1/3 > 0.3) counts
    with pytest.raises(ValueError, match="purity"):
        mk.maxima_coverage(labels, 8, purity=1.0)
    with pytest.raises(ValueError, match="d_vocab"):
        mk.maxima_coverage(labels, 0)


def test_analyse_split_run_on_a_constructed_nested_split():
    # sequences (0, m), each maximum m in 0..7 equally often; widths 2 -> 4 -> 8 of indicator
    # latents: "max < 4" / ">= 4",
    # then halves of those, then one latent per maximum. The split is nested by construction, every
    # maximum gets exactly one width-8 latent, the chain spans all three widths, the first coarse
    # latent splits into latents for maxima 0..3, and spans go 4 -> 1 (a coarse ratio of 4).
    tokens = torch.stack([torch.zeros(400, dtype=torch.long), torch.arange(8).repeat(50)], -1)
    mx = mk.ground_truth(tokens)["max"]
    acts = [torch.stack([(mx // 4) == k for k in range(2)], -1).float(),
            torch.stack([(mx // 2) == k for k in range(4)], -1).float(),
            torch.nn.functional.one_hot(mx, 8).float()]
    run = mk.analyse_split_run(acts, tokens, [2, 4, 8], d_vocab=8)
    assert run.nesting.fraction_nested == 1.0 and run.nesting.n_links == 4 + 8
    assert (run.coverage.covered, run.coverage.exactly_one) == (8, 8)
    assert run.chain == 3
    assert run.root == (0, 0) and run.split_maxima == [0, 1, 2, 3]
    assert run.coarse_ratio == 4.0
    assert [run.summary[w]["distinct"] for w in (2, 4, 8)] == [2, 4, 8]
    with pytest.raises(ValueError, match="d_vocab=16 must be one of the widths"):
        mk.analyse_split_run(acts, tokens, [2, 4, 8], d_vocab=16)
    with pytest.raises(ValueError, match="3 activation tensors for 2 widths"):
        mk.analyse_split_run(acts, tokens, [2, 4], d_vocab=4)
