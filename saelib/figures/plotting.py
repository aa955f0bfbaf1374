"""Figures: cosine heatmaps of SAE latents against true features, and a deterministic saver.

Every plotting function returns a :class:`matplotlib.figure.Figure` and never calls
``plt.show()``; figures are built with ``matplotlib.figure.Figure`` directly (not through
pyplot), so they hold no global state and a notebook displays one exactly once, when it is the
cell's value. :func:`save_figure` is the one function that writes figures, under ``figures/``,
byte-identically on re-runs.

Heatmap conventions (as in Nabeshima 2024's toy heatmaps): rows are SAE latents, columns true features; a
diverging colour map centred at 0 (red +, blue −) on ``[-1, 1]``; latents in Hungarian order so
the diagonal is the match, with tick labels giving the original latent indices; black squares
mark parent/child blocks.
"""

from __future__ import annotations

import io
import os
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import seaborn as sns
import torch
from jaxtyping import Float
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from ..core.metrics import cosine_matrix, decoder_cosines, encoder_cosines, hungarian_order
from ..core.io import atomic_write_bytes

__all__ = ["cosine_heatmap", "sae_feature_heatmaps", "hedging_sweep_figure", "save_figure", "figures_root", "FIGURE_DPI"]

FIGURE_DPI = 150
CMAP = "RdBu_r"
FIGURES_ENV_VAR = "SAELIB_FIGURES_DIR"

Block = tuple[int, int]


def _to_numpy(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [rows, cols], got shape {arr.shape}")
    return arr


def _check_blocks(blocks: Sequence[Block] | None, n_cols: int) -> list[Block]:
    out = []
    for b in blocks or ():
        start, stop = (int(v) for v in b)
        if not (0 <= start < stop <= n_cols):
            raise ValueError(f"block {tuple(b)!r} must satisfy 0 <= start < stop <= n_cols={n_cols}")
        out.append((start, stop))
    return out


def _check_labels(labels: Sequence[str] | None, n: int, name: str) -> list[str] | None:
    if labels is None:
        return None
    labels = [str(v) for v in labels]
    if len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} entries, expected {n}")
    return labels


def cosine_heatmap(
    cos: Float[Tensor, "rows cols"] | np.ndarray,
    *,
    ax: Axes | None = None,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    blocks: Sequence[Block] | None = None,
    title: str = "",
    vmin: float = -1.0,
    vmax: float = 1.0,
    annotate: bool = False,
    cbar: bool = True,
) -> Figure:
    """Heatmap of a cosine matrix ``[rows, cols]`` (e.g. latents × true features).

    Diverging colour map centred at 0 on ``[vmin, vmax]``. ``blocks`` is a list of
    ``(start, stop)`` column ranges (e.g. a parent and its children); each is outlined as the
    square ``rows start:stop × cols start:stop`` on the diagonal. Labels default to indices
    (thinned automatically when there are many). ``annotate`` writes the values in the cells.
    Draws into ``ax`` if given (and returns its figure), else into a new figure.

    Raises ValueError if ``cos`` is not 2-D, a label list has the wrong length, a block is not
    ``0 <= start < stop <= cols``, or ``vmin >= vmax``.
    """
    data = _to_numpy(cos, "cos")
    n_rows, n_cols = data.shape
    row_labels = _check_labels(row_labels, n_rows, "row_labels")
    col_labels = _check_labels(col_labels, n_cols, "col_labels")
    checked_blocks = _check_blocks(blocks, n_cols)
    if not vmin < vmax:
        raise ValueError(f"need vmin < vmax, got vmin={vmin!r}, vmax={vmax!r}")
    if ax is None:
        fig = Figure(figsize=(min(2.0 + 0.4 * n_cols, 16.0), min(1.2 + 0.3 * n_rows, 16.0)),
                     layout="constrained")
        ax = fig.add_subplot()
    frame = pd.DataFrame(
        data,
        index=row_labels if row_labels is not None else range(n_rows),
        columns=col_labels if col_labels is not None else range(n_cols),
    )
    sns.heatmap(
        frame,
        ax=ax,
        cmap=CMAP,
        center=0.0,
        vmin=vmin,
        vmax=vmax,
        annot=annotate,
        fmt=".2f",
        annot_kws={"fontsize": 7},
        cbar=cbar,
        cbar_kws={"label": "cosine"} if cbar else None,
        linewidths=0.0,
        xticklabels="auto",
        yticklabels="auto",
    )
    for start, stop in checked_blocks:
        ax.add_patch(Rectangle((start, start), stop - start, stop - start,
                               fill=False, edgecolor="black", linewidth=1.5, clip_on=False))
    ax.tick_params(axis="y", labelrotation=0)
    ax.set_title(title)
    return ax.get_figure(root=True)


def sae_feature_heatmaps(
    W_enc: Float[Tensor, "d_in d_sae"],
    W_dec: Float[Tensor, "d_sae d_in"],
    b_dec: Float[Tensor, " d_in"] | None,
    features: Float[Tensor, "n_feat d_in"],
    *,
    feature_names: Sequence[str] | None = None,
    blocks: Sequence[Block] | None = None,
    title: str = "",
) -> Figure:
    """Encoder and decoder directions of one SAE vs the true features, side by side.

    Panels: cosine of each encoder direction (column of ``W_enc``) with each feature; cosine of
    each decoder row with each feature; and, if ``b_dec`` is given, a thin row of ``b_dec``'s
    cosine with each feature. Latents (rows) are put in the Hungarian order of the *decoder*
    cosines in both panels, so the decoder diagonal is the match; row tick labels are the
    original latent indices. Columns are the features (``feature_names`` or indices), with
    parent/child ``blocks`` outlined. Pass one instance: ``sae.W_enc[i]``, ``sae.W_dec[i]``,
    ``sae.b_dec[i]``.

    Raises ValueError if the shapes disagree (see :func:`saelib.core.metrics.decoder_cosines`), or as
    :func:`cosine_heatmap`. Source: Nabeshima 2024 toy heatmaps (REFERENCES.md).
    """
    dec = decoder_cosines(W_dec, features)  # [d_sae, n_feat]
    enc = encoder_cosines(W_enc, features)  # [d_sae, n_feat]
    if enc.shape != dec.shape:
        raise ValueError(
            f"W_enc {tuple(W_enc.shape)} and W_dec {tuple(W_dec.shape)} disagree on d_sae"
        )
    n_lat, n_feat = dec.shape
    col_labels = _check_labels(feature_names, n_feat, "feature_names")
    if col_labels is None:
        col_labels = [str(j) for j in range(n_feat)]
    order = hungarian_order(dec)  # [d_sae]
    row_labels = [str(i) for i in order.tolist()]

    panel_w = min(1.0 + 0.4 * n_feat, 8.0)
    panel_h = min(1.0 + 0.3 * n_lat, 14.0)
    fig = Figure(figsize=(2 * panel_w + 1.2, panel_h + (1.0 if b_dec is not None else 0.0)),
                 layout="constrained")
    if b_dec is not None:
        if b_dec.ndim != 1:
            raise ValueError(f"b_dec must be 1-D [d_in] (one instance), got shape {tuple(b_dec.shape)}")
        grid = fig.add_gridspec(2, 2, height_ratios=[max(n_lat, 1), 1.2])
        ax_enc, ax_dec = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
        ax_bias = fig.add_subplot(grid[1, 1])
    else:
        ax_enc, ax_dec = fig.subplots(1, 2)
        ax_bias = None
    common = dict(col_labels=col_labels, blocks=blocks, cbar=False)
    cosine_heatmap(enc[order], ax=ax_enc, row_labels=row_labels, title="encoder", **common)
    cosine_heatmap(dec[order], ax=ax_dec, row_labels=row_labels, title="decoder", **common)
    ax_enc.set_ylabel("latent (original index)")
    ax_enc.set_xlabel("true feature")
    ax_dec.set_xlabel("true feature")
    axes = [ax_enc, ax_dec]
    if ax_bias is not None:
        bias_cos = cosine_matrix(b_dec[None, :], features)  # [1, n_feat]
        cosine_heatmap(bias_cos, ax=ax_bias, row_labels=["b_dec"], col_labels=col_labels,
                       cbar=False, annotate=n_feat <= 30)
        ax_bias.set_xlabel("true feature")
        axes.append(ax_bias)
    fig.colorbar(ax_dec.collections[0], ax=axes, label="cosine", shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


# ---------------------------------------------------------------------------- saving
def figures_root() -> Path:
    """Default folder for figures: ``$SAELIB_FIGURES_DIR`` if set; else ``figures/`` in the first
    directory, walking up from the working directory, that holds both ``notebooks/`` and
    ``saelib/`` (the project root); else ``./figures``."""
    env = os.environ.get(FIGURES_ENV_VAR)
    if env:
        return Path(env)
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        if (folder / "notebooks").is_dir() and (folder / "saelib").is_dir():
            return folder / "figures"
    return cwd / "figures"


def _check_figure_name(name: str) -> PurePosixPath:
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"figure name must be a non-empty string without surrounding spaces, got {name!r}")
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ValueError(f"figure name must be a relative POSIX path like 'folder/name', got {name!r}")
    rel = PurePosixPath(name)
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"figure name must not contain '..', '.' or empty parts, got {name!r}")
    if len(parts) > 2:
        raise ValueError(f"figure name may hold at most one subfolder ('folder/name'), got {name!r}")
    if rel.suffix.lower() in (".png", ".pdf"):
        raise ValueError(f"figure name must not carry an extension (both .png and .pdf are written), got {name!r}")
    return rel


def save_figure(fig: Figure, name: str, root: str | Path | None = None) -> list[Path]:
    """Write ``fig`` to ``<root>/<name>.png`` and ``<root>/<name>.pdf``; return the two paths.

    ``name`` is a relative name with at most one subfolder, e.g.
    ``"01_toy_parent_child_mixing/decoder_heatmap"``. ``root`` defaults to :func:`figures_root`.
    Output is deterministic (fixed dpi :data:`FIGURE_DPI`, tight bounding box, no software /
    date metadata), so re-running a notebook gives byte-identical files, and each file is written
    atomically (temporary file + ``os.replace``).

    Raises ValueError for an absolute name, one containing ``..``, more than one subfolder, or a
    ``.png`` / ``.pdf`` extension.
    """
    rel = _check_figure_name(name)
    base = (Path(root) if root is not None else figures_root()) / rel
    renders = {
        ".png": dict(format="png", metadata={"Software": None}),
        ".pdf": dict(format="pdf", metadata={"Creator": None, "Producer": None,
                                             "CreationDate": None, "ModDate": None}),
    }
    paths = []
    for suffix, kwargs in renders.items():
        buf = io.BytesIO()
        fig.savefig(buf, dpi=FIGURE_DPI, bbox_inches="tight", **kwargs)
        paths.append(atomic_write_bytes(base.with_name(base.name + suffix), buf.getvalue()))
    return paths


def hedging_sweep_figure(
    q_values: Sequence[float],
    l1_values: Sequence[float],
    child_cos: Float[Tensor, "n_q n_l1"],
    predicted: Callable[[float], float],
    *,
    title: str = "",
) -> Figure:
    """Trained vs closed-form child cosine of a single-latent SAE (feature hedging).

    Left: child cosine against the child probability, one line of points per L1 coefficient,
    with the closed-form curve ``predicted(q)`` drawn on a fine grid. Right: trained minus
    predicted against the L1 coefficient (log scale), one line per child probability.
    Raises ValueError if ``child_cos`` is not ``[len(q_values), len(l1_values)]``.
    Source: Chanin et al. 2025, "Feature hedging" (arXiv 2505.11756).
    """
    cos = _to_numpy(child_cos, "child_cos")
    if cos.shape != (len(q_values), len(l1_values)):
        raise ValueError(f"child_cos must be [{len(q_values)}, {len(l1_values)}], got {cos.shape}")
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_a, ax_b = fig.subplots(1, 2)
    grid = np.linspace(min(q_values), max(q_values), 100)
    ax_a.plot(grid, [predicted(float(q)) for q in grid], color="black", lw=2, label="closed form")
    palette = sns.color_palette("viridis", len(l1_values))
    for j, l1 in enumerate(l1_values):
        ax_a.plot(q_values, cos[:, j], "o--", color=palette[j], label=f"trained, L1 {l1:g}")
    ax_a.set_xlabel("child probability given parent")
    ax_a.set_ylabel("cos(latent decoder, child feature)")
    ax_a.legend(fontsize=8)
    pal_q = sns.color_palette("rocket", len(q_values))
    for i, q in enumerate(q_values):
        ax_b.plot(l1_values, cos[i] - predicted(float(q)), "o-", color=pal_q[i], label=f"q = {q:g}")
    ax_b.axhline(0, color="black", lw=1)
    ax_b.set_xscale("log")
    ax_b.set_xlabel("L1 coefficient")
    ax_b.set_ylabel("trained − predicted child cosine")
    ax_b.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig
