"""The sparse exact every-prefix path of the Matryoshka loss (``matryoshka_loss(method="sparse")``)
against a naive loop that decodes every prefix, and the "auto" rule that routes to it."""

import functools

import pytest
import torch

import saelib.core.matryoshka as matryoshka
from saelib.core.matryoshka import MatryoshkaConfig, matryoshka_loss, prefix_weights
from saelib.core.sae import SAE, SAEConfig

sparse_prefix_loss = functools.partial(matryoshka_loss, method="sparse")
active_latents = matryoshka._active_latents


def naive_prefix_loss(x, acts, W_dec, b_dec, weights):
    """One decode per prefix length m = 1..d_sae: sum_m w_m mean_batch ||x - acts[:m] W_dec[:m] - b_dec||²."""
    total = 0.0
    for m in range(1, acts.shape[-1] + 1):
        recon = torch.einsum("bis,isd->bid", acts[..., :m], W_dec[:, :m]) + b_dec
        total = total + weights[:, m - 1] * (x - recon).pow(2).sum(-1).mean(0)
    return total


def build_sae(architecture, n_inst=3, d_in=6, d_sae=16, k=None, dtype=torch.float64, seed=0):
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, n_inst=n_inst, architecture=architecture, k=k, seed=seed))
    sae = sae.to(dtype)
    with torch.no_grad():  # non-trivial biases so every parameter's gradient is exercised
        g = torch.Generator().manual_seed(seed + 1)
        sae.b_enc.copy_(0.3 * torch.randn(sae.b_enc.shape, generator=g, dtype=torch.float64))
        sae.b_dec.copy_(0.3 * torch.randn(sae.b_dec.shape, generator=g, dtype=torch.float64))
    sae.train()
    return sae


def loss_and_grads(sae, x, weights, loss_fn):
    sae.zero_grad(set_to_none=True)
    xi = sae.expand_instances(x)
    _, acts = sae(x)
    loss = loss_fn(xi, acts, sae.W_dec, sae.b_dec, weights)
    loss.sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in sae.named_parameters()}
    return loss.detach(), grads, acts.detach()


@pytest.mark.parametrize(
    "architecture, k",
    [("relu", None), ("topk", 3), ("batchtopk", 3)],
)
@pytest.mark.parametrize("mode", ["every", "random", "fixed"])
def test_loss_and_gradients_match_naive_float64(architecture, k, mode):
    sae = build_sae(architecture, k=k)
    x = torch.randn(11, sae.d_in, dtype=torch.float64)
    cfg = MatryoshkaConfig(mode=mode, prefixes=(2, 5), n_prefixes=4)
    weights = prefix_weights(cfg, sae.d_sae, sae.n_inst, torch.Generator().manual_seed(3)).double()
    ref_loss, ref_grads, acts = loss_and_grads(sae, x, weights, naive_prefix_loss)
    loss, grads, _ = loss_and_grads(sae, x, weights, sparse_prefix_loss)
    if architecture == "relu":  # dense-ish: several latents active, not all
        assert 1 < (acts > 0).sum(-1).float().mean() < sae.d_sae
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert set(grads) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name in grads:
        assert ref_grads[name].abs().max() > 0, name
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_float32_matches_float64_naive_on_a_wider_topk_sae():
    sae64 = build_sae("topk", n_inst=2, d_in=32, d_sae=128, k=8)
    sae32 = build_sae("topk", n_inst=2, d_in=32, d_sae=128, k=8, dtype=torch.float32)
    x = torch.randn(64, 32, dtype=torch.float64)
    weights = torch.full((2, 128), 1.0 / 128, dtype=torch.float64)
    ref_loss, ref_grads, _ = loss_and_grads(sae64, x, weights, naive_prefix_loss)
    loss, grads, _ = loss_and_grads(sae32, x.float(), weights.float(), sparse_prefix_loss)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name].double(), ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_wrt_acts_exact_at_active_latents_zero_elsewhere():
    g = torch.Generator().manual_seed(0)
    batch, inst, d_sae, d_in = 5, 2, 9, 4
    dense = torch.rand(batch, inst, d_sae, generator=g, dtype=torch.float64)
    mask = torch.rand(batch, inst, d_sae, generator=g) < 0.4
    acts = (dense * mask).requires_grad_(True)
    x = torch.randn(batch, inst, d_in, generator=g, dtype=torch.float64)
    W_dec = torch.randn(inst, d_sae, d_in, generator=g, dtype=torch.float64)
    b_dec = torch.randn(inst, d_in, generator=g, dtype=torch.float64)
    weights = torch.rand(inst, d_sae, generator=g, dtype=torch.float64)  # unnormalised is fine
    (ref,) = torch.autograd.grad(naive_prefix_loss(x, acts, W_dec, b_dec, weights).sum(), acts)
    (got,) = torch.autograd.grad(sparse_prefix_loss(x, acts, W_dec, b_dec, weights).sum(), acts)
    torch.testing.assert_close(got[mask], ref[mask], rtol=1e-10, atol=1e-12)
    assert (got[~mask] == 0).all()
    assert ref[~mask].abs().max() > 0  # the naive loss does have a gradient there


def test_chunked_gram_matches_single_chunk(monkeypatch):
    sae = build_sae("topk", n_inst=2, d_in=5, d_sae=20, k=4)
    x = torch.randn(13, 5, dtype=torch.float64)
    weights = prefix_weights(MatryoshkaConfig(mode="every"), 20, 2).double()
    ref_loss, ref_grads, _ = loss_and_grads(sae, x, weights, naive_prefix_loss)
    monkeypatch.setattr(matryoshka, "_CHUNK_ELEMENTS", 5 * 5 * 3)  # 3 rows per chunk, ragged end
    loss, grads, _ = loss_and_grads(sae, x, weights, sparse_prefix_loss)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_rows_without_active_latents_cost_the_centred_input_norm():
    x = torch.tensor([[[1.0, 2.0]], [[0.0, -1.0]]], dtype=torch.float64)  # [batch 2, inst 1, d_in 2]
    acts = torch.zeros(2, 1, 3, dtype=torch.float64)
    acts[1, 0, 2] = 0.5  # only the second sample has an active latent (the last one)
    W_dec = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, -2.0]]], dtype=torch.float64)
    b_dec = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    weights = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)
    # sample 0: e = x - b_dec = (0, 2), every prefix has error 4. Sample 1: e = (-1, -1); prefixes
    # of length 1 and 2 miss latent 2 (error 2); length 3 leaves e - 0.5 * (0, -2) = (-1, 0) (error 1)
    expected = ((0.5 + 0.25 + 0.25) * 4 + (0.5 * 2 + 0.25 * 2 + 0.25 * 1)) / 2
    got = sparse_prefix_loss(x, acts, W_dec, b_dec, weights)
    torch.testing.assert_close(got, torch.tensor([expected], dtype=torch.float64))
    all_zero = sparse_prefix_loss(x, torch.zeros_like(acts), W_dec, b_dec, weights)
    torch.testing.assert_close(all_zero, torch.tensor([(4 + 2) / 2], dtype=torch.float64))


def test_active_latents_lists_nonzeros_in_order_and_pads_with_zero():
    acts = torch.tensor(
        [[[0.0, 2.0, 0.0, 3.0], [1.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0], [4.0, 5.0, 6.0, 0.0]]]
    ).requires_grad_(True)
    idx, vals = active_latents(acts)
    assert idx.tolist() == [[[1, 3, 0], [0, 0, 0]], [[0, 0, 0], [0, 1, 2]]]
    assert vals.tolist() == [[[2.0, 3.0, 0.0], [1.0, 0.0, 0.0]], [[0.0, 0.0, 0.0], [4.0, 5.0, 6.0]]]
    (grad,) = torch.autograd.grad((vals * torch.arange(1.0, 4.0)).sum(), acts)
    # each active entry receives the weight of its slot; padding slots reach nothing
    expected = [[[0.0, 1.0, 0.0, 2.0], [1.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 0.0]]]
    assert grad.tolist() == expected


def test_bad_inputs_raise():
    x = torch.randn(4, 2, 3)
    acts = torch.rand(4, 2, 5)
    W_dec = torch.randn(2, 5, 3)
    b_dec = torch.zeros(2, 3)
    w = torch.full((2, 5), 0.2)
    with pytest.raises(ValueError, match="must be >= 0"):
        sparse_prefix_loss(x, acts, W_dec, b_dec, -w)
    with pytest.raises(ValueError, match="weights must be"):
        sparse_prefix_loss(x, acts, W_dec, b_dec, w[:, :4])
    with pytest.raises(ValueError, match="W_dec must be"):
        sparse_prefix_loss(x, acts, W_dec[:, :4], b_dec, w)
    with pytest.raises(ValueError, match="share batch and inst"):
        sparse_prefix_loss(x[:3], acts, W_dec, b_dec, w)
    with pytest.raises(ValueError, match="acts must be"):
        active_latents(acts[0])


def test_auto_routes_large_sparse_problems_to_the_sparse_path(monkeypatch):
    calls = []
    real = matryoshka._sparse_loss
    monkeypatch.setattr(matryoshka, "_sparse_loss", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(matryoshka, "_DENSE_PREFIX_LIMIT", 0)  # as if d_sae were large
    sae = build_sae("topk", n_inst=2, d_in=5, d_sae=24, k=3)
    x = torch.randn(9, 5, dtype=torch.float64)
    xi = sae.expand_instances(x)
    _, acts = sae(x)
    for mode, routed in (("every", True), ("random", False)):  # 24 prefixes > L0 3 > 2 prefixes
        cfg = MatryoshkaConfig(mode=mode, n_prefixes=2)
        weights = prefix_weights(cfg, 24, 2, torch.Generator().manual_seed(0)).double()
        calls.clear()
        got = matryoshka_loss(xi, acts, sae.W_dec, sae.b_dec, weights)
        assert bool(calls) == routed, mode
        torch.testing.assert_close(got, naive_prefix_loss(xi, acts, sae.W_dec, sae.b_dec, weights))


def test_auto_keeps_the_dense_path_when_d_sae_is_at_most_d_in(monkeypatch):
    calls = []
    real = matryoshka._gram_errors
    monkeypatch.setattr(matryoshka, "_gram_errors", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(matryoshka, "_DENSE_PREFIX_LIMIT", 0)
    for d_sae, dense in ((6, True), (7, False)):
        sae = build_sae("topk", n_inst=2, d_in=6, d_sae=d_sae, k=2)
        x = torch.randn(9, 6, dtype=torch.float64)
        xi = sae.expand_instances(x)
        _, acts = sae(x)
        weights = prefix_weights(MatryoshkaConfig(mode="every"), d_sae, 2).double()
        calls.clear()
        got = matryoshka_loss(xi, acts, sae.W_dec, sae.b_dec, weights)
        assert bool(calls) == dense, d_sae
        torch.testing.assert_close(got, naive_prefix_loss(xi, acts, sae.W_dec, sae.b_dec, weights))


def test_training_with_every_prefix_follows_the_same_path_through_either_route(monkeypatch):
    import saelib.core.matryoshka as matryoshka
    from saelib.core.train import TrainConfig, train_sae

    data = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=15, batch_size=32, lr=1e-2, matryoshka=MatryoshkaConfig(mode="every"),
                      log_every=5, progress=False)
    trained = {}
    for limit in (2**40, 0):  # dense Gram path, then the sparse path
        monkeypatch.setattr(matryoshka, "_DENSE_PREFIX_LIMIT", limit)
        sae = SAE(SAEConfig(d_in=8, d_sae=32, n_inst=2, architecture="topk", k=4, seed=1))
        train_sae(sae, data, cfg)
        trained[limit] = sae
    for name, p in trained[2**40].named_parameters():
        torch.testing.assert_close(getattr(trained[0], name), p, rtol=1e-4, atol=1e-5, msg=name)
    assert (trained[0].W_dec != SAE(trained[0].cfg).W_dec).any()  # training moved the weights
