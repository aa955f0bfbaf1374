"""Uncertainty from the data: percentile bootstrap confidence intervals over documents.

A real-model statistic (loss recovered, KL, a density) comes from one trained model on held-out text,
so its uncertainty is that of the text: documents are resampled with replacement (never tokens, which
are correlated within a document), the statistic recomputed on each resample, and the interval read
off the percentiles (Efron & Tibshirani 1993, *An Introduction to the Bootstrap*, ch. 13).
:func:`saelib.experiments.claims` accepts a :class:`ConfidenceInterval` where the toy claims take
seed values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["ConfidenceInterval", "bootstrap_ci", "bootstrap_ratio_ci", "bootstrap_counts_ci"]


@dataclass(frozen=True)
class ConfidenceInterval:
    """A statistic on the full sample with a percentile-bootstrap interval (:func:`bootstrap_ci`).

    Attributes:
        estimate: the statistic on all the documents, in its own units.
        low, high: the interval's ends (``low <= high``), the ``(1 - level) / 2`` and
            ``(1 + level) / 2`` quantiles of the statistic over resampled documents.
        level: the interval's coverage, in (0, 1) (0.95 for a 95 % interval).
        n: number of units resampled.
        n_boot: number of bootstrap resamples.
        unit: what was resampled ("documents" by default; e.g. "links" for a fraction of graph
            links, which are not independent: such an interval understates the uncertainty).

    Raises ValueError for non-finite ends, ``low > high`` or a level outside (0, 1).
    """

    estimate: float
    low: float
    high: float
    level: float
    n: int
    n_boot: int
    unit: str = "documents"

    def __post_init__(self) -> None:
        if not 0 < self.level < 1:
            raise ValueError(f"level must be in (0, 1), got {self.level!r}")
        if not all(math.isfinite(v) for v in (self.estimate, self.low, self.high)):
            raise ValueError(f"non-finite interval: estimate {self.estimate}, [{self.low}, {self.high}]")
        if self.low > self.high:
            raise ValueError(f"interval low {self.low} > high {self.high}")

    @property
    def se(self) -> float:
        """The standard error the interval implies for a normal statistic: ``(high - low) / (2 z)``,
        ``z`` the normal quantile of ``(1 + level) / 2`` (1.96 for 95 %)."""
        return (self.high - self.low) / (2 * NormalDist().inv_cdf((1 + self.level) / 2))


def _per_document(name: str, values: object) -> np.ndarray:
    """One number per document as a 1-D float64 array; rejects empty, non-finite and non-1-D input."""
    if hasattr(values, "detach"):  # a torch tensor (any device or dtype)
        values = values.detach().cpu().double().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be numbers, got {values!r}") from err
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D [n_documents], got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: need at least one document")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} has non-finite values at documents {np.flatnonzero(~np.isfinite(arr)).tolist()[:5]}")
    return arr


def _check_boot(n_boot: int, level: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


def _resampled_indices(n: int, n_boot: int, seed: int) -> Iterable[np.ndarray]:
    """Bootstrap resamples of ``n`` documents, drawn with replacement: ``[rows, n]`` index blocks
    (``n_boot`` rows in all, a few million indices per block to bound memory)."""
    rng = np.random.default_rng(seed)
    rows = max(1, 2**22 // n)
    for start in range(0, n_boot, rows):
        yield rng.integers(0, n, size=(min(rows, n_boot - start), n))


def _interval(estimate: float, boot: np.ndarray, level: float, n: int) -> ConfidenceInterval:
    low, high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return ConfidenceInterval(float(estimate), float(low), float(high), float(level), n, boot.size)


def _ratio_of_sums(numerator: np.ndarray, denominator: np.ndarray, n_boot: int, level: float,
                   seed: int) -> ConfidenceInterval:
    """``sum(numerator) / sum(denominator)`` with its interval, documents resampled together."""
    total = denominator.sum()
    if total == 0:
        raise ValueError("the denominator sums to 0 over the documents: the ratio is undefined")
    boot = []
    for idx in _resampled_indices(numerator.size, n_boot, seed):  # idx: [rows, n_documents]
        den = denominator[idx].sum(1)
        if (den == 0).any():
            raise ValueError("the denominator sums to 0 in a bootstrap resample: the ratio is undefined there")
        boot.append(numerator[idx].sum(1) / den)
    return _interval(numerator.sum() / total, np.concatenate(boot), level, numerator.size)


def bootstrap_ci(
    per_document: Sequence[float] | np.ndarray | Tensor,
    weights: Sequence[float] | np.ndarray | Tensor | None = None,
    statistic: Callable[..., float] | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    unit: str = "documents",
) -> ConfidenceInterval:
    """Percentile-bootstrap confidence interval of a statistic over documents (Efron & Tibshirani
    1993, *An Introduction to the Bootstrap*, ch. 13).

    ``per_document``: ``[n_documents]``, one number per held-out document (tokens of one document
    are not independent, so documents, not tokens, are resampled). ``n_boot`` resamples of
    ``n_documents`` documents are drawn with replacement (numpy generator seeded with ``seed``); the
    interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the statistic over
    them; ``estimate`` is the statistic on all documents.

    The statistic: by default the mean; with ``weights`` (``[n_documents]``, >= 0, e.g. each
    document's number of predicted tokens), the weighted mean ``sum(w x) / sum(w)``, so a document's
    mean loss per token with its token count as weight gives the mean loss per predicted token,
    ``sum(loss) / sum(count)``. A custom ``statistic`` is called on each resample as
    ``statistic(values)``, or ``statistic(values, weights)`` when weights are given, and must return
    a finite number. For a ratio of two per-document sums see :func:`bootstrap_ratio_ci`. ``unit``
    names what the values are per (the interval's :attr:`ConfidenceInterval.unit`), when it is not
    documents.

    Raises ValueError for empty, non-finite or non-1-D input, weights of another length, negative or
    summing to 0, ``n_boot < 1``, a level outside (0, 1), or a non-finite statistic.
    """
    _check_boot(n_boot, level)
    x = _per_document("per_document", per_document)
    w = None
    if weights is not None:
        w = _per_document("weights", weights)
        if w.shape != x.shape:
            raise ValueError(f"weights has {w.size} documents but per_document has {x.size}")
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got min {w.min()} and sum {w.sum()}")
    if statistic is None:
        ci = _ratio_of_sums(x * w if w is not None else x, w if w is not None else np.ones_like(x), n_boot, level, seed)
        return replace(ci, unit=unit)

    def stat(idx: np.ndarray) -> float:
        value = float(statistic(x[idx]) if w is None else statistic(x[idx], w[idx]))
        if not math.isfinite(value):
            raise ValueError(f"statistic returned a non-finite value {value}")
        return value

    boot = np.array([stat(row) for idx in _resampled_indices(x.size, n_boot, seed) for row in idx])
    return replace(_interval(stat(np.arange(x.size)), boot, level, x.size), unit=unit)


def bootstrap_ratio_ci(
    numerator: Sequence[float] | np.ndarray | Tensor,
    denominator: Sequence[float] | np.ndarray | Tensor,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> ConfidenceInterval:
    """Percentile-bootstrap interval of ``sum(numerator) / sum(denominator)``, documents resampled
    together (:func:`bootstrap_ci` for the method).

    ``numerator``, ``denominator``: ``[n_documents]``, each document's sum over its predicted
    tokens. Loss recovered, ``(L_ablated - L_spliced) / (L_ablated - L_original)`` with mean losses
    per predicted token, is the ratio of the per-document sums of ``loss_ablated - loss_spliced`` and
    of ``loss_ablated - loss_original`` (the token count cancels). ``estimate`` is the plain ratio on
    all documents.

    Raises ValueError as :func:`bootstrap_ci`, if the lengths differ, or if the denominator sums to
    0 over all documents or in a resample.
    """
    _check_boot(n_boot, level)
    num, den = _per_document("numerator", numerator), _per_document("denominator", denominator)
    if num.shape != den.shape:
        raise ValueError(f"numerator has {num.size} documents but denominator has {den.size}")
    return _ratio_of_sums(num, den, n_boot, level, seed)


def bootstrap_counts_ci(
    statistic: Callable[[np.ndarray], float],
    n_documents: int,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> ConfidenceInterval:
    """Percentile-bootstrap interval of a statistic that needs more than one number per document
    (e.g. the fraction of latents above a density, from per-document firing counts ``[n_documents,
    d_sae]``); :func:`bootstrap_ci` for the method.

    ``statistic(counts)`` gets ``counts`` ``[n_documents]`` (float64): how many times each document
    was drawn in one resample (all ones for the full sample, whose value is ``estimate``), so a sum
    over resampled documents is ``counts @ per_document_rows``. Resamples are drawn as in
    :func:`bootstrap_ci` (same seed, same documents drawn). Raises ValueError for ``n_documents <
    1``, ``n_boot < 1``, a level outside (0, 1), or a non-finite statistic.
    """
    _check_boot(n_boot, level)
    if isinstance(n_documents, bool) or not isinstance(n_documents, (int, np.integer)) or n_documents < 1:
        raise ValueError(f"n_documents must be a positive integer, got {n_documents!r}")

    def stat(counts: np.ndarray) -> float:
        value = float(statistic(counts))
        if not math.isfinite(value):
            raise ValueError(f"statistic returned a non-finite value {value}")
        return value

    boot = np.array([stat(np.bincount(row, minlength=n_documents).astype(np.float64))
                     for idx in _resampled_indices(n_documents, n_boot, seed) for row in idx])
    return _interval(stat(np.ones(n_documents)), boot, level, n_documents)
