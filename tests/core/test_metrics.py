"""Tests for saelib.core.metrics: expected values are hand-computed or brute-forced, never taken from
the code under test."""

import itertools
import math

import numpy as np
import pytest
import torch

from saelib.core.metrics import (
    best_match_stats,
    check_finite,
    cosine_matrix,
    dead_latents,
    decoder_cosines,
    encoder_cosines,
    feature_density,
    fvu,
    hungarian_match,
    hungarian_order,
    instance_indices,
    l0,
    mcc,
    recovered_features,
    unit_rows,
)

S = 1 / math.sqrt(2)


def brute_force_best(abs_cos: np.ndarray) -> float:
    """Largest summed |cos| over all one-to-one matchings (min(n, m) pairs)."""
    n, m = abs_cos.shape
    if n >= m:
        return max(sum(abs_cos[rows[j], j] for j in range(m)) for rows in itertools.permutations(range(n), m))
    return max(sum(abs_cos[i, cols[i]] for i in range(n)) for cols in itertools.permutations(range(m), n))


# ---------------------------------------------------------------------------- cosines
def test_unit_rows_by_hand_keeps_zero_rows_and_batch_dims():
    t = torch.tensor([[[3.0, 4.0], [0.0, 0.0]], [[0.0, -2.0], [1.0, 1.0]]])  # [2, 2, 2]
    out = unit_rows(t)
    assert out.shape == t.shape and out.dtype == t.dtype
    assert out[0, 0].tolist() == pytest.approx([0.6, 0.8], abs=1e-7) and out[0, 1].tolist() == [0.0, 0.0]
    assert out[1, 0].tolist() == [0.0, -1.0]
    assert out[1, 1].tolist() == pytest.approx([S, S], abs=1e-7)


def test_check_finite_names_the_tensor():
    check_finite("ok", torch.zeros(3))
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="^W_dec contains NaN or inf values$"):
            check_finite("W_dec", torch.tensor([0.0, bad]))


def test_instance_indices_all_one_or_listed_in_order():
    assert instance_indices(3, None) == [0, 1, 2]
    assert instance_indices(3, 2) == [2]
    assert instance_indices(3, [2, 0]) == [2, 0]
    assert instance_indices(3, range(1, 3)) == [1, 2]
    with pytest.raises(ValueError, match="instances is empty"):
        instance_indices(3, [])
    for bad in (3, -1, [0, 5], [1.0]):
        with pytest.raises(ValueError, match=r"instance index .* out of range for n_inst=3"):
            instance_indices(3, bad)


def test_cosine_matrix_hand_values_and_zero_rows():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [-2.0, 0.0]])
    b = torch.tensor([[0.0, 2.0], [3.0, 0.0], [0.0, 0.0]])
    expected = torch.tensor([[0.0, 1.0, 0.0], [S, S, 0.0], [0.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    out = cosine_matrix(a, b)
    assert out.shape == (4, 3)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, expected)


def test_cosine_matrix_dim_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 5\)"):
        cosine_matrix(torch.ones(2, 3), torch.ones(4, 5))
    with pytest.raises(ValueError, match="2-D"):
        cosine_matrix(torch.ones(2, 3, 1), torch.ones(4, 3))


def test_decoder_and_encoder_cosines_analytic():
    features = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # [n_feat=2, d_in=3]
    W_dec = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 5.0]])  # [d_sae=3, d_in=3]
    expected = torch.tensor([[1.0, 0.0], [S, S], [0.0, 0.0]])
    torch.testing.assert_close(decoder_cosines(W_dec, features), expected)
    # encoder directions are the columns of W_enc [d_in, d_sae]
    W_enc = torch.tensor([[0.0, 3.0], [-1.0, 3.0], [0.0, 0.0]])  # latent 0 = -e1, latent 1 = e0+e1
    torch.testing.assert_close(encoder_cosines(W_enc, features), torch.tensor([[0.0, -1.0], [S, S]]))


def test_decoder_cosines_rejects_stacked_instances():
    W_dec = torch.randn(2, 4, 3)  # [inst, d_sae, d_in]: caller forgot sae.W_dec[i]
    with pytest.raises(ValueError, match=r"W_dec\[i\]"):
        decoder_cosines(W_dec, torch.randn(5, 3))
    with pytest.raises(ValueError, match="d_in"):
        encoder_cosines(torch.randn(4, 3), torch.randn(5, 3))  # W_enc [d_in=4] vs d_in=3


# ---------------------------------------------------------------------------- matching
@pytest.mark.parametrize("shape", [(4, 4), (5, 3), (3, 5), (1, 4), (6, 2)])
def test_hungarian_match_is_optimal_vs_brute_force(shape):
    cos = torch.rand(*shape) * 2 - 1
    latent_idx, feature_idx = hungarian_match(cos)
    n_match = min(shape)
    assert latent_idx.dtype == feature_idx.dtype == torch.long
    assert len(latent_idx) == len(feature_idx) == n_match
    assert len(set(latent_idx.tolist())) == n_match and len(set(feature_idx.tolist())) == n_match
    assert feature_idx.tolist() == sorted(feature_idx.tolist())
    got = cos.abs()[latent_idx, feature_idx].sum().item()
    assert got == pytest.approx(brute_force_best(cos.abs().numpy()), abs=1e-6)


def test_hungarian_match_uses_absolute_cosine():
    # Greedy on signed cos would pair latent 0 with feature 0 (0.5); |cos| prefers -0.9.
    cos = torch.tensor([[0.5, -0.9], [0.4, 0.1]])
    latent_idx, feature_idx = hungarian_match(cos)
    assert feature_idx.tolist() == [0, 1]
    assert latent_idx.tolist() == [1, 0]


def test_hungarian_order_known_permutation():
    # latent 3 is feature 0, latent 0 is feature 1, latent 2 is feature 2; latents 1, 4 unmatched.
    cos = torch.zeros(5, 3)
    cos[3, 0], cos[0, 1], cos[2, 2] = 0.95, -0.9, 0.8
    cos[1] = torch.tensor([0.1, 0.05, 0.1])
    cos[4] = torch.tensor([0.2, 0.1, 0.0])
    order = hungarian_order(cos)
    assert order.tolist() == [3, 0, 2, 1, 4]
    assert torch.equal(cos[order].diagonal(), torch.tensor([0.95, -0.9, 0.8]))


def test_hungarian_order_fewer_latents_than_features():
    cos = torch.tensor([[0.0, 0.0, 0.9], [0.8, 0.0, 0.0]])  # latent 0 ↔ f2, latent 1 ↔ f0
    assert hungarian_order(cos).tolist() == [1, 0]


def test_hungarian_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        hungarian_match(torch.tensor([[float("nan"), 0.0]]))


def test_mcc_hand_value_and_brute_force():
    cos = torch.tensor([[0.1, -0.9], [0.8, 0.2]])
    assert mcc(cos) == pytest.approx((0.9 + 0.8) / 2)
    for shape in [(4, 4), (5, 3), (3, 5)]:
        c = torch.rand(*shape) * 2 - 1
        assert mcc(c) == pytest.approx(brute_force_best(c.abs().numpy()) / min(shape), abs=1e-6)


def test_mcc_perfect_recovery_is_one_for_permuted_signed_features():
    features = torch.linalg.qr(torch.randn(6, 6))[0][:4]  # 4 orthonormal features in R^6
    W_dec = torch.cat([-features[[2, 0]], features[[3, 1]] * 3.0, torch.zeros(1, 6)])  # 5 latents
    assert mcc(decoder_cosines(W_dec, features)) == pytest.approx(1.0, abs=1e-6)


def test_recovered_features_signed_threshold_and_unmatched():
    cos = torch.tensor([
        [0.95, 0.0, 0.0],   # latent 0 ↔ f0, recovered
        [0.0, -0.97, 0.0],  # latent 1 ↔ f1 by |cos|, but anti-aligned: not recovered
        [0.0, 0.0, 0.5],    # latent 2 ↔ f2, below threshold
    ])
    assert recovered_features(cos).tolist() == [True, False, False]
    assert recovered_features(cos, threshold=0.4).tolist() == [True, False, True]
    # 1 latent, 3 features: only the matched feature can be recovered.
    assert recovered_features(torch.tensor([[0.1, 0.99, 0.2]])).tolist() == [False, True, False]


def test_best_match_stats_hand_values():
    W_b = torch.tensor([[1.0, 0.0, 0.0]])
    angles = torch.tensor([0.2, 0.4, 0.6, 0.95])  # target cosines with W_b's only row
    W_a = torch.stack([angles, torch.sqrt(1 - angles**2), torch.zeros(4)], dim=1)
    W_a[1] *= 7.0  # scale must not matter
    stats = best_match_stats(W_a, W_b)
    torch.testing.assert_close(stats["best_cos"], angles)
    assert stats["frac_gt_0.9"] == pytest.approx(0.25)
    assert stats["frac_gt_0.8"] == pytest.approx(0.25)
    assert stats["median"] == pytest.approx(0.5)  # mean of the middle two, 0.4 and 0.6


def test_best_match_stats_takes_max_over_rows_of_b():
    W_a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    W_b = torch.tensor([[1.0, 0.0], [0.0, -1.0], [1.0, 1.0]])
    stats = best_match_stats(W_a, W_b)
    torch.testing.assert_close(stats["best_cos"], torch.tensor([1.0, S, 1.0]))
    assert stats["frac_gt_0.9"] == pytest.approx(2 / 3)
    assert stats["median"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------- FVU
def test_fvu_hand_value_2d():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean [2, 0]; sum ||x - mean||² = 2
    x_hat = torch.tensor([[1.0, 0.5], [3.0, 0.0]])  # sum ||x - x_hat||² = 0.25
    out = fvu(x, x_hat)
    assert out.shape == ()
    assert out.item() == pytest.approx(0.125)
    assert fvu(x, x).item() == 0.0
    assert fvu(x, x.mean(0, keepdim=True).expand_as(x)).item() == pytest.approx(1.0)


def test_fvu_per_instance_and_broadcast_input():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    x_hat = torch.stack([x, torch.tensor([[1.0, 0.5], [3.0, 0.0]]), torch.full((2, 2), 2.0)], dim=1)
    # inst 0: perfect; inst 1: 0.25 / 2; inst 2: (||(-1, -2)||² + ||(1, -2)||²) / 2 = 10 / 2
    expected = torch.tensor([0.0, 0.125, 5.0])
    x3 = x[:, None, :].expand(-1, 3, -1)
    torch.testing.assert_close(fvu(x3, x_hat), expected)
    torch.testing.assert_close(fvu(x, x_hat), expected)


def test_fvu_errors():
    x = torch.randn(8, 3)
    with pytest.raises(ValueError, match=r"\(8, 3\).*\(8, 4\)"):
        fvu(x, torch.randn(8, 4))
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fvu(bad, x)
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="inf"):
        fvu(bad, x)
    with pytest.raises(ValueError, match="variance"):
        fvu(torch.ones(4, 3), torch.zeros(4, 3))


# ---------------------------------------------------------------------------- sparsity
def test_l0_density_dead_hand_values():
    acts = torch.tensor([
        [0.0, 1.0, 2.0, 0.0],
        [0.0, 0.0, 0.5, 0.0],
        [0.0, 3.0, -1.0, 0.0],
        [0.0, 0.0, 4.0, 0.0],
    ])
    assert l0(acts).item() == pytest.approx((2 + 1 + 1 + 1) / 4)  # active = > 0: the -1.0 does not count
    torch.testing.assert_close(feature_density(acts), torch.tensor([0.0, 0.5, 0.75, 0.0]))
    assert dead_latents(acts).tolist() == [True, False, False, True]
    assert dead_latents(acts, threshold=0.5).tolist() == [True, True, False, True]


def test_l0_density_keep_instance_dims():
    acts = torch.zeros(5, 2, 3)  # [batch, inst, d_sae]
    acts[:, 0, 0] = 1.0          # inst 0: latent 0 always on
    acts[:2, 1, :] = 2.0         # inst 1: all latents on in 2 of 5 samples
    torch.testing.assert_close(l0(acts), torch.tensor([1.0, 3 * 2 / 5]))
    torch.testing.assert_close(feature_density(acts), torch.tensor([[1.0, 0, 0], [0.4, 0.4, 0.4]]))
    assert dead_latents(acts).tolist() == [[False, True, True], [False, False, False]]


def test_sparsity_metrics_reject_bad_shapes():
    with pytest.raises(ValueError, match="batch"):
        l0(torch.ones(3))
    with pytest.raises(ValueError, match="threshold"):
        dead_latents(torch.ones(2, 3), threshold=1.5)


@pytest.mark.parametrize("metric", [l0, feature_density, dead_latents])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_sparsity_metrics_reject_non_finite_acts(metric, value):
    """NaN passes through SAE.encode unchecked (it is a plain forward), so the metrics check:
    a NaN latent would otherwise count as active in L0 and as silent in the density."""
    acts = torch.rand(4, 2, 3)  # [batch, inst, d_sae]
    acts[1, 0, 2] = value
    with pytest.raises(ValueError, match=rf"acts contains 1 NaN/inf value\(s\) \(first at index \(1, 0, 2\): {value}\)"):
        metric(acts)


def test_metrics_catch_nan_passed_through_encode():
    from saelib.core.sae import SAE, SAEConfig

    x = torch.randn(6, 5)
    x[3, 1] = float("nan")
    for arch, k in (("relu", None), ("topk", 2)):
        acts = SAE(SAEConfig(d_in=5, d_sae=4, n_inst=2, architecture=arch, k=k)).encode(x)
        assert acts[3].isnan().any()  # documented: encode does not check
        with pytest.raises(ValueError, match=r"acts contains .* NaN/inf"):
            l0(acts)
