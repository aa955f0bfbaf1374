"""Tests for saelib.experiments.hedging: the closed-form hedging coefficient against an independent numpy
eigendecomposition of a hand-built second moment, the single-latent MSE against hand algebra
and Monte Carlo, and the hedging rate of Chanin et al. 2025 on hand-built decoders whose answer
follows from their construction."""

import math

import numpy as np
import pytest
import torch

from saelib.core.sae import SAE, SAEConfig
from saelib.core.train import TrainConfig
from saelib.data.toy_data import chanin_parent_children
from saelib.experiments.hedging import (
    extend_sae,
    hedged_child_cosine,
    hedging_coefficient,
    hedging_rate,
    hedging_scores,
    optimal_single_latent,
    single_latent_mse,
    train_hedging_pair,
)

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


# ---------------------------------------------------------------------------- hedging rate
D = 20
E = torch.eye(D)


def dec_sae(W_dec: torch.Tensor) -> SAE:
    """An SAE whose only meaningful weights are the decoder rows ``W_dec`` ``[inst, d_sae, d_in]``
    (the encoder is their transpose; no biases)."""
    inst, d_sae, d_in = W_dec.shape
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, n_inst=inst, use_b_dec=False))
    with torch.no_grad():
        sae.W_enc.copy_(W_dec.transpose(1, 2))
        sae.W_dec.copy_(W_dec)
        sae.b_enc.zero_()
    return sae


def test_hedging_rate_by_hand():
    assert hedging_rate(0.5, 0.2) == pytest.approx(0.3 / 0.8, rel=1e-15)  # (0.5 - 0.2) / (1 - 0.2)
    assert hedging_rate(0.2, 0.2) == 0.0
    assert hedging_rate(0.1, 0.2) == 0.0  # less than chance: clipped at 0
    assert hedging_rate(1.0, 0.0) == 1.0
    assert math.isnan(hedging_rate(0.5, 1.0))


def expected_random_projection(r: int, d: int) -> float:
    """E||P u|| for a unit vector u and a uniformly random r-dim subspace of R^d:
    ||P u||^2 ~ Beta(r/2, (d-r)/2), and E[B^(1/2)] = Γ(a+1/2)Γ(a+b) / (Γ(a)Γ(a+b+1/2))."""
    a, b = r / 2, (d - r) / 2
    return math.exp(math.lgamma(a + 0.5) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(a + b + 0.5))


def into_span(theta: float) -> tuple[SAE, SAE]:
    """Control: rows e0, e1, e2. Extended: old row i turned by ``theta`` toward a unit vector of
    span(e3, e4), which the two new rows (0.1 e3 and e3 + e4, not orthogonal) span."""
    v = [E[3], E[4], (E[3] + E[4]) / math.sqrt(2)]
    old = [math.cos(theta) * E[i] + math.sin(theta) * v[i] for i in range(3)]
    ext = torch.stack(old + [0.1 * E[3], E[3] + E[4]])[None]
    return dec_sae(ext), dec_sae(E[:3][None].clone())


def test_rows_moving_into_the_new_span_score_high():
    theta = math.pi / 3
    ext, ctrl = into_span(theta)
    s = hedging_scores(ext, ctrl, n_baselines=400)
    assert (s.width, s.n_new, s.rank.tolist()) == (3, 2, [2])
    assert s.delta_proj.item() == pytest.approx(math.sin(theta), abs=1e-6)
    assert s.delta_norm.item() == pytest.approx(math.sqrt(2 - 2 * math.cos(theta)), abs=1e-6)
    assert s.mean_dec_cos.item() == pytest.approx(math.cos(theta), abs=1e-6)
    # |delta| = 1 here: the random baseline is E||P u|| for a random 2-dim subspace of R^20
    assert s.baseline_proj.item() == pytest.approx(expected_random_projection(2, D), abs=0.02)
    b = s.baseline_proj.item()
    assert s.hedging_rate.item() == pytest.approx((math.sin(theta) - b) / (1 - b), abs=1e-6)
    assert s.hedging_rate.item() > 0.75


def test_rows_that_do_not_move_score_zero():
    _, ctrl = into_span(0.3)
    ext = dec_sae(torch.cat([E[:3], 0.1 * E[3:5]])[None])
    s = hedging_scores(ext, ctrl)
    assert s.delta_proj.item() == 0.0 and s.baseline_proj.item() == 0.0
    assert s.hedging_rate.item() == 0.0


def test_rows_moving_elsewhere_score_zero():
    theta = math.pi / 3
    old = [math.cos(theta) * E[i] + math.sin(theta) * E[10 + i] for i in range(3)]
    ext = dec_sae(torch.stack(old + [E[3], E[4]])[None])
    s = hedging_scores(ext, dec_sae(E[:3][None].clone()))
    assert s.delta_proj.item() == pytest.approx(0.0, abs=1e-12)
    assert s.baseline_proj.item() > 0.1  # |delta| = 1: random subspaces do catch some of it
    assert s.hedging_rate.item() == 0.0


def test_hedged_parent_latent_moves_by_closed_form_amount():
    # control: one latent hedging a parent with two children, (f_P + t f_C0 + t f_C1) / n;
    # extended: the old latent becomes f_P and the two new latents take the children
    h = chanin_parent_children(p_parent=0.25, p_child=0.2, n_children=2)
    P, C0, C1 = h.features[:3]
    t = hedging_coefficient(0.2, 2)
    n = math.sqrt(1 + 2 * t * t)
    hedged = (P + t * (C0 + C1)) / n
    s = hedging_scores(dec_sae(torch.stack([P, C0, C1])[None]), dec_sae(hedged[None, None]))
    assert s.delta_proj.item() == pytest.approx(math.sqrt(2) * t / n, abs=1e-6)


def test_decoder_norms_do_not_matter():
    theta = math.pi / 4
    ext, ctrl = into_span(theta)
    with torch.no_grad():
        ext.W_dec.mul_(7.0)
        ctrl.W_dec.mul_(0.2)
    assert hedging_scores(ext, ctrl).delta_proj.item() == pytest.approx(math.sin(theta), abs=1e-6)


def test_rank_deficient_new_rows():
    # two new rows along e3 span one dimension; old rows move into e3
    ext = dec_sae(torch.stack([(E[0] + E[3]) / math.sqrt(2), E[1], E[3], 2 * E[3]])[None])
    s = hedging_scores(ext, dec_sae(E[:2][None].clone()), n_baselines=400)
    assert s.rank.tolist() == [1]
    assert s.delta_proj.item() == pytest.approx(math.sqrt(0.5) / 2, abs=1e-6)  # mean of 1/sqrt(2) and 0
    delta_norms = [math.sqrt((1 - math.sqrt(0.5)) ** 2 + 0.5), 0.0]
    assert s.baseline_proj.item() == pytest.approx(
        sum(delta_norms) / 2 * expected_random_projection(1, D), abs=0.02
    )


def test_before_gives_drift():
    theta = math.pi / 3
    ext, ctrl = into_span(theta)
    s = hedging_scores(ext, ctrl, before=ctrl)
    assert s.control_drift.item() == 0.0
    assert s.extended_drift.item() == pytest.approx(s.delta_norm.item(), abs=1e-12)
    assert hedging_scores(ext, ctrl).control_drift is None


def test_hedging_instances_and_seeds():
    ext0, ctrl0 = into_span(math.pi / 3)
    ext = dec_sae(torch.cat([ext0.W_dec.detach(), ext0.W_dec.detach()]))
    still = torch.cat([E[:3], ext0.W_dec.detach()[0, 3:]])[None]  # instance 1: old rows unmoved
    with torch.no_grad():
        ext.W_dec[1:] = still
    ctrl = dec_sae(torch.cat([ctrl0.W_dec.detach()] * 2))
    s = hedging_scores(ext, ctrl)
    assert s.hedging_rate[0] > 0.75 and s.hedging_rate[1] == 0.0
    one = hedging_scores(ext, ctrl, instances=0)
    assert one.instances == [0] and one.baseline_proj.item() == s.baseline_proj[0].item()
    assert hedging_scores(ext, ctrl, seed=5).baseline_proj[0] != s.baseline_proj[0]


def test_hedging_rejects_bad_inputs():
    ext, ctrl = into_span(0.5)
    with pytest.raises(ValueError, match=r"extended.d_sae=3 must exceed control.d_sae=5"):
        hedging_scores(ctrl, ext)
    with pytest.raises(ValueError, match="n_inst"):
        hedging_scores(ext, dec_sae(torch.cat([ctrl.W_dec.detach()] * 2)))
    with pytest.raises(ValueError, match="d_in"):
        hedging_scores(ext, dec_sae(torch.zeros(1, 3, 5) + 1))
    with pytest.raises(ValueError, match="n_baselines"):
        hedging_scores(ext, ctrl, n_baselines=1)
    with pytest.raises(ValueError, match=r"before.W_dec has shape \(1, 2, 20\)"):
        hedging_scores(ext, ctrl, before=dec_sae(E[:2][None].clone()))
    zero_new = dec_sae(torch.cat([E[:3], torch.zeros(2, D)])[None])
    with pytest.raises(ValueError, match="all zero"):
        hedging_scores(zero_new, ctrl)
    small = dec_sae(torch.eye(3)[None])  # d_in = 3: one old row, two new rows span 2 < 3 is fine
    big = dec_sae(torch.eye(3)[[0, 0, 1, 2]][None])  # three new rows span all 3 dimensions
    with pytest.raises(ValueError, match="span all d_in=3"):
        hedging_scores(big, dec_sae(torch.eye(3)[:1][None].clone()))
    assert hedging_scores(small, dec_sae(torch.eye(3)[:1][None].clone())).rank.tolist() == [2]
    with torch.no_grad():
        ext.W_dec[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="extended.W_dec contains NaN or inf"):
        hedging_scores(ext, ctrl)


# ---------------------------------------------------------------------------- extension
def test_extend_sae_keeps_old_latents_and_ties_new_ones():
    sae = SAE(SAEConfig(d_in=D, d_sae=4, n_inst=2, seed=3))
    with torch.no_grad():
        sae.b_enc.fill_(0.5)
        sae.b_dec.fill_(0.25)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    ext = extend_sae(sae, 3, init_norm=0.2, seed=1)
    assert ext.d_sae == 7 and ext.W_enc.shape == (2, D, 7) and ext.W_dec.shape == (2, 7, D)
    torch.testing.assert_close(ext.W_enc[:, :, :4], sae.W_enc)
    torch.testing.assert_close(ext.W_dec[:, :4], sae.W_dec)
    torch.testing.assert_close(ext.b_enc[:, :4], sae.b_enc)
    assert (ext.b_enc[:, 4:] == 0).all()
    torch.testing.assert_close(ext.b_dec, sae.b_dec)
    torch.testing.assert_close(ext.W_dec[:, 4:].norm(dim=-1), torch.full((2, 3), 0.2))
    torch.testing.assert_close(ext.W_enc[:, :, 4:], ext.W_dec[:, 4:].transpose(1, 2))
    assert not torch.allclose(ext.W_dec[0, 4:], ext.W_dec[1, 4:])  # each instance its own draw
    for k, v in sae.state_dict().items():  # the original is untouched
        torch.testing.assert_close(v, before[k], equal_nan=True)  # threshold: NaN until trained
    with pytest.raises(ValueError, match="n_new"):
        extend_sae(sae, 0)
    with pytest.raises(ValueError, match="init_norm"):
        extend_sae(sae, 1, init_norm=-1.0)


def test_train_hedging_pair_runs_and_scores():
    h = chanin_parent_children()
    before = SAE(SAEConfig(d_in=h.d, d_sae=2, n_inst=2, seed=0))
    snapshot = before.W_dec.detach().clone()
    cfg = TrainConfig(steps=30, batch_size=64, warmup_steps=5, log_every=10, progress=False)
    ext, ctrl = train_hedging_pair(before, 2, lambda b, g: h.sample(b, g)[0], cfg)
    assert ext.d_sae == 4 and ctrl.d_sae == 2
    torch.testing.assert_close(before.W_dec, snapshot)  # before is not trained
    assert not torch.allclose(ctrl.W_dec, snapshot)
    s = hedging_scores(ext, ctrl, before=before)
    assert s.hedging_rate.shape == (2,) and torch.isfinite(s.hedging_rate).all()
    assert (s.hedging_rate >= 0).all()
