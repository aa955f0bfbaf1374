"""Tests for the Matryoshka variants in saelib.core.matryoshka (inner-loss weights, gradient routing
into inner latents, per-term masks), the probes of Nabeshima's hypothesis in
saelib.experiments.matryoshka_probes (the parent-in / child-out terms, the decoder-gradient probe) and
per-instance configs in saelib.core.train.

Gradients are checked against a naive loop that decodes every prefix with explicit
``detach`` on the inner latents; expected weights are worked out by hand.
"""

import pytest
import torch

import saelib.core.matryoshka as mat
from saelib.core.matryoshka import (
    MatryoshkaConfig,
    PerInstanceMatryoshka,
    batched_prefix_weights,
    expected_prefix_weights,
    latent_weights,
    matryoshka_loss,
    prefix_weights,
    previous_prefix,
)
from saelib.experiments.matryoshka_probes import SplitTermMask, parent_child_split_terms, prefix_term_gradient
from saelib.core.sae import SAE, SAEConfig
from saelib.data.toy_data import FeatureNode, HierarchySpec, ToyHierarchy, nabeshima_tree
from saelib.core.train import TrainConfig, train_sae
from tests.builders import matryoshka_problem

D = torch.float64


def build_problem(batch=5, inst=3, d_sae=6, d_in=4, seed=0):
    return matryoshka_problem(batch, inst, d_sae, d_in, D, seed)


def sparse_weights(inst_lengths, d_sae):
    """Weights with the given chosen lengths per instance, weight i+1 for the i-th (then normalised)."""
    w = torch.zeros(len(inst_lengths), d_sae, dtype=D)
    for i, lengths in enumerate(inst_lengths):
        for k, m in enumerate(lengths):
            w[i, m - 1] = k + 1.0
    return w / w.sum(-1, keepdim=True)


def naive_routed_loss(x, acts, W_dec, b_dec, weights, gamma, keep=None):
    """sum_m w_m mean_b keep[b, m] ||x - b - sum_{j<m} c_j||² with c_j (j < prev chosen length)
    passing only gamma of its gradient, written with explicit loops."""
    batch, inst, d_sae = acts.shape
    total = []
    for i in range(inst):
        chosen = [m for m in range(1, d_sae + 1) if weights[i, m - 1] > 0]
        loss_i = 0.0
        for k, m in enumerate(chosen):
            prev = chosen[k - 1] if k > 0 else 0
            for b in range(batch):
                recon = b_dec[i]
                for j in range(m):
                    c = acts[b, i, j] * W_dec[i, j]
                    if j < prev:
                        c = gamma[i] * c + (1 - gamma[i]) * c.detach()
                    recon = recon + c
                k_bm = 1.0 if keep is None else keep[b, i, m - 1]
                loss_i = loss_i + weights[i, m - 1] * k_bm * (x[b, i] - recon).pow(2).sum() / batch
        total.append(loss_i)
    return torch.stack(total)


def grads_of(fn, tensors):
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out.sum(), leaves)


# ---------------------------------------------------------------------------- config and weights
@pytest.mark.parametrize(
    "kw, match",
    [({"inner_weight": -0.5}, r"inner_weight.*-0\.5"), ({"inner_grad_scale": 1.5}, r"inner_grad_scale.*1\.5"),
     ({"inner_weight": float("inf")}, r"inner_weight")],
)
def test_variant_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        MatryoshkaConfig(**kw)


def test_inner_weight_rescales_inner_prefixes_by_hand():
    # lengths 2, 4, 6 equal (1/3 each); inner x 0.5 -> 1/6, 1/6, 1/3 -> normalised 1/4, 1/4, 1/2
    cfg = MatryoshkaConfig(mode="fixed", prefixes=(2, 4), inner_weight=0.5)
    w = prefix_weights(cfg, 6, 2)
    torch.testing.assert_close(w[0], torch.tensor([0, 0.25, 0, 0.25, 0, 0.5]))
    # inner_weight 0 leaves only the full prefix: a vanilla SAE
    w0 = prefix_weights(MatryoshkaConfig(mode="random", inner_weight=0.0), 20, 3, torch.Generator().manual_seed(0))
    torch.testing.assert_close(w0, torch.zeros(3, 20).index_fill(1, torch.tensor([19]), 1.0))


def test_random_inner_weight_gives_full_prefix_its_share():
    # 9 sampled inner lengths at beta each, full at 1: full weight 1 / (1 + 9 beta)
    w = prefix_weights(MatryoshkaConfig(mode="random", inner_weight=0.2), 20, 4, torch.Generator().manual_seed(1))
    torch.testing.assert_close(w[:, -1], torch.full((4,), 1 / (1 + 9 * 0.2)))
    assert ((w[:, :-1] > 0).sum(-1) == 9).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(4))


def test_batched_weights_match_single_config_draws_and_group_configs():
    cfg = MatryoshkaConfig(mode="random")
    single = prefix_weights(cfg, 20, 4, torch.Generator().manual_seed(5))
    batched = batched_prefix_weights([cfg] * 4, 20, torch.Generator().manual_seed(5))
    torch.testing.assert_close(single, batched)
    # configs that differ only outside the sampling fields draw together
    mixed = [cfg, MatryoshkaConfig(mode="random", permute_latents=True, inner_grad_scale=0.0)] * 2
    torch.testing.assert_close(batched_prefix_weights(mixed, 20, torch.Generator().manual_seed(5)), single)
    # a different mode gets its own rows
    w = batched_prefix_weights([cfg, MatryoshkaConfig(mode="every"), cfg], 20, torch.Generator().manual_seed(5))
    torch.testing.assert_close(w[1], torch.full((20,), 1 / 20))


def test_expected_prefix_weights_of_every_is_uniform():
    torch.testing.assert_close(expected_prefix_weights(MatryoshkaConfig(mode="every"), 5, n_draws=3), torch.full((5,), 0.2))


def test_per_instance_build_checks_length():
    with pytest.raises(ValueError, match="got 2 Matryoshka configs for n_inst=3"):
        PerInstanceMatryoshka.build([MatryoshkaConfig()] * 2, 3)
    plan = PerInstanceMatryoshka.build([MatryoshkaConfig(), MatryoshkaConfig(inner_grad_scale=0.5, permute_latents=True)], 2)
    assert plan.routes_gradient
    assert plan.permute.tolist() == [False, True]
    torch.testing.assert_close(plan.inner_grad_scale, torch.tensor([1.0, 0.5]))


# ---------------------------------------------------------------------------- routing
def test_previous_prefix_by_hand():
    w = torch.tensor([[0, 0.3, 0, 0, 0.3, 0.4], [1 / 6] * 6])
    assert previous_prefix(w).tolist() == [[0, 0, 2, 2, 2, 5], [0, 1, 2, 3, 4, 5]]


def test_latent_weights_routed_by_hand():
    w = torch.tensor([[0, 0.25, 0, 0, 0.25, 0.5], [1 / 6] * 6], dtype=D)
    # plain: tail sums
    torch.testing.assert_close(latent_weights(w), torch.tensor([[1, 1, 0.75, 0.75, 0.75, 0.5],
                                                               [1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]], dtype=D))
    # gamma 0: only the home prefix; gamma 0.5: home + half of the rest
    routed = latent_weights(w, torch.tensor([0.0, 0.5], dtype=D))
    torch.testing.assert_close(routed[0], torch.tensor([0.25, 0.25, 0.25, 0.25, 0.25, 0.5], dtype=D))
    torch.testing.assert_close(routed[1], torch.tensor([1 / 6 + 0.5 * 5 / 6, 1 / 6 + 0.5 * 4 / 6, 1 / 6 + 0.5 * 3 / 6,
                                                        1 / 6 + 0.5 * 2 / 6, 1 / 6 + 0.5 / 6, 1 / 6], dtype=D))


def assert_grads_close(grads, ref_grads, acts, method):
    ref_grads = list(ref_grads)
    if method == "sparse":  # exact at the active latents (inactive ones pass no gradient on)
        grads = list(grads)
        grads[1] = torch.where(acts == 0, torch.zeros_like(grads[1]), grads[1])
        ref_grads[1] = torch.where(acts == 0, torch.zeros_like(ref_grads[1]), ref_grads[1])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("method", ["loop", "gram", "blocks", "sparse", "auto", "routed errors"])
def test_routed_gradients_match_naive_loop(method):
    x, acts, W_dec, b_dec = build_problem()
    weights = sparse_weights([[2, 3, 6], [1, 2, 3, 4, 5, 6], [4, 6]], 6)
    gamma = torch.tensor([0.0, 0.3, 0.7], dtype=D)
    ref_val, ref_grads = grads_of(lambda *t: naive_routed_loss(*t, weights, gamma), (x, acts, W_dec, b_dec))
    if method == "routed errors":  # the explicit-decode kernel used when keep drops routed terms
        fn = lambda *t: (mat._routed_errors(*t, weights, gamma).mean(0) * weights).sum(-1)  # noqa: E731
    else:
        fn = lambda *t: matryoshka_loss(*t, weights, gamma, method=method)  # noqa: E731
    val, grads = grads_of(fn, (x, acts, W_dec, b_dec))
    torch.testing.assert_close(val, ref_val)
    assert_grads_close(grads, ref_grads, acts, method)


@pytest.mark.parametrize("method", ["loop", "gram", "blocks", "auto"])
def test_routed_gradients_with_dropped_terms_match_naive_loop(method):
    x, acts, W_dec, b_dec = build_problem(seed=7)
    weights = sparse_weights([[2, 3, 6], [1, 2, 3, 4, 5, 6], [4, 6]], 6)
    gamma = torch.tensor([0.0, 1.0, 0.5], dtype=D)
    keep = torch.ones(5, 3, 6, dtype=D)
    keep[1, 0, 2] = 0.0  # instance 0 (routed) drops a term: explicit decodes
    keep[3, 1, 0] = 0.0  # instance 1 (plain) drops a term
    keep[0, 2, 5] = 0.25  # instance 2 (routed) weights a term
    ref_val, ref_grads = grads_of(lambda *t: naive_routed_loss(*t, weights, gamma, keep), (x, acts, W_dec, b_dec))
    val, grads = grads_of(lambda *t: matryoshka_loss(*t, weights, gamma, keep, method=method), (x, acts, W_dec, b_dec))
    torch.testing.assert_close(val, ref_val)
    assert_grads_close(grads, ref_grads, acts, method)


def test_routing_leaves_value_unchanged_and_gamma_one_is_plain():
    x, acts, W_dec, b_dec = build_problem(seed=3)
    weights = sparse_weights([[1, 6], [3, 5, 6], [6]], 6)
    plain_val, plain_grads = grads_of(lambda *t: matryoshka_loss(*t, weights), (x, acts, W_dec, b_dec))
    zero_val, _ = grads_of(lambda *t: matryoshka_loss(*t, weights, torch.zeros(3, dtype=D)), (x, acts, W_dec, b_dec))
    torch.testing.assert_close(zero_val, plain_val)
    one_val, one_grads = grads_of(
        lambda *t: matryoshka_loss(*t, weights, torch.tensor([1.0, 0.0, 1.0], dtype=D)), (x, acts, W_dec, b_dec)
    )
    torch.testing.assert_close(one_val, plain_val)
    # instances 0 and 2 (gamma 1) keep the plain gradient; instance 1 (gamma 0) does not
    torch.testing.assert_close(one_grads[2][0], plain_grads[2][0])  # W_dec of instance 0
    torch.testing.assert_close(one_grads[2][2], plain_grads[2][2])
    torch.testing.assert_close(one_grads[1][:, 0], plain_grads[1][:, 0])  # acts of instance 0
    assert not torch.allclose(one_grads[2][1], plain_grads[2][1])


def test_stop_gradient_cuts_inner_latents_from_outer_losses():
    # prefixes 1 and 6: with gamma 0 latent 0 only learns from the prefix-1 loss
    x, acts, W_dec, b_dec = build_problem(inst=1)
    weights = sparse_weights([[1, 6]], 6)
    _, g_cut = grads_of(lambda *t: matryoshka_loss(*t, weights, torch.zeros(1, dtype=D)), (x, acts, W_dec, b_dec))

    def prefix_one_loss(x, acts, W_dec, b_dec):  # w_1 mean_b ||x - b_dec - a_0 W_dec[0]||²
        return weights[:, 0] * (x - b_dec - acts[..., :1] * W_dec[:, 0]).pow(2).sum(-1).mean(0)

    _, g_inner_only = grads_of(prefix_one_loss, (x, acts, W_dec, b_dec))
    torch.testing.assert_close(g_cut[2][0, 0], g_inner_only[2][0, 0])  # W_dec row 0
    torch.testing.assert_close(g_cut[1][:, 0, 0], g_inner_only[1][:, 0, 0])  # activation of latent 0


def test_keep_mask_weights_terms():
    x, acts, W_dec, b_dec = build_problem(batch=4, inst=2)
    weights = sparse_weights([[2, 6], [1, 3, 6]], 6)
    keep = torch.ones(4, 2, 6, dtype=D)
    torch.testing.assert_close(matryoshka_loss(x, acts, W_dec, b_dec, weights, keep=keep),
                               matryoshka_loss(x, acts, W_dec, b_dec, weights))
    keep[1, 0, 1] = 0.0  # drop sample 1's prefix-2 term in instance 0
    dropped = matryoshka_loss(x, acts, W_dec, b_dec, weights, keep=keep)
    err = (x[1, 0] - b_dec[0] - acts[1, 0, :2] @ W_dec[0, :2]).pow(2).sum()
    full = matryoshka_loss(x, acts, W_dec, b_dec, weights)
    torch.testing.assert_close(dropped[0], full[0] - weights[0, 1] * err / 4)
    torch.testing.assert_close(dropped[1], full[1])
    with pytest.raises(ValueError, match="keep must have shape"):
        matryoshka_loss(x, acts, W_dec, b_dec, weights, keep=keep[:, :1])


# ---------------------------------------------------------------------------- split terms
def test_parent_child_split_terms_by_hand():
    parent_index = torch.tensor([-1, 0, 0])
    coeffs = torch.tensor([[1.0, 1.0, 0.0],   # parent + child 1
                           [1.0, 0.0, 0.0],   # parent alone
                           [0.0, 0.0, 1.0],   # child 2 alone (parent off): never a split term
                           [1.0, 0.0, 1.0]])  # parent + child 2
    lof = torch.tensor([[0, 2, 4],    # parent latent 0, children at 2 and 4
                        [3, 1, 2]])   # children before the parent: no prefix splits them
    out = parent_child_split_terms(coeffs, parent_index, lof, d_sae=5)
    # instance 0: sample 0 marks lengths 1, 2 (columns 0, 1); sample 3 marks lengths 1..4
    assert out[0, 0].tolist() == [True, True, False, False, False]
    assert out[3, 0].tolist() == [True, True, True, True, False]
    assert not out[1].any() and not out[2].any() and not out[:, 1].any()


def _two_level_tree():
    root = FeatureNode(0.5, children=(FeatureNode(0.5), FeatureNode(0.5)), exclusive_children=True)
    return ToyHierarchy(HierarchySpec((root, FeatureNode(0.3)), d=6, seed=2))


def test_split_term_mask_decodes_features_from_x():
    tree = _two_level_tree()
    lof = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    mask = SplitTermMask(tree, lof, d_sae=4, instances=torch.tensor([True, False]))
    x, coeffs = tree.sample(64, torch.Generator().manual_seed(0))
    torch.testing.assert_close(mask.coefficients(x), coeffs, atol=1e-5, rtol=0)
    keep = mask(x)
    expected = ~parent_child_split_terms(coeffs, tree.parent_index, lof, 4)
    assert torch.equal(keep[:, 0].bool(), expected[:, 0])
    assert keep[:, 1].eq(1).all()  # instance 1 drops nothing
    assert (keep[:, 0] == 0).any()


def test_split_term_mask_rejects_superposition():
    tree = nabeshima_tree(d=10, directions="random")
    with pytest.raises(ValueError, match="linearly independent"):
        SplitTermMask(tree, torch.zeros(1, 20, dtype=torch.long), d_sae=20)


# ---------------------------------------------------------------------------- gradient probe
def test_prefix_term_gradient_by_hand():
    # two orthonormal features (parent e0, child e1); latent 0 reads/writes e0, latent 1 e1.
    sae = SAE(SAEConfig(d_in=2, d_sae=2, n_inst=1))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2)[None])
        sae.W_dec.copy_(torch.eye(2)[None])
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.tensor([[1.0, 1.0]])  # parent and child both active
    weights = torch.tensor([[1.0, 0.0]])  # only the prefix of length 1 (parent latent only)
    terms = torch.ones(1, 1, 2)
    out = prefix_term_gradient(sae, x, weights, terms, torch.tensor([0]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    # L = ||x - a0 d0||² with a0 = 1: dL/dd0 = -2 a0 (x - d0) = -2 e1 -> descent +2 along e1, 0 along e0
    torch.testing.assert_close(out, torch.tensor([[2.0, 0.0]]))
    torch.testing.assert_close(sae.W_dec.detach(), torch.eye(2)[None])  # unchanged


def test_prefix_term_gradient_matches_finite_difference():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=4, d_sae=3, n_inst=2, seed=1)).double()
    x = torch.randn(8, 4, dtype=D)
    weights = sparse_weights([[1, 3], [2, 3]], 3)
    terms = (torch.rand(8, 2, 3) > 0.3).to(D)
    latent = torch.tensor([0, 1])
    direction = torch.randn(1, 4, dtype=D)
    got = prefix_term_gradient(sae, x, weights, terms, latent, direction)  # [2, 1]

    def loss(eps, i):
        with torch.no_grad():
            W = sae.W_dec.detach().clone()
            W[i, latent[i]] += eps * direction[0] / direction.norm()
            x_in = x[:, None, :].expand(-1, 2, -1)
            acts = sae.encode(x_in)
            recon_terms = []
            for m in range(1, 4):
                recon = torch.einsum("bis,isd->bid", acts[..., :m], W[:, :m]) + sae.b_dec
                recon_terms.append((x_in - recon).pow(2).sum(-1))
            errs = torch.stack(recon_terms, -1)  # [b, i, 3]
            return ((errs * terms).mean(0) * weights).sum(-1)[i]

    for i in range(2):
        fd = -(loss(1e-6, i) - loss(-1e-6, i)) / 2e-6
        torch.testing.assert_close(got[i, 0], fd, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- training
def _onehot_data(batch, g):
    x = torch.zeros(batch, 5)
    x[torch.arange(batch), torch.randint(0, 5, (batch,), generator=g)] = torch.rand(batch, generator=g) + 0.5
    return x


def test_per_instance_configs_match_separate_runs():
    # deterministic prefix weights (no RNG), so each instance sees exactly what a solo run sees
    cfgs = [
        MatryoshkaConfig(mode="every"),
        MatryoshkaConfig(mode="fixed", prefixes=(2,), inner_grad_scale=0.0),
        MatryoshkaConfig(mode="fixed", prefixes=(1, 3), permute_latents=True),
        MatryoshkaConfig(mode="fixed", prefixes=(5,)),
    ]
    sae_cfg = SAEConfig(d_in=5, d_sae=5, n_inst=4, seed=7)
    mixed = SAE(sae_cfg)
    train_sae(mixed, _onehot_data, TrainConfig(steps=25, l1_coeff=0.05, matryoshka=cfgs, progress=False))
    for i, cfg in enumerate(cfgs):
        solo = SAE(sae_cfg)
        train_sae(solo, _onehot_data, TrainConfig(steps=25, l1_coeff=0.05, matryoshka=cfg, progress=False))
        torch.testing.assert_close(mixed.W_dec[i], solo.W_dec[i], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(mixed.W_enc[i], solo.W_enc[i], rtol=1e-4, atol=1e-6)


def test_full_prefix_only_config_is_a_vanilla_sae():
    sae_cfg = SAEConfig(d_in=5, d_sae=5, n_inst=2, seed=3)
    a, b = SAE(sae_cfg), SAE(sae_cfg)
    train_sae(a, _onehot_data, TrainConfig(steps=20, l1_coeff=0.05, progress=False))
    train_sae(b, _onehot_data, TrainConfig(steps=20, l1_coeff=0.05, progress=False,
                                           matryoshka=MatryoshkaConfig(mode="fixed", prefixes=(5,))))
    torch.testing.assert_close(a.W_dec, b.W_dec, rtol=1e-4, atol=1e-6)


def test_callback_sees_every_step_and_term_mask_needs_matryoshka():
    seen = []
    sae = SAE(SAEConfig(d_in=5, d_sae=5, n_inst=1))
    train_sae(sae, _onehot_data, TrainConfig(steps=7, progress=False), callback=lambda step, s: seen.append(step))
    assert seen == list(range(7))
    with pytest.raises(ValueError, match="term_mask needs a Matryoshka loss"):
        train_sae(sae, _onehot_data, TrainConfig(steps=1, progress=False), term_mask=lambda x: torch.ones(1))


def test_dropping_every_term_stops_reconstruction_learning():
    # keep = 0 everywhere: the reconstruction loss is 0, so with no penalty nothing moves
    sae = SAE(SAEConfig(d_in=5, d_sae=5, n_inst=1, seed=2))
    before = sae.W_dec.detach().clone()
    train_sae(sae, _onehot_data, TrainConfig(steps=5, l1_coeff=0.0, progress=False, matryoshka=MatryoshkaConfig(mode="every")),
              term_mask=lambda x: torch.zeros(x.shape[0], 1, 5))
    torch.testing.assert_close(sae.W_dec.detach(), before)
