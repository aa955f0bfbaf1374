"""Summaries of how an SAE's latents mix parent and child features (absorption and hedging).

Given a latents × features cosine matrix and the toy hierarchy, every feature is matched to one
latent by the Hungarian algorithm (as in the heatmaps), and the mixing is read off the matched
latents. In the notation of Nabeshima 2024 (toy heatmaps) and Chanin et al. 2024 ("A is for
Absorption", arXiv 2409.14507):

* **absorption** (vanilla SAE): a child latent points at child + parent (cos ≈ 0.7 with each) and
  the parent latent's *encoder* is negative on the children (it switches off when a child fires);
* **residual mixing / hedging** (Matryoshka SAE): the parent latent's decoder is slightly positive
  on its children (≈ +0.2) and child latents slightly negative on their siblings (≈ −0.2).
"""

from __future__ import annotations

from itertools import permutations

import torch
from jaxtyping import Float
from torch import Tensor

from .metrics import decoder_cosines, encoder_cosines, hungarian_match, mcc, recovered_features
from .sae import SAE
from .toy_data import ToyHierarchy

__all__ = ["parent_child_pattern", "matched_latents", "instance_summary"]


def matched_latents(cos: Float[Tensor, "n_latents n_feat"]) -> Tensor:
    """``[n_feat]`` long: the latent Hungarian-matched to each feature (-1 if none, when
    ``n_latents < n_feat``)."""
    lat, feat = hungarian_match(cos)
    out = torch.full((cos.shape[1],), -1, dtype=torch.long)
    out[feat] = lat
    return out


def parent_child_pattern(
    cos: Float[Tensor, "n_latents n_feat"],
    hierarchy: ToyHierarchy,
    match_cos: Float[Tensor, "n_latents n_feat"] | None = None,
) -> dict[str, float]:
    """Mean cosines that characterise parent/child mixing, over every parent with ≥ 2 children.

    Args:
        cos: cosines of latents (decoder rows or encoder columns) with the true features.
        hierarchy: the toy hierarchy whose features are the columns of ``cos``.
        match_cos: the matrix used for the Hungarian matching (default ``cos``); pass the decoder
            cosines when summarising encoder cosines, so that both use the same latents.

    Returns a dict (all means over parent/child pairs):
        ``diagonal``: cos of every feature with its matched latent (all features);
        ``parent_on_children``: parent latent with its child features;
        ``child_on_parent``: child latents with their parent feature;
        ``child_on_own``: child latents with their own feature;
        ``child_on_siblings``: child latents with their sibling features.

    Raises ValueError if ``cos`` does not have one column per feature of ``hierarchy``.
    """
    if cos.ndim != 2 or cos.shape[1] != hierarchy.n_features:
        raise ValueError(
            f"cos must be [n_latents, n_features={hierarchy.n_features}], got {tuple(cos.shape)}"
        )
    cos = cos.detach().double()
    match = matched_latents(cos if match_cos is None else match_cos.detach())
    p_on_c, c_on_p, c_on_own, c_on_sib = [], [], [], []
    for parent in range(hierarchy.n_features):
        children = hierarchy.children_of(parent)
        if len(children) < 2 or match[parent] < 0 or (match[children] < 0).any():
            continue
        lp = match[parent]
        for c in children:
            lc = match[c]
            p_on_c.append(cos[lp, c])
            c_on_p.append(cos[lc, parent])
            c_on_own.append(cos[lc, c])
        for a, b in permutations(children, 2):
            c_on_sib.append(cos[match[a], b])
    matched = match >= 0
    diag = cos[match[matched], torch.arange(hierarchy.n_features)[matched]]

    def mean(xs: list[Tensor]) -> float:
        return float(torch.stack(xs).mean()) if xs else float("nan")

    return {
        "diagonal": float(diag.mean()),
        "parent_on_children": mean(p_on_c),
        "child_on_parent": mean(c_on_p),
        "child_on_own": mean(c_on_own),
        "child_on_siblings": mean(c_on_sib),
    }


def instance_summary(sae: SAE, hierarchy: ToyHierarchy, threshold: float = 0.9) -> list[dict[str, float]]:
    """Per instance: decoder MCC, features recovered (matched decoder cos > ``threshold``), stuck
    latents (features not recovered), and the decoder and encoder parent/child patterns
    (see :func:`saelib.absorption.parent_child_pattern`; encoder keys are prefixed ``enc_``)."""
    out = []
    for i in range(sae.n_inst):
        dec = decoder_cosines(sae.W_dec[i].detach(), hierarchy.features)
        enc = encoder_cosines(sae.W_enc[i].detach(), hierarchy.features)
        n_rec = int(recovered_features(dec, threshold).sum())
        row = {"mcc": mcc(dec), "recovered": n_rec, "stuck": hierarchy.n_features - n_rec}
        row.update(parent_child_pattern(dec, hierarchy))
        row.update({f"enc_{k}": v for k, v in parent_child_pattern(enc, hierarchy, match_cos=dec).items()})
        out.append(row)
    return out
