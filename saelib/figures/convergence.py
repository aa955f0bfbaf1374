"""Convergence curves of claims: a statistic at each checkpoint of one training run.

Draws what :func:`saelib.experiments.claims.converged` decides on: each claim's statistic against
the training tokens seen, with two standard errors at each point, the source's bound or range as a
line, and whether the last two points agree (converged) or not (undecided at this scale).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

__all__ = ["plot_claim_convergence"]


def plot_claim_convergence(claims: Sequence[Any], ncols: int = 3, title: str = "") -> Figure:
    """One panel per claim with a numeric convergence curve (``claim.curve`` non-empty and
    ``claim.margin`` not NaN): the statistic (``claim.curve``) against training tokens
    (``claim.tokens``, log scale), error bars of two standard errors (``claim.curve_se``), the
    panel titled with the claim and "converged" / "undecided". Boolean findings are left out (their
    curve is a verdict, listed in the claims table). Raises ValueError when no claim has a numeric
    curve."""
    shown = [c for c in claims if c.curve and not math.isnan(c.margin)]
    if not shown:
        raise ValueError("no claim has a numeric convergence curve (build them with claims.converged)")
    ncols = max(1, min(ncols, len(shown)))
    nrows = math.ceil(len(shown) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, c in zip(axes, shown):
        se = np.asarray(c.curve_se if c.curve_se else [0.0] * len(c.curve))
        ax.errorbar(c.tokens, c.curve, yerr=2 * se, marker="o", capsize=3,
                    color="tab:blue" if c.converged else "tab:red")
        ax.set_xscale("log")
        ax.set_xlabel("training tokens seen")
        text = c.text if len(c.text) <= 60 else c.text[:57] + "..."
        ax.set_title(f"{text}\n{'converged' if c.converged else 'undecided at this scale'} "
                     f"(published: {c.published})", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig
