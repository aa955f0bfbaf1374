"""Tests for the SAEBench absorption scores and the hedging rate in saelib.experiments.absorption, on
hand-built SAEs whose answer follows from their construction.

Toy data: Chanin's parent with two mutually exclusive children (features 0 = P, 1 = C0, 2 = C1,
orthonormal, magnitude 1). With ``p_child = 0.5`` every parent sample has exactly one child.
"""

import math

import pytest
import torch

from saelib.experiments.absorption import (
    absorption_scores,
    extend_sae,
    hedging_scores,
    train_hedging_pair,
)
from saelib.experiments.hedging import hedging_coefficient
from saelib.core.sae import SAE, SAEConfig
from saelib.data.toy_data import chanin_parent_children
from saelib.core.train import TrainConfig

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
    s = absorption_scores(sae, h, x, c, projection_proportion_threshold=0.25)
    assert s.absorption_fraction.item() == pytest.approx(0.3, abs=1e-3)
    # a child latent at cos 1/sqrt(2) with the parent is no absorber above a 0.8 threshold
    s = absorption_scores(build_sae(*absorbing(h)), h, x, c, absorption_fraction_cos_threshold=0.8,
                          full_absorption_cos_threshold=0.8)
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
    with pytest.raises(ValueError, match="max_absorbing_latents"):
        absorption_scores(sae, h, x, c, max_absorbing_latents=0)
    with pytest.raises(ValueError, match="sae.d_in=5 but hierarchy.d=20"):
        absorption_scores(SAE(SAEConfig(d_in=5, d_sae=3)), h, x, c)


# ---------------------------------------------------------------------------- hedging
D = 20
E = torch.eye(D)


def dec_sae(W_dec: torch.Tensor) -> SAE:
    """An SAE whose only meaningful weights are the decoder rows ``W_dec`` ``[inst, d_sae, D]``."""
    inst, d_sae, _ = W_dec.shape
    return build_sae(W_dec.transpose(1, 2).clone(), W_dec, b_enc=0.0)


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
