"""Probes of Nabeshima's hypothesis for the residual parent/child mixing of Matryoshka SAEs
(notebook 03, "Matryoshka variants").

Nabeshima 2024 ("Matryoshka Sparse Autoencoders", LessWrong) suggests that a parent latent
keeps absorbing its children because of the loss terms in which a child feature is active and
the prefix holds the parent's latent but not the child's. This module marks those
``(sample, prefix)`` terms (:func:`parent_child_split_terms`), turns them into a ``term_mask``
for :func:`saelib.core.train.train_sae` that drops them during training (:class:`SplitTermMask`),
and measures what chosen terms do to one decoder row (:func:`prefix_term_gradient`). The loss
itself is :func:`saelib.core.matryoshka.matryoshka_loss` (its ``keep`` argument).
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..core.matryoshka import matryoshka_loss
from ..core.sae import SAE
from ..data.toy_data import ToyHierarchy

__all__ = ["parent_child_split_terms", "SplitTermMask", "prefix_term_gradient"]


def parent_child_split_terms(
    coeffs: Float[Tensor, "batch n_feat"],
    parent_index: Int[Tensor, " n_feat"],
    latent_of_feature: Int[Tensor, "inst n_feat"],
    d_sae: int,
) -> Bool[Tensor, "batch inst d_sae"]:
    """Which ``(sample, prefix length)`` terms hold a parent latent but not an active child's.

    Term ``(b, m)`` (column ``m - 1``) of instance ``i`` is marked when some feature ``c`` with
    parent ``p`` has ``coeffs[b, c] > 0`` and ``coeffs[b, p] > 0`` (child and parent both
    active), and ``latent_of_feature[i, p] < m <= latent_of_feature[i, c]``: the prefix contains
    the parent's latent but not the child's. These are the loss terms of Nabeshima's hypothesis
    for the residual mixing. A latent index of -1 means "no latent": pairs involving
    it are never marked.

    Raises ValueError on mismatched shapes.
    """
    batch, n_feat = coeffs.shape
    if parent_index.shape != (n_feat,) or latent_of_feature.ndim != 2 or latent_of_feature.shape[1] != n_feat:
        raise ValueError(
            f"coeffs {tuple(coeffs.shape)}, parent_index {tuple(parent_index.shape)} and "
            f"latent_of_feature {tuple(latent_of_feature.shape)} disagree on n_feat={n_feat}"
        )
    inst = latent_of_feature.shape[0]
    child = (parent_index >= 0).nonzero().flatten()  # [n_pairs]
    parent = parent_index[child]
    out = torch.zeros(batch, inst, d_sae, dtype=torch.bool, device=coeffs.device)
    if len(child) == 0:
        return out
    both = (coeffs[:, child] > 0) & (coeffs[:, parent] > 0)  # [batch, n_pairs]
    lp, lc = latent_of_feature[:, parent], latent_of_feature[:, child]  # [inst, n_pairs]
    cols = torch.arange(d_sae, device=coeffs.device)  # column k <-> length k + 1: marked iff lp <= k < lc
    span = (lp[..., None] <= cols) & (cols < lc[..., None]) & (lp[..., None] >= 0) & (lc[..., None] >= 0)
    # [inst, n_pairs, d_sae]; a term is marked if any active pair spans it
    hits = torch.einsum("bp,ips->bis", both.float(), span.float())
    return hits > 0


class SplitTermMask:
    """A ``term_mask`` for :func:`saelib.core.train.train_sae` that drops the parent-in / child-out
    terms of :func:`parent_child_split_terms` (keep = 0) and keeps every other term (keep = 1).

    The active features of a sample are decoded from ``x`` by least squares against the
    hierarchy's feature directions, exact when they are linearly independent (``d >= n``).

    Args:
        hierarchy: the toy hierarchy the data comes from.
        latent_of_feature: ``[inst, n_feat]`` long, the latent that represents each feature in
            each instance (e.g. the Hungarian match, or the order of a truth initialisation).
        instances: ``[inst]`` bool, the instances whose terms are dropped (default: all).
        d_sae: number of latents.

    Raises ValueError if the feature directions are linearly dependent or shapes disagree.
    """

    def __init__(
        self,
        hierarchy: ToyHierarchy,
        latent_of_feature: Int[Tensor, "inst n_feat"],
        d_sae: int,
        instances: Bool[Tensor, " inst"] | None = None,
    ):
        feats = hierarchy.features.double()  # [n_feat, d]
        if torch.linalg.matrix_rank(feats) < hierarchy.n_features:
            raise ValueError(
                f"SplitTermMask needs linearly independent features, got {hierarchy.n_features} "
                f"features in d={hierarchy.d}"
            )
        if latent_of_feature.shape[1] != hierarchy.n_features:
            raise ValueError(
                f"latent_of_feature must be [inst, {hierarchy.n_features}], got {tuple(latent_of_feature.shape)}"
            )
        self.decode = torch.linalg.pinv(feats).float()  # [d, n_feat]: x @ decode = coeffs
        self.parent_index = hierarchy.parent_index
        self.latent_of_feature = latent_of_feature.long()
        n_inst = latent_of_feature.shape[0]
        self.instances = torch.ones(n_inst, dtype=torch.bool) if instances is None else instances.bool()
        if self.instances.shape != (n_inst,):
            raise ValueError(f"instances must be [{n_inst}] bool, got {tuple(self.instances.shape)}")
        self.d_sae = d_sae

    def coefficients(self, x: Float[Tensor, "batch d"]) -> Float[Tensor, "batch n_feat"]:
        """Feature coefficients decoded from inputs (values below 1e-3 are set to 0)."""
        c = x @ self.decode.to(x)
        return torch.where(c.abs() > 1e-3, c, torch.zeros_like(c))

    def __call__(self, x: Float[Tensor, "batch d"]) -> Float[Tensor, "batch inst d_sae"]:
        if x.ndim != 2:
            raise ValueError(f"SplitTermMask expects x of shape [batch, d] (shared by instances), got {tuple(x.shape)}")
        idx = self.instances.nonzero().flatten()
        keep = x.new_ones(x.shape[0], len(self.instances), self.d_sae)
        if len(idx):
            split = parent_child_split_terms(
                self.coefficients(x), self.parent_index.to(x.device), self.latent_of_feature[idx].to(x.device), self.d_sae
            )
            keep[:, idx] = (~split).to(keep.dtype)
        return keep


def prefix_term_gradient(
    sae: SAE,
    x: Float[Tensor, "batch d_in"] | Float[Tensor, "batch inst d_in"],
    weights: Float[Tensor, "inst d_sae"],
    terms: Float[Tensor, "batch inst d_sae"],
    latent: Int[Tensor, " inst"],
    directions: Float[Tensor, "inst n_dir d_in"] | Float[Tensor, "n_dir d_in"],
) -> Float[Tensor, "inst n_dir"]:
    """Component of the descent step that chosen loss terms give one decoder row, along given
    directions.

    With ``L = sum_m w_m mean_batch(terms[b, m] * err[b, m])`` (the Matryoshka reconstruction loss
    restricted to the selected ``(sample, prefix)`` terms; ``terms`` may be 0/1 or weights), returns
    ``-dL/dW_dec[i, latent[i]] · d̂`` for every unit direction ``d̂`` of ``directions`` (shared, or
    one set per instance). Positive means these terms pull the decoder row toward the direction.
    Reconstruction only (no sparsity penalty). Parameters are not changed.

    Used for Nabeshima's hypothesis (Nabeshima 2024): with ``terms`` from
    :func:`parent_child_split_terms`, ``latent`` the parent latents and ``directions`` the child
    features, a positive value is the push of the parent decoder toward its children.

    Raises ValueError on mismatched shapes.
    """
    n_inst = sae.n_inst
    if latent.shape != (n_inst,):
        raise ValueError(f"latent must be [{n_inst}] long, got {tuple(latent.shape)}")
    dirs = directions.expand(n_inst, *directions.shape) if directions.ndim == 2 else directions
    if dirs.shape[0] != n_inst or dirs.shape[-1] != sae.d_out:
        raise ValueError(f"directions must be [n_dir, {sae.d_out}] or [{n_inst}, n_dir, {sae.d_out}], got {tuple(directions.shape)}")
    with torch.enable_grad():
        x_in = sae.expand_instances(x)
        x_hat, acts = sae(x_in)  # acts [b, i, s]
        if terms.shape != acts.shape:
            raise ValueError(f"terms must have shape {tuple(acts.shape)}, got {tuple(terms.shape)}")
        loss = matryoshka_loss(x_in, acts, sae.W_dec, sae.b_dec, weights, keep=terms, method="gram").sum()
        (grad,) = torch.autograd.grad(loss, sae.W_dec)
    row = grad[torch.arange(n_inst, device=grad.device), latent.to(grad.device)]  # [inst, d_in]
    unit = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return -torch.einsum("id,ind->in", row, unit)
