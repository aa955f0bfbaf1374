"""Tests for saelib.core.penalties: values against hand-computed formulas, gradients (including the
Lp blow-up near zero), batch-level frequency penalty, implied priors against closed forms, and
per-instance penalties in training."""

import math

import pytest
import torch

from saelib.core.penalties import (
    BATCH_PENALTIES,
    FREQ_TARGET,
    FREQ_WEIGHT,
    PENALTIES,
    PRIOR_FAMILY,
    SMOOTH_L0_EPS,
    implied_log_prior,
    penalty_names,
    per_latent_penalty,
    prior_density,
    prior_is_proper,
)
from saelib.core.sae import SAE, SAEConfig
from saelib.core.train import TrainConfig, train_sae

S = torch.tensor([0.0, 0.5, 1.0, 3.0], dtype=torch.float64)


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("l1", [0.0, 0.5, 1.0, 3.0]),
        ("log1p_sq", [0.0, math.log(1.25), math.log(2.0), math.log(10.0)]),
        ("log1p_abs", [0.0, math.log(1.5), math.log(2.0), math.log(4.0)]),
        ("lp_half", [1e-6, math.sqrt(0.5), 1.0, math.sqrt(3.0)]),
        ("tanh", [0.0, math.tanh(0.5), math.tanh(1.0), math.tanh(3.0)]),
        ("smooth_l0", [0.0, 1 - math.exp(-5.0), 1 - math.exp(-10.0), 1 - math.exp(-30.0)]),
    ],
)
def test_elementwise_values(kind, expected):
    assert SMOOTH_L0_EPS == 0.1  # the expected smooth-L0 values assume eps = 0.1
    torch.testing.assert_close(PENALTIES[kind](S), torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_registry_is_complete_and_every_penalty_has_a_prior_family():
    assert set(penalty_names()) == set(PENALTIES) | set(BATCH_PENALTIES)
    assert set(penalty_names()) == set(PRIOR_FAMILY)
    for name in ("l1", "log1p_sq", "log1p_abs", "lp_half", "tanh", "smooth_l0", "smooth_l0_freq"):
        assert name in penalty_names()


def test_per_latent_penalty_is_batch_mean_of_scaled_activation():
    acts = torch.tensor([[[1.0, 0.0]], [[3.0, 2.0]]])  # [batch=2, inst=1, d_sae=2]
    norms = torch.tensor([[2.0, 0.5]])
    out = per_latent_penalty(acts, norms, "log1p_sq")
    # latent 0: scaled 2 and 6 -> mean(log 5, log 37); latent 1: scaled 0 and 1 -> mean(0, log 2)
    expected = torch.tensor([[(math.log(5) + math.log(37)) / 2, math.log(2) / 2]])
    torch.testing.assert_close(out, expected)


def test_unknown_penalty_names_the_choices():
    with pytest.raises(ValueError, match=r"'l3'.*l1"):
        per_latent_penalty(torch.ones(2, 1, 3), torch.ones(1, 3), "l3")


def test_smooth_l0_freq_matches_hand_computed_kl():
    # one latent active (scaled 1) on 1 of 4 samples, the other never
    acts = torch.zeros(4, 1, 2, dtype=torch.float64)
    acts[0, 0, 0] = 1.0
    out = per_latent_penalty(acts, torch.ones(1, 2, dtype=torch.float64), "smooth_l0_freq")
    ind = 1 - math.exp(-1.0 / SMOOTH_L0_EPS)
    f0 = ind / 4
    rho = FREQ_TARGET

    def kl(f):
        return rho * math.log(rho / f) + (1 - rho) * math.log((1 - rho) / (1 - f))

    f1 = 1e-6  # clamped frequency of a silent latent
    expected = torch.tensor([[f0 + FREQ_WEIGHT * kl(f0), 0.0 + FREQ_WEIGHT * kl(f1)]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)


def test_smooth_l0_freq_per_instance_target():
    # instance i with target rho_i equals the one-instance penalty computed with that rho by hand
    acts = torch.zeros(4, 2, 2, dtype=torch.float64)
    acts[0, :, 0] = 1.0
    rhos = [0.05, 0.01]
    out = per_latent_penalty(acts, torch.ones(2, 2, dtype=torch.float64), "smooth_l0_freq", freq_target=rhos)
    f0 = (1 - math.exp(-1.0 / SMOOTH_L0_EPS)) / 4
    for i, rho in enumerate(rhos):
        kl = rho * math.log(rho / f0) + (1 - rho) * math.log((1 - rho) / (1 - f0))
        torch.testing.assert_close(out[i, 0], torch.tensor(f0 + FREQ_WEIGHT * kl, dtype=torch.float64))
    # a silent latent at a lower target costs less: rho log(rho / 1e-6) shrinks with rho
    assert out[1, 1] < out[0, 1]


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, [0.1, 1.5], [0.1, 0.2, 0.3]])
def test_smooth_l0_freq_bad_target(bad):
    with pytest.raises(ValueError, match="freq_target"):
        per_latent_penalty(torch.ones(3, 2, 4), torch.ones(2, 4), "smooth_l0_freq", freq_target=bad)


def test_frequency_term_pushes_rare_latents_up_and_dense_latents_down():
    # gradient of the batch penalty w.r.t. an activation: negative (increase it) for a rare latent
    acts = torch.zeros(100, 1, 2, dtype=torch.float64)
    acts[0, 0, 0] = 1.0  # latent 0 active on 1 % of samples (< rho = 5 %)
    acts[:50, 0, 1] = 1.0  # latent 1 active on 50 % (> rho)
    acts.requires_grad_(True)
    pen = per_latent_penalty(acts, torch.ones(1, 2, dtype=torch.float64), "smooth_l0_freq")
    # isolate the frequency term by subtracting the elementwise smooth-L0 part
    kl_part = pen - per_latent_penalty(acts, torch.ones(1, 2, dtype=torch.float64), "smooth_l0")
    (grad,) = torch.autograd.grad(kl_part.sum(), acts)
    assert grad[0, 0, 0] < 0 < grad[0, 0, 1]


def test_lp_gradient_blows_up_near_zero_but_stays_finite_at_zero():
    s = torch.tensor([0.0, 1e-10, 1e-4, 1.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(PENALTIES["lp_half"](s).sum(), s)
    assert torch.isfinite(g).all()
    assert g[0] == 0  # at exactly zero the floor cuts the gradient (no inf*0 = NaN)
    torch.testing.assert_close(g[1:], 0.5 / s.detach()[1:].sqrt())  # exact d sqrt(s)/ds elsewhere
    assert g[1] > 1e4 * g[3]


def test_lp_with_decoder_norm_scaling_has_no_nan_gradient():
    acts = torch.tensor([[[0.0, 2.0]]], requires_grad=True)
    norms = torch.tensor([[1.5, 0.5]], requires_grad=True)
    pen = per_latent_penalty(acts, norms, "lp_half").sum()
    g_acts, g_norms = torch.autograd.grad(pen, [acts, norms])
    assert torch.isfinite(g_acts).all() and torch.isfinite(g_norms).all()


# ---------------------------------------------------------------------------- priors
def test_log_prior_is_minus_coeff_times_penalty():
    s = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(implied_log_prior("log1p_abs", s, 3.0), -3.0 * torch.log1p(s))
    # the batch-level penalty's prior is that of its elementwise part
    torch.testing.assert_close(implied_log_prior("smooth_l0_freq", s, 2.0), implied_log_prior("smooth_l0", s, 2.0))
    with pytest.raises(ValueError, match="-1"):
        implied_log_prior("l1", s, -1.0)


@pytest.mark.parametrize(
    "kind, coeff, proper",
    [
        ("l1", 0.5, True), ("lp_half", 0.1, True),
        ("log1p_sq", 0.6, True), ("log1p_sq", 0.5, False),
        ("log1p_abs", 1.5, True), ("log1p_abs", 1.0, False), ("log1p_abs", 0.9, False),
        ("tanh", 50.0, False), ("smooth_l0", 50.0, False), ("smooth_l0_freq", 5.0, False),
    ],
)
def test_prior_is_proper(kind, coeff, proper):
    assert prior_is_proper(kind, coeff) is proper


def test_prior_densities_match_closed_forms():
    s = torch.linspace(0, 60, 600_001, dtype=torch.float64)
    # L1 at coeff 2: exponential density 2 exp(-2 s) (mass beyond 60 is negligible)
    torch.testing.assert_close(prior_density("l1", s, 2.0)[:5], 2 * torch.exp(-2 * s[:5]), rtol=1e-6, atol=0)
    # log1p_abs at coeff c: Lomax with shape c - 1 = 3: density 3 (1 + s)^-4 (tail beyond 60 ~ 4e-6)
    torch.testing.assert_close(prior_density("log1p_abs", s, 4.0)[:5], 3 * (1 + s[:5]) ** -4, rtol=1e-4, atol=0)
    # log1p_sq at coeff 1: half-Cauchy 2 / (pi (1 + s^2)), truncated at 60: renormalise by its mass
    mass = 2 / math.pi * math.atan(60.0)
    torch.testing.assert_close(
        prior_density("log1p_sq", s, 1.0)[:5], 2 / (math.pi * (1 + s[:5] ** 2)) / mass, rtol=1e-6, atol=0
    )


def test_prior_density_rejects_bad_grid():
    with pytest.raises(ValueError, match="ascending"):
        prior_density("l1", torch.tensor([1.0, 0.0]), 1.0)


# ---------------------------------------------------------------------------- training
def _toy_data(batch, g):
    x = torch.zeros(batch, 4)
    x[torch.arange(batch), torch.randint(0, 4, (batch,), generator=g)] = 1.0
    return x


def test_per_instance_penalties_match_separate_runs():
    cfg = SAEConfig(d_in=4, d_sae=4, n_inst=2, seed=3)
    both = SAE(cfg)
    train_sae(both, _toy_data, TrainConfig(steps=30, penalty=["l1", "log1p_sq"], l1_coeff=0.1, progress=False))
    for i, kind in enumerate(("l1", "log1p_sq")):
        single = SAE(cfg)
        train_sae(single, _toy_data, TrainConfig(steps=30, penalty=kind, l1_coeff=0.1, progress=False))
        # instances never interact, so instance i of the mixed run equals instance i of a pure run
        torch.testing.assert_close(both.W_dec[i], single.W_dec[i], rtol=1e-5, atol=1e-6)


def test_penalty_list_length_is_checked():
    with pytest.raises(ValueError, match="3 entries but n_inst=2"):
        train_sae(SAE(SAEConfig(d_in=4, d_sae=4, n_inst=2)), _toy_data,
                  TrainConfig(steps=2, penalty=["l1"] * 3, progress=False))


@pytest.mark.parametrize("kind", ["lp_half", "smooth_l0_freq", "tanh"])
def test_every_penalty_trains_without_nan(kind):
    sae = SAE(SAEConfig(d_in=4, d_sae=4, n_inst=1))
    hist = train_sae(sae, _toy_data, TrainConfig(steps=50, penalty=kind, l1_coeff=0.3, progress=False))
    assert torch.isfinite(hist.final("loss")).all()
    assert all(torch.isfinite(p).all() for p in sae.parameters())
