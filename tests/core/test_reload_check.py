"""Tests for saelib.core.persistence.check_reload, the notebooks' save-and-reload check: it passes on
a saved SAE (whatever the trained SAE's mode) and fails, naming the loader, when either loader's
encoding differs from the trained SAE's."""

import pytest
import torch

from saelib.core.persistence import check_reload, save_instances
from tests.builders import random_bias_sae

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see tests/conftest.py


def test_check_reload_passes_on_saved_saes_and_keeps_the_mode(tmp_path, sae_lens):
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    for architecture, lens_class in (("relu", "StandardSAE"), ("batchtopk", "JumpReLUSAE")):
        sae = random_bias_sae(architecture).train()
        folders = save_instances(sae.eval(), tmp_path / architecture)
        sae.train()  # a BatchTopK SAE in training mode keeps k per batch, not its saved threshold
        loaded = check_reload(folders[1], sae, 1, x, sae_lens.SAE.load_from_disk)
        assert type(loaded).__name__ == lens_class and sae.training


def test_check_reload_names_the_loader_that_differs(tmp_path, sae_lens):
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    sae = random_bias_sae()
    folders = save_instances(sae, tmp_path)
    with pytest.raises(AssertionError, match=r"load_sae\(.*instance_1'\) encodes differently"):
        check_reload(folders[1], sae, 0, x, sae_lens.SAE.load_from_disk)  # another instance's weights
    # an SAELens loader that shifts b_enc: saelib's reload still agrees, SAELens's does not
    real = sae_lens.SAE.load_from_disk

    def shifted(path, *args, **kwargs):
        loaded = real(path, *args, **kwargs)
        with torch.no_grad():
            loaded.b_enc.add_(1.0)
        return loaded

    with pytest.raises(AssertionError, match=r"SAELens's SAE from .*instance_2' encodes differently"):
        check_reload(folders[2], sae, 2, x, shifted)
    with pytest.raises(IndexError, match="instance 3 out of range for n_inst=3"):
        check_reload(folders[0], sae, 3, x, real)
