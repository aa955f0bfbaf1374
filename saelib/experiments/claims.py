"""Claims checked by the notebooks: a statistic over seeds compared with the source's number.

Every notebook's checking cells follow one rule (``notebooks/README.md``):

* a **claim** is a statistic over seeds (the median, or a count of seeds) compared with a number or
  a bound taken from the source (a post, comment, paper or repository in REFERENCES.md);
* its **tolerance comes from the seed spread**: two standard errors of the median,
  ``tol = 2 · 1.2533 · 1.4826 · MAD / sqrt(n)`` (the MAD scaled to a standard deviation, times the
  asymptotic standard error of a median, so one stuck seed does not widen it); for a difference of
  two medians the two standard errors add in quadrature; a count has no tolerance;
* a published value read off a figure or quoted as "≈ 0.2" is also given the precision of how it
  was published (half a unit of its last digit, e.g. 0.05 for "≈ 0.2");
* a prediction for one trained SAE (a closed form) is judged against the seeds themselves: it holds
  when it lies within two robust standard deviations (``2 · 1.4826 · MAD``) of the seeds' median,
  i.e. when it looks like one more seed (:func:`within_seed_spread`);
* an ``≈`` claim **holds** when the statistic is within tolerance + precision of the published
  value; a direction claim ("above", "below", "A above B") holds only when the statistic clears the
  bound by more than the tolerance, so a difference lost in the seed noise is reported as *not
  reproduced*, never as confirmed.

What nbval compares (``# NBVAL_CHECK_OUTPUT``) is :func:`verdicts`: the claims in words with the
published numbers and whether each was reproduced, never a measured digit, so the comparison is
the same on any CPU or GPU whose rounding moves the measured numbers within the seed spread. The
measured numbers go in a ``# NBVAL_IGNORE_OUTPUT`` cell through :func:`claims_table`.

A change of machine moves a trained SAE about as much as a change of seed does: the statistic on
another machine is like an independent redraw of the seeds: it differs from this run's by sqrt(2)
standard errors (one standard deviation of the difference of two draws). A claim is decided here
only when its margin exceeds ``NOISE_MARGIN_SE`` = 2 · sqrt(2) = 2.83 standard errors; a claim
within that band is *within the seed noise*: recorded as such, printed as such, and asserted only
to stay near its bound (:func:`check_claims`). Seen on this project's toy notebooks under
``ATEN_CPU_CAPABILITY=default``: medians of 8 seeds moved by up to 2.2 standard errors, and an
all-seed count went from 8 of 8 to 7 of 8.

**Uncertainty from the data.** A real-model claim rests on one trained model, so it has no seed
spread; its uncertainty comes from the held-out data instead: a percentile bootstrap over documents
(:func:`saelib.experiments.bootstrap.bootstrap_ci`; ``bootstrap_ratio_ci`` for a ratio of two per-document sums such as loss
recovered). :func:`approx`, :func:`between`, :func:`above` and :func:`below` take such a
:class:`ConfidenceInterval` in place of the seed values and use it as the toy claims use the seed
spread: a direction claim holds when the whole interval clears the bound, an ``≈`` / range claim
when the interval (widened by the published precision) reaches the published value or range. The
interval's standard error, ``(high - low) / (2 z)`` with ``z`` the normal quantile of its level,
plays the part of the seed standard error in the noise band above. (A 95 % interval is about
two standard errors each side, like the seed tolerance.)

**Convergence is part of the claim.** A real-model claim's statistic is measured at three or more
checkpoints of one training run (for example after 1/4, 1/2 and all of the tokens), building the
same claim at each, and :func:`converged` joins them into one claim. It is decided (reproduced /
NOT reproduced, or within the noise) only when its **last two points agree**: ``|last - previous|
<= 2 · se`` with ``se`` the standard error at the last point (from the seed spread or the
interval: about its tolerance); a boolean finding's last two verdicts must be the same. Otherwise
its verdict is **undecided at this scale**: :func:`check_claims` asserts it stays undecided (the
run that records it lists it in ``undecided``), its verdict line says so with no digit, and
``Claim.decided_by`` says what scale would decide it ("more training tokens than N", with a
geometric extrapolation of the shrinking steps where the curve is levelling off, marked as one).
A statistic with no uncertainty (one value, no interval) converges only when its last two points
are equal: give it an interval.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from .bootstrap import ConfidenceInterval, bootstrap_ci, bootstrap_ratio_ci

__all__ = [
    "Claim",
    "ConfidenceInterval",
    "bootstrap_ci",
    "bootstrap_ratio_ci",
    "converged",
    "converged_claims",
    "seed_median",
    "seed_tolerance",
    "seed_spread",
    "approx",
    "within_seed_spread",
    "between",
    "above",
    "below",
    "difference_approx",
    "difference_above",
    "count_at_least",
    "count_below",
    "finding",
    "at_full_size",
    "claims_table",
    "verdicts",
    "check_claims",
]

# the median's asymptotic standard error is sqrt(pi / 2) = 1.2533 standard deviations / sqrt(n);
# 1.4826 * MAD estimates the standard deviation of normal data (robust to one stuck seed)
_SE_MEDIAN = math.sqrt(math.pi / 2)
_MAD_TO_SD = 1.4826
N_STANDARD_ERRORS = 2.0
# Another machine's run (other rounding) is like an independent draw of all the seeds: its statistic
# differs from this run's by sqrt(2) standard errors (one standard deviation of the difference of
# two draws). A verdict whose margin is under N_STANDARD_ERRORS of those, 2 * sqrt(2) = 2.83 SE,
# flips on another machine with a probability above about 2 % (one-sided normal tail at 2), so this
# run does not decide it: it is within the seed noise.
NOISE_MARGIN_SE = N_STANDARD_ERRORS * math.sqrt(2)
# a claim recorded as within the seed noise must stay within this many standard errors of flipping on
# a later run: its own band plus one more band for the run-to-run move
NOISE_BAND_SE = 2 * NOISE_MARGIN_SE


def _values(name: str, values: Iterable[float] | np.ndarray) -> np.ndarray:
    """Seed values as a 1-D float array; rejects empty and non-finite input naming the claim."""
    if isinstance(values, ConfidenceInterval):
        raise TypeError(f"claim {name!r}: takes seed values, not a confidence interval (approx, between, above "
                        "and below take one)")
    if not hasattr(values, "__len__"):
        values = list(values)  # a generator
    try:
        arr = np.asarray(values, dtype=float).ravel()
    except (TypeError, ValueError) as err:
        raise TypeError(f"claim {name!r}: values must be numbers, got {values!r}") from err
    if arr.size == 0:
        raise ValueError(f"claim {name!r}: no seed values given")
    if not np.isfinite(arr).all():
        raise ValueError(f"claim {name!r}: non-finite seed values {arr.tolist()}")
    return arr


def seed_median(values: Iterable[float]) -> float:
    """The median over seeds of ``values`` (``[n_seeds]``). Raises ValueError if empty or non-finite."""
    return float(np.median(_values("median", values)))


def seed_tolerance(values: Iterable[float]) -> float:
    """Two standard errors of the median over seeds: ``2 · 1.2533 · 1.4826 · MAD / sqrt(n)``.

    ``values``: ``[n_seeds]``, one statistic per independently trained SAE. Zero when more than
    half the seeds agree exactly. Raises ValueError if empty or non-finite.
    """
    arr = _values("tolerance", values)
    return N_STANDARD_ERRORS * _SE_MEDIAN * seed_spread(arr) / math.sqrt(arr.size)


def seed_spread(values: Iterable[float]) -> float:
    """``1.4826 · MAD``: the spread of one seed (a standard deviation for normal data), robust to
    a stuck seed. ``values``: ``[n_seeds]``. Raises ValueError if empty or non-finite."""
    arr = _values("spread", values)
    return _MAD_TO_SD * float(np.median(np.abs(arr - np.median(arr))))


@dataclass(frozen=True)
class _Statistic:
    """A claim's statistic with its uncertainty: ``down`` / ``up`` how far it may plausibly lie below
    / above ``measured`` (the seed tolerance both ways, or the distance to an interval's ends)."""

    measured: float
    down: float
    up: float
    tolerance: float
    se: float
    n_seeds: int
    interval: ConfidenceInterval | None = None


def _statistic(text: str, values: Iterable[float] | ConfidenceInterval) -> _Statistic:
    """The median over seeds with ``seed_tolerance`` both ways, or a bootstrap interval's estimate
    with the distances to its ends (one trained model: ``n_seeds = 1``)."""
    if isinstance(values, ConfidenceInterval):
        ci = values
        return _Statistic(ci.estimate, ci.estimate - ci.low, ci.high - ci.estimate, (ci.high - ci.low) / 2, ci.se,
                          1, ci)
    arr = _values(text, values)
    tol = seed_tolerance(arr)
    return _Statistic(float(np.median(arr)), tol, tol, tol, tol / 2, arr.size)


@dataclass(frozen=True)
class Claim:
    """One claim of a source, checked on a statistic over seeds.

    Attributes:
        text: the claim in words (what the verdict line prints).
        published: the source's number or bound, as the source gives it (e.g. ``"≈ +0.2"``).
        source: who claims it (a key of REFERENCES.md such as ``"[Nabeshima 2024]"``, or
            ``"this project"`` for a finding).
        measured: the statistic (median over seeds, difference of medians, or a count).
        tolerance: the tolerance from the seed spread (0 for counts), in the statistic's units.
        n_seeds: number of seeds behind the statistic.
        holds: whether the claim holds within the tolerance.
        margin: signed distance of the statistic from the point where ``holds`` would flip, in the
            statistic's units (>= 0 when it holds); NaN for a boolean finding.
        se: one standard error of the statistic (half the tolerance; for a count of seeds the
            binomial ``sqrt(n p (1 - p))`` with the Jeffreys rate ``p = (count + 1/2) / (n + 1)``,
            never 0); 0 for a boolean finding. A claim with
            ``|margin| < NOISE_MARGIN_SE · se`` (2.83 SE) is within the seed noise: another machine
            or seed may decide it the other way (see :func:`check_claims`).
        full_size: the claim speaks about the full-size run only (a language-model notebook's
            scientific claim; :func:`at_full_size`).
        judged: False for a ``full_size`` claim measured in a quick run (``SAELIB_QUICK=1``):
            its statistic is shown but not asserted, and its verdict line repeats the one
            recorded by the full run.
        interval: the bootstrap interval the statistic and tolerance come from (one trained model;
            ``n_seeds`` is then 1), or None for a statistic over seeds.
        curve: the statistic at each checkpoint of the training run, oldest first (the last is
            ``measured``); empty for a claim measured once (:func:`converged`).
        tokens: training tokens seen at each point of ``curve``.
        curve_se: one standard error of the statistic at each point of ``curve``.
        converged: False when the last two points of ``curve`` disagree: the claim is *undecided at
            this scale* whatever ``holds`` says. True for a claim without a curve.
        decided_by: for an unconverged claim, what scale would decide it ("more training tokens
            than N", with an extrapolation where one is possible); empty otherwise.
    """

    text: str
    published: str
    source: str
    measured: float
    tolerance: float
    n_seeds: int
    holds: bool
    margin: float = float("nan")
    se: float = 0.0
    full_size: bool = False
    judged: bool = True
    interval: ConfidenceInterval | None = None
    curve: tuple[float, ...] = ()
    tokens: tuple[int, ...] = ()
    curve_se: tuple[float, ...] = ()
    converged: bool = True
    decided_by: str = ""

    @property
    def undecided(self) -> bool:
        """True when the statistic has not settled over training (:func:`converged`): undecided at
        this scale."""
        return not self.converged

    @property
    def within_noise(self) -> bool:
        """True when the statistic lies within ``NOISE_MARGIN_SE`` (2 · sqrt(2) = 2.83) standard errors
        of the point where the verdict flips: a rerun of the seeds on another machine decides it the
        other way with a probability above about 2 %."""
        return not math.isnan(self.margin) and abs(self.margin) < NOISE_MARGIN_SE * self.se


def _claim(text: str, published: str, source: str, st: _Statistic, margin: float, holds: bool) -> Claim:
    return Claim(text, published, source, st.measured, st.tolerance, st.n_seeds, holds, margin, st.se,
                 interval=st.interval)


def approx(text: str, values: Iterable[float] | ConfidenceInterval, published: float, precision: float, *,
           source: str) -> Claim:
    """Claim "the median over seeds is ≈ ``published``".

    Holds when ``|median - published| <= tolerance + precision``; ``precision`` is how precisely the
    source gave the number (half a unit of its last digit: 0.05 for "≈ 0.2"). ``values``: the seed
    values ``[n_seeds]``, or a :class:`ConfidenceInterval` of one model's statistic: then it holds
    when ``published`` lies in ``[low - precision, high + precision]``. Raises ValueError for a
    negative precision or empty / non-finite values.
    """
    if precision < 0:
        raise ValueError(f"claim {text!r}: precision must be >= 0, got {precision}")
    st = _statistic(text, values)
    toward = st.down if st.measured >= published else st.up  # the uncertainty on the side of the published value
    margin = toward + precision - abs(st.measured - published)
    return _claim(text, f"≈ {published:+g}", source, st, margin, margin >= 0)


def within_seed_spread(text: str, values: Iterable[float], predicted: float, *, source: str) -> Claim:
    """Claim "``predicted`` is what one trained SAE gives": a prediction for a single SAE (e.g. a
    closed form) holds when ``|median - predicted| <= 2 · 1.4826 · MAD`` over the seeds (two
    robust standard deviations of one seed, not of the median). Raises ValueError for empty or
    non-finite values.
    """
    arr = _values(text, values)
    med, tol_median = float(np.median(arr)), seed_tolerance(arr)
    tol = N_STANDARD_ERRORS * seed_spread(arr)
    margin = tol - abs(med - predicted)
    return Claim(text, f"{predicted:+.3f}", source, med, tol, arr.size, margin >= 0, margin, tol_median / 2)


def between(text: str, values: Iterable[float] | ConfidenceInterval, low: float, high: float, *, source: str,
            published: str | None = None) -> Claim:
    """Claim "the median over seeds lies in [low, high]" (a range the source gives, like ``≈``
    claims), each end moved out by the tolerance (given a :class:`ConfidenceInterval`: it holds
    when the interval overlaps ``[low, high]``).

    Raises ValueError if ``low > high`` or the values are empty / non-finite.
    """
    if low > high:
        raise ValueError(f"claim {text!r}: low {low} > high {high}")
    st = _statistic(text, values)
    margin = min(st.measured - (low - st.up), (high + st.down) - st.measured)
    return _claim(text, published or f"{low:g} to {high:g}", source, st, margin, margin >= 0)


def above(text: str, values: Iterable[float] | ConfidenceInterval, bound: float, *, source: str,
          published: str | None = None) -> Claim:
    """Claim "the median over seeds is above ``bound``": holds when ``median - tolerance > bound``
    (given a :class:`ConfidenceInterval`: when its low end is above ``bound``)."""
    st = _statistic(text, values)
    margin = st.measured - st.down - bound
    return _claim(text, published or f"> {bound:g}", source, st, margin, margin > 0)


def below(text: str, values: Iterable[float] | ConfidenceInterval, bound: float, *, source: str,
          published: str | None = None) -> Claim:
    """Claim "the median over seeds is below ``bound``": holds when ``median + tolerance < bound``
    (given a :class:`ConfidenceInterval`: when its high end is below ``bound``)."""
    st = _statistic(text, values)
    margin = bound - st.measured - st.up
    return _claim(text, published or f"< {bound:g}", source, st, margin, margin > 0)


def _difference(text: str, a: Iterable[float], b: Iterable[float]) -> tuple[float, float, int]:
    arr_a, arr_b = _values(text, a), _values(text, b)
    diff = float(np.median(arr_a) - np.median(arr_b))
    tol = math.hypot(seed_tolerance(arr_a), seed_tolerance(arr_b))
    return diff, tol, min(arr_a.size, arr_b.size)


def difference_approx(text: str, a: Iterable[float], b: Iterable[float], published: float = 0.0,
                      precision: float = 0.0, *, source: str) -> Claim:
    """Claim "median(a) - median(b) ≈ ``published``" (e.g. 0: two variants are about equal).

    Tolerance: the two medians' tolerances in quadrature, plus ``precision`` of the published value.
    """
    diff, tol, n = _difference(text, a, b)
    margin = tol + precision - abs(diff - published)
    return Claim(text, f"difference ≈ {published:+g}", source, diff, tol, n, margin >= 0, margin, tol / 2)


def difference_above(text: str, a: Iterable[float], b: Iterable[float], bound: float = 0.0, *,
                     source: str, published: str | None = None) -> Claim:
    """Claim "median(a) - median(b) > ``bound``": holds when the difference exceeds ``bound + tol``
    with ``tol`` the two tolerances in quadrature."""
    diff, tol, n = _difference(text, a, b)
    margin = diff - tol - bound
    return Claim(text, published or f"difference > {bound:+g}", source, diff, tol, n, margin > 0, margin, tol / 2)


def _binomial_se(n: int, total: int) -> float:
    """One standard error of a count of ``n`` seeds out of ``total``: ``sqrt(total p (1 - p))`` with
    ``p = (n + 1/2) / (total + 1)``, the rate's posterior mean under Jeffreys' prior Beta(1/2, 1/2).

    The plain estimate ``p = n / total`` gives a standard error of 0 when every seed agrees
    (8 of 8, 0 of 8), as if the rate were known exactly: a claim like "in every seed" would then
    never be within the seed noise, although a ninth seed, or the same eight seeds on a CPU that
    rounds differently, may disagree (seen: 8/8 here, 7/8 under ``ATEN_CPU_CAPABILITY=default``).
    With the half-count the standard error of 8 of 8 is ``sqrt(8 · 17/18 · 1/18) ≈ 0.65`` seeds.
    """
    p = (n + 0.5) / (total + 1)
    return math.sqrt(total * p * (1 - p))


def _flags(text: str, flags: Iterable[bool]) -> list[bool]:
    out = [bool(f) for f in flags]
    if not out:
        raise ValueError(f"claim {text!r}: no seeds given")
    return out


def count_at_least(text: str, flags: Iterable[bool], k: int, *, source: str,
                   published: str | None = None) -> Claim:
    """Claim "at least ``k`` of the seeds show it" (``flags``: one bool per seed). A count has no
    tolerance. Raises ValueError if ``k`` is outside ``[0, n_seeds]`` or no seeds are given."""
    fl = _flags(text, flags)
    if not 0 <= k <= len(fl):
        raise ValueError(f"claim {text!r}: k must be in [0, {len(fl)}], got {k}")
    n = sum(fl)
    return Claim(text, published or f">= {k}/{len(fl)} seeds", source, float(n), 0.0, len(fl), n >= k,
                 n - k + 0.5, _binomial_se(n, len(fl)))


def count_below(text: str, flags: Iterable[bool], k: int, *, source: str,
                published: str | None = None) -> Claim:
    """Claim "fewer than ``k`` of the seeds show it" (``flags``: one bool per seed)."""
    fl = _flags(text, flags)
    if not 0 <= k <= len(fl) + 1:
        raise ValueError(f"claim {text!r}: k must be in [0, {len(fl) + 1}], got {k}")
    n = sum(fl)
    return Claim(text, published or f"< {k}/{len(fl)} seeds", source, float(n), 0.0, len(fl), n < k,
                 k - 0.5 - n, _binomial_se(n, len(fl)))


def finding(text: str, holds: bool, *, source: str = "this project", measured: float = float("nan"),
            published: str = "—") -> Claim:
    """A claim checked by a boolean (no seed statistic: a single run, or a structural property)."""
    return Claim(text, published, source, float(measured), 0.0, 1, bool(holds))


def at_full_size(claim: Claim, quick: bool) -> Claim:
    """Mark ``claim`` as one that only the full-size run decides.

    Language-model notebooks run twice: at full size in the main job (``make figures``) and on a
    few documents under ``make test`` (``quick``). A scientific claim about the full-size numbers
    (a published percentage, a comparison between SAEs trained on the whole corpus) says nothing
    at quick size, so there it is measured and shown but not asserted; its verdict line (marked
    "judged at full size") repeats what the full run recorded in ``NOT_REPRODUCED`` /
    ``WITHIN_NOISE``, which the full run asserts (:func:`check_claims`). Claims about the
    implementation (a context starts at the maximum, a spliced loss lies between the clean and
    the ablated loss) hold at any size and are not marked.
    """
    return replace(claim, full_size=True, judged=not quick)


def _step_tolerance(claim: Claim) -> float:
    """How far the last two points of a curve may differ and still agree: two standard errors of
    the statistic at the last point (its tolerance, for a median over seeds or a 95 % interval)."""
    return N_STANDARD_ERRORS * claim.se


def _extrapolate(curve: Sequence[float], tokens: Sequence[int], tol: float) -> str:
    """Tokens at which the step between checkpoints would fall within ``tol``, if each step keeps
    shrinking by the factor of the last two steps and the checkpoints keep the last token ratio."""
    (m1, m2, m3), (t2, t3) = curve[-3:], tokens[-2:]
    first, last = m2 - m1, m3 - m2
    if tol <= 0 or not all(map(math.isfinite, (first, last))) or first * last <= 0 or abs(last) >= abs(first):
        return " (the steps are not shrinking: no extrapolation)"
    ratio, growth = abs(last) / abs(first), t3 / t2
    steps = max(1, math.ceil(math.log(tol / abs(last)) / math.log(ratio)))
    return (f"; about {t3 * growth ** steps:,.0f} by extrapolation (if each x{growth:g} step in tokens keeps "
            f"shrinking the change by {ratio:.2f}, the last ratio: not a measurement)")


def converged(claims_at_points: Sequence[Claim], tokens: Sequence[int]) -> Claim:
    """One claim from its statistic at three or more checkpoints of one training run.

    ``claims_at_points``: the same claim (same text and source) built at each checkpoint, oldest
    first, e.g. ``[cl.above(text, ci_k, 0.8, source=S) for ci_k in intervals]``; ``tokens``: the
    training tokens seen at each, strictly increasing. The last two points **agree** when
    ``|last - previous| <= 2 · se`` of the last point (its tolerance for a median over seeds or a
    95 % interval; two binomial standard errors for a count); a boolean finding's last two verdicts
    must be equal. Then the result is the last claim, decided as usual; otherwise it is *undecided
    at this scale* (``converged=False``): :func:`check_claims` expects it in ``undecided``, and
    ``decided_by`` says "more training tokens than N" (N the last point), with a geometric
    extrapolation where the last three points are levelling off. Either way the result carries the
    ``curve`` and ``tokens`` for :func:`claims_table` and a convergence plot.

    Raises ValueError for fewer than three points, a different number of token counts, token counts
    not positive and strictly increasing, or claims of different text or source.
    """
    points = list(claims_at_points)
    seen = [int(t) for t in tokens]
    if len(points) < 3:
        raise ValueError(f"a convergence curve needs three or more checkpoints, got {len(points)}")
    if len(seen) != len(points):
        raise ValueError(f"{len(points)} claims but {len(seen)} token counts")
    if seen[0] <= 0 or any(b <= a for a, b in zip(seen, seen[1:])):
        raise ValueError(f"tokens must be positive and strictly increasing, got {seen}")
    last, previous = points[-1], points[-2]
    other = [(c.text, c.source) for c in points if (c.text, c.source) != (last.text, last.source)]
    if other:
        raise ValueError(f"the checkpoints must measure one claim ({last.text!r}, {last.source}), got {other}")
    curve = tuple(float(c.measured) for c in points)
    tol = _step_tolerance(last)
    if math.isnan(last.margin):  # a boolean finding: its verdict must not change
        agree = last.holds == previous.holds
    else:
        agree = abs(curve[-1] - curve[-2]) <= tol
    decided_by = ""
    if not agree:
        decided_by = f"more training tokens than {seen[-1]:,}"
        decided_by += (" (the verdict changed between the last two checkpoints)" if math.isnan(last.margin)
                       else _extrapolate(curve, seen, tol))
    return replace(last, curve=curve, tokens=tuple(seen), curve_se=tuple(float(c.se) for c in points),
                   converged=agree, decided_by=decided_by)


def converged_claims(claims_per_point: Sequence[Sequence[Claim]], tokens: Sequence[int]) -> list[Claim]:
    """:func:`converged` for a list of claims built at each checkpoint: ``claims_per_point[k]`` is
    the list built at checkpoint ``k`` (oldest first, the same claims in the same order at every
    point), ``tokens[k]`` the training tokens seen there. Returns one claim per position. Raises
    ValueError if the lists differ in length, and as :func:`converged`."""
    lengths = {len(cs) for cs in claims_per_point}
    if len(lengths) > 1:
        raise ValueError(f"every checkpoint must build the same claims; got lists of lengths {sorted(lengths)}")
    return [converged(points, tokens) for points in zip(*claims_per_point)]


def _convergence(c: Claim) -> str:
    """The table's convergence cell: the last step against its tolerance, or what would decide it."""
    if not c.curve:
        return "—"
    if math.isnan(c.margin):
        step = "verdict " + ("unchanged" if c.converged else "changed")
    else:
        step = f"step {_fmt(c.curve[-1] - c.curve[-2])} vs ± {_step_tolerance(c):.3f}"
    where = f"{c.tokens[-2]:,} → {c.tokens[-1]:,} tokens"
    return f"{step}, {where}: " + ("converged" if c.converged else f"undecided: {c.decided_by}")


def _fmt(v: float) -> str:
    return "—" if math.isnan(v) else f"{v:+.3f}" if abs(v) < 10 else f"{v:.1f}"


def claims_table(claims: Sequence[Claim]) -> str:
    """Markdown table of the claims: published beside measured ± tolerance, the margin from the
    verdict's flipping point in standard errors, the number of seeds, and whether it holds
    (``~`` marks a claim within ``NOISE_MARGIN_SE`` standard errors of flipping: within the seed noise).

    A claim with a bootstrap interval shows it beside its tolerance. When some claim has a
    convergence curve (:func:`converged`), a last column gives its last step against the step
    tolerance, or, for a claim undecided at this scale, what would decide it; its ``holds`` reads
    "undecided" with the current verdict in brackets.

    Measured numbers vary with the machine's rounding: show it in a ``# NBVAL_IGNORE_OUTPUT`` cell.
    """
    curves = any(c.curve for c in claims)
    rows = ["| claim | source | published | measured | ± tol (seed spread) | margin / SE | seeds | holds |"
            + (" convergence |" if curves else ""),
            "|---|---|---|---|---|---|---|---|" + ("---|" if curves else "")]
    for c in claims:
        ratio = "—" if math.isnan(c.margin) else "∞" if c.se == 0 else f"{c.margin / c.se:+.1f}"
        holds = ("yes" if c.holds else "**no**") + (" ~" if c.within_noise else "")
        if c.undecided:
            holds = f"undecided (now {holds})"
        if not c.judged:
            holds += " (quick run: not judged)"
        tol = f"{c.tolerance:.3f}"
        if c.interval is not None:
            ci = c.interval
            tol += f" ({ci.level:.0%} CI [{_fmt(ci.low)}, {_fmt(ci.high)}] over {ci.n} {ci.unit})"
        rows.append(f"| {c.text} | {c.source} | {c.published} | {_fmt(c.measured)} | "
                    f"{tol} | {ratio} | {c.n_seeds} | {holds} |" + (f" {_convergence(c)} |" if curves else ""))
    return "\n".join(rows)


def verdicts(claims: Sequence[Claim], within_noise: Iterable[str] = (), not_reproduced: Iterable[str] = (),
             undecided: Iterable[str] = ()) -> str:
    """One line per claim, with no measured digit: ``reproduced`` / ``NOT reproduced`` (or, for the
    project's own findings, ``holds`` / ``does not hold``; for the claims named in ``within_noise``,
    ``within the seed noise``; for those named in ``undecided``, ``undecided at this scale``), the
    claim and the published number. Stable across machines
    whenever the claims are decided the same way. A claim not judged in this run
    (:func:`at_full_size` in a quick run) prints the verdict recorded for the full run
    (``not_reproduced`` / ``within_noise`` / ``undecided``); every ``full_size`` claim's line ends with
    "judged at full size", in both runs, so the two runs print the same lines."""
    noisy, expected_false, unsettled = set(within_noise), set(not_reproduced), set(undecided)
    lines = []
    for c in claims:
        own = c.source == "this project"
        holds = c.holds if c.judged else c.text not in expected_false
        if c.text in unsettled:
            verdict = "undecided at this scale"
        elif c.text in noisy:
            verdict = "within the seed noise"
        elif own:
            verdict = "holds" if holds else "does not hold"
        else:
            verdict = "reproduced" if holds else "NOT reproduced"
        tag = " [judged at full size]" if c.full_size else ""
        lines.append(f"[{verdict}] {c.text} ({c.source}: {c.published}){tag}")
    return "\n".join(lines)


def check_claims(claims: Sequence[Claim], not_reproduced: Iterable[str] = (),
                 within_noise: Iterable[str] = (), undecided: Iterable[str] = ()) -> str:
    """Assert each claim is decided as recorded; return :func:`verdicts` for nbval to compare.

    Every claim must hold, except those in ``not_reproduced`` (this project's data contradict the
    source; the notebook's prose says so), which must *not* hold, and those in ``within_noise``:
    claims whose statistic came out within ``NOISE_MARGIN_SE`` (2.83) standard errors of the point
    where the verdict flips (``Claim.within_noise`` on the run that recorded them). Another
    machine's rounding, like another seed, may decide those either way, so their verdict is not
    asserted; instead they must stay within ``NOISE_BAND_SE`` (5.66) standard errors of flipping
    (a claim that moves far from its bound must be decided again). Claims in ``undecided`` are
    those whose last two checkpoints disagree (:func:`converged`): their verdict is not asserted,
    only that they are still unconverged (one whose curve has settled must be decided again); a
    claim whose curve has not settled must be listed there. Claims not judged in this run
    (:func:`at_full_size` in a quick run) are not asserted; their lines repeat the recorded verdict.

    Raises:
        AssertionError: naming every claim decided otherwise than recorded.
        ValueError: a name in ``not_reproduced`` / ``within_noise`` / ``undecided`` that is not a
            claim, or in two of them.
    """
    texts = {c.text for c in claims}
    expected_false, noisy, unsettled = set(not_reproduced), set(within_noise), set(undecided)
    unknown = (expected_false | noisy | unsettled) - texts
    if unknown:
        raise ValueError(f"not_reproduced / within_noise / undecided name unknown claims: {sorted(unknown)}")
    twice = (expected_false & noisy) | (expected_false & unsettled) | (noisy & unsettled)
    if twice:
        raise ValueError(f"claims in both of two lists (not_reproduced, within_noise, undecided): {sorted(twice)}")
    judged = [c for c in claims if c.judged]
    settled = [c for c in judged if c.text in unsettled and c.converged]
    unsettled_unlisted = [c for c in judged if c.text not in unsettled and not c.converged]
    decided = [c for c in judged if c.converged and c.text not in unsettled]
    wrong = [c for c in decided if c.text not in noisy and c.holds == (c.text in expected_false)]
    drifted = [c for c in decided if c.text in noisy and not abs(c.margin) <= NOISE_BAND_SE * c.se]
    if wrong or drifted or settled or unsettled_unlisted:
        raise AssertionError("claims decided otherwise than recorded:\n" + "\n".join(
            [f"  {c.text}: measured {_fmt(c.measured)} ± {c.tolerance:.3f} over {c.n_seeds} seeds, "
             f"published {c.published}, holds={c.holds}" for c in wrong]
            + [f"  {c.text}: recorded as within the seed noise but {c.margin:+.3g} from flipping "
               f"(SE {c.se:.3g})" for c in drifted]
            + [f"  {c.text}: recorded as undecided at this scale but "
               + ("its last two checkpoints agree" if c.curve else "it has no convergence curve")
               for c in settled]
            + [f"  {c.text}: undecided at this scale (its last two checkpoints disagree; decided by "
               f"{c.decided_by}) but not recorded in undecided" for c in unsettled_unlisted]))
    return verdicts(claims, noisy, expected_false, unsettled)
