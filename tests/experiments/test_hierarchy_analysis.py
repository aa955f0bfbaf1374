"""Tests for saelib.experiments.hierarchy_analysis (per-instance metrics on toy hierarchies) and
saelib.figures.comparison_plots (figures return Figures with the expected content)."""

import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from saelib.figures.comparison_plots import (
    bar_groups,
    cosine_trajectories,
    method_scatter,
    metric_strips,
    pareto_plot,
    prior_density_plot,
    sweep_lines,
)
from saelib.experiments.hierarchy_analysis import (
    CosineRecorder,
    evaluate_instances,
    first_step_above,
    group_table,
    init_at_features,
    latent_assignment,
    parent_cofiring,
    pareto_front,
)
from saelib.core.sae import SAE, SAEConfig
from saelib.data.toy_data import chanin_absorption_order, nabeshima_tree
from saelib.core.train import TrainConfig, train_sae


def truth_sae(tree, n_inst=2, order=None):
    sae = SAE(SAEConfig(d_in=tree.d, d_sae=tree.n_features, n_inst=n_inst))
    init_at_features(sae, tree.features, order or list(range(tree.n_features)))
    return sae


def test_truth_init_reconstructs_and_scores_perfectly():
    tree = nabeshima_tree()
    order = list(reversed(range(20)))
    sae = truth_sae(tree, order=order)
    with torch.no_grad():  # a small threshold, so that rounding noise never counts as firing
        sae.b_enc.fill_(-1e-4)
    m = evaluate_instances(sae, tree, n_samples=5000, seed=3)
    x, coeffs = tree.sample(5000, torch.Generator().manual_seed(3))
    torch.testing.assert_close(m["mcc"], torch.ones(2))
    assert m["all_recovered"].tolist() == [1.0, 1.0]
    assert (m["fvu"] < 1e-6).all()
    # each latent fires exactly when its feature does
    torch.testing.assert_close(m["l0"], (coeffs > 0).sum(-1).double().mean().float().expand(2))
    torch.testing.assert_close(m["parent_on_children"], torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(m["child_on_own"], torch.ones(2))
    torch.testing.assert_close(m["child_on_parent"], torch.zeros(2), atol=1e-6, rtol=0)
    assert (m["dead_frac"] == 0).all()
    # the true features absorb nothing (SAEBench's scores on ground truth)
    assert m["full_absorption"].tolist() == [0.0, 0.0] and m["absorption_fraction"].tolist() == [0.0, 0.0]
    # latent j represents feature order[j]
    assert latent_assignment(sae, tree)[0, torch.tensor(order)].tolist() == list(range(20))


def test_init_at_features_validates_order():
    tree = nabeshima_tree()
    sae = SAE(SAEConfig(d_in=20, d_sae=20))
    with pytest.raises(ValueError, match="latent_order"):
        init_at_features(sae, tree.features, [0, 25])


def test_evaluate_rejects_wrong_dimension():
    with pytest.raises(ValueError, match="d_in=5"):
        evaluate_instances(SAE(SAEConfig(d_in=5, d_sae=3)), nabeshima_tree())


def test_group_table_splits_instances():
    metrics = {"mcc": torch.tensor([0.1, 0.2, 0.3, 0.4])}
    table = group_table(metrics, {"a": [0, 2], "b": [1, 3]})
    assert table["a"]["mcc"].tolist() == pytest.approx([0.1, 0.3])
    with pytest.raises(ValueError, match="'c'"):
        group_table(metrics, {"c": [4]})


def test_cosine_recorder_records_every_k_steps():
    tree = nabeshima_tree()
    rec = CosineRecorder(tree.features, every=3)
    sae = SAE(SAEConfig(d_in=20, d_sae=20, n_inst=2))
    train_sae(sae, lambda b, g: tree.sample(b, g)[0], TrainConfig(steps=7, progress=False), callback=rec)
    assert rec.steps.tolist() == [0, 3, 6]
    assert rec.cos.shape == (3, 2, 20, 20)
    with pytest.raises(ValueError):
        CosineRecorder(tree.features, every=0)


def test_first_step_above_by_hand():
    steps = torch.tensor([0, 10, 20, 30])
    values = torch.tensor([[0.1, 0.0], [0.95, 0.2], [0.5, 0.3], [0.99, 0.4]])
    out = first_step_above(steps, values, 0.9)
    assert out[0] == 10 and math.isinf(out[1])


def test_parent_cofiring_detects_absorption():
    tree = chanin_absorption_order()  # parent (feature 0) magnitude 2, child (feature 1) magnitude 10
    sae = truth_sae(tree, n_inst=2)
    f = tree.features / tree.features.norm(dim=-1, keepdim=True)
    with torch.no_grad():  # instance 1: the parent latent's encoder switches off when the child fires
        sae.W_enc[1, :, 0] = f[0] - 0.3 * f[1]  # pre-act 2 alone, 2 - 3 = -1 with the child
    out = parent_cofiring(sae, tree, parent=0, child=1, n_samples=4000)
    assert out["fires_alone"].tolist() == [1.0, 1.0]
    assert out["fires_with_child"].tolist() == [1.0, 0.0]
    torch.testing.assert_close(out["act_ratio"][0], torch.tensor(1.0), rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="not a child"):
        parent_cofiring(sae, tree, parent=1, child=0)


def test_pareto_front_by_hand():
    l0 = torch.tensor([1.0, 2.0, 1.5, 3.0, 1.0])
    fvu = torch.tensor([0.5, 0.1, 0.6, 0.1, 0.5])
    # (1.5, 0.6) is dominated by (1, 0.5); (3, 0.1) by (2, 0.1); the two equal (1, 0.5) both stay
    assert pareto_front(l0, fvu).tolist() == [True, True, False, False, True]
    with pytest.raises(ValueError):
        pareto_front(l0, fvu[:3])


# ---------------------------------------------------------------------------- figures
def test_figures_are_returned():
    table = {"a": {"mcc": torch.tensor([0.9, 0.95]), "fvu": torch.tensor([0.1, 0.2])},
             "b": {"mcc": torch.tensor([0.8]), "fvu": torch.tensor([0.3])}}
    fig = metric_strips(table, ["mcc", "fvu"])
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    with pytest.raises(ValueError, match="lacks"):
        metric_strips(table, ["l0"])
    fig = sweep_lines([0, 0.1, 1], {"x": torch.zeros(3, 2), "y": torch.ones(3, 2)}, "beta", logx=True)
    assert len(fig.axes[0].lines) >= 2
    with pytest.raises(ValueError):
        sweep_lines([0, 1], {"x": torch.zeros(3, 2)}, "beta")
    fig = cosine_trajectories(torch.arange(5) * 10, torch.rand(5, 2, 3), ["a", "b", "c"], marks={"m": 20.0})
    assert len(fig.axes) == 2
    fig = pareto_plot({"l1": (torch.tensor([1.0, 2.0]), torch.tensor([0.2, 0.1]))},
                      front={"l1": torch.tensor([True, True])}, true_l0=1.12)
    assert isinstance(fig, Figure)
    fig = method_scatter({"a": (torch.tensor([1.0, 2.0]), torch.tensor([0.1, 0.0]))}, "dead fraction")
    assert fig.axes[0].get_ylabel() == "dead fraction"
    fig = bar_groups({"g": {"u": torch.tensor([1.0, 2.0]), "v": torch.tensor([-1.0])}}, "value")
    assert isinstance(fig, Figure)


def test_prior_density_plot_has_one_line_per_penalty():
    fig = prior_density_plot(["l1", "log1p_sq", "tanh"], coeff=2.0)
    labels = [line.get_label() for line in fig.axes[1].lines]
    assert len(labels) == 3 and len(fig.axes[0].lines) == 3
    assert "improper" in labels[2] and "improper" not in labels[0]
    # slope panel: L1's slope is 1 everywhere, log(1 + s²)'s is 2s / (1 + s²)
    l1_slope, cauchy_slope = fig.axes[0].lines[0].get_ydata(), fig.axes[0].lines[1].get_ydata()
    s = fig.axes[0].lines[1].get_xdata()
    assert abs(l1_slope - 1).max() < 1e-12
    assert abs(cauchy_slope - 2 * s / (1 + s**2)).max() < 1e-9


def test_sweep_lines_logy_draws_the_geometric_mean():
    v = torch.tensor([[1.0, 100.0], [0.1, 10.0]])  # geometric means 10 and 1
    fig = sweep_lines([0, 1], {"coeff": v}, "step", logy=True)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [10.0, 1.0], rtol=1e-6)  # float32 inputs
    with pytest.raises(ValueError, match="<= 0"):
        sweep_lines([0, 1], {"coeff": torch.tensor([[1.0, 0.0], [1.0, 1.0]])}, "step", logy=True)


def test_evaluate_input_scale_is_applied_before_the_sae():
    # the true features with a threshold of 0.3: on inputs scaled by 3 a firing feature's activation
    # is 3 - 0.3 (a 10 % shrink), on raw inputs 1 - 0.3 (30 %): FVU must be ~9x smaller when scaled
    from saelib.core.metrics import fvu
    tree = nabeshima_tree()
    sae = truth_sae(tree)
    with torch.no_grad():
        sae.b_enc.fill_(-0.3)
    m = evaluate_instances(sae, tree, n_samples=2000, seed=3, input_scale=3.0)
    raw = evaluate_instances(sae, tree, n_samples=2000, seed=3)
    x, _ = tree.sample(2000, torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(m["fvu"], fvu(3 * x, sae(3 * x)[0]))
    assert (m["fvu"] * 5 < raw["fvu"]).all()
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="input_scale"):
            evaluate_instances(sae, tree, n_samples=10, input_scale=bad)


def test_split_term_push_scales_with_the_input_scale_squared():
    # from the true features (a linear, bias-free SAE) a term's gradient on the decoder is
    # 2 a (x_hat - x): both factors scale with the input, so the push scales with input_scale²
    from saelib.experiments.hierarchy_analysis import split_term_push
    from saelib.core.matryoshka import MatryoshkaConfig, expected_prefix_weights
    tree = nabeshima_tree()
    sae = truth_sae(tree, n_inst=1)
    latent_of = torch.arange(tree.n_features)[None]
    w = expected_prefix_weights(MatryoshkaConfig(mode="random"), tree.n_features)
    one = split_term_push(sae, tree, latent_of, w, n_samples=2000, seed=1)
    two = split_term_push(sae, tree, latent_of, w, n_samples=2000, seed=1, input_scale=2.0)
    assert (one["split"] > 0).all()
    torch.testing.assert_close(two["split"], 4 * one["split"], rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="input_scale"):
        split_term_push(sae, tree, latent_of, w, n_samples=10, input_scale=0.0)
