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
from .matryoshka import MatryoshkaConfig
from .plotting import sae_feature_heatmaps
from .sae import SAE, SAEConfig
from .toy_data import ToyHierarchy
from .train import History, TrainConfig, train_sae

__all__ = ["ToyComparison", "instance_summary", "compare_vanilla_matryoshka", "NarrowSweep", "narrow_sae_sweep"]


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
        (:func:`saelib.absorption.instance_summary`)."""
        return instance_summary(self.saes[method], self.hierarchy)

    def absorption(self, method: str, n: int = 20_000, seed: int = 1) -> AbsorptionScores:
        """SAEBench's full-absorption rate and absorption fraction of every seed of ``method`` on
        ``n`` fresh samples drawn with ``seed`` (:func:`saelib.absorption.absorption_scores`;
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
    ``sqrt(d)``, :meth:`saelib.toy_data.ToyHierarchy.input_scale`, so his sparsity coefficients
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


@dataclass
class NarrowSweep:
    """Result of :func:`narrow_sae_sweep`: trained vs closed-form single-latent SAEs.

    ``child_cos_seeds`` / ``parent_cos_seeds`` are ``[n_q, n_l1, n_seeds]``: each trained decoder's
    cosine with the children (mean over children) and with the parent; ``child_cos`` /
    ``parent_cos`` are their medians over seeds, ``[n_q, n_l1]``; ``predicted`` is ``[n_q]``, the
    closed-form child cosine of :func:`saelib.hedging.hedged_child_cosine`; ``mse`` is
    ``[n_q, n_l1]``, the median over seeds of the trained SAEs' reconstruction MSE on a fresh sample;
    ``sae`` holds the trained SAEs, one instance per (q, L1, seed) in that order.
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
) -> NarrowSweep:
    """Train one bias-free 1-latent ReLU SAE per (child probability, L1 coefficient) pair, all at
    once along the instance dimension, on Chanin's parent/children hierarchy, and compare each
    decoder with the closed-form hedged direction (Chanin et al. 2025, arXiv 2505.11756).
    Dead latents are resampled during the first half of training (a 1-latent SAE starts dead on
    about 1 seed in 8). ``n_seeds`` SAEs per pair differ in their initialisation and data draws
    (instance order: q, then L1, then seed). Raises ValueError if ``n_seeds < 1``."""
    from .hedging import hedged_child_cosine
    from .toy_data import chanin_parent_children, stacked_sampler

    if n_seeds < 1:
        raise ValueError(f"n_seeds must be >= 1, got {n_seeds}")
    trees = [
        chanin_parent_children(p_parent=p_parent, p_child=q, n_children=n_children, exclusive=exclusive, seed=seed)
        for q in q_values for _ in l1_values for _ in range(n_seeds)
    ]
    coeffs = [l1 for _ in q_values for l1 in l1_values for _ in range(n_seeds)]
    sae = SAE(SAEConfig(d_in=trees[0].d, d_sae=1, n_inst=len(trees), use_b_dec=False, seed=seed))
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, l1_coeff=coeffs, l1_warmup_frac=0.0,
                      resample_dead_every=200, seed=seed, progress=False)
    train_sae(sae, stacked_sampler(trees), cfg)
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
    )
