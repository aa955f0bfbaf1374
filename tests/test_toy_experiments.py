"""saelib.toy_experiments: the narrow-SAE sweep's seed axis."""

import pytest
import torch

from saelib.toy_experiments import narrow_sae_sweep


def test_narrow_sweep_seed_axis_and_medians():
    one = narrow_sae_sweep([0.3], [1e-3], steps=300, n_eval=2_000)
    three = narrow_sae_sweep([0.3], [1e-3], steps=300, n_eval=2_000, n_seeds=3)
    assert one.child_cos_seeds.shape == (1, 1, 1) and three.child_cos_seeds.shape == (1, 1, 3)
    assert torch.equal(three.child_cos[0, 0], three.child_cos_seeds[0, 0].median())
    assert three.child_cos_seeds[0, 0].unique().numel() == 3  # seeds differ (init and data draws)
    # the returned SAE is the trained one: its decoder gives the reported child cosines
    assert three.sae.n_inst == 3
    from saelib.toy_data import chanin_parent_children
    tree = chanin_parent_children(p_parent=0.25, p_child=0.3, n_children=2, seed=0)
    f = tree.features / tree.features.norm(dim=-1, keepdim=True)
    w = three.sae.W_dec[:, 0].detach()
    cos = (w / w.norm(dim=-1, keepdim=True)) @ f[1:].T  # [seed, child]
    torch.testing.assert_close(cos.mean(-1), three.child_cos_seeds[0, 0])


def test_narrow_sweep_rejects_zero_seeds():
    with pytest.raises(ValueError, match="n_seeds must be >= 1, got 0"):
        narrow_sae_sweep([0.3], [1e-3], steps=10, n_seeds=0)


# ---------------------------------------------------------------------------- input scale, methods, absorption
from dataclasses import replace as _replace

from saelib.absorption import absorption_scores
from saelib.matryoshka import MatryoshkaConfig
from saelib.sae import SAE, SAEConfig
from saelib.toy_data import nabeshima_tree
from saelib.toy_experiments import compare_vanilla_matryoshka
from saelib.train import TrainConfig, train_sae


def test_input_scale_gives_mean_norm_sqrt_d():
    tree = nabeshima_tree(seed=0)
    n = 200_000
    scale = tree.input_scale(n=n, seed=0)
    x, _ = tree.sample(n, torch.Generator().manual_seed(1))  # independent samples
    mean_norm = float((x * scale).double().norm(dim=-1).mean())
    # two independent means of n norms with a coefficient of variation <= 1 (norms are 0 or ~1-1.7):
    # their ratio is within 5 * sqrt(2 / n) = 1.6 % of 1
    assert abs(mean_norm / tree.d ** 0.5 - 1) < 5 * (2 / n) ** 0.5


@pytest.mark.parametrize("n", [0, -1, 2.5])
def test_input_scale_rejects_bad_n(n):
    with pytest.raises(ValueError, match="n must be"):
        nabeshima_tree(seed=0).input_scale(n=n)


def test_compare_scales_inputs_and_trains_only_the_methods_asked():
    tree = nabeshima_tree(seed=0)
    cfg = TrainConfig(steps=60, batch_size=32, warmup_steps=5, progress=False, seed=3)
    mcfg = MatryoshkaConfig(mode="random", n_prefixes=4)
    got = compare_vanilla_matryoshka(tree, cfg, mcfg, n_inst=2, seed=5, input_scale=2.5, methods=("matryoshka",))
    assert list(got.saes) == ["matryoshka"] and got.input_scale == 2.5
    # the same training by hand on inputs multiplied by 2.5
    sae = SAE(SAEConfig(d_in=tree.d, d_sae=tree.n_features, n_inst=2, seed=5))
    train_sae(sae, lambda b, g: tree.sample(b, g)[0] * 2.5, _replace(cfg, matryoshka=mcfg))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(got.saes["matryoshka"], name), getattr(sae, name)), name
    # absorption is scored on inputs with the same scale
    scores = got.absorption("matryoshka", n=2_000, seed=7)
    x, c = tree.sample(2_000, torch.Generator().manual_seed(7))
    want = absorption_scores(sae, tree, x * 2.5, c)
    torch.testing.assert_close(scores.full_absorption, want.full_absorption, rtol=0, atol=0)
    torch.testing.assert_close(scores.absorption_fraction, want.absorption_fraction, rtol=0, atol=0)


@pytest.mark.parametrize("kw", [dict(input_scale=0.0), dict(input_scale=float("nan")), dict(input_scale=-1.0),
                                dict(methods=()), dict(methods=("vanilla", "topk")), dict(methods=("vanilla", "vanilla"))])
def test_compare_rejects_bad_arguments(kw):
    with pytest.raises(ValueError, match="input_scale|methods"):
        compare_vanilla_matryoshka(nabeshima_tree(seed=0), TrainConfig(steps=1, progress=False),
                                   MatryoshkaConfig(), n_inst=1, **kw)
