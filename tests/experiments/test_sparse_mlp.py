"""Tests for saelib.experiments.sparse_mlp, with the SparseMLP, fold_scales and hook names of
saelib.core.transcoder that it trains and splices in: penalty bookkeeping, normalisation folding,
splicing (exact copies of the MLP, zero and mean outputs must reproduce the original / ablated
losses computed by hand), neuron cosines and training on a synthetic MLP."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer, HookedTransformerConfig, utils

from saelib.core.metrics import fvu
from saelib.core.normalisation import normalisation_scale
from saelib.core.sae import SAE, SAEConfig
from saelib.core.transcoder import SparseMLP, fold_scales, mlp_hook_names
from saelib.experiments.sparse_mlp import (
    NABESHIMA_LOSS_ORIG,
    NABESHIMA_LOSS_SPARSE_S6,
    NABESHIMA_LOSS_ZERO,
    NABESHIMA_RECOVERED_S6,
    LossRecovered,
    SparseMLPConfig,
    loss_recovered,
    loss_recovered_table,
    recovered_at_l0,
    max_neuron_cosines,
    neuron_cosines,
    penalty_coefficients,
    sparse_mlp_train_config,
    spliced_losses,
    spliced_losses_many,
    train_sparse_mlps,
    train_sparse_mlps_with_checkpoints,
)


def tiny_model(normalization_type=None) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, d_mlp=24, n_heads=2, d_head=8, act_fn="relu", d_vocab=40, n_ctx=12,
        normalization_type=normalization_type, seed=0, device="cpu",
    )
    model = HookedTransformer(cfg)
    with torch.no_grad():  # non-trivial biases and norm weights so a formula that drops them fails
        for block in model.blocks:
            block.mlp.b_in.normal_(0, 0.3)
            block.mlp.b_out.normal_(0, 0.3)
            if normalization_type is not None:
                block.ln2.w.uniform_(0.5, 2.0)
    return model.eval()


def handmade_sparse_mlp(model: HookedTransformer, layer: int, mean_out: torch.Tensor) -> SparseMLP:
    """Three instances: 0 = an exact copy of the MLP, 1 = outputs zero, 2 = outputs ``mean_out``."""
    mlp = model.blocks[layer].mlp
    d_model, d_mlp = model.cfg.d_model, model.cfg.d_mlp
    sae = SAE(SAEConfig(d_in=d_model, d_sae=d_mlp, d_out=d_model, n_inst=3, apply_b_dec_to_input=False))
    W_in = mlp.W_in.detach()
    if model.cfg.normalization_type is not None:
        W_in = W_in * model.blocks[layer].ln2.w.detach()[:, None]  # the hook reads ln2 before its weight
    with torch.no_grad():
        sae.W_enc.copy_(W_in.expand(3, -1, -1))
        sae.b_enc.copy_(mlp.b_in.detach().expand(3, -1))
        sae.W_dec.zero_()
        sae.b_dec.zero_()
        sae.W_dec[0] = mlp.W_out.detach()
        sae.b_dec[0] = mlp.b_out.detach()
        sae.b_dec[2] = mean_out
    in_hook, out_hook = mlp_hook_names(model, layer)
    return SparseMLP(sae, layer, (0.0, 1.0, 2.0), in_hook, out_hook)


def hand_loss(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), tokens[:, 1:].reshape(-1)))


# ---------------------------------------------------------------------------- bookkeeping
def test_loss_recovered_reproduces_nabeshimas_arithmetic():
    for layer in range(4):
        got = loss_recovered(NABESHIMA_LOSS_SPARSE_S6[layer], 1.13, NABESHIMA_LOSS_ZERO[layer])
        assert round(got, 2) == NABESHIMA_RECOVERED_S6[layer]
    assert loss_recovered(2.0, 2.0, 5.0) == 1.0
    assert loss_recovered(5.0, 2.0, 5.0) == 0.0
    with pytest.raises(ValueError, match="L_ablated > L_orig"):
        loss_recovered(1.0, 2.0, 2.0)
    assert NABESHIMA_LOSS_ORIG == 1.128


def test_penalty_coefficients():
    assert penalty_coefficients([0, 3, -1], d_model=128, d_sae=2048) == [128 / 2048, 128 * 8 / 2048, 128 * 0.5 / 2048]


def test_normalisation_scale():
    x = torch.randn(1000, 7) * 13.0
    c = normalisation_scale(x)
    assert (c * x).pow(2).sum(-1).mean().item() == pytest.approx(7.0, rel=1e-5)
    with pytest.raises(ValueError, match="cannot normalise"):
        normalisation_scale(torch.zeros(3, 2))


def test_fold_scales_preserves_latents_and_maps_raw_units():
    sae = SAE(SAEConfig(d_in=6, d_sae=10, d_out=4, n_inst=2, apply_b_dec_to_input=False, seed=3))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(50, 6)
    c_in, c_out = 2.5, 0.2
    ref_out, ref_acts = sae(c_in * x)
    fold_scales(sae, c_in, c_out)
    out, acts = sae(x)
    assert torch.allclose(acts, ref_acts, atol=1e-5)
    assert torch.allclose(out, ref_out / c_out, atol=1e-4)
    with pytest.raises(ValueError, match="transcoder"):
        fold_scales(SAE(SAEConfig(d_in=3, d_sae=4)), 1.0, 1.0)
    with pytest.raises(ValueError, match="scales"):
        fold_scales(sae, 0.0, 1.0)


def test_mlp_hook_names():
    assert mlp_hook_names(tiny_model(), 1) == ("blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out")
    assert mlp_hook_names(tiny_model("RMS"), 0) == ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")
    with pytest.raises(ValueError, match="layer"):
        mlp_hook_names(tiny_model(), 2)


# ---------------------------------------------------------------------------- splicing
@pytest.mark.parametrize("normalization_type", [None, "RMS"])
@pytest.mark.parametrize("layer", [0, 1])
def test_spliced_losses_exact_zero_and_mean(normalization_type, layer):
    model = tiny_model(normalization_type)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 40, (6, 12), generator=g)
    tokens[:, 0] = 0
    mean_out = torch.randn(16, generator=g)
    sm = handmade_sparse_mlp(model, layer, mean_out)
    res = spliced_losses(model, tokens, sm, mean_out, tokens_per_batch=48, progress=False)

    out_hook = utils.get_act_name("mlp_out", layer)

    def set_from_1(value):
        def hook(act, hook):
            act = act.clone()
            act[:, 1:] = value
            return act

        return hook

    with torch.no_grad():
        orig = hand_loss(model(tokens), tokens)
        zero = hand_loss(model.run_with_hooks(tokens, fwd_hooks=[(out_hook, set_from_1(0.0))]), tokens)
        mean = hand_loss(model.run_with_hooks(tokens, fwd_hooks=[(out_hook, set_from_1(mean_out))]), tokens)
    assert res.n_tokens == 6 * 11
    assert res.loss_orig == pytest.approx(orig, abs=1e-6)
    assert res.loss_zero == pytest.approx(zero, abs=1e-6)
    assert res.loss_mean == pytest.approx(mean, abs=1e-6)
    assert abs(res.loss_zero - res.loss_orig) > 1e-3  # the ablation does something
    assert res.loss_sparse[0] == pytest.approx(orig, abs=1e-5)  # exact copy of the MLP
    assert res.kl_sparse[0] == pytest.approx(0.0, abs=1e-6)
    assert res.loss_sparse[1] == pytest.approx(zero, abs=1e-6)  # outputs zero
    assert res.kl_sparse[1] == pytest.approx(res.kl_zero, abs=1e-8)
    assert res.loss_sparse[2] == pytest.approx(mean, abs=1e-6)  # outputs the mean
    assert res.kl_zero > 0
    # L0 of the exact copy is the MLP's own number of active neurons on non-BOS tokens
    in_hook, _ = mlp_hook_names(model, layer)
    _, cache = model.run_with_cache(tokens, names_filter=[utils.get_act_name("post", layer)])
    active = (cache[utils.get_act_name("post", layer)][:, 1:] > 0).float().sum(-1).mean()
    assert res.l0[0] == pytest.approx(float(active), abs=1e-4)


def test_spliced_losses_without_skipping_bos_changes_bos_too():
    model = tiny_model()
    tokens = torch.randint(1, 40, (4, 12), generator=torch.Generator().manual_seed(1))
    mean_out = torch.zeros(16)
    sm = handmade_sparse_mlp(model, 0, mean_out)
    res = spliced_losses(model, tokens, sm, mean_out, skip_bos=False, progress=False)
    zero_all = lambda act, hook: torch.zeros_like(act)
    with torch.no_grad():
        zero = hand_loss(model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_out", zero_all)]), tokens)
    assert res.loss_zero == pytest.approx(zero, abs=1e-6)
    assert res.loss_sparse[1] == pytest.approx(zero, abs=1e-6)


@pytest.mark.parametrize("layer", [0, 1])
def test_spliced_losses_on_documents_of_unequal_length_count_each_document_alone(layer):
    from saelib.data.corpus import DocumentTokens

    model = tiny_model("RMS")
    g = torch.Generator().manual_seed(2)
    lengths = [12, 7, 3, 9]
    tokens = torch.full((4, 12), 0, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, 1:n] = torch.randint(1, 40, (n - 1,), generator=g)
    docs = DocumentTokens(tokens, torch.tensor(lengths), ("a", "b", "c", "d"), 0, torch.zeros(4, dtype=torch.bool))
    mean_out = torch.randn(16, generator=g)
    sm = handmade_sparse_mlp(model, layer, mean_out)
    res = spliced_losses(model, docs, sm, mean_out, tokens_per_batch=24, progress=False)  # padded batches

    out_hook = utils.get_act_name("mlp_out", layer)
    zero_from_1 = lambda act, hook: torch.cat([act[:, :1], torch.zeros_like(act[:, 1:])], 1)
    orig, zero, kl_zero, n_pred = 0.0, 0.0, 0.0, 0
    with torch.no_grad():
        for i, n in enumerate(lengths):  # each document alone, no padding
            doc = tokens[i : i + 1, :n]
            clean, ablated = model(doc), model.run_with_hooks(doc, fwd_hooks=[(out_hook, zero_from_1)])
            orig += hand_loss(clean, doc) * (n - 1)
            zero += hand_loss(ablated, doc) * (n - 1)
            kl_zero += float(F.kl_div(ablated[0, :-1].double().log_softmax(-1), clean[0, :-1].double().log_softmax(-1),
                                      log_target=True, reduction="sum"))  # KL(p_clean || p_ablated), summed
            n_pred += n - 1
    assert res.n_tokens == n_pred == sum(lengths) - 4
    assert res.loss_orig == pytest.approx(orig / n_pred, abs=1e-5)
    assert res.loss_zero == pytest.approx(zero / n_pred, abs=1e-5)
    assert res.kl_zero == pytest.approx(kl_zero / n_pred, abs=1e-5) and res.kl_zero > 1e-3
    assert res.loss_sparse[0] == pytest.approx(orig / n_pred, abs=1e-5)  # the exact copy
    assert res.loss_sparse[1] == pytest.approx(zero / n_pred, abs=1e-5)


def test_loss_recovered_properties():
    r = LossRecovered(
        layer=0, S_values=(1.0, 2.0), loss_orig=1.0, loss_zero=3.0, loss_mean=2.0, loss_sparse=[1.5, 2.0],
        kl_zero=1.0, kl_mean=0.5, kl_sparse=[0.1, 0.2], l0=[10.0, 5.0], n_tokens=100,
    )
    assert r.recovered == [0.75, 0.5]
    assert r.recovered_vs_mean == [0.5, 0.0]
    # at L0 <= 10 both S qualify and S=1 recovers more; at L0 <= 6 only S=2 (L0 5) does; at L0 <= 4 none
    assert recovered_at_l0(r, 10)["S"] == 1.0 and recovered_at_l0(r, 10)["recovered"] == 0.75
    assert recovered_at_l0(r, 6) == {"S": 2.0, "L0": 5.0, "recovered": 0.5, "recovered_vs_mean": 0.0, "kl": 0.2,
                                      "instance": 1}
    assert recovered_at_l0(r, 4) is None
    with pytest.raises(ValueError, match="max_l0 must be > 0"):
        recovered_at_l0(r, 0)
    table = loss_recovered_table([r], max_l0=6, dead_frac={0: [0.25, 0.5]})
    assert "| 0 | 2 | 5.0 | 50.0% | 1.000 | 3.000 | 2.000 | 2.000 | 0.200 | 50.0% | 0.0% | 0 | 3.72 | 1.24 | 96% |" in table
    assert "none with L0 <= 4" in loss_recovered_table([r], max_l0=4)


# ---------------------------------------------------------------------------- cosines
@pytest.mark.parametrize("normalization_type", [None, "RMS"])
def test_neuron_cosines_of_an_exact_copy(normalization_type):
    model = tiny_model(normalization_type)
    sm = handmade_sparse_mlp(model, 1, torch.zeros(16))
    cos = neuron_cosines(model, sm)
    assert cos["enc"].shape == (3, 24, 24) and cos["dec"].shape == (3, 24, 24)
    assert torch.allclose(cos["enc"][0].diagonal(), torch.ones(24), atol=1e-5)
    assert torch.allclose(cos["dec"][0].diagonal(), torch.ones(24), atol=1e-5)
    best = max_neuron_cosines(cos["enc"])
    assert torch.allclose(best[0], torch.ones(24), atol=1e-5)
    alive = torch.zeros(3, 24)
    alive[0, :5] = 1
    assert [len(b) for b in max_neuron_cosines(cos["enc"], alive)] == [5, 0, 0]


# ---------------------------------------------------------------------------- training
def test_train_sparse_mlps_learns_a_relu_mlp_and_penalty_orders_l0():
    g = torch.Generator().manual_seed(0)
    d, h, n = 8, 16, 4096
    W1, b1, W2 = torch.randn(d, h, generator=g), 0.2 * torch.randn(h, generator=g), torch.randn(h, d, generator=g)
    x = 7.0 * torch.randn(n, d, generator=g)  # raw units far from 1: the folding must undo the scaling
    y = 0.01 * torch.relu(x @ W1 + b1) @ W2
    cfg = SparseMLPConfig(S_values=(-6.0, 2.0), d_sae=64, steps=600, batch_size=256, lr=3e-3, progress=False)
    sm = train_sparse_mlps(x, y, cfg, layer=0)
    out = sm(x)  # [n, inst, d] in raw units
    err = fvu(y, out)
    assert err[0] < 0.05
    acts = sm.latents(x)
    l0 = (acts > 0).float().sum(-1).mean(0)
    assert l0[1] < l0[0]
    assert err[1] > err[0]
    assert sm.history is not None and len(sm.history.step) > 1
    with pytest.raises(ValueError, match="equal n_tok"):
        train_sparse_mlps(x, y[:10], cfg)
    with pytest.raises(ValueError, match="finite"):
        SparseMLPConfig(S_values=(math.inf,))


def test_sparse_mlp_config_passes_train_config_fields_through():
    from saelib.core.train import TrainConfig

    # the notebook's keywords: TrainConfig fields next to the sweep's own
    cfg = SparseMLPConfig(S_values=(-1, 3), d_sae=8, steps=40, batch_size=64, seed=3, lr=1e-3, progress=False)
    assert cfg.S_values == (-1.0, 3.0) and cfg.d_sae == 8 and (cfg.device, cfg.dtype) == ("cpu", "float32")
    got = sparse_mlp_train_config(cfg, d_model_out=6)
    # the training settings written out by hand: the sweep's schedule, the keywords, the penalty
    # set from S (6 * 2**S / 8), a logged row every 40 // 20 = 2 steps, TrainConfig's defaults elsewhere
    want = TrainConfig(steps=40, batch_size=64, lr=1e-3, betas=(0.9, 0.999), warmup_steps=50, decay_frac=0.3,
                       l1_coeff=[6 * 0.5 / 8, 6 * 8.0 / 8], l1_warmup_frac=0.1, penalty="l1",
                       scale_penalty_by_decoder_norm=True, log_every=2, seed=3, progress=False)
    assert got == want
    # any TrainConfig field passes through, without SparseMLPConfig naming it
    assert SparseMLPConfig(grad_clip=None, end_lr_factor=0.5).train.grad_clip is None
    assert SparseMLPConfig(train=TrainConfig(steps=7), seed=2).train == TrainConfig(steps=7, seed=2)
    assert SparseMLPConfig().train.steps == 1500 and SparseMLPConfig(steps=9).train.steps == 9
    with pytest.raises(ValueError, match=r"\['l1_coeff'\] are set by train_sparse_mlps"):
        SparseMLPConfig(l1_coeff=1.0)
    with pytest.raises(TypeError, match="no_such_field"):
        SparseMLPConfig(no_such_field=1)
    with pytest.raises(ValueError, match="TrainConfig.steps"):
        SparseMLPConfig(steps=0)
    with pytest.raises(ValueError, match="must not be empty"):
        SparseMLPConfig(S_values=())


# ---------------------------------------------------------------------------- checkpoints and intervals
def _documents(g, lengths, vocab=40):
    from saelib.data.corpus import DocumentTokens

    tokens = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, 1:n] = torch.randint(1, vocab, (n - 1,), generator=g)
    return DocumentTokens(tokens, torch.tensor(lengths), tuple(map(str, range(len(lengths)))), 0,
                          torch.zeros(len(lengths), dtype=torch.bool))


def test_spliced_losses_many_equals_each_alone_and_keeps_per_document_sums():
    model = tiny_model("RMS")
    g = torch.Generator().manual_seed(4)
    docs = _documents(g, [12, 5, 9, 3, 11, 7])
    mean_out = torch.randn(16, generator=g)
    copy_zero_mean = handmade_sparse_mlp(model, 0, mean_out)
    other = handmade_sparse_mlp(model, 0, torch.randn(16, generator=g))
    with torch.no_grad():
        other.sae.W_dec.mul_(0.5)  # a half-strength copy: a loss strictly between the two
    both = spliced_losses_many(model, docs, [copy_zero_mean, other], mean_out, tokens_per_batch=24, progress=False)
    for together, alone_sm in zip(both, [copy_zero_mean, other]):
        alone = spliced_losses(model, docs, alone_sm, mean_out, tokens_per_batch=24, progress=False)
        for name in ("loss_orig", "loss_zero", "loss_mean", "kl_zero", "kl_mean", "n_tokens"):
            assert getattr(together, name) == pytest.approx(getattr(alone, name), abs=1e-9)
        assert together.loss_sparse == pytest.approx(alone.loss_sparse, abs=1e-9)
        assert together.l0 == pytest.approx(alone.l0, abs=1e-9)
    res = both[0]
    d = res.per_document
    assert d["n_pred"].tolist() == [11, 4, 8, 2, 10, 6]
    assert d["orig"].sum() / d["n_pred"].sum() == pytest.approx(res.loss_orig, abs=1e-9)
    assert d["sparse"].shape == (3, 6)
    assert d["sparse"][0] == pytest.approx(d["orig"], abs=1e-4)  # instance 0 is an exact copy of the MLP
    assert d["kl_sparse"][1].sum() / d["n_pred"].sum() == pytest.approx(res.kl_sparse[1], abs=1e-9)
    # the interval's estimate is the plain loss recovered; the exact copy's interval is [1, 1]
    ci = both[1].recovered_ci(0, n_boot=200)
    r = both[1]  # loss recovered by hand: 1 - (L_sparse - L_orig) / (L_zero - L_orig), from the mean losses
    assert ci.estimate == pytest.approx(1 - (r.loss_sparse[0] - r.loss_orig) / (r.loss_zero - r.loss_orig), abs=1e-9)
    assert ci.low <= ci.estimate <= ci.high
    assert ci.n == 6 and ci.unit == "documents"
    exact = res.recovered_ci(0, n_boot=200)
    assert exact.low == pytest.approx(1.0, abs=1e-4) and exact.high == pytest.approx(1.0, abs=1e-4)
    assert res.kl_ci(1, n_boot=200).estimate == pytest.approx(res.kl_sparse[1], abs=1e-9)
    with pytest.raises(ValueError, match="one layer"):
        spliced_losses_many(model, docs, [copy_zero_mean, handmade_sparse_mlp(model, 1, mean_out)], mean_out)
    with pytest.raises(ValueError, match="per-document"):
        LossRecovered(0, (0.0,), 1.0, 2.0, 2.0, [1.5], 0.1, 0.1, [0.1], [1.0], 10).recovered_ci(0)


def test_train_sparse_mlps_checkpoints_are_the_same_run_stopped_early():
    from saelib.core.train import train_sae

    g = torch.Generator().manual_seed(1)
    x = 3.0 * torch.randn(512, 8, generator=g)
    y = torch.relu(x @ torch.randn(8, 8, generator=g))
    cfg = SparseMLPConfig(S_values=(-4.0, 0.0), d_sae=16, steps=30, batch_size=64, progress=False)
    sms = train_sparse_mlps_with_checkpoints(x, y, cfg, checkpoints=(20, 10))
    final = train_sparse_mlps(x, y, cfg)
    assert len(sms) == 3 and sms[-1].history is not None and sms[0].history is None
    torch.testing.assert_close(sms[-1].sae.W_enc, final.sae.W_enc, rtol=0, atol=0)
    # the checkpoint after 10 steps is the run's SAE as it stood after its 10th step (input scale folded in)
    seen = {}
    sae = SAE(SAEConfig(d_in=8, d_sae=16, d_out=8, n_inst=2, apply_b_dec_to_input=False, seed=cfg.train.seed))
    train_sae(sae, (x * normalisation_scale(x), y * normalisation_scale(y)), sparse_mlp_train_config(cfg, 8),
              callback=lambda step, s: seen.setdefault(step + 1, s.W_enc.detach().clone()))
    torch.testing.assert_close(sms[0].sae.W_enc, seen[10] * normalisation_scale(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sms[1].sae.W_enc, seen[20] * normalisation_scale(x), rtol=1e-6, atol=1e-6)
    assert not torch.equal(sms[0].sae.W_enc, sms[1].sae.W_enc)
    with pytest.raises(ValueError, match=r"checkpoints must be step counts in \[1, steps=30\)"):
        train_sparse_mlps_with_checkpoints(x, y, cfg, checkpoints=(30,))
