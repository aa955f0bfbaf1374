"""Measuring many SAE instances trained on a toy hierarchy: per-instance metrics, per-variant
tables, cosines over training, truth initialisation, absorption rates and Pareto fronts.

Used by notebooks 03 (Matryoshka variants) and 04 (sparsity penalties), where many variants,
seeds or coefficients share one batched :class:`saelib.core.sae.SAE` and a ``groups`` mapping
``{variant name: instance indices}`` says which instance is which.

Metric conventions: MCC and recovery from decoder cosines with the
true features under the Hungarian matching (:mod:`saelib.core.metrics`); FVU and L0 on a fresh,
seeded evaluation batch; parent/child cosine patterns from
:func:`saelib.experiments.absorption.parent_child_pattern`.
"""

from __future__ import annotations

import math

from typing import Mapping, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .absorption import absorption_scores, matched_latents, weight_metrics_from_cosines
from .matryoshka_probes import parent_child_split_terms, prefix_term_gradient
from ..core.metrics import active, dead_latents, decoder_cosines, fvu, l0
from ..core.sae import SAE
from ..data.toy_data import ToyHierarchy

__all__ = [
    "evaluate_instances",
    "group_table",
    "CosineRecorder",
    "init_at_features",
    "latent_assignment",
    "first_step_above",
    "parent_cofiring",
    "split_term_push",
    "pareto_front",
]

_PATTERN_KEYS = ("parent_on_children", "child_on_parent", "child_on_siblings", "child_on_own")


@torch.no_grad()
def evaluate_instances(
    sae: SAE,
    hierarchy: ToyHierarchy,
    n_samples: int = 20_000,
    seed: int = 1234,
    threshold: float = 0.9,
    input_scale: float = 1.0,
) -> dict[str, Tensor]:
    """Per-instance metrics, each a ``[inst]`` tensor.

    Keys: ``mcc`` (decoder, Hungarian), ``recovered`` (features whose matched decoder cosine
    > ``threshold``), ``all_recovered`` (1.0 if every feature is recovered), ``fvu`` and ``l0``
    on ``n_samples`` fresh samples drawn with ``seed``, ``dead_frac`` (fraction of latents that
    never fire on them), ``early_cos`` / ``late_cos`` (mean over the first / second half of the
    latents, by index, of each latent's best decoder cosine with any feature: in a Matryoshka
    SAE the late latents are the specific ones), the decoder parent/child pattern
    (``parent_on_children``, ``child_on_parent``, ``child_on_siblings``, ``child_on_own``) and
    the encoder's (``enc_parent_on_children``, ...) under the decoder's matching, and SAEBench's
    ``full_absorption`` rate and ``absorption_fraction`` on the same samples
    (:func:`saelib.experiments.absorption.absorption_scores`; NaN for a hierarchy without parents).
    ``input_scale`` multiplies the samples before they reach the SAE (the constant the SAE's
    training inputs were multiplied by; FVU is then in those units, which does not change it).

    Raises ValueError if the SAE's ``d_in`` is not the hierarchy's ``d``, or ``input_scale`` is
    not a finite number > 0.
    """
    if sae.d_in != hierarchy.d:
        raise ValueError(f"SAE d_in={sae.d_in} but hierarchy d={hierarchy.d}")
    if not (math.isfinite(input_scale) and input_scale > 0):
        raise ValueError(f"input_scale must be a finite number > 0, got {input_scale!r}")
    x, coeffs = hierarchy.sample(n_samples, torch.Generator().manual_seed(seed))
    if input_scale != 1.0:
        x = x * input_scale
    x_hat, acts = sae(x)
    rows: dict[str, list[float]] = {}
    half = (sae.d_sae + 1) // 2
    for i in range(sae.n_inst):
        dec = decoder_cosines(sae.W_dec[i], hierarchy.features)  # [d_sae, n_feat]
        w = weight_metrics_from_cosines(dec, sae.W_enc[i], hierarchy, threshold)
        row = {"mcc": w["mcc"], "recovered": float(w["recovered"]), "all_recovered": float(w["stuck"] == 0)}
        best = dec.max(dim=1).values  # [d_sae]
        row.update({"early_cos": float(best[:half].mean()), "late_cos": float(best[half:].mean())})
        row.update({k: v for k, v in w.items() if k in _PATTERN_KEYS})  # the pattern's own order
        row.update({f"enc_{k}": w[f"enc_{k}"] for k in _PATTERN_KEYS})
        for k, v in row.items():
            rows.setdefault(k, []).append(v)
    out = {k: torch.tensor(v) for k, v in rows.items()}
    out["fvu"] = fvu(x, x_hat)
    out["l0"] = l0(acts)
    out["dead_frac"] = dead_latents(acts).float().mean(-1)
    if any(hierarchy.children_of(f) for f in range(hierarchy.n_features)):
        scores = absorption_scores(sae, hierarchy, x, coeffs)
        out["full_absorption"], out["absorption_fraction"] = scores.full_absorption, scores.absorption_fraction
    else:
        out["full_absorption"] = out["absorption_fraction"] = torch.full((sae.n_inst,), float("nan"))
    return out


def group_table(
    metrics: Mapping[str, Tensor], groups: Mapping[str, Sequence[int]]
) -> dict[str, dict[str, Tensor]]:
    """Split per-instance metrics by variant: ``{variant: {metric: [n_in_group]}}``.

    Raises ValueError if a group holds an index outside the instances.
    """
    n = len(next(iter(metrics.values())))
    out = {}
    for name, idx in groups.items():
        idx_t = torch.as_tensor(list(idx), dtype=torch.long)
        if len(idx_t) and (idx_t.min() < 0 or idx_t.max() >= n):
            raise ValueError(f"group {name!r} has indices outside [0, {n})")
        out[name] = {k: v[idx_t] for k, v in metrics.items()}
    return out


class CosineRecorder:
    """A ``train_sae`` callback that records decoder cosines with the true features.

    Every ``every`` steps (and at step 0) stores ``cos[inst, d_sae, n_feat]``; afterwards
    ``steps`` is ``[n_snap]`` and ``cos`` is ``[n_snap, inst, d_sae, n_feat]``.
    Raises ValueError if ``every < 1``.
    """

    def __init__(self, features: Float[Tensor, "n_feat d"], every: int = 50):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every!r}")
        self.features = features
        self.every = every
        self._steps: list[int] = []
        self._cos: list[Tensor] = []

    @torch.no_grad()
    def __call__(self, step: int, sae: SAE) -> None:
        if step % self.every:
            return
        self._steps.append(step)
        self._cos.append(torch.stack([decoder_cosines(w, self.features) for w in sae.W_dec]))

    @property
    def steps(self) -> Int[Tensor, " n_snap"]:
        return torch.tensor(self._steps)

    @property
    def cos(self) -> Float[Tensor, "n_snap inst d_sae n_feat"]:
        return torch.stack(self._cos)


@torch.no_grad()
def init_at_features(
    sae: SAE,
    features: Float[Tensor, "n_feat d"],
    latent_order: Sequence[int],
    instances: Sequence[int] | None = None,
) -> None:
    """Set chosen instances to the ideal dictionary: latent ``j`` reads and writes feature
    ``latent_order[j]``.

    Decoder row ``j`` = encoder column ``j`` = the unit feature direction, ``b_enc = b_dec = 0``,
    so for orthogonal features the SAE reconstructs perfectly with activation ``c_j · ||f_j||``.
    Latents beyond ``len(latent_order)`` keep their initialisation.

    Raises ValueError if ``latent_order`` is longer than ``d_sae`` or names a missing feature.
    """
    order = list(latent_order)
    if len(order) > sae.d_sae or any(not (0 <= f < len(features)) for f in order):
        raise ValueError(f"latent_order must list at most d_sae={sae.d_sae} features in [0, {len(features)}), got {order}")
    idx = list(range(sae.n_inst)) if instances is None else list(instances)
    unit = features / features.norm(dim=-1, keepdim=True)  # [n_feat, d]
    rows = unit[order]  # [n_lat, d]
    k = len(order)
    for i in idx:
        sae.W_dec[i, :k] = rows
        sae.W_enc[i, :, :k] = rows.T
        sae.b_enc[i, :k] = 0.0
        sae.b_dec[i] = 0.0


@torch.no_grad()
def latent_assignment(sae: SAE, hierarchy: ToyHierarchy) -> Int[Tensor, "inst n_feat"]:
    """The latent Hungarian-matched to each feature, per instance (decoder cosines)."""
    return torch.stack([matched_latents(decoder_cosines(w, hierarchy.features)) for w in sae.W_dec])


def first_step_above(
    steps: Int[Tensor, " n_snap"], values: Float[Tensor, "n_snap *rest"], threshold: float
) -> Float[Tensor, "*rest"]:
    """The first recorded step at which ``values`` exceeds ``threshold`` (``inf`` if never, so
    that "learned earlier" is a plain ``<``)."""
    above = values > threshold  # [n_snap, *rest]
    first = above.float().argmax(dim=0)  # index of first True (0 if none)
    out = steps[first].double()
    return torch.where(above.any(dim=0), out, torch.full_like(out, float("inf")))


@torch.no_grad()
def parent_cofiring(
    sae: SAE,
    hierarchy: ToyHierarchy,
    parent: int,
    child: int,
    n_samples: int = 20_000,
    seed: int = 1234,
) -> dict[str, Tensor]:
    """How the parent's latent behaves when its child fires (absorption test), per instance.

    The parent latent is the one Hungarian-matched to the parent feature (decoder cosines).
    Returns ``[inst]`` tensors: ``fires_with_child`` (fraction of samples with parent and child
    active in which the parent latent is active), ``fires_alone`` (same, parent active and child
    not), and ``act_ratio`` (its mean activation with the child over its mean without). An
    absorbed parent has ``fires_with_child`` ≈ 0 while ``fires_alone`` ≈ 1.

    Raises ValueError if ``child`` is not a child of ``parent``.
    """
    if int(hierarchy.parent_index[child]) != parent:
        raise ValueError(f"feature {child} is not a child of feature {parent}")
    x, coeffs = hierarchy.sample(n_samples, torch.Generator().manual_seed(seed))
    _, acts = sae(x)  # [b, i, s]
    lat = latent_assignment(sae, hierarchy)[:, parent]  # [inst]
    a = acts[:, torch.arange(sae.n_inst), lat]  # [b, inst]
    both = (coeffs[:, parent] > 0) & (coeffs[:, child] > 0)
    alone = (coeffs[:, parent] > 0) & (coeffs[:, child] == 0)
    return {
        "fires_with_child": active(a[both]).float().mean(0),
        "fires_alone": active(a[alone]).float().mean(0),
        "act_ratio": a[both].mean(0) / a[alone].mean(0).clamp_min(1e-12),
    }


def split_term_push(
    sae: SAE,
    hierarchy: ToyHierarchy,
    latent_of_feature: Int[Tensor, "inst n_feat"],
    weights: Float[Tensor, " d_sae"],
    n_samples: int = 20_000,
    seed: int = 0,
    input_scale: float = 1.0,
) -> dict[str, Float[Tensor, "inst n_parents"]]:
    """Nabeshima's hypothesis probe (Nabeshima 2024): how the parent-in / child-out loss terms move each
    parent's decoder row along its children, against all other terms.

    For every feature with children (in index order), the descent step that the selected terms
    give the parent's decoder row (:func:`saelib.experiments.matryoshka_probes.prefix_term_gradient`), projected on
    each child's direction and averaged over the children. ``"split"``: the terms of
    :func:`saelib.experiments.matryoshka_probes.parent_child_split_terms`; ``"rest"``: every other term. Terms are
    weighted by ``weights`` (e.g. :func:`saelib.core.matryoshka.expected_prefix_weights`) over
    ``n_samples`` fresh samples, multiplied by ``input_scale`` (the constant the SAE's training
    inputs were multiplied by). Positive: pulled toward the children.

    Raises ValueError if ``latent_of_feature`` is not ``[inst, n_feat]`` or ``input_scale`` is not
    a finite number > 0.
    """
    if not (math.isfinite(input_scale) and input_scale > 0):
        raise ValueError(f"input_scale must be a finite number > 0, got {input_scale!r}")
    n_inst, n_feat = sae.n_inst, hierarchy.n_features
    if latent_of_feature.shape != (n_inst, n_feat):
        raise ValueError(f"latent_of_feature must be [{n_inst}, {n_feat}], got {tuple(latent_of_feature.shape)}")
    x, coeffs = hierarchy.sample(n_samples, torch.Generator().manual_seed(seed))
    x = x * input_scale if input_scale != 1.0 else x
    split = parent_child_split_terms(coeffs, hierarchy.parent_index, latent_of_feature, sae.d_sae).float()
    w = weights.expand(n_inst, -1)
    parents = [f for f in range(n_feat) if hierarchy.children_of(f)]
    out = {}
    for name, terms in (("split", split), ("rest", 1 - split)):
        out[name] = torch.stack([
            prefix_term_gradient(sae, x, w, terms, latent_of_feature[:, p],
                                 hierarchy.features[hierarchy.children_of(p)]).mean(-1)
            for p in parents
        ], dim=-1)
    return out


def pareto_front(l0: Float[Tensor, " n"], fvu: Float[Tensor, " n"]) -> Bool[Tensor, " n"]:
    """Points not dominated in (L0, FVU): no other point has both lower-or-equal L0 and FVU with
    one strictly lower. Raises ValueError if the shapes differ."""
    if l0.shape != fvu.shape or l0.ndim != 1:
        raise ValueError(f"l0 and fvu must be 1-D of equal length, got {tuple(l0.shape)} and {tuple(fvu.shape)}")
    le = (l0[None, :] <= l0[:, None]) & (fvu[None, :] <= fvu[:, None])  # j weakly better than i
    lt = (l0[None, :] < l0[:, None]) | (fvu[None, :] < fvu[:, None])
    return ~(le & lt).any(dim=1)
