"""Summaries of how an SAE's latents mix parent and child features (absorption and hedging).

Given a latents × features cosine matrix and the toy hierarchy, every feature is matched to one
latent by the Hungarian algorithm (as in the heatmaps), and the mixing is read off the matched
latents. In the notation of Nabeshima 2024 (toy heatmaps) and Chanin et al. 2024 ("A is for
Absorption", arXiv 2409.14507):

* **absorption** (vanilla SAE): a child latent points at child + parent (cos ≈ 0.7 with each) and
  the parent latent's *encoder* is negative on the children (it switches off when a child fires);
* **residual mixing / hedging** (Matryoshka SAE): the parent latent's decoder is slightly positive
  on its children (≈ +0.2) and child latents slightly negative on their siblings (≈ −0.2).

Rates that another toolkit can be compared on
---------------------------------------------

:func:`absorption_scores` — SAEBench's absorption eval (Chanin et al. 2024, arXiv 2409.14507;
reference code ``adamkarvonen/SAEBench``, ``sae_bench/evals/absorption/
feature_absorption_calculator.py`` for the per-sample rules, ``main.py`` for the aggregation,
``k_sparse_probing.py`` / ``feature_absorption.py`` for the choice of main latents). For every
positive sample of a concept it asks whether the SAE's "main latents" for the concept stay silent
while another latent carries the concept's direction. Two numbers per SAE:

* **full-absorption rate**: the fraction of positive samples in which every main latent is off
  (``|act| < 1e-8``), the latent with the largest projection onto the concept direction has cosine
  ``>= 0.025`` with it, and that one latent's projection is ``>= 0.4`` of the input's projection;
* **absorption fraction** (added to SAEBench by Demian Till): per sample, the share of the
  concept's projection carried by up to 3 non-main latents (each with cosine ``>= 0.1`` and a
  positive projection) rather than by the main latents; 0 when the main latents already carry the
  whole projection or the absorbers carry less than 0.4 of it; averaged over positive samples.

Both are averaged over the concepts (SAEBench: over the 26 first letters; here: over parents).
Adaptations to toy ground truth, each a deliberate change from the reference:

1. *Probe direction* → the true parent direction ``hierarchy.features[p]``, unit-normalised
   (SAEBench: the row of a logistic-regression probe trained on first-letter labels).
2. *Positive samples* → samples whose ground-truth parent coefficient is ``> 0`` (SAEBench: tokens
   whose first letter is the letter *and* whose probe score is ``> 0``; the true direction is a
   perfect probe here, so the two conditions coincide).
3. *Input projection* → ``x · u_p`` for the input ``x`` and unit parent direction ``u_p``, as in
   SAEBench (there: the model activation dotted with the unit probe).
4. *Latent projection* → ``a_j (W_dec[j] · u_p)``, the component of latent ``j``'s contribution to
   the reconstruction along ``u_p``. SAEBench uses ``a_j cos(W_dec[j], u_p)``, which is the same
   number for unit-norm decoder rows (SAELens/SAEBench SAEs); saelib's decoder rows are not
   normalised, and this form does not change when scale moves between encoder and decoder. The
   cosine thresholds (0.025, 0.1) still use ``cos(W_dec[j], u_p)``. ``b_dec`` is credited to no
   latent, as in SAEBench.
5. *Main latents* → by default the one latent Hungarian-matched to the parent on decoder cosines
   (:func:`matched_latents`, the matching of the heatmaps and of MCC); or any set given in
   ``main_latents``. SAEBench trains an L1 probe on SAE activations, keeps its top-k latents and
   grows k (up to 10) while the k-sparse probe's F1 rises by more than 0.03, calling the extra
   latents "feature splits". In a toy hierarchy every child fires on a large share of the parent's
   samples, so a latent that has absorbed the parent into a child would pass that F1 test and be
   counted as a split of the parent — the absorption the metric is meant to see would vanish. The
   one-to-one matching keeps absorbing child latents out of the main set. A parent left unmatched
   (possible when ``d_sae < n_features``) has no main latent; only the absorber tests then apply.
6. *Degenerate samples*: SAEBench divides by the input's projection; a positive sample whose
   projection is ``<= 0`` (possible with superposed directions) counts here as no absorption
   (full: False; fraction: 0) instead of raising ``ZeroDivisionError`` or giving a negative ratio.
7. *Concepts scored* → by default every feature with at least one child (``parents=``).
8. The thresholds (0.025, 0.1, 0.4, at most 3 absorbers, 1e-8) are SAEBench's
   ``FeatureAbsorptionCalculator`` defaults, the fields of :class:`AbsorptionThresholds`.

The hedging rate of Chanin et al. 2025 (how far old decoder rows move into the span of newly added
latents) is in :mod:`saelib.experiments.hedging`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import permutations
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.metrics import (
    check_finite,
    decoder_cosines,
    encoder_cosines,
    hungarian_match,
    instance_indices,
    mcc,
    recovered_features,
    unit_rows,
)
from ..core.sae import SAE
from ..data.toy_data import ToyHierarchy

__all__ = [
    "parent_child_pattern",
    "matched_latents",
    "weight_metrics",
    "weight_metrics_from_cosines",
    "instance_summary",
    "AbsorptionThresholds",
    "SAEBENCH_THRESHOLDS",
    "AbsorptionScores",
    "ParentProjections",
    "full_absorption",
    "absorbed_projection",
    "absorption_fraction",
    "absorption_scores",
]


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


def weight_metrics(sae: SAE, instance: int, hierarchy: ToyHierarchy, threshold: float = 0.9) -> dict[str, float]:
    """The metrics of one instance that its weights alone decide (no data): decoder ``mcc``,
    ``recovered`` (features whose matched decoder cosine > ``threshold``), ``stuck`` (features
    not recovered), the decoder's parent/child pattern and, under the decoder's matching, the
    encoder's (keys prefixed ``enc_``; see :func:`parent_child_pattern`).

    The one per-instance evaluation behind :func:`instance_summary` and
    :func:`saelib.experiments.hierarchy_analysis.evaluate_instances`.
    Raises IndexError for an instance outside ``[0, sae.n_inst)``.
    """
    if not 0 <= instance < sae.n_inst:
        raise IndexError(f"instance {instance} outside [0, {sae.n_inst})")
    dec = decoder_cosines(sae.W_dec[instance].detach(), hierarchy.features)
    return weight_metrics_from_cosines(dec, sae.W_enc[instance].detach(), hierarchy, threshold)


def weight_metrics_from_cosines(
    dec: Float[Tensor, "d_sae n_feat"], W_enc: Float[Tensor, "d_in d_sae"], hierarchy: ToyHierarchy, threshold: float = 0.9
) -> dict[str, float]:
    """:func:`weight_metrics` of one instance given its decoder cosines ``dec``
    (:func:`saelib.core.metrics.decoder_cosines` of ``W_dec[i]``) and its encoder ``W_enc[i]``, for
    callers that use the cosines themselves too. Raises ValueError as
    :func:`parent_child_pattern` (``dec`` without one column per feature)."""
    enc = encoder_cosines(W_enc, hierarchy.features)
    n_rec = int(recovered_features(dec, threshold).sum())
    row = {"mcc": mcc(dec), "recovered": n_rec, "stuck": hierarchy.n_features - n_rec}
    row.update(parent_child_pattern(dec, hierarchy))
    row.update({f"enc_{k}": v for k, v in parent_child_pattern(enc, hierarchy, match_cos=dec).items()})
    return row


def instance_summary(sae: SAE, hierarchy: ToyHierarchy, threshold: float = 0.9) -> list[dict[str, float]]:
    """Per instance, :func:`weight_metrics`: decoder MCC, features recovered (matched decoder cos >
    ``threshold``), stuck latents (features not recovered), and the decoder and encoder
    parent/child patterns (encoder keys are prefixed ``enc_``)."""
    return [weight_metrics(sae, i, hierarchy, threshold) for i in range(sae.n_inst)]


# ---------------------------------------------------------------------------- absorption (SAEBench)
@dataclass(frozen=True)
class AbsorptionThresholds:
    """The thresholds of SAEBench's absorption eval; the defaults are those of its
    ``FeatureAbsorptionCalculator`` (``sae_bench/evals/absorption/feature_absorption_calculator.py``).

    Attributes:
        full_absorption_cos: least ``cos(W_dec[j], u)`` of the latent with the largest projection
            for a full absorption (SAEBench 0.025).
        absorption_fraction_cos: least ``cos(W_dec[j], u)`` of a latent counted as an absorber
            in the absorption fraction (SAEBench 0.1).
        projection_proportion: least share of the input's projection ``x · u`` that the absorbing
            latent(s) must carry (SAEBench 0.4).
        max_absorbing_latents: at most this many latents share an absorbed projection (SAEBench 3).
        active_eps: a main latent with ``|a_j|`` below this counts as silent (SAEBench 1e-8).

    Raises ValueError for a threshold that is not finite, or ``max_absorbing_latents`` that is
    not an int ``>= 1``.
    """

    full_absorption_cos: float = 0.025
    absorption_fraction_cos: float = 0.1
    projection_proportion: float = 0.4
    max_absorbing_latents: int = 3
    active_eps: float = 1e-8

    def __post_init__(self) -> None:
        for name in ("full_absorption_cos", "absorption_fraction_cos", "projection_proportion", "active_eps"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"AbsorptionThresholds.{name} must be finite, got {value!r}")
        n = self.max_absorbing_latents
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"AbsorptionThresholds.max_absorbing_latents must be an int >= 1, got {n!r}")


SAEBENCH_THRESHOLDS = AbsorptionThresholds()


@dataclass
class AbsorptionScores:
    """SAEBench absorption scores of some instances of an SAE (see :func:`absorption_scores`).

    Attributes:
        instances: the scored instance indices (``inst`` below is ``len(instances)``).
        parents: the scored parent features (``n_parents`` below).
        main_latents: ``main_latents[k][j]`` the main latents of ``parents[j]`` in ``instances[k]``.
        n_positive: ``[n_parents]`` long, samples in which each parent fires.
        full_absorption: ``[inst]`` mean over parents of the full-absorption rate (SAEBench's
            ``mean_full_absorption_score``), in ``[0, 1]``.
        absorption_fraction: ``[inst]`` mean over parents of the mean absorption fraction
            (SAEBench's ``mean_absorption_fraction_score``), in ``[0, 1]``.
        full_absorption_by_parent: ``[inst, n_parents]`` the rate of each parent.
        absorption_fraction_by_parent: ``[inst, n_parents]`` the fraction of each parent.
    """

    instances: list[int]
    parents: list[int]
    main_latents: list[list[list[int]]]
    n_positive: Tensor
    full_absorption: Tensor
    absorption_fraction: Tensor
    full_absorption_by_parent: Tensor
    absorption_fraction_by_parent: Tensor


class ParentProjections(NamedTuple):
    """What SAEBench's per-sample rules read, for one parent in one SAE instance, over the
    ``n_pos`` samples in which the parent fires (units of ``x``; ``u`` the unit parent direction).

    Attributes:
        acts: ``[n_pos, d_sae]`` latent activations ``a_j``.
        input_proj: ``[n_pos]`` the input's projection ``x · u``.
        latent_proj: ``[n_pos, d_sae]`` each latent's projection ``a_j (W_dec[j] · u)``.
        latent_cos: ``[d_sae]`` ``cos(W_dec[j], u)``.
        is_main: ``[d_sae]`` bool, the parent's main latents.
    """

    acts: Tensor
    input_proj: Tensor
    latent_proj: Tensor
    latent_cos: Tensor
    is_main: Tensor


def full_absorption(proj: ParentProjections, thresholds: AbsorptionThresholds = SAEBENCH_THRESHOLDS) -> Tensor:
    """``[n_pos]`` bool, SAEBench's full absorption per sample: every main latent is silent
    (``|a_j| < active_eps``; true when there is none), the latent with the largest projection has
    ``cos >= full_absorption_cos``, ``x · u > 0``, and that projection is at least
    ``projection_proportion`` of ``x · u``."""
    mains_silent = (proj.acts[:, proj.is_main].abs() < thresholds.active_eps).all(-1)  # [n_pos]
    top_proj, top = proj.latent_proj.max(-1)  # [n_pos]
    return (
        mains_silent
        & (proj.latent_cos[top] >= thresholds.full_absorption_cos)
        & (proj.input_proj > 0)
        & (top_proj >= thresholds.projection_proportion * proj.input_proj)
    )


def absorbed_projection(proj: ParentProjections, thresholds: AbsorptionThresholds = SAEBENCH_THRESHOLDS) -> Tensor:
    """``[n_pos]`` the summed projection of the (at most ``max_absorbing_latents``) largest
    absorbers: non-main latents with ``cos >= absorption_fraction_cos`` and a positive projection
    (0 when there is none)."""
    candidate = ~proj.is_main & (proj.latent_cos >= thresholds.absorption_fraction_cos)  # [d_sae]
    candidate = candidate[None, :] & (proj.latent_proj > 0)  # [n_pos, d_sae]
    absorber_proj = torch.where(candidate, proj.latent_proj, torch.zeros_like(proj.latent_proj))
    n_top = min(thresholds.max_absorbing_latents, absorber_proj.shape[-1])
    return absorber_proj.topk(n_top, dim=-1).values.sum(-1)  # zeros add nothing


def absorption_fraction(proj: ParentProjections, thresholds: AbsorptionThresholds = SAEBENCH_THRESHOLDS) -> Tensor:
    """``[n_pos]`` in ``[0, 1]``, SAEBench's absorption fraction per sample. With ``M`` the main
    latents' summed projection and ``T`` the :func:`absorbed_projection`: 0 if ``x · u <= 0``,
    ``M >= x · u`` or ``T < projection_proportion * (x · u)``; else 1 if ``M <= 0``; else
    ``A / (A + M)`` with ``A = min(T, x · u - M)``, clipped to ``[0, 1]``."""
    main_proj = proj.latent_proj[:, proj.is_main].sum(-1)  # [n_pos]
    absorbed = absorbed_projection(proj, thresholds)  # [n_pos]
    share = torch.minimum(absorbed, proj.input_proj - main_proj)
    partial = (share / (share + main_proj)).clamp(0.0, 1.0)
    too_small = absorbed < thresholds.projection_proportion * proj.input_proj
    none = (proj.input_proj <= 0) | (main_proj >= proj.input_proj) | too_small
    value = torch.where(main_proj <= 0, torch.ones_like(partial), partial)
    return torch.where(none, torch.zeros_like(value), value)


def _main_latent_sets(
    main_latents: Mapping[int, Sequence[int]] | Sequence[Mapping[int, Sequence[int]]] | None,
    cos_dec: Tensor,
    parents: list[int],
    k: int,
    n_scored: int,
) -> list[list[int]]:
    """Main latents of every parent for the ``k``-th scored instance."""
    d_sae = cos_dec.shape[0]
    if main_latents is None:
        match = matched_latents(cos_dec)
        return [[int(match[p])] if match[p] >= 0 else [] for p in parents]
    if isinstance(main_latents, Mapping):
        mapping = main_latents
    else:
        if len(main_latents) != n_scored:
            raise ValueError(
                f"main_latents must be one mapping, or one per scored instance ({n_scored}), "
                f"got {len(main_latents)}"
            )
        mapping = main_latents[k]
    out = []
    for p in parents:
        if p not in mapping:
            raise ValueError(f"main_latents has no entry for parent feature {p}")
        ids = [int(j) for j in mapping[p]]
        bad = [j for j in ids if not (0 <= j < d_sae)]
        if bad:
            raise ValueError(f"main_latents[{p}] has latent indices {bad} out of range for d_sae={d_sae}")
        out.append(sorted(set(ids)))
    return out


def _check_absorption_inputs(sae: SAE, hierarchy: ToyHierarchy, x: Tensor, coeffs: Tensor) -> None:
    """The shape and value checks of :func:`absorption_scores` (its Raises list)."""
    n_feat, d_in = hierarchy.n_features, hierarchy.d
    if sae.d_in != d_in:
        raise ValueError(f"sae.d_in={sae.d_in} but hierarchy.d={d_in}")
    if x.ndim != 2 or x.shape[1] != d_in:
        raise ValueError(f"x must be [batch, d_in={d_in}], got shape {tuple(x.shape)}")
    if coeffs.ndim != 2 or coeffs.shape[1] != n_feat:
        raise ValueError(f"coeffs must be [batch, n_feat={n_feat}], got shape {tuple(coeffs.shape)}")
    if x.shape[0] != coeffs.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but coeffs has {coeffs.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("x and coeffs are empty (batch = 0)")
    check_finite("x", x)
    check_finite("coeffs", coeffs)
    check_finite("sae.W_dec", sae.W_dec)
    check_finite("sae.W_enc", sae.W_enc)


def _scored_parents(hierarchy: ToyHierarchy, parents: Sequence[int] | None, positive: Tensor) -> list[int]:
    """The parent features to score (default: every feature with a child); ValueError for none,
    an index out of range, or a parent with no positive sample in ``positive`` ``[batch, n_feat]``."""
    n_feat = hierarchy.n_features
    if parents is None:
        parents = [p for p in range(n_feat) if hierarchy.children_of(p)]
        if not parents:
            raise ValueError("the hierarchy has no feature with children: pass parents=[...]")
    parents = [int(p) for p in parents]
    if not parents:
        raise ValueError("parents is empty")
    for p in parents:
        if not (0 <= p < n_feat):
            raise ValueError(f"parent feature {p} out of range for n_features={n_feat}")
    for p, n in zip(parents, positive[:, parents].sum(0).tolist()):
        if n == 0:
            raise ValueError(f"parent feature {p} never fires in coeffs: its absorption rate is undefined")
    return parents


def _eval_activations(sae: SAE, x: Tensor) -> Float[Tensor, "batch inst d_sae"]:
    """``sae.encode(x)`` in eval mode (BatchTopK: the inference threshold, not updated), float64
    on the CPU; the SAE's training mode is restored."""
    was_training = sae.training
    sae.eval()
    try:
        return sae.encode(x.to(sae.W_enc.device, sae.W_enc.dtype)).detach().cpu().double()
    finally:
        sae.train(was_training)


@torch.no_grad()
def absorption_scores(
    sae: SAE,
    hierarchy: ToyHierarchy,
    x: Float[Tensor, "batch d_in"],
    coeffs: Float[Tensor, "batch n_feat"],
    *,
    instances: int | Sequence[int] | None = None,
    parents: Sequence[int] | None = None,
    main_latents: Mapping[int, Sequence[int]] | Sequence[Mapping[int, Sequence[int]]] | None = None,
    thresholds: AbsorptionThresholds = SAEBENCH_THRESHOLDS,
) -> AbsorptionScores:
    """SAEBench's full-absorption rate and absorption fraction on toy ground truth.

    For every scored parent ``p`` (unit direction ``u = f_p / ||f_p||``) and every sample in which
    the parent's true coefficient is ``> 0``, with latent activations ``a`` (``sae.encode(x)``, in
    eval mode) and latent projections ``a_j (W_dec[j] · u)`` (units of ``x``,
    :class:`ParentProjections`), the sample's :func:`full_absorption` and
    :func:`absorption_fraction` are averaged over the parent's positive samples, then over parents.
    The main latents are the latent Hungarian-matched to the parent on decoder cosines unless
    ``main_latents`` says otherwise. Every adaptation from SAEBench is listed in the module
    docstring.

    Args:
        sae: the SAEs; ``W_enc`` ``[inst, d_in, d_sae]``, ``W_dec`` ``[inst, d_sae, d_in]``.
        hierarchy: the toy hierarchy (true directions ``features`` ``[n_feat, d_in]``).
        x: ``[batch, d_in]`` inputs, shared by every instance (e.g. ``hierarchy.sample(...)[0]``).
        coeffs: ``[batch, n_feat]`` the true feature coefficients of ``x`` (``> 0``: firing).
        instances: ``None`` (all), one index, or a list of indices to score.
        parents: the features to score (default: every feature with at least one child).
        main_latents: ``{parent: [latent, ...]}`` used for every scored instance, or one such
            mapping per scored instance; ``None`` for the Hungarian match.
        thresholds: SAEBench's thresholds (:class:`AbsorptionThresholds`; default its own).

    Returns an :class:`AbsorptionScores` whose tensors have one row per scored instance.

    Raises:
        ValueError: ``sae.d_in != hierarchy.d``; ``x`` not ``[batch, d_in]`` or ``coeffs`` not
            ``[batch, n_feat]`` (shapes named); an empty batch; NaN/inf in ``x``, ``coeffs`` or
            the SAE weights; a bad instance or parent index; a parent that never fires in
            ``coeffs`` (its rate is undefined); no parents to score; bad ``main_latents``.
    Source: Chanin et al. 2024 (arXiv 2409.14507); SAEBench
    ``sae_bench/evals/absorption/feature_absorption_calculator.py``.
    """
    _check_absorption_inputs(sae, hierarchy, x, coeffs)
    scored = instance_indices(sae.n_inst, instances)
    positive = coeffs.detach().cpu() > 0  # [batch, n_feat]
    parents = _scored_parents(hierarchy, parents, positive)
    acts = _eval_activations(sae, x)  # [batch, inst, d_sae]
    x64 = x.detach().cpu().double()  # [batch, d_in]
    U = unit_rows(hierarchy.features.double())  # [n_feat, d_in]

    full = torch.zeros(len(scored), len(parents), dtype=torch.float64)
    frac = torch.zeros(len(scored), len(parents), dtype=torch.float64)
    mains_out: list[list[list[int]]] = []
    for k, i in enumerate(scored):
        W_dec = sae.W_dec[i].detach().cpu().double()  # [d_sae, d_in]
        cos_dec = decoder_cosines(W_dec, hierarchy.features.double())  # [d_sae, n_feat]
        mains = _main_latent_sets(main_latents, cos_dec, parents, k, len(scored))
        mains_out.append(mains)
        for j, (p, main) in enumerate(zip(parents, mains)):
            pos = positive[:, p]
            is_main = torch.zeros(W_dec.shape[0], dtype=torch.bool)
            is_main[main] = True
            a = acts[pos, i]  # [n_pos, d_sae]
            proj = ParentProjections(a, x64[pos] @ U[p], a * (W_dec @ U[p]), cos_dec[:, p], is_main)
            full[k, j] = full_absorption(proj, thresholds).double().mean()
            frac[k, j] = absorption_fraction(proj, thresholds).mean()

    return AbsorptionScores(
        instances=scored,
        parents=parents,
        main_latents=mains_out,
        n_positive=positive[:, parents].sum(0),
        full_absorption=full.mean(1),
        absorption_fraction=frac.mean(1),
        full_absorption_by_parent=full,
        absorption_fraction_by_parent=frac,
    )
