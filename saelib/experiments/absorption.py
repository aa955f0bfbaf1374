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
   ``FeatureAbsorptionCalculator`` defaults, kept as keyword arguments.

:func:`hedging_scores` — the hedging rate of Chanin et al. 2025 ("Feature hedging", arXiv
2505.11756; reference code ``chanind/feature-hedging-paper``,
``hedging_paper/evals/hedging_eval.py``, extension in ``hedging_paper/saes/base_sae.py``
``extend_sae``, training in ``hedging_paper/scripts/train_hedging_eval_batch_topk_sae.py``). A
trained SAE of width ``w`` is trained further twice from the same weights: once extended by
``n_new`` latents ("extended"), once at width ``w`` ("control"). If the old latents hedged (mixed
in correlated features they had no room for), the new latents take those features over and the old
decoder rows move *into the span of the new rows*. Per SAE:

* ``delta`` = unit-normalised old decoder rows of the extended SAE minus those of the control;
* ``delta_proj`` = mean over old rows of ``||P_new delta_i||`` (``P_new``: orthogonal projection
  onto the span of the new decoder rows), in units of the (unit) decoder norm;
* ``baseline_proj`` = the same with ``n_baselines`` random Gaussian subspaces of the same
  dimension;
* ``hedging_rate = max(0, (delta_proj - baseline_proj) / (1 - baseline_proj))``.

Adaptations: (a) decoder rows are unit-normalised inside the function (the reference folds the
decoder norms into the encoder with ``fold_W_dec_norm`` first; the inputs here are not modified);
an all-zero (dead) row stays zero; (b) the random subspaces have the *rank* of the new rows'
span (the reference draws as many random vectors as new latents; the two agree unless the new rows
are linearly dependent); (c) random draws come from a seeded generator per instance; (d) the rate
is NaN when ``baseline_proj >= 1`` (the formula divides by ``1 - baseline_proj``), and a span as
large as ``d_in`` is refused (every random subspace would contain ``delta``); (e) the SAE before
the extra training is optional and only used for drift diagnostics (the reference compares the
two trained SAEs only). :func:`extend_sae` initialises the new latents as the reference does
(decoder row = encoder column = a random unit vector × 0.1, ``b_enc = 0``);
:func:`train_hedging_pair` trains the extended and the control SAE with
:func:`saelib.core.train.train_sae` on the same data stream.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import permutations

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.metrics import decoder_cosines, encoder_cosines, hungarian_match, mcc, recovered_features
from ..core.sae import SAE, SAEConfig
from ..data.toy_data import ToyHierarchy
from ..core.train import DataSource, TrainConfig, train_sae

__all__ = [
    "parent_child_pattern",
    "matched_latents",
    "weight_metrics",
    "instance_summary",
    "AbsorptionScores",
    "absorption_scores",
    "HedgingScores",
    "hedging_scores",
    "extend_sae",
    "train_hedging_pair",
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
    return _weight_metrics(dec, sae.W_enc[instance].detach(), hierarchy, threshold)


def _weight_metrics(dec: Float[Tensor, "d_sae n_feat"], W_enc: Float[Tensor, "d_in d_sae"], hierarchy: ToyHierarchy,
                    threshold: float) -> dict[str, float]:
    """:func:`weight_metrics` from the instance's decoder cosines (for callers that also use them)."""
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


# ---------------------------------------------------------------------------- shared checks
# SAEBench's FeatureAbsorptionCalculator defaults (feature_absorption_calculator.py)
SAEBENCH_ACTIVE_EPS = 1e-8  # a main latent with |act| below this counts as not firing
SAEBENCH_FULL_COS = 0.025  # min cos(top latent decoder, concept direction) for full absorption
SAEBENCH_FRACTION_COS = 0.1  # min cos(absorber decoder, concept direction) for the fraction
SAEBENCH_PROJ_PROPORTION = 0.4  # min share of the input's projection carried by the absorber(s)
SAEBENCH_MAX_ABSORBERS = 3  # at most this many latents share an absorbed projection


def _instance_list(n_inst: int, instances: int | Sequence[int] | None) -> list[int]:
    if instances is None:
        return list(range(n_inst))
    out = [instances] if isinstance(instances, int) else list(instances)
    if not out:
        raise ValueError("instances is empty: pass None (all), an int or a non-empty list")
    for i in out:
        if not isinstance(i, int) or not (0 <= i < n_inst):
            raise ValueError(f"instance index {i!r} out of range for n_inst={n_inst}")
    return out


def _check_finite(name: str, t: Tensor) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf values")


def _unit(rows: Tensor) -> Tensor:
    """Rows scaled to unit norm; all-zero rows stay zero."""
    norms = rows.norm(dim=-1, keepdim=True)
    return rows / torch.where(norms > 0, norms, torch.ones_like(norms))


# ---------------------------------------------------------------------------- absorption (SAEBench)
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
    full_absorption_cos_threshold: float = SAEBENCH_FULL_COS,
    absorption_fraction_cos_threshold: float = SAEBENCH_FRACTION_COS,
    projection_proportion_threshold: float = SAEBENCH_PROJ_PROPORTION,
    max_absorbing_latents: int = SAEBENCH_MAX_ABSORBERS,
) -> AbsorptionScores:
    """SAEBench's full-absorption rate and absorption fraction on toy ground truth.

    For every scored parent ``p`` (unit direction ``u = f_p / ||f_p||``) and every sample in which
    the parent's true coefficient is ``> 0``, with latent activations ``a`` (``sae.encode(x)``, in
    eval mode) and latent projections ``proj_j = a_j (W_dec[j] · u)`` (units of ``x``):

    * full absorption: every main latent has ``|a_j| < 1e-8``, the latent with the largest
      ``proj_j`` has ``cos(W_dec[j], u) >= full_absorption_cos_threshold``, ``x · u > 0`` and that
      largest ``proj_j >= projection_proportion_threshold * (x · u)``;
    * absorption fraction: with ``M`` the summed ``proj`` of the main latents and ``T`` the summed
      ``proj`` of the (at most ``max_absorbing_latents``) largest non-main latents with
      ``cos >= absorption_fraction_cos_threshold`` and ``proj > 0``: 0 if ``x · u <= 0``,
      ``M >= x · u`` or ``T < projection_proportion_threshold * (x · u)``; else 1 if ``M <= 0``;
      else ``A / (A + M)`` with ``A = min(T, x · u - M)``, clipped to ``[0, 1]``.

    Each is averaged over the parent's positive samples, then over parents. The main latents are
    the latent Hungarian-matched to the parent on decoder cosines unless ``main_latents`` says
    otherwise. Every adaptation from SAEBench is listed in the module docstring.

    Args:
        sae: the SAEs; ``W_enc`` ``[inst, d_in, d_sae]``, ``W_dec`` ``[inst, d_sae, d_in]``.
        hierarchy: the toy hierarchy (true directions ``features`` ``[n_feat, d_in]``).
        x: ``[batch, d_in]`` inputs, shared by every instance (e.g. ``hierarchy.sample(...)[0]``).
        coeffs: ``[batch, n_feat]`` the true feature coefficients of ``x`` (``> 0``: firing).
        instances: ``None`` (all), one index, or a list of indices to score.
        parents: the features to score (default: every feature with at least one child).
        main_latents: ``{parent: [latent, ...]}`` used for every scored instance, or one such
            mapping per scored instance; ``None`` for the Hungarian match.
        full_absorption_cos_threshold, absorption_fraction_cos_threshold,
        projection_proportion_threshold, max_absorbing_latents: SAEBench's thresholds
            (defaults 0.025, 0.1, 0.4, 3 from ``FeatureAbsorptionCalculator``).

    Returns an :class:`AbsorptionScores` whose tensors have one row per scored instance.

    Raises:
        ValueError: ``sae.d_in != hierarchy.d``; ``x`` not ``[batch, d_in]`` or ``coeffs`` not
            ``[batch, n_feat]`` (shapes named); an empty batch; NaN/inf in ``x``, ``coeffs`` or
            the SAE weights; a bad instance or parent index; a parent that never fires in
            ``coeffs`` (its rate is undefined); no parents to score; bad ``main_latents``;
            thresholds that are not finite or ``max_absorbing_latents < 1``.
    Source: Chanin et al. 2024 (arXiv 2409.14507); SAEBench
    ``sae_bench/evals/absorption/feature_absorption_calculator.py``.
    """
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
    _check_finite("x", x)
    _check_finite("coeffs", coeffs)
    _check_finite("sae.W_dec", sae.W_dec)
    _check_finite("sae.W_enc", sae.W_enc)
    for name, v in (
        ("full_absorption_cos_threshold", full_absorption_cos_threshold),
        ("absorption_fraction_cos_threshold", absorption_fraction_cos_threshold),
        ("projection_proportion_threshold", projection_proportion_threshold),
    ):
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v!r}")
    if not isinstance(max_absorbing_latents, int) or max_absorbing_latents < 1:
        raise ValueError(f"max_absorbing_latents must be an int >= 1, got {max_absorbing_latents!r}")
    scored = _instance_list(sae.n_inst, instances)
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
    positive = coeffs.detach().cpu() > 0  # [batch, n_feat]
    n_pos = positive[:, parents].sum(0)  # [n_parents]
    for p, n in zip(parents, n_pos.tolist()):
        if n == 0:
            raise ValueError(f"parent feature {p} never fires in coeffs: its absorption rate is undefined")

    was_training = sae.training
    sae.eval()  # BatchTopK: the inference threshold, and no update of it
    try:
        acts_all = sae.encode(x.to(sae.W_enc.device, sae.W_enc.dtype)).detach().cpu().double()
    finally:
        sae.train(was_training)
    xd = x.detach().cpu().double()  # [batch, d_in]
    U = _unit(hierarchy.features.double())  # [n_feat, d_in]

    full = torch.zeros(len(scored), len(parents), dtype=torch.float64)
    frac = torch.zeros(len(scored), len(parents), dtype=torch.float64)
    mains_out: list[list[list[int]]] = []
    for k, i in enumerate(scored):
        W_dec = sae.W_dec[i].detach().cpu().double()  # [d_sae, d_in]
        d_sae = W_dec.shape[0]
        cos_dec = decoder_cosines(W_dec, hierarchy.features.double())  # [d_sae, n_feat]
        mains = _main_latent_sets(main_latents, cos_dec, parents, k, len(scored))
        mains_out.append(mains)
        for j, (p, main) in enumerate(zip(parents, mains)):
            pos = positive[:, p]
            u = U[p]  # [d_in]
            acts = acts_all[pos, i]  # [n_pos, d_sae]
            x_proj = xd[pos] @ u  # [n_pos]
            lat_cos = cos_dec[:, p]  # [d_sae]
            lat_proj = acts * (W_dec @ u)  # [n_pos, d_sae]
            is_main = torch.zeros(d_sae, dtype=torch.bool)
            is_main[main] = True

            # full absorption: main latents silent, one other latent carries the projection
            main_off = (acts[:, is_main].abs() < SAEBENCH_ACTIVE_EPS).all(-1)  # True if no main
            top_proj, top = lat_proj.max(-1)  # [n_pos]
            is_full = (
                main_off
                & (lat_cos[top] >= full_absorption_cos_threshold)
                & (x_proj > 0)
                & (top_proj >= projection_proportion_threshold * x_proj)
            )
            full[k, j] = is_full.double().mean()

            # absorption fraction: share of the projection carried by up to n non-main latents
            main_proj = lat_proj[:, is_main].sum(-1)  # [n_pos]
            absorber = ~is_main & (lat_cos >= absorption_fraction_cos_threshold)  # [d_sae]
            absorber = absorber[None, :] & (lat_proj > 0)  # [n_pos, d_sae]
            cand = torch.where(absorber, lat_proj, torch.zeros_like(lat_proj))
            n_top = min(max_absorbing_latents, d_sae)
            absorbed = cand.topk(n_top, dim=-1).values.sum(-1)  # [n_pos] (zeros add nothing)
            share = torch.minimum(absorbed, x_proj - main_proj)
            partial = (share / (share + main_proj)).clamp(0.0, 1.0)
            too_small = absorbed < projection_proportion_threshold * x_proj
            none = (x_proj <= 0) | (main_proj >= x_proj) | too_small
            value = torch.where(main_proj <= 0, torch.ones_like(partial), partial)
            value = torch.where(none, torch.zeros_like(value), value)
            frac[k, j] = value.mean()

    return AbsorptionScores(
        instances=scored,
        parents=parents,
        main_latents=mains_out,
        n_positive=n_pos,
        full_absorption=full.mean(1),
        absorption_fraction=frac.mean(1),
        full_absorption_by_parent=full,
        absorption_fraction_by_parent=frac,
    )


# ---------------------------------------------------------------------------- hedging (Chanin 2025)
@dataclass
class HedgingScores:
    """Hedging scores of some instances (see :func:`hedging_scores`); every tensor is ``[inst]``
    with ``inst = len(instances)``, lengths in units of the (unit-normalised) decoder rows.

    Attributes:
        instances: the scored instance indices.
        width: ``w``, the control SAE's ``d_sae`` (the extended SAE's first ``w`` latents are old).
        n_new: number of latents added.
        rank: dimension of the span of the new decoder rows (= ``n_new`` unless they are
            linearly dependent).
        hedging_rate: ``max(0, (delta_proj - baseline_proj) / (1 - baseline_proj))``; NaN if
            ``baseline_proj >= 1``.
        delta_norm: mean ``||delta_i||`` over the old rows.
        delta_proj: mean ``||P_new delta_i||`` (the reference's ``delta_proj_portion``, since the
            control rows have unit norm; dead rows count as zero).
        baseline_proj: the same for random subspaces of dimension ``rank``, mean over draws.
        baseline_proj_std: standard deviation of that over the draws.
        mean_dec_cos: mean cosine of each old row of the extended SAE with the control's.
        extended_drift, control_drift: mean ``||unit(after_i) - unit(before_i)||`` of the old
            rows since ``before`` (None when ``before`` was not given).
    """

    instances: list[int]
    width: int
    n_new: int
    rank: Tensor
    hedging_rate: Tensor
    delta_norm: Tensor
    delta_proj: Tensor
    baseline_proj: Tensor
    baseline_proj_std: Tensor
    mean_dec_cos: Tensor
    extended_drift: Tensor | None = None
    control_drift: Tensor | None = None


def _span_basis(rows: Tensor) -> Tensor:
    """``[d, r]`` orthonormal basis of the span of ``rows`` ``[n, d]`` (rank ``r`` by SVD, with
    numpy's ``matrix_rank`` tolerance)."""
    _, s, Vh = torch.linalg.svd(rows, full_matrices=False)  # Vh [min(n, d), d]
    if s.numel() == 0 or s[0] == 0:
        return rows.new_zeros(rows.shape[1], 0)
    tol = s[0] * max(rows.shape) * torch.finfo(rows.dtype).eps
    return Vh[s > tol].T


@torch.no_grad()
def hedging_scores(
    extended: SAE,
    control: SAE,
    *,
    before: SAE | None = None,
    instances: int | Sequence[int] | None = None,
    n_baselines: int = 50,
    seed: int = 0,
) -> HedgingScores:
    """Hedging rate of Chanin et al. 2025: how far the old decoder rows move into the span of
    newly added latents, beyond what a random subspace of the same dimension would catch.

    ``extended`` and ``control`` were both trained further from the same SAE (``before``);
    ``extended`` got ``n_new`` extra latents appended after the ``w`` old ones (see
    :func:`extend_sae`, :func:`train_hedging_pair`). Per instance, with decoder rows
    unit-normalised: ``delta_i = W_ext[i] - W_ctrl[i]`` for old rows ``i < w``; ``delta_proj`` =
    mean ``||P delta_i||`` with ``P`` the projection onto ``span(W_ext[w:])``; ``baseline_proj`` =
    the same averaged over ``n_baselines`` random Gaussian subspaces of that span's dimension;
    ``hedging_rate = max(0, (delta_proj - baseline_proj) / (1 - baseline_proj))``. 0 means the old
    rows did not move toward the new latents more than toward random directions; values near 1
    mean the old rows moved by about their own length into the new span. See the module docstring
    for the adaptations from the reference.

    Args:
        extended: ``W_dec`` ``[inst, w + n_new, d_in]``.
        control: ``W_dec`` ``[inst, w, d_in]``, same ``n_inst`` and ``d_in``.
        before: optional, ``W_dec`` ``[inst, w, d_in]``: only for the drift diagnostics.
        instances: ``None`` (all), one index, or a list of indices.
        n_baselines: random subspaces per instance (reference: 50); at least 2.
        seed: the random subspaces of instance ``i`` come from ``torch.Generator`` seeded
            ``seed + i`` (the same whichever other instances are scored).

    Returns a :class:`HedgingScores`, one value per scored instance.

    Raises:
        ValueError: ``d_in`` or ``n_inst`` differ; ``extended.d_sae <= control.d_sae``;
            ``before`` shaped unlike ``control``; NaN/inf in a decoder; new decoder rows that
            are all zero, or span ``d_in`` dimensions (no random baseline possible);
            ``n_baselines < 2``; a bad instance index.
    Source: Chanin et al. 2025 (arXiv 2505.11756); ``chanind/feature-hedging-paper``
    ``hedging_paper/evals/hedging_eval.py`` (``calculate_hedging_stats``).
    """
    if extended.d_in != control.d_in:
        raise ValueError(f"extended.d_in={extended.d_in} but control.d_in={control.d_in}")
    if extended.n_inst != control.n_inst:
        raise ValueError(f"extended.n_inst={extended.n_inst} but control.n_inst={control.n_inst}")
    w, n_new = control.d_sae, extended.d_sae - control.d_sae
    if n_new < 1:
        raise ValueError(
            f"extended.d_sae={extended.d_sae} must exceed control.d_sae={control.d_sae} "
            f"(the extended SAE has the new latents)"
        )
    if before is not None and tuple(before.W_dec.shape) != tuple(control.W_dec.shape):
        raise ValueError(
            f"before.W_dec has shape {tuple(before.W_dec.shape)} but control.W_dec has shape "
            f"{tuple(control.W_dec.shape)}"
        )
    if not isinstance(n_baselines, int) or n_baselines < 2:
        raise ValueError(f"n_baselines must be an int >= 2, got {n_baselines!r}")
    _check_finite("extended.W_dec", extended.W_dec)
    _check_finite("control.W_dec", control.W_dec)
    if before is not None:
        _check_finite("before.W_dec", before.W_dec)
    scored = _instance_list(extended.n_inst, instances)
    d_in = extended.d_in

    keys = ("rank", "rate", "dn", "dp", "bp", "bs", "cos", "ed", "cd")
    rows: dict[str, list[float]] = {k: [] for k in keys}
    for i in scored:
        W_ext = extended.W_dec[i].detach().cpu().double()  # [w + n_new, d_in]
        old_ext = _unit(W_ext[:w])  # [w, d_in]
        old_ctrl = _unit(control.W_dec[i].detach().cpu().double())  # [w, d_in]
        delta = old_ext - old_ctrl  # [w, d_in]
        basis = _span_basis(W_ext[w:])  # [d_in, r]
        r = basis.shape[1]
        if r == 0:
            raise ValueError(f"instance {i}: the {n_new} new decoder rows are all zero")
        if r >= d_in:
            raise ValueError(
                f"instance {i}: the new decoder rows span all d_in={d_in} dimensions; a random "
                f"subspace of that dimension contains every delta (use fewer new latents)"
            )
        delta_proj = (delta @ basis).norm(dim=-1).mean()  # basis orthonormal: ||B Bᵀ δ|| = ||Bᵀ δ||
        g = torch.Generator().manual_seed(seed + i)
        base = torch.empty(n_baselines, dtype=torch.float64)
        for b in range(n_baselines):
            rand = torch.randn(r, d_in, generator=g, dtype=torch.float64)
            q, _ = torch.linalg.qr(rand.T)  # [d_in, r], full rank with probability 1
            base[b] = (delta @ q).norm(dim=-1).mean()
        ctrl_norm = old_ctrl.norm(dim=-1).mean()  # 1 unless the control has dead rows
        portion, base_portion = delta_proj / ctrl_norm, base.mean() / ctrl_norm
        if base_portion >= 1:
            rate = float("nan")
        else:
            rate = max(0.0, float((portion - base_portion) / (1 - base_portion)))
        rows["rank"].append(r)
        rows["rate"].append(rate)
        rows["dn"].append(float(delta.norm(dim=-1).mean()))
        rows["dp"].append(float(portion))
        rows["bp"].append(float(base_portion))
        rows["bs"].append(float(base.std() / ctrl_norm))
        rows["cos"].append(float((old_ext * old_ctrl).sum(-1).mean()))
        if before is not None:
            old_before = _unit(before.W_dec[i].detach().cpu().double())
            rows["ed"].append(float((old_ext - old_before).norm(dim=-1).mean()))
            rows["cd"].append(float((old_ctrl - old_before).norm(dim=-1).mean()))

    def t(key: str) -> Tensor:
        return torch.tensor(rows[key], dtype=torch.float64)

    return HedgingScores(
        instances=scored,
        width=w,
        n_new=n_new,
        rank=torch.tensor(rows["rank"], dtype=torch.long),
        hedging_rate=t("rate"),
        delta_norm=t("dn"),
        delta_proj=t("dp"),
        baseline_proj=t("bp"),
        baseline_proj_std=t("bs"),
        mean_dec_cos=t("cos"),
        extended_drift=t("ed") if before is not None else None,
        control_drift=t("cd") if before is not None else None,
    )


@torch.no_grad()
def extend_sae(sae: SAE, n_new: int, init_norm: float = 0.1, seed: int = 0) -> SAE:
    """A copy of ``sae`` with ``n_new`` latents appended (``d_sae`` → ``d_sae + n_new``).

    The old latents keep their weights (latent ``j < d_sae`` is the same latent); each new latent
    gets a random direction ``v`` (Gaussian, unit norm, times ``init_norm``) as both its decoder
    row and its encoder column, and ``b_enc = 0``, as the reference's ``extend_sae`` does
    (``chanind/feature-hedging-paper``, ``hedging_paper/saes/base_sae.py``). ``b_dec`` and the
    BatchTopK threshold are copied. Instance ``i`` draws from ``torch.Generator`` seeded
    ``seed + i``. ``sae`` itself is not modified.

    Shapes: ``W_enc`` ``[inst, d_in, d_sae]`` → ``[inst, d_in, d_sae + n_new]``, ``W_dec``
    ``[inst, d_sae, d_out]`` → ``[inst, d_sae + n_new, d_out]``.

    Raises ValueError if ``n_new < 1`` or ``init_norm`` is not a positive finite number.
    """
    if not isinstance(n_new, int) or n_new < 1:
        raise ValueError(f"n_new must be an int >= 1, got {n_new!r}")
    if not (math.isfinite(init_norm) and init_norm > 0):
        raise ValueError(f"init_norm must be a positive finite number, got {init_norm!r}")
    w, d_in, d_out = sae.d_sae, sae.d_in, sae.d_out
    cfg = SAEConfig.from_dict({**sae.cfg.to_dict(), "d_sae": w + n_new})
    out = SAE(cfg).to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)
    out.W_enc[:, :, :w] = sae.W_enc
    out.W_dec[:, :w] = sae.W_dec
    out.b_enc[:, :w] = sae.b_enc
    out.b_enc[:, w:] = 0
    out.b_dec.copy_(sae.b_dec)
    out.threshold.copy_(sae.threshold)
    for i in range(sae.n_inst):
        g = torch.Generator().manual_seed(seed + i)
        v = torch.randn(n_new, max(d_in, d_out), generator=g, dtype=torch.float64)
        dec = v[:, :d_out]
        dec = (dec / dec.norm(dim=-1, keepdim=True) * init_norm).to(out.W_dec)  # [n_new, d_out]
        out.W_dec[i, w:] = dec
        if d_out == d_in:  # tied initialisation, as in the reference
            out.W_enc[i, :, w:] = dec.T
        else:  # a transcoder reads another space: same recipe, its own direction
            enc = v[:, :d_in]
            out.W_enc[i, :, w:] = (enc / enc.norm(dim=-1, keepdim=True) * init_norm).T.to(out.W_enc)
    out.train(sae.training)
    return out


def train_hedging_pair(
    before: SAE,
    n_new: int,
    data: DataSource,
    cfg: TrainConfig,
    *,
    init_norm: float = 0.1,
    seed: int = 0,
) -> tuple[SAE, SAE]:
    """Train the two SAEs the hedging eval compares: ``(extended, control)``.

    ``extended`` = :func:`extend_sae` of ``before`` (``n_new`` latents, ``init_norm``, ``seed``),
    ``control`` = a copy of ``before``; both are trained with :func:`saelib.core.train.train_sae` on
    ``data`` with the same ``cfg`` (so the same data stream, ``cfg.seed``). ``before`` is not
    modified. Pass the result to :func:`hedging_scores`. The reference
    (``hedging_paper/scripts/train_hedging_eval_batch_topk_sae.py``) trains both with the
    initial SAE's training configuration. A Matryoshka ``cfg.matryoshka`` must fit both widths.

    Raises what :func:`extend_sae` and :func:`saelib.core.train.train_sae` raise.
    """
    extended = extend_sae(before, n_new, init_norm=init_norm, seed=seed)
    control = copy.deepcopy(before)
    train_sae(control, data, cfg)
    train_sae(extended, data, cfg)
    return extended, control
