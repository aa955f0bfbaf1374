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
