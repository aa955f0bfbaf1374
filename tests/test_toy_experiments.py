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


def test_narrow_sweep_rejects_zero_seeds():
    with pytest.raises(ValueError, match="n_seeds must be >= 1, got 0"):
        narrow_sae_sweep([0.3], [1e-3], steps=10, n_seeds=0)
