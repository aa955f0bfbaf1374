"""Ready-made toy experiments: a vanilla and a Matryoshka SAE trained side by side on a hierarchy.

Used by notebook 01 (and its retraining widget) so that the notebook only configures and plots.
Source of the setup: Nabeshima 2024, "Matryoshka Sparse Autoencoders" (LessWrong) and its repo
noanabeshima/matryoshka-saes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from matplotlib.figure import Figure

from .absorption import AbsorptionScores, absorption_scores, instance_summary
from .hedging import HedgingScores, hedging_scores, train_hedging_pair
from ..core.matryoshka import MatryoshkaConfig
from ..figures.plotting import sae_feature_heatmaps
from ..core.sae import SAE, SAEConfig
from ..data.toy_data import ToyHierarchy, instance_samplers, nabeshima_tree, stacked_sampler
from ..core.train import DataSource, History, TrainConfig, train_sae

__all__ = [
    "ToyComparison",
    "instance_summary",
    "compare_vanilla_matryoshka",
    "retrained_tree_figure",
    "NarrowSweep",
    "narrow_sae_sweep",
    "NarrowSweepHedging",
    "narrow_sweep_hedging",
]


@dataclass
class ToyComparison:
    """SAEs of several methods (``n_inst`` seeds each) trained on the same hierarchy.

    ``input_scale`` is the constant the inputs were multiplied by before training (1 for raw
    inputs); every evaluation that feeds inputs to the SAEs applies it too.
    """

    hierarchy: ToyHierarchy
    saes: dict[str, SAE]
    histories: dict[str, History]
    input_scale: float = 1.0

    def summary(self, method: str) -> list[dict[str, float]]:
        """Per seed: MCC, recovered / stuck features and the parent/child cosine pattern
        (:func:`saelib.experiments.absorption.instance_summary`)."""
        return instance_summary(self.saes[method], self.hierarchy)

    def absorption(self, method: str, n: int = 20_000, seed: int = 1) -> AbsorptionScores:
        """SAEBench's full-absorption rate and absorption fraction of every seed of ``method`` on
        ``n`` fresh samples drawn with ``seed`` (:func:`saelib.experiments.absorption.absorption_scores`;
        ``full_absorption`` / ``absorption_fraction`` are ``[n_inst]``). Raises KeyError for an
        unknown method."""
        x, coeffs = self.hierarchy.sample(n, torch.Generator().manual_seed(seed))
        return absorption_scores(self.saes[method], self.hierarchy, x * self.input_scale, coeffs)

    def figure(self, method: str, instance: int = 0) -> Figure:
        """Encoder / decoder / b_dec heatmaps of one trained SAE against the true features."""
        sae, h = self.saes[method], self.hierarchy
        return sae_feature_heatmaps(
            sae.W_enc[instance].detach(), sae.W_dec[instance].detach(), sae.b_dec[instance].detach(),
            h.features, feature_names=h.names, blocks=h.blocks(), title=f"{method} SAE, seed {instance}",
        )


def compare_vanilla_matryoshka(
    hierarchy: ToyHierarchy,
    train_cfg: TrainConfig,
    matryoshka_cfg: MatryoshkaConfig,
    n_inst: int = 8,
    d_sae: int | None = None,
    seed: int = 0,
    input_scale: float = 1.0,
    methods: Sequence[str] = ("vanilla", "matryoshka"),
) -> ToyComparison:
    """Train ``n_inst`` vanilla and ``n_inst`` Matryoshka ReLU SAEs (same initialisations; the
    same data stream, or each instance its own with ``train_cfg.independent_instances``) with
    ``d_sae`` latents (default: one per true feature).

    ``input_scale`` multiplies every input (Nabeshima normalises inputs to a mean norm of
    ``sqrt(d)``, :meth:`saelib.data.toy_data.ToyHierarchy.input_scale`, so his sparsity coefficients
    are in those units). ``methods`` picks which of ``"vanilla"`` and ``"matryoshka"`` to train.

    Raises ValueError for an ``input_scale`` that is not a finite positive number, or for empty
    or unknown ``methods``.
    """
    if not (isinstance(input_scale, (int, float)) and math.isfinite(input_scale) and input_scale > 0):
        raise ValueError(f"input_scale must be a finite number > 0, got {input_scale!r}")
    methods = list(methods)
    unknown = [m for m in methods if m not in ("vanilla", "matryoshka")]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be distinct names among 'vanilla', 'matryoshka', got {methods!r}")
    cfg = SAEConfig(d_in=hierarchy.d, d_sae=d_sae or hierarchy.n_features, n_inst=n_inst, seed=seed)

    def data(batch: int, g: torch.Generator) -> torch.Tensor:
        x = hierarchy.sample(batch, g)[0]
        return x if input_scale == 1.0 else x * input_scale

    saes, hists = {}, {}
    for method in methods:
        saes[method] = SAE(cfg)
        mcfg = matryoshka_cfg if method == "matryoshka" else None
        hists[method] = train_sae(saes[method], data, replace(train_cfg, matryoshka=mcfg))
    return ToyComparison(hierarchy, saes, hists, float(input_scale))


def retrained_tree_figure(
    train_cfg: TrainConfig,
    *,
    p_parent: float,
    p_child: float,
    prefix_mode: str,
    target_l0: float,
    seed: int,
    steps: int,
    permute_latents: bool = True,
    n_inst: int = 4,
) -> Figure:
    """Train ``n_inst`` vanilla and Matryoshka SAEs on Nabeshima's tree with other firing
    probabilities and return the first Matryoshka instance's heatmaps (notebook 01's widget).

    ``train_cfg`` is replaced by ``steps``, ``target_l0`` and ``seed``; the Matryoshka prefixes are
    ``MatryoshkaConfig(mode=prefix_mode, permute_latents=permute_latents)``; inputs are scaled as
    Nabeshima does (:meth:`saelib.data.toy_data.ToyHierarchy.input_scale`). Raises ValueError as
    :func:`saelib.data.toy_data.nabeshima_tree` for bad probabilities, or as :class:`TrainConfig`
    and :class:`saelib.core.matryoshka.MatryoshkaConfig`.
    """
    tree = nabeshima_tree(seed=seed, p_parent=p_parent, p_child=p_child)
    cfg = replace(train_cfg, steps=steps, target_l0=target_l0, seed=seed)
    run = compare_vanilla_matryoshka(tree, cfg, MatryoshkaConfig(mode=prefix_mode, permute_latents=permute_latents),
                                     n_inst=n_inst, seed=seed, input_scale=tree.input_scale(seed=seed))
    return run.figure("matryoshka", 0)


@dataclass
class NarrowSweep:
    """Result of :func:`narrow_sae_sweep`: trained vs closed-form single-latent SAEs.

    ``child_cos_seeds`` / ``parent_cos_seeds`` are ``[n_q, n_l1, n_seeds]``: each trained decoder's
    cosine with the children (mean over children) and with the parent; ``child_cos`` /
    ``parent_cos`` are their medians over seeds, ``[n_q, n_l1]``; ``predicted`` is ``[n_q]``, the
    closed-form child cosine of :func:`saelib.experiments.hedging.hedged_child_cosine`; ``mse`` is
    ``[n_q, n_l1]``, the median over seeds of the trained SAEs' reconstruction MSE on a fresh sample;
    ``sae`` holds the trained SAEs, one instance per (q, L1, seed) in that order.

    What is needed to train them further on the same data (:func:`narrow_sweep_hedging`):
    ``trees`` (one :class:`~saelib.data.toy_data.ToyHierarchy` per instance, same order as ``sae``),
    ``train_cfg`` (the :class:`~saelib.core.train.TrainConfig` of the sweep: steps, batch size, lr,
    per-instance L1 coefficients, seed), and the hierarchy's settings ``p_parent``,
    ``n_children``, ``exclusive``. They default to None / the sweep's defaults so that a
    ``NarrowSweep`` built by older code still constructs; :func:`narrow_sweep_hedging` then refuses it.
    """

    q_values: list[float]
    l1_values: list[float]
    child_cos: torch.Tensor
    parent_cos: torch.Tensor
    predicted: torch.Tensor
    mse: torch.Tensor
    child_cos_seeds: torch.Tensor
    parent_cos_seeds: torch.Tensor
    sae: SAE | None = None
    trees: list[ToyHierarchy] | None = None
    train_cfg: TrainConfig | None = None
    p_parent: float = 0.25
    n_children: int = 2
    exclusive: bool = True

    @property
    def n_seeds(self) -> int:
        """Seeds per (q, L1) pair (the last axis of ``child_cos_seeds``)."""
        return int(self.child_cos_seeds.shape[-1])


def _tree_data(trees: list[ToyHierarchy], independent_instances: bool) -> DataSource:
    """The data source of a sweep over toy trees (instance ``i`` draws from ``trees[i]``): one
    function per instance for ``TrainConfig.independent_instances``, else one stacked stream."""
    return instance_samplers(trees) if independent_instances else stacked_sampler(trees)


def narrow_sae_sweep(
    q_values: list[float],
    l1_values: list[float],
    p_parent: float = 0.25,
    n_children: int = 2,
    exclusive: bool = True,
    steps: int = 5_000,
    batch_size: int = 500,
    lr: float = 1e-2,
    seed: int = 0,
    n_eval: int = 20_000,
    n_seeds: int = 1,
    independent_instances: bool = True,
) -> NarrowSweep:
    """Train one bias-free 1-latent ReLU SAE per (child probability, L1 coefficient) pair, all at
    once along the instance dimension, on Chanin's parent/children hierarchy, and compare each
    decoder with the closed-form hedged direction (Chanin et al. 2025, arXiv 2505.11756).
    Dead latents are resampled during the first half of training (a 1-latent SAE starts dead on
    about 1 seed in 8). ``n_seeds`` SAEs per pair differ in their initialisation and data draws
    (instance order: q, then L1, then seed). With ``independent_instances`` (the default) every
    instance has its own data and resampling streams (``TrainConfig.independent_instances``, data
    from :func:`saelib.data.toy_data.instance_samplers`), so an instance's result does not depend
    on how many train beside it; False: one stream drawn for all instances in turn
    (:func:`saelib.data.toy_data.stacked_sampler`, the behaviour before). Raises ValueError if
    ``n_seeds < 1``."""
    from ..data.toy_data import chanin_parent_children
    from .hedging import hedged_child_cosine

    if n_seeds < 1:
        raise ValueError(f"n_seeds must be >= 1, got {n_seeds}")
    trees = [
        chanin_parent_children(p_parent=p_parent, p_child=q, n_children=n_children, exclusive=exclusive, seed=seed)
        for q in q_values for _ in l1_values for _ in range(n_seeds)
    ]
    coeffs = [l1 for _ in q_values for l1 in l1_values for _ in range(n_seeds)]
    sae = SAE(SAEConfig(d_in=trees[0].d, d_sae=1, n_inst=len(trees), use_b_dec=False, seed=seed))
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, l1_coeff=coeffs, l1_warmup_frac=0.0,
                      resample_dead_every=200, seed=seed, independent_instances=independent_instances, progress=False)
    train_sae(sae, _tree_data(trees, independent_instances), cfg)
    with torch.no_grad():
        w = sae.W_dec[:, 0] / sae.W_dec[:, 0].norm(dim=-1, keepdim=True)  # [inst, d]
        cos = torch.stack([t.features / t.features.norm(dim=-1, keepdim=True) @ w[i] for i, t in enumerate(trees)])
        x = stacked_sampler(trees)(n_eval, torch.Generator().manual_seed(seed + 1))
        mse = (sae(x)[0] - x).pow(2).sum(-1).mean(0)
    shape = (len(q_values), len(l1_values), n_seeds)
    child_cos, parent_cos = cos[:, 1:].mean(-1).reshape(shape), cos[:, 0].reshape(shape)
    return NarrowSweep(
        q_values=list(q_values), l1_values=list(l1_values),
        child_cos=child_cos.median(-1).values, parent_cos=parent_cos.median(-1).values,
        predicted=torch.tensor([hedged_child_cosine(q, n_children, exclusive) for q in q_values]),
        mse=mse.reshape(shape).median(-1).values,
        child_cos_seeds=child_cos, parent_cos_seeds=parent_cos, sae=sae,
        trees=trees, train_cfg=cfg, p_parent=p_parent, n_children=n_children, exclusive=exclusive,
    )


@dataclass
class NarrowSweepHedging:
    """Hedging rates of every SAE of a :class:`NarrowSweep` (see :func:`narrow_sweep_hedging`).

    Every tensor is ``[n_q, n_l1, n_seeds]`` (float64), indexed like ``NarrowSweep.child_cos_seeds``;
    lengths are in units of the unit-normalised decoder row.

    Attributes:
        q_values, l1_values: the sweep's axes.
        n_new: latents added to each 1-latent SAE.
        steps: optimiser steps of the further training (extended and control alike).
        hedging_rate: Chanin et al. 2025's rate, ``max(0, (delta_proj - baseline_proj) /
            (1 - baseline_proj))``: 0 when the old decoder row moved no more into the new latents'
            span than into a random subspace of that dimension, near 1 when it moved by about its
            own length into it.
        delta_proj: ``||P_new delta||``, the change of the old row (extended minus control) projected
            onto the span of the new decoder rows.
        baseline_proj: the same for random subspaces of the same dimension (mean over draws).
        delta_norm: ``||delta||``, the whole change of the old row.
        scores: the :class:`~saelib.experiments.hedging.HedgingScores` over all instances (flat, in the
            sweep's (q, L1, seed) order), with the drift since the sweep's SAE.
        extended, control: the SAEs trained further (``d_sae = 1 + n_new`` and ``1``).
    """

    q_values: list[float]
    l1_values: list[float]
    n_new: int
    steps: int
    hedging_rate: torch.Tensor
    delta_proj: torch.Tensor
    baseline_proj: torch.Tensor
    delta_norm: torch.Tensor
    scores: HedgingScores
    extended: SAE
    control: SAE


def narrow_sweep_hedging(
    sweep: NarrowSweep,
    n_new: int | None = None,
    steps: int | None = None,
    *,
    init_norm: float = 0.1,
    n_baselines: int = 50,
    seed: int | None = None,
    progress: bool = False,
) -> NarrowSweepHedging:
    """Hedging rate (Chanin et al. 2025, arXiv 2505.11756) of every 1-latent SAE of a narrow sweep.

    Each trained 1-latent SAE of ``sweep`` is extended with ``n_new`` latents
    (:func:`saelib.experiments.hedging.extend_sae`, the reference's initialisation) and trained further
    beside a copy of itself at width 1 (the control), both with the sweep's own training
    configuration (same L1 coefficient per instance, lr, batch size, schedule, dead-latent
    resampling) on the data each instance was trained on: instance ``i`` draws from
    ``sweep.trees[i]`` through the same sampler (per instance, or stacked) and seed as the sweep,
    so it sees the same data stream again (:func:`saelib.experiments.hedging.train_hedging_pair`). The old row's move in the
    extended SAE relative to the control is scored by :func:`saelib.experiments.hedging.hedging_scores`:
    a single latent that hedged (merged its children into the parent direction) gives the children
    up to the new latents and moves into their span.

    Args:
        sweep: a :class:`NarrowSweep` from :func:`narrow_sae_sweep` (it must hold ``sae``,
            ``trees`` and ``train_cfg``).
        n_new: latents to add; default ``sweep.n_children`` (room for one latent per child).
        steps: optimiser steps of the further training; default the sweep's.
        init_norm: norm of the new latents' random decoder rows / encoder columns (reference: 0.1).
        n_baselines: random subspaces per instance for the baseline (reference: 50).
        seed: seed of the new latents' directions (instance ``i``: ``seed + i``) and of the random
            subspaces; the training data stream keeps the sweep's seed. Default: the sweep's seed.
        progress: show tqdm progress bars of the two trainings.

    Returns a :class:`NarrowSweepHedging`; its tensors are ``[n_q, n_l1, n_seeds]``.

    Raises:
        ValueError: ``sweep`` lacks ``sae``, ``trees`` or ``train_cfg`` (made before they were
            recorded), its sizes disagree, ``n_new`` is not an int >= 1 or leaves no room for a
            random baseline (``1 + n_new >= d_in``), or ``steps`` is not an int >= 1; and whatever
            :func:`saelib.experiments.hedging.extend_sae`, :func:`saelib.core.train.train_sae` and
            :func:`saelib.experiments.hedging.hedging_scores` raise.

    Source: Chanin et al. 2025, "Feature hedging" (arXiv 2505.11756), reference code
    ``chanind/feature-hedging-paper`` (``hedging_paper/evals/hedging_eval.py``,
    ``hedging_paper/scripts/train_hedging_eval_batch_topk_sae.py``). Adaptations beyond those of
    :mod:`saelib.experiments.absorption`: the SAEs are ReLU + L1 bias-free 1-latent SAEs (the reference scores
    BatchTopK SAEs of an LLM), and the further training replays the toy data stream.
    """
    if sweep.sae is None or sweep.trees is None or sweep.train_cfg is None:
        raise ValueError(
            "sweep must hold its SAEs, trees and train_cfg (a NarrowSweep from narrow_sae_sweep); "
            "this one was built without them"
        )
    shape = (len(sweep.q_values), len(sweep.l1_values), sweep.n_seeds)
    n_inst = shape[0] * shape[1] * shape[2]
    if sweep.sae.n_inst != n_inst or len(sweep.trees) != n_inst:
        raise ValueError(
            f"sweep has {sweep.sae.n_inst} SAE instances and {len(sweep.trees)} trees but "
            f"n_q * n_l1 * n_seeds = {n_inst}"
        )
    n_new = sweep.n_children if n_new is None else n_new
    if not isinstance(n_new, int) or isinstance(n_new, bool) or n_new < 1:
        raise ValueError(f"n_new must be an int >= 1, got {n_new!r}")
    if sweep.sae.d_sae + n_new >= sweep.sae.d_in:
        raise ValueError(
            f"n_new={n_new} new latents beside {sweep.sae.d_sae} in d_in={sweep.sae.d_in} leave no room "
            f"for a random-subspace baseline; use n_new < {sweep.sae.d_in - sweep.sae.d_sae}"
        )
    steps = sweep.train_cfg.steps if steps is None else steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    seed = sweep.train_cfg.seed if seed is None else seed
    cfg = replace(sweep.train_cfg, steps=steps, progress=progress)
    extended, control = train_hedging_pair(
        sweep.sae, n_new, _tree_data(sweep.trees, cfg.independent_instances), cfg, init_norm=init_norm, seed=seed
    )
    scores = hedging_scores(extended, control, before=sweep.sae, n_baselines=n_baselines, seed=seed)
    return NarrowSweepHedging(
        q_values=list(sweep.q_values), l1_values=list(sweep.l1_values), n_new=n_new, steps=steps,
        hedging_rate=scores.hedging_rate.reshape(shape), delta_proj=scores.delta_proj.reshape(shape),
        baseline_proj=scores.baseline_proj.reshape(shape), delta_norm=scores.delta_norm.reshape(shape),
        scores=scores, extended=extended, control=control,
    )
