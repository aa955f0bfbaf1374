"""Tests for saelib.core.train_parts, each part alone: the loss of one step, the sparsity controller,
dead-latent resampling, latent permutation, and History.record (saelib.core.train)."""

import pytest
import torch

from saelib.core.matryoshka import MatryoshkaConfig, PerInstanceMatryoshka, latent_weights, matryoshka_loss
from saelib.core.sae import SAE
from saelib.core.train import History
from saelib.core.train_parts import (
    DeadLatentResampler,
    LatentPermuter,
    SparsityController,
    SparsityPenalty,
    step_loss,
)
from tests.builders import build_sae_cfg

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see tests/conftest.py


def build_sae(**kw) -> SAE:
    return SAE(build_sae_cfg(**{"d_sae": 6, "n_inst": 2, **kw}))


def batch(n=8, d=5, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- step loss
def test_step_loss_is_mse_plus_coefficient_times_l1_by_hand():
    sae = build_sae()
    x_in = batch()
    x = sae.expand_instances(x_in)
    coeff = torch.tensor([0.5, 2.0])
    loss, x_hat, acts = step_loss(sae, x_in, x, coeff, SparsityPenalty(["l1", "l1"], [0.05, 0.05]))
    mse = (x - x_hat).pow(2).sum(-1).mean(0)
    l1 = (acts * sae.decoder_norms()).sum(-1).mean(0)
    torch.testing.assert_close(loss, mse + coeff * l1)
    no_penalty, _, _ = step_loss(sae, x_in, x, coeff)  # TopK / BatchTopK: no penalty term
    torch.testing.assert_close(no_penalty, mse)


def test_step_loss_matryoshka_uses_the_loss_and_prefix_weighted_penalty():
    sae = build_sae()
    x_in = batch(seed=1)
    x = sae.expand_instances(x_in)
    plan = PerInstanceMatryoshka.build(
        [MatryoshkaConfig(mode="fixed", prefixes=(2,)), MatryoshkaConfig(mode="every", weight_sparsity_by_prefix=False,
                                                                         inner_grad_scale=0.5)], 2)
    weights = plan.weights(6)
    coeff = torch.tensor([1.0, 1.0])
    pen = SparsityPenalty(["l1", "l1"], [0.05, 0.05], scale_by_decoder_norm=False)
    loss, x_hat, acts = step_loss(sae, x_in, x, coeff, pen, plan, weights)
    recon = matryoshka_loss(x, acts, sae.W_dec, sae.b_dec, weights, plan.inner_grad_scale)
    per_latent = acts.mean(0)  # [inst, d_sae], scale 1
    lw = latent_weights(weights, plan.inner_grad_scale)
    sparsity = torch.stack([(per_latent[0] * lw[0]).sum(), per_latent[1].sum()])
    torch.testing.assert_close(loss, recon + sparsity)
    with pytest.raises(ValueError, match="prefix weights"):
        step_loss(sae, x_in, x, coeff, pen, plan, None)


def test_sparsity_penalty_mixes_kinds_per_instance():
    sae = build_sae()
    acts = torch.relu(torch.randn(8, 2, 6, generator=torch.Generator().manual_seed(2)))
    both = SparsityPenalty(["l1", "tanh"], [0.05, 0.05])(sae, acts)
    alone = [SparsityPenalty([k, k], [0.05, 0.05])(sae, acts)[i] for i, k in enumerate(("l1", "tanh"))]
    torch.testing.assert_close(both, torch.stack(alone))


# ---------------------------------------------------------------------------- controller
def test_controller_ramps_then_steers_towards_the_target():
    c = SparsityController(torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0]), eps=0.1, warmup_steps=4)
    assert c.steers
    torch.testing.assert_close(c.in_force(0), torch.tensor([0.25, 0.25]))
    torch.testing.assert_close(c.in_force(9), torch.tensor([1.0, 1.0]))
    c.update(1, torch.tensor([5.0, 1.0]))  # still warming up: unchanged
    torch.testing.assert_close(c.coeff, torch.tensor([1.0, 1.0]))
    c.update(3, torch.tensor([5.0, 1.0]))  # L0 above target: up; below: down
    torch.testing.assert_close(c.coeff, torch.tensor([1.1, 0.9]))
    fixed = SparsityController(torch.tensor([2.0]), None, eps=0.1, warmup_steps=0)
    assert not fixed.steers
    fixed.update(10, None)
    torch.testing.assert_close(fixed.in_force(0), torch.tensor([2.0]))  # warm-up of at least 1 step


# ---------------------------------------------------------------------------- resampling
def test_resampler_points_dead_latents_at_inputs_when_due_only():
    sae = build_sae(architecture="relu")
    opt = torch.optim.Adam(sae.parameters())
    r = DeadLatentResampler(every=2, until_step=3, generators=torch.Generator().manual_seed(0),
                            n_inst=2, d_sae=6, device="cpu")
    x_in = batch(seed=3)
    x = sae.expand_instances(x_in)
    acts = torch.zeros(8, 2, 6)
    acts[:, :, :4] = 1.0  # latents 4 and 5 never fire
    before = sae.W_enc.detach().clone()
    assert not r(0, sae, opt, acts, x_in, x, torch.zeros_like(x))  # step 1 is not a multiple of 2
    assert torch.equal(sae.W_enc, before)
    assert r(1, sae, opt, acts, x_in, x, torch.zeros_like(x))
    assert torch.equal(sae.W_enc[:, :, :4], before[:, :, :4])
    assert not torch.equal(sae.W_enc[:, :, 4:], before[:, :, 4:])
    assert (sae.b_enc[:, 4:] == 0).all()
    # each new encoder column points along (x - b_dec) of some batch row
    v = sae.W_enc[0, :, 4] / sae.W_enc[0, :, 4].norm()
    rows = (x_in - sae.b_dec[0]) / (x_in - sae.b_dec[0]).norm(dim=-1, keepdim=True)
    assert torch.isclose(rows @ v, torch.tensor(1.0), atol=1e-5).any()
    assert not r.fired.any()  # the window restarts
    assert not r(3, sae, opt, acts, x_in, x, torch.zeros_like(x))  # past until_step


def test_resampler_zeroes_the_adam_moments_of_resampled_latents_only():
    sae = build_sae(architecture="relu")
    opt = torch.optim.Adam(sae.parameters())
    x_in = batch(seed=3)
    x_hat, _ = sae(x_in)
    x_hat.pow(2).sum().backward()
    opt.step()  # every parameter now has non-zero moments
    moments = {(name, key): opt.state[getattr(sae, name)][key].clone()
               for name in ("W_enc", "b_enc", "W_dec") for key in ("exp_avg", "exp_avg_sq")}
    r = DeadLatentResampler(every=1, until_step=5, generators=torch.Generator().manual_seed(0),
                            n_inst=2, d_sae=6, device="cpu")
    acts = torch.zeros(8, 2, 6)
    acts[:, 0, :4] = 1.0  # instance 0: latents 4 and 5 never fire
    acts[:, 1, :] = 1.0  # instance 1: every latent fires
    x = sae.expand_instances(x_in)
    assert r(0, sae, opt, acts, x_in, x, torch.zeros_like(x))
    for (name, key), old in moments.items():
        new = opt.state[getattr(sae, name)][key]
        dead, old_dead = (m[0, :, 4:] if name == "W_enc" else m[0, 4:] for m in (new, old))
        kept_0, old_0 = (m[0, :, :4] if name == "W_enc" else m[0, :4] for m in (new, old))
        assert (old_dead != 0).all() and (dead == 0).all(), (name, key)
        assert torch.equal(kept_0, old_0) and torch.equal(new[1], old[1]), (name, key)


# ---------------------------------------------------------------------------- permutation
def test_permuter_sorts_by_the_ema_and_leaves_other_instances():
    sae = build_sae()
    opt = torch.optim.Adam(sae.parameters())
    plan = PerInstanceMatryoshka.build([MatryoshkaConfig(permute_latents=True, permute_ema=0.0),
                                        MatryoshkaConfig(permute_latents=False)], 2)
    assert LatentPermuter.for_plan(PerInstanceMatryoshka.build(MatryoshkaConfig(), 2), sae) is None
    p = LatentPermuter.for_plan(plan, sae)
    assert p is not None
    acts = torch.zeros(4, 2, 6)
    acts[:, :, 3] = 2.0
    acts[:, :, 5] = 1.0
    W_dec = sae.W_dec.detach().clone()
    perm = p(sae, opt, acts)
    assert perm[0, :2].tolist() == [3, 5]
    assert perm[1].tolist() == list(range(6))
    torch.testing.assert_close(sae.W_dec[0], W_dec[0, perm[0]])
    torch.testing.assert_close(sae.W_dec[1], W_dec[1])
    assert p.sq_act_ema[0, 0] >= p.sq_act_ema[0, 1] >= p.sq_act_ema[0, 2]  # the statistic moved along


# ---------------------------------------------------------------------------- history
def test_history_record_appends_metrics_of_the_batch():
    h = History()
    x = torch.tensor([[[1.0, 0.0]], [[3.0, 0.0]]])  # [batch 2, inst 1, d 2]
    x_hat = torch.tensor([[[1.0, 1.0]], [[3.0, 0.0]]])
    loss, coeff = torch.tensor([0.7]), torch.tensor([0.1])
    h.record(5, loss, x, x_hat, torch.tensor([2.0]), coeff)
    loss += 1  # recorded values are copies
    assert h.step == [5]
    torch.testing.assert_close(h.loss[0], torch.tensor([0.7]))
    torch.testing.assert_close(h.mse[0], torch.tensor([0.5]))  # errors 1 and 0
    torch.testing.assert_close(h.fvu[0], torch.tensor([1.0 / 2.0]))  # variance: (1 + 1) about the mean
    torch.testing.assert_close(h.l0[0], torch.tensor([2.0]))
    torch.testing.assert_close(h.l1_coeff[0], coeff)
