"""Figures that compare training variants: per-variant metric strips, sweeps, cosines over
training, FVU-vs-L0 Pareto fronts, gradient bars and implied prior densities.

Companion of :mod:`saelib.figures.plotting` (heatmaps and :func:`saelib.figures.plotting.save_figure`), for
notebooks 03 and 04. Every function returns a :class:`matplotlib.figure.Figure` built without
pyplot and never shows it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Float
from matplotlib.figure import Figure
from torch import Tensor

from ..core.penalties import PRIOR_FAMILY, implied_log_prior, prior_density, prior_is_proper

__all__ = [
    "metric_strips",
    "sweep_lines",
    "cosine_trajectories",
    "method_scatter",
    "pareto_plot",
    "prior_density_plot",
    "bar_groups",
]


def _np(t: Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(t, Tensor):
        return t.detach().to("cpu", torch.float64).numpy()
    return np.asarray(t, dtype=np.float64)


def metric_strips(
    table: Mapping[str, Mapping[str, Tensor]],
    metrics: Sequence[str],
    labels: Mapping[str, str] | None = None,
    title: str = "",
) -> Figure:
    """One panel per metric: every instance of every variant as a dot, the variant mean as a bar.

    ``table`` is ``{variant: {metric: [n_seeds]}}`` (see
    :func:`saelib.experiments.hierarchy_analysis.group_table`); ``labels`` renames metrics on the axes.
    Raises ValueError if a metric is missing from a variant.
    """
    variants = list(table)
    for v in variants:
        missing = [m for m in metrics if m not in table[v]]
        if missing:
            raise ValueError(f"variant {v!r} lacks metrics {missing}")
    fig = Figure(figsize=(3.0 * len(metrics), 0.35 * len(variants) + 1.6), layout="constrained")
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    ypos = np.arange(len(variants))
    for ax, m in zip(axes, metrics):
        for y, v in zip(ypos, variants):
            vals = _np(table[v][m])
            jitter = np.linspace(-0.15, 0.15, len(vals)) if len(vals) > 1 else np.zeros(1)
            ax.barh(y, np.nanmean(vals), color="0.85", height=0.6)
            ax.scatter(vals, y + jitter, s=10, color="C0", zorder=3)
        ax.set_xlabel((labels or {}).get(m, m))
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ypos, variants)
    axes[0].invert_yaxis()
    if title:
        fig.suptitle(title)
    return fig


def sweep_lines(
    x: Sequence[float] | Tensor,
    series: Mapping[str, Float[Tensor, "n_x n_seeds"]],
    xlabel: str,
    ylabel: str = "cosine",
    title: str = "",
    logx: bool = False,
    logy: bool = False,
) -> Figure:
    """Mean ± one standard deviation over seeds of several quantities along a swept parameter.

    ``series[name]`` is ``[len(x), n_seeds]``. With ``logy`` the y axis is logarithmic and the band
    is the geometric mean times / divided by the geometric standard deviation (values must then be
    > 0). Raises ValueError on a length mismatch, or for values <= 0 with ``logy``.
    """
    xs = _np(x)
    fig = Figure(figsize=(5.0, 3.4), layout="constrained")
    ax = fig.add_subplot()
    for k, (name, vals) in enumerate(series.items()):
        v = _np(vals)
        if v.ndim != 2 or v.shape[0] != len(xs):
            raise ValueError(f"series {name!r} must be [{len(xs)}, n_seeds], got {v.shape}")
        if logy:
            if not (v[np.isfinite(v)] > 0).all():
                raise ValueError(f"series {name!r} has values <= 0, which a log axis cannot show")
            lv = np.log(v)
            mean, lo, hi = (np.exp(np.nanmean(lv, 1) + d * np.nanstd(lv, 1)) for d in (0, -1, 1))
        else:
            mean, std = np.nanmean(v, 1), np.nanstd(v, 1)
            lo, hi = mean - std, mean + std
        ax.plot(xs, mean, marker="o" if len(xs) <= 50 else None, color=f"C{k}", label=name)
        ax.fill_between(xs, lo, hi, color=f"C{k}", alpha=0.2)
    if logy:
        ax.set_yscale("log")
    else:
        ax.axhline(0.0, color="0.5", lw=0.8)
    if logx:
        ax.set_xscale("symlog", linthresh=min(x for x in xs if x > 0))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return fig


def cosine_trajectories(
    steps: Sequence[int] | Tensor,
    cos: Float[Tensor, "n_snap d_sae n_feat"],
    feature_names: Sequence[str],
    title: str = "",
    marks: Mapping[str, float] | None = None,
) -> Figure:
    """Decoder cosine of every latent with every feature over training (one panel per latent).

    ``marks`` draws labelled vertical lines (e.g. ``{"child learned": 120}``).
    Raises ValueError if ``feature_names`` does not have one entry per feature.
    """
    c = _np(cos)
    if c.ndim != 3 or c.shape[2] != len(feature_names):
        raise ValueError(f"cos must be [n_snap, d_sae, {len(feature_names)}], got {c.shape}")
    s = _np(steps)
    n_lat = c.shape[1]
    fig = Figure(figsize=(3.6 * n_lat, 3.0), layout="constrained")
    axes = fig.subplots(1, n_lat, sharey=True, squeeze=False)[0]
    for j, ax in enumerate(axes):
        for f, name in enumerate(feature_names):
            ax.plot(s, c[:, j, f], color=f"C{f}", label=name)
        for k, (label, step) in enumerate((marks or {}).items()):
            if np.isfinite(step):
                ax.axvline(step, color="0.3", ls=("--", ":", "-.")[k % 3], lw=1, label=label)
        ax.set_xscale("symlog", linthresh=max(1.0, float(s[1] - s[0]) if len(s) > 1 else 1.0))
        ax.set_xlim(0, float(s.max()) if len(s) else 1.0)
        ax.set_title(f"latent {j}")
        ax.set_xlabel("training step")
        ax.axhline(0.0, color="0.6", lw=0.6)
    axes[0].set_ylabel("decoder cosine with feature")
    axes[-1].legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    return fig


def method_scatter(
    points: Mapping[str, tuple[Tensor, Tensor]],
    ylabel: str,
    front: Mapping[str, Tensor] | None = None,
    title: str = "",
    true_l0: float | None = None,
    logy: bool = False,
) -> Figure:
    """A metric against L0 for several methods: ``points[name] = (l0 [n], value [n])``.

    ``front[name]`` (bool ``[n]``, e.g. from :func:`saelib.experiments.hierarchy_analysis.pareto_front`)
    joins that method's selected points with a line. ``true_l0`` draws the data's true L0.
    """
    fig = Figure(figsize=(5.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for k, (name, (l0s, vals)) in enumerate(points.items()):
        x, y = _np(l0s), _np(vals)
        marker = "os^vD<>ph*"[k // 10 % 10]
        ax.scatter(x, y, s=16, color=f"C{k % 10}", marker=marker, alpha=0.7, label=name)
        if front is not None and name in front:
            m = _np(front[name]).astype(bool)
            order = np.argsort(x[m])
            ax.plot(x[m][order], y[m][order], color=f"C{k % 10}", lw=1.2)
    if true_l0 is not None:
        ax.axvline(true_l0, color="0.4", ls=":", lw=1, label="true E[L0]")
    ax.set_xlabel("L0 (active latents per sample)")
    ax.set_ylabel(ylabel)
    ax.set_xscale("symlog", linthresh=1.0)
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title)
    return fig


def pareto_plot(
    points: Mapping[str, tuple[Tensor, Tensor]],
    front: Mapping[str, Tensor] | None = None,
    title: str = "",
    true_l0: float | None = None,
) -> Figure:
    """FVU (log scale) against L0 for several methods: ``points[name] = (l0 [n], fvu [n])``, each
    method's Pareto front joined by a line (see :func:`method_scatter`)."""
    return method_scatter(points, "FVU", front=front, title=title, true_l0=true_l0, logy=True)


def prior_density_plot(
    kinds: Sequence[str], coeff: float = 2.0, s_max: float = 4.0, n_grid: int = 801
) -> Figure:
    """Two panels per penalty list: the penalty's slope ``d pen / ds`` near zero (log-log: the
    push toward exactly zero that a small activation feels), and the prior on ``s >= 0`` it
    implies at ``coeff``, ``p(s) ∝ exp(-coeff·pen(s))``, normalised on ``[0, s_max]`` (improper
    priors are marked "truncated"), log scale.

    Raises ValueError as :func:`saelib.core.penalties.prior_density`.
    """
    s = torch.linspace(0.0, s_max, n_grid, dtype=torch.float64)
    small = torch.logspace(-6, 1, 200, dtype=torch.float64, requires_grad=True)
    fig = Figure(figsize=(10.0, 3.8), layout="constrained")
    ax_g, ax_p = fig.subplots(1, 2)
    for k, kind in enumerate(kinds):
        slope = -torch.autograd.grad(implied_log_prior(kind, small, 1.0).sum(), small)[0]
        ax_g.plot(_np(small), np.maximum(_np(slope), 1e-12), color=f"C{k}", label=kind)
        p = _np(prior_density(kind, s, coeff))
        tag = "" if prior_is_proper(kind, coeff) else ", improper: truncated"
        ax_p.plot(_np(s), p, color=f"C{k}", label=f"{kind} ({PRIOR_FAMILY[kind]}{tag})")
    ax_g.set_xscale("log")
    ax_g.set_yscale("log")
    ax_g.set_ylim(1e-7, None)
    ax_g.set_xlabel("scaled activation s")
    ax_g.set_ylabel("d pen / ds")
    ax_g.set_title("penalty slope near zero")
    ax_g.legend(fontsize=7)
    ax_p.set_yscale("log")
    ax_p.set_xlabel("scaled activation s = a·‖W_dec‖")
    ax_p.set_ylabel(f"density on [0, {s_max:g}]")
    ax_p.set_title(f"implied priors, coefficient {coeff:g}")
    ax_p.legend(fontsize=7)
    return fig


def bar_groups(
    values: Mapping[str, Mapping[str, Tensor]],
    ylabel: str,
    title: str = "",
) -> Figure:
    """Grouped bars with seed dots: ``values[group][bar] = [n_seeds]`` (mean bar, dots per seed)."""
    groups = list(values)
    bars = list(dict.fromkeys(b for g in groups for b in values[g]))
    fig = Figure(figsize=(1.6 + 1.4 * len(groups), 3.4), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(bars))
    for k, b in enumerate(bars):
        for gi, g in enumerate(groups):
            if b not in values[g]:
                continue
            v = _np(values[g][b])
            xpos = gi - 0.4 + width * (k + 0.5)
            ax.bar(xpos, np.nanmean(v), width=width * 0.9, color=f"C{k}", alpha=0.5,
                   label=b if gi == 0 else None)
            ax.scatter(np.full(len(v), xpos), v, s=8, color=f"C{k}", zorder=3)
    ax.axhline(0.0, color="0.4", lw=0.8)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return fig
