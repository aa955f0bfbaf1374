"""Tests for saelib.experiments.hedging: the closed-form hedging coefficient against an independent numpy
eigendecomposition of a hand-built second moment, and the single-latent MSE against hand algebra
and Monte Carlo."""

import math

import numpy as np
import pytest
import torch

from saelib.experiments.hedging import hedged_child_cosine, hedging_coefficient, optimal_single_latent, single_latent_mse
from saelib.data.toy_data import chanin_parent_children

QK_EXCLUSIVE = [(0.2, 2), (0.1, 3), (0.5, 2), (0.05, 1), (1.0, 1), (0.25, 4), (0.9, 1)]
QK_INDEPENDENT = [(0.2, 2), (0.1, 3), (0.5, 2), (0.9, 5), (1.0, 3), (0.3, 1)]


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see tests/conftest.py


def hand_second_moment(p0: float, q: float, k: int, exclusive: bool) -> np.ndarray:
    """E[c cᵀ] in the (parent, child_1..child_k) basis, magnitude 1."""
    M = np.zeros((k + 1, k + 1))
    M[0, 0] = p0
    M[0, 1:] = M[1:, 0] = p0 * q  # a child fires only with its parent
    for i in range(1, k + 1):
        for j in range(1, k + 1):
            M[i, j] = p0 * q if i == j else (0.0 if exclusive else p0 * q * q)
    return M


def top_eigvec_ratio(M: np.ndarray) -> np.ndarray:
    evals, evecs = np.linalg.eigh(M)
    v = evecs[:, -1]
    return v / v[0]


@pytest.mark.parametrize("exclusive, qk", [(True, qk) for qk in QK_EXCLUSIVE] + [(False, qk) for qk in QK_INDEPENDENT])
def test_hedging_coefficient_is_top_eigenvector_and_solves_quadratic(exclusive, qk):
    q, k = qk
    t = hedging_coefficient(q, k, exclusive)
    assert t > 0
    b = (1 - q) if exclusive else (1 - q - (k - 1) * q * q)
    assert k * q * t * t + b * t - q == pytest.approx(0.0, abs=1e-12)
    for p0 in (0.25, 0.7):  # p0 cancels
        v = top_eigvec_ratio(hand_second_moment(p0, q, k, exclusive))
        np.testing.assert_allclose(v[1:], t, rtol=1e-9, atol=1e-12)


def test_hedging_coefficient_by_hand():
    # exclusive, q = 0.2, k = 2: 0.4 t^2 + 0.8 t - 0.2 = 0 -> t = (-0.8 + sqrt(0.96)) / 0.8
    assert hedging_coefficient(0.2, 2) == pytest.approx((-0.8 + math.sqrt(0.96)) / 0.8, rel=1e-12)
    # independent, q = 0.5, k = 2: t^2 + 0.25 t - 0.5 = 0
    assert hedging_coefficient(0.5, 2, exclusive=False) == pytest.approx((-0.25 + math.sqrt(2.0625)) / 2, rel=1e-12)
    # a single child with q = 1 always co-fires: the latent is (f0 + f1) / sqrt(2), t = 1
    assert hedging_coefficient(1.0, 1) == pytest.approx(1.0)
    assert hedging_coefficient(0.0, 3) == 0.0
    assert hedged_child_cosine(0.0, 3) == 0.0


@pytest.mark.parametrize(
    "q, k, exclusive, match",
    [
        (-0.1, 2, True, r"q.*-0\.1"),
        (1.5, 2, False, r"q.*1\.5"),
        (float("nan"), 2, True, r"q.*nan"),
        (0.6, 2, True, r"k\*q"),
        (0.2, 0, True, r"k.*0"),
        (0.2, 1.5, True, r"k.*1\.5"),
    ],
)
def test_invalid_arguments(q, k, exclusive, match):
    with pytest.raises(ValueError, match=match):
        hedging_coefficient(q, k, exclusive)
    with pytest.raises(ValueError):
        hedged_child_cosine(q, k, exclusive)


def test_independent_children_allow_kq_above_one():
    assert hedging_coefficient(0.6, 2, exclusive=False) > 0


@pytest.mark.parametrize(
    "p_parent, q, k, exclusive", [(0.25, 0.2, 2, True), (0.4, 0.1, 3, True), (0.3, 0.5, 2, False), (0.6, 0.3, 4, False)]
)
def test_child_cosine_agrees_with_optimal_single_latent(p_parent, q, k, exclusive):
    h = chanin_parent_children(p_parent=p_parent, p_child=q, n_children=k, exclusive=exclusive, d=10, seed=1)
    v, lam = optimal_single_latent(h)
    assert v.shape == (10,)
    assert v.norm().item() == pytest.approx(1.0, abs=1e-6)
    cos = (h.features.double() @ v.double()).numpy()  # features are orthonormal
    t = hedging_coefficient(q, k, exclusive)
    np.testing.assert_allclose(cos[1:], hedged_child_cosine(q, k, exclusive), atol=1e-6)
    np.testing.assert_allclose(cos[0], 1 / math.sqrt(1 + k * t * t), atol=1e-6)
    # top eigenvalue by hand: M (1, t, ..., t) = p0 (1 + k q t) (1, t, ..., t)
    assert lam == pytest.approx(p_parent * (1 + k * q * t), rel=1e-6)
    # and against numpy on the hand-built moment (orthonormal embedding keeps the spectrum)
    assert lam == pytest.approx(np.linalg.eigvalsh(hand_second_moment(p_parent, q, k, exclusive))[-1], rel=1e-6)


def test_optimal_single_latent_is_oriented_and_general():
    h = chanin_parent_children(n_children=3, exclusive=False, d=6, seed=2)
    v, _ = optimal_single_latent(h)
    assert (h.features @ v).sum() > 0
    # a stationary point of the Rayleigh quotient of E[x xᵀ] computed from samples independently
    x, _ = h.sample(100_000, torch.Generator().manual_seed(0))
    S = (x.double().T @ x.double() / len(x)).numpy()
    u = np.linalg.eigh(S)[1][:, -1]
    assert abs(float(np.dot(u, v.double().numpy()))) > 0.999


@pytest.mark.parametrize("exclusive", [True, False])
def test_single_latent_mse_hand_values_and_monte_carlo(exclusive):
    p0, q, k = 0.3, 0.25, 3
    h = chanin_parent_children(p_parent=p0, p_child=q, n_children=k, exclusive=exclusive, d=8, seed=3)
    v, _ = optimal_single_latent(h)
    t = hedging_coefficient(q, k, exclusive)
    parent_dir = h.features[0]
    mse_opt = single_latent_mse(h, v)
    mse_parent = single_latent_mse(h, parent_dir)
    # by hand: E||x||^2 = p0 (1 + k q); the parent direction explains E[c0^2] = p0,
    # the optimal direction explains lambda = p0 (1 + k q t)
    assert mse_parent == pytest.approx(k * p0 * q, rel=1e-6)
    assert mse_opt == pytest.approx(k * p0 * q * (1 - t), rel=1e-5)
    assert mse_opt < mse_parent
    # the direction's scale does not matter
    assert single_latent_mse(h, 3.0 * v) == pytest.approx(mse_opt, rel=1e-6)
    # Monte Carlo
    n = 200_000
    x, _ = h.sample(n, torch.Generator().manual_seed(4))
    x = x.double()
    for u, analytic in ((v.double(), mse_opt), (parent_dir.double() / parent_dir.norm(), mse_parent)):
        err = (x - (x @ u)[:, None] * u).pow(2).sum(-1)
        se = err.std().item() / math.sqrt(n)
        assert abs(err.mean().item() - analytic) < 5 * se


def test_single_latent_mse_errors():
    h = chanin_parent_children(d=5)
    with pytest.raises(ValueError, match=r"\(5,\)"):
        single_latent_mse(h, torch.ones(4))
    with pytest.raises(ValueError, match=r"zero"):
        single_latent_mse(h, torch.zeros(5))
