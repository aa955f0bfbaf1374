"""Transcoders (sparse MLPs): what one is, where it sits in a transformer, and how its
normalisation is folded into its weights.

A transcoder for layer ``l`` replaces that layer's MLP: it reads the MLP's input
(``blocks.l.hook_resid_mid`` in a model without normalisation, else
``blocks.l.ln2.hook_normalized``; :func:`mlp_hook_names`) and predicts the MLP's output
(``blocks.l.hook_mlp_out``) through ``d_sae`` ReLU latents. It is a :class:`saelib.core.sae.SAE`
with ``d_out`` set and ``apply_b_dec_to_input=False`` (Dunefsky et al. 2024, arXiv 2406.11944;
Nabeshima's sparse MLPs, Nabeshima 2024b in REFERENCES.md); :class:`SparseMLP` holds one such
SAE (one instance per setting of a sweep) with the layer and hooks it belongs to.

Trained on inputs and targets each multiplied by a fixed scalar
(:func:`saelib.core.normalisation.normalisation_scale`), a transcoder maps raw activations once
the two scalars are folded into its weights (:func:`fold_scales`): latent activations are
unchanged. Training, splicing and the published comparison live in the sparse-MLP experiment,
:mod:`saelib.experiments.sparse_mlp`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer, utils

from .sae import SAE
from .train import History

__all__ = ["SparseMLP", "mlp_hook_names", "fold_scales"]


@dataclass
class SparseMLP:
    """Trained sparse MLPs for one layer, one :class:`SAE` instance per ``S`` (weights in model
    units: they read the raw MLP input and write the raw MLP output)."""

    sae: SAE
    layer: int
    S_values: tuple[float, ...]
    in_hook: str
    out_hook: str
    in_scale: float = 1.0
    out_scale: float = 1.0
    history: History | None = field(default=None, repr=False)

    @torch.no_grad()
    def __call__(self, mlp_in: Float[Tensor, "... d_model"]) -> Float[Tensor, "... inst d_model"]:
        """Predicted MLP output of every instance (on the SAE's device, in its dtype)."""
        lead = mlp_in.shape[:-1]
        out, _ = self.sae(mlp_in.reshape(-1, mlp_in.shape[-1]).to(self.sae.W_enc))  # [n, inst, d_model]
        return out.reshape(*lead, self.sae.n_inst, self.sae.d_out)

    @torch.no_grad()
    def latents(self, mlp_in: Float[Tensor, "... d_model"]) -> Float[Tensor, "... inst d_sae"]:
        """Sparse-neuron activations of every instance (on the SAE's device, in its dtype)."""
        lead = mlp_in.shape[:-1]
        acts = self.sae.encode(mlp_in.reshape(-1, mlp_in.shape[-1]).to(self.sae.W_enc))
        return acts.reshape(*lead, self.sae.n_inst, self.sae.d_sae)


def mlp_hook_names(model: HookedTransformer, layer: int) -> tuple[str, str]:
    """``(input hook, output hook)`` of layer ``layer``'s MLP: the residual stream after
    attention (no normalisation) or ``ln2``'s normalised output, and ``hook_mlp_out``.

    Raises ValueError if ``layer`` is not a layer of the model.
    """
    if not (0 <= layer < model.cfg.n_layers):
        raise ValueError(f"layer must be in [0, {model.cfg.n_layers}), got {layer}")
    if model.cfg.normalization_type is None:
        in_hook = utils.get_act_name("resid_mid", layer)
    else:
        in_hook = utils.get_act_name("normalized", layer, "ln2")
    return in_hook, utils.get_act_name("mlp_out", layer)


@torch.no_grad()
def fold_scales(sae: SAE, in_scale: float, out_scale: float) -> None:
    """Fold input/output normalisation into the weights in place: an SAE trained on
    ``(in_scale * x, out_scale * y)`` becomes one that maps ``x`` to ``y`` with the same latent
    activations. Raises ValueError for ``apply_b_dec_to_input=True`` (an SAE, not a transcoder)
    or non-positive scales."""
    if sae.cfg.apply_b_dec_to_input:
        raise ValueError("fold_scales needs a transcoder (apply_b_dec_to_input=False)")
    if not (in_scale > 0 and out_scale > 0):
        raise ValueError(f"scales must be > 0, got in_scale={in_scale}, out_scale={out_scale}")
    sae.W_enc.mul_(in_scale)
    sae.W_dec.div_(out_scale)
    sae.b_dec.div_(out_scale)
