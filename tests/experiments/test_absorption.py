"""Tests for the SAEBench absorption scores and the weight metrics in saelib.experiments.absorption, on
hand-built SAEs whose answer follows from their construction.

Toy data: Chanin's parent with two mutually exclusive children (features 0 = P, 1 = C0, 2 = C1,
orthonormal, magnitude 1). With ``p_child = 0.5`` every parent sample has exactly one child.
"""

import pytest
import torch

from saelib.experiments.absorption import (
    AbsorptionThresholds,
    ParentProjections,
    absorbed_projection,
    absorption_fraction,
    absorption_scores,
    full_absorption,
)
from saelib.core.sae import SAE, SAEConfig
from saelib.data.toy_data import chanin_parent_children

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see tests/conftest.py

BIAS = -1e-4  # every latent: rounding noise in f_i · f_j (~1e-8) never makes a latent fire


def build_sae(W_enc: torch.Tensor, W_dec: torch.Tensor, b_enc: float = BIAS) -> SAE:
    """An SAE with the given ``W_enc`` ``[inst, d_in, d_sae]`` and ``W_dec`` ``[inst, d_sae, d_in]``,
    no decoder bias."""
    inst, d_in, d_sae = W_enc.shape
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, n_inst=inst, use_b_dec=False))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.fill_(b_enc)
    return sae


def one_instance(enc_cols: list[torch.Tensor], dec_rows: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.stack(enc_cols, dim=1)[None], torch.stack(dec_rows)[None]


def absorbing(h, alpha: float = 1.0, absorb=(True, True)):
    """Child latent ``c`` writes ``f_c + alpha f_P`` (if ``absorb[c]``); the parent latent reads
    ``f_P - alpha f_c`` so that, when child ``c`` fires, it gives ``1 - alpha`` and the sum still
    reconstructs ``f_P + f_c``. ``alpha = 1`` is pure absorption (the parent latent is off: its
    encoder reads ``f_P - 2 f_c`` to be safely negative)."""
    P, C0, C1 = h.features[:3]
    enc_P = P.clone()
    decs = []
    for c, f in ((0, C0), (1, C1)):
        if absorb[c]:
            enc_P = enc_P - (2.0 if alpha == 1.0 else alpha) * f
            decs.append(f + alpha * P)
        else:
            decs.append(f.clone())
    return one_instance([enc_P, C0, C1], [P, decs[0], decs[1]])


def truth(h):
    P, C0, C1 = h.features[:3]
    return one_instance([P, C0, C1], [P, C0, C1])


def sample(h, n=4000, seed=0):
    return h.sample(n, torch.Generator().manual_seed(seed))


def always_child():
    h = chanin_parent_children(p_parent=0.25, p_child=0.5, n_children=2, exclusive=True)
    x, c = sample(h)
    assert ((c[:, 1] > 0) | (c[:, 2] > 0))[c[:, 0] > 0].all()  # the construction's premise
    return h, x, c


# ---------------------------------------------------------------------------- absorption
def hand_projections() -> ParentProjections:
    """Four samples, four latents (latent 0 the main one), values chosen to hit each of SAEBench's rules:
    A: main silent, latent 1 carries 0.8 of x·u = 1 (latent 2 adds 0.05); B: main active, absorbers carry
    0.3 < 0.4; C: main 0.2, latent 1 0.6; D: x·u < 0."""
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)
    return ParentProjections(
        acts=t([[0, 2, 1, 0], [1, 1, 0, 0], [0.5, 1, 0, 1], [0, 1, 0, 0]]),
        input_proj=t([1.0, 1.0, 1.0, -0.5]),
        latent_proj=t([[0, 0.8, 0.05, 0], [0.5, 0.3, 0, 0], [0.2, 0.6, 0, -0.1], [0, 0.3, 0, 0]]),
        latent_cos=t([0.9, 0.5, 0.2, -0.3]),
        is_main=torch.tensor([True, False, False, False]),
    )


def test_per_sample_rules_by_hand():
    proj = hand_projections()
    # A: every rule holds; B, C: the main latent fires; D: x·u <= 0
    assert full_absorption(proj).tolist() == [True, False, False, False]
    # absorbers: latents 1 and 2 (cos >= 0.1, not main) where their projection is positive
    assert absorbed_projection(proj).tolist() == pytest.approx([0.85, 0.3, 0.6, 0.3], abs=1e-15)
    assert absorbed_projection(proj, AbsorptionThresholds(max_absorbing_latents=1)).tolist() == [0.8, 0.3, 0.6, 0.3]
    # A: M = 0 -> 1; B: T = 0.3 < 0.4 -> 0; C: A = min(0.6, 1 - 0.2) = 0.6, 0.6 / (0.6 + 0.2); D: x·u < 0 -> 0
    assert absorption_fraction(proj).tolist() == pytest.approx([1.0, 0.0, 0.75, 0.0], abs=1e-15)
    # a stricter cosine leaves latent 1 (cos 0.5) as the only absorber and no full absorption
    strict = AbsorptionThresholds(full_absorption_cos=0.6, absorption_fraction_cos=0.3)
    assert full_absorption(proj, strict).tolist() == [False] * 4
    assert absorbed_projection(proj, strict).tolist() == [0.8, 0.3, 0.6, 0.3]


def test_pure_absorption_scores_one():
    h, x, c = always_child()
    s = absorption_scores(build_sae(*absorbing(h)), h, x, c)
    assert s.parents == [0] and s.instances == [0]
    assert s.main_latents == [[[0]]]  # the Hungarian match of the parent
    assert s.n_positive.tolist() == [int((c[:, 0] > 0).sum())]
    assert s.full_absorption.tolist() == [1.0]
    assert s.absorption_fraction.tolist() == [1.0]


def test_true_features_score_zero():
    h, x, c = always_child()
    s = absorption_scores(build_sae(*truth(h)), h, x, c)
    assert s.full_absorption.tolist() == [0.0]
    assert s.absorption_fraction.tolist() == [0.0]


def test_rate_is_share_of_parent_samples_with_an_absorbed_child():
    # children fire on 40 % of parent samples: only those samples are absorbed
    h = chanin_parent_children(p_parent=0.25, p_child=0.2, n_children=2, exclusive=True)
    x, c = sample(h)
    on = c[:, 0] > 0
    expected = ((c[:, 1] > 0) | (c[:, 2] > 0))[on].double().mean().item()
    assert 0.3 < expected < 0.5
    s = absorption_scores(build_sae(*absorbing(h)), h, x, c)
    assert s.full_absorption.item() == pytest.approx(expected, abs=1e-12)
    assert s.absorption_fraction.item() == pytest.approx(expected, abs=1e-12)


def test_one_child_absorbed_one_clean():
    h, x, c = always_child()
    expected = (c[:, 1] > 0)[c[:, 0] > 0].double().mean().item()  # C0 absorbed, C1 not
    s = absorption_scores(build_sae(*absorbing(h, absorb=(True, False))), h, x, c)
    assert s.full_absorption.item() == pytest.approx(expected, abs=1e-12)
    assert s.absorption_fraction.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("alpha, expected", [(0.3, 0.0), (0.5, 0.5), (0.7, 0.7)])
def test_partial_absorption_fraction(alpha, expected):
    # per sample: the parent latent carries 1 - alpha of the parent's projection, the child latent
    # alpha; SAEBench counts the absorbers only if they carry >= 0.4 of it
    h, x, c = always_child()
    s = absorption_scores(build_sae(*absorbing(h, alpha=alpha)), h, x, c)
    assert s.full_absorption.item() == 0.0  # the parent latent still fires
    assert s.absorption_fraction.item() == pytest.approx(expected, abs=1e-3)


def test_thresholds_are_arguments():
    h, x, c = always_child()
    sae = build_sae(*absorbing(h, alpha=0.3))
    s = absorption_scores(sae, h, x, c, thresholds=AbsorptionThresholds(projection_proportion=0.25))
    assert s.absorption_fraction.item() == pytest.approx(0.3, abs=1e-3)
    # a child latent at cos 1/sqrt(2) with the parent is no absorber above a 0.8 threshold
    strict = AbsorptionThresholds(absorption_fraction_cos=0.8, full_absorption_cos=0.8)
    s = absorption_scores(build_sae(*absorbing(h)), h, x, c, thresholds=strict)
    assert s.full_absorption.item() == 0.0 and s.absorption_fraction.item() == 0.0


def test_scale_between_encoder_and_decoder_does_not_matter():
    h, x, c = always_child()
    W_enc, W_dec = absorbing(h, alpha=0.5)
    W_enc[0, :, 1] /= 3.0
    W_dec[0, 1] *= 3.0  # same reconstruction, a decoder row of norm 3.35
    s = absorption_scores(build_sae(W_enc, W_dec, b_enc=0.0), h, x, c)
    assert s.absorption_fraction.item() == pytest.approx(0.5, abs=1e-5)


def test_child_latents_declared_main_hide_absorption():
    # SAEBench's k-sparse probing would call the absorbing child latents splits of the parent
    h, x, c = always_child()
    s = absorption_scores(build_sae(*absorbing(h)), h, x, c, main_latents={0: [0, 1, 2]})
    assert s.main_latents == [[[0, 1, 2]]]
    assert s.full_absorption.item() == 0.0 and s.absorption_fraction.item() == 0.0


def test_instances_are_scored_separately():
    h, x, c = always_child()
    (e0, d0), (e1, d1) = absorbing(h), truth(h)
    sae = build_sae(torch.cat([e0, e1]), torch.cat([d0, d1]))
    assert absorption_scores(sae, h, x, c).full_absorption.tolist() == [1.0, 0.0]
    s = absorption_scores(sae, h, x, c, instances=[1, 0])
    assert s.instances == [1, 0] and s.absorption_fraction.tolist() == [0.0, 1.0]
    assert absorption_scores(sae, h, x, c, instances=1).full_absorption.tolist() == [0.0]
    assert s.full_absorption_by_parent.shape == (2, 1)
    # one main-latent mapping per scored instance (here the same as the Hungarian match)
    s = absorption_scores(sae, h, x, c, instances=[0, 1], main_latents=[{0: [0]}, {0: [0]}])
    assert s.full_absorption.tolist() == [1.0, 0.0]


def test_absorption_does_not_change_training_mode():
    h, x, c = always_child()
    sae = build_sae(*absorbing(h))
    sae.train()
    absorption_scores(sae, h, x, c)
    assert sae.training


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda x, c: (x[:, :5], c), r"x must be \[batch, d_in=20\].*\(4000, 5\)"),
        (lambda x, c: (x, c[:, :2]), r"coeffs must be \[batch, n_feat=3\].*\(4000, 2\)"),
        (lambda x, c: (x[:10], c), r"x has 10 samples but coeffs has 4000"),
        (lambda x, c: (x[:0], c[:0]), r"empty"),
        (lambda x, c: (x.clone().fill_(float("nan")), c), r"x contains NaN"),
        (lambda x, c: (x, torch.where(c > 0, torch.zeros_like(c), c)), r"parent feature 0 never fires"),
    ],
)
def test_absorption_rejects_bad_inputs(mutate, match):
    h, x, c = always_child()
    sae = build_sae(*truth(h))
    with pytest.raises(ValueError, match=match):
        absorption_scores(sae, h, *mutate(x, c))


def test_absorption_rejects_bad_arguments():
    h, x, c = always_child()
    sae = build_sae(*truth(h))
    with pytest.raises(ValueError, match="instance index 3"):
        absorption_scores(sae, h, x, c, instances=3)
    with pytest.raises(ValueError, match="parent feature 7 out of range"):
        absorption_scores(sae, h, x, c, parents=[7])
    with pytest.raises(ValueError, match="no entry for parent feature 0"):
        absorption_scores(sae, h, x, c, main_latents={1: [0]})
    with pytest.raises(ValueError, match=r"latent indices \[5\]"):
        absorption_scores(sae, h, x, c, main_latents={0: [5]})
    with pytest.raises(ValueError, match="max_absorbing_latents must be an int >= 1, got 0"):
        AbsorptionThresholds(max_absorbing_latents=0)
    with pytest.raises(ValueError, match="projection_proportion must be finite, got nan"):
        AbsorptionThresholds(projection_proportion=float("nan"))
    with pytest.raises(ValueError, match="sae.d_in=5 but hierarchy.d=20"):
        absorption_scores(SAE(SAEConfig(d_in=5, d_sae=3)), h, x, c)


def test_weight_metrics_of_the_true_dictionary_and_of_a_missing_feature():
    from saelib.data.toy_data import nabeshima_tree
    from saelib.experiments.absorption import instance_summary, weight_metrics
    from saelib.experiments.hierarchy_analysis import init_at_features

    tree = nabeshima_tree(seed=0)
    n = tree.n_features
    sae = SAE(SAEConfig(d_in=tree.d, d_sae=n, n_inst=2, seed=1))
    init_at_features(sae, tree.features, list(range(n)))
    # instance 1: latent 0 writes feature 1 as well, so feature 0 has no latent of its own
    init_at_features(sae, tree.features, [1] + list(range(1, n)), instances=[1])
    true, missing = weight_metrics(sae, 0, tree), weight_metrics(sae, 1, tree)
    assert true["mcc"] == pytest.approx(1.0) and true["recovered"] == n and true["stuck"] == 0
    assert true["diagonal"] == pytest.approx(1.0)
    assert missing["recovered"] == n - 1 and missing["stuck"] == 1 and missing["mcc"] < 1 - 1 / (2 * n)
    assert instance_summary(sae, tree) == [true, missing]
    with pytest.raises(IndexError, match="instance 2"):
        weight_metrics(sae, 2, tree)
