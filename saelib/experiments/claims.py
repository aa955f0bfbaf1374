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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

__all__ = [
    "Claim",
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


def _median_and_tolerance(text: str, values: Iterable[float]) -> tuple[np.ndarray, float, float]:
    """``(values as an array, their median, seed_tolerance)``, validated under the claim's name."""
    arr = _values(text, values)
    return arr, float(np.median(arr)), seed_tolerance(arr)


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

    @property
    def within_noise(self) -> bool:
        """True when the statistic lies within ``NOISE_MARGIN_SE`` (2 · sqrt(2) = 2.83) standard errors
        of the point where the verdict flips: a rerun of the seeds on another machine decides it the
        other way with a probability above about 2 %."""
        return not math.isnan(self.margin) and abs(self.margin) < NOISE_MARGIN_SE * self.se


def approx(text: str, values: Iterable[float], published: float, precision: float, *,
           source: str) -> Claim:
    """Claim "the median over seeds is ≈ ``published``".

    Holds when ``|median - published| <= tolerance + precision``; ``precision`` is how precisely the
    source gave the number (half a unit of its last digit: 0.05 for "≈ 0.2"). Raises ValueError
    for a negative precision or empty / non-finite values.
    """
    if precision < 0:
        raise ValueError(f"claim {text!r}: precision must be >= 0, got {precision}")
    arr, med, tol = _median_and_tolerance(text, values)
    margin = tol + precision - abs(med - published)
    return Claim(text, f"≈ {published:+g}", source, med, tol, arr.size, margin >= 0, margin, tol / 2)


def within_seed_spread(text: str, values: Iterable[float], predicted: float, *, source: str) -> Claim:
    """Claim "``predicted`` is what one trained SAE gives": a prediction for a single SAE (e.g. a
    closed form) holds when ``|median - predicted| <= 2 · 1.4826 · MAD`` over the seeds (two
    robust standard deviations of one seed, not of the median). Raises ValueError for empty or
    non-finite values.
    """
    arr, med, tol_median = _median_and_tolerance(text, values)
    tol = N_STANDARD_ERRORS * seed_spread(arr)
    margin = tol - abs(med - predicted)
    return Claim(text, f"{predicted:+.3f}", source, med, tol, arr.size, margin >= 0, margin, tol_median / 2)


def between(text: str, values: Iterable[float], low: float, high: float, *, source: str,
            published: str | None = None) -> Claim:
    """Claim "the median over seeds lies in [low, high]" (a range the source gives, like ``≈``
    claims), each end moved out by the tolerance.

    Raises ValueError if ``low > high`` or the values are empty / non-finite.
    """
    if low > high:
        raise ValueError(f"claim {text!r}: low {low} > high {high}")
    arr, med, tol = _median_and_tolerance(text, values)
    margin = min(med - (low - tol), (high + tol) - med)
    return Claim(text, published or f"{low:g} to {high:g}", source, med, tol, arr.size, margin >= 0, margin,
                 tol / 2)


def above(text: str, values: Iterable[float], bound: float, *, source: str,
          published: str | None = None) -> Claim:
    """Claim "the median over seeds is above ``bound``": holds when ``median - tolerance > bound``."""
    arr, med, tol = _median_and_tolerance(text, values)
    margin = med - tol - bound
    return Claim(text, published or f"> {bound:g}", source, med, tol, arr.size, margin > 0, margin, tol / 2)


def below(text: str, values: Iterable[float], bound: float, *, source: str,
          published: str | None = None) -> Claim:
    """Claim "the median over seeds is below ``bound``": holds when ``median + tolerance < bound``."""
    arr, med, tol = _median_and_tolerance(text, values)
    margin = bound - med - tol
    return Claim(text, published or f"< {bound:g}", source, med, tol, arr.size, margin > 0, margin, tol / 2)


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


def _fmt(v: float) -> str:
    return "—" if math.isnan(v) else f"{v:+.3f}" if abs(v) < 10 else f"{v:.1f}"


def claims_table(claims: Sequence[Claim]) -> str:
    """Markdown table of the claims: published beside measured ± tolerance, the margin from the
    verdict's flipping point in standard errors, the number of seeds, and whether it holds
    (``~`` marks a claim within ``NOISE_MARGIN_SE`` standard errors of flipping: within the seed noise).

    Measured numbers vary with the machine's rounding: show it in a ``# NBVAL_IGNORE_OUTPUT`` cell.
    """
    rows = ["| claim | source | published | measured | ± tol (seed spread) | margin / SE | seeds | holds |",
            "|---|---|---|---|---|---|---|---|"]
    for c in claims:
        ratio = "—" if math.isnan(c.margin) else "∞" if c.se == 0 else f"{c.margin / c.se:+.1f}"
        holds = ("yes" if c.holds else "**no**") + (" ~" if c.within_noise else "")
        if not c.judged:
            holds += " (quick run: not judged)"
        rows.append(f"| {c.text} | {c.source} | {c.published} | {_fmt(c.measured)} | "
                    f"{c.tolerance:.3f} | {ratio} | {c.n_seeds} | {holds} |")
    return "\n".join(rows)


def verdicts(claims: Sequence[Claim], within_noise: Iterable[str] = (), not_reproduced: Iterable[str] = ()) -> str:
    """One line per claim, with no measured digit: ``reproduced`` / ``NOT reproduced`` (or, for the
    project's own findings, ``holds`` / ``does not hold``; for the claims named in ``within_noise``,
    ``within the seed noise``), the claim and the published number. Stable across machines
    whenever the claims are decided the same way. A claim not judged in this run
    (:func:`at_full_size` in a quick run) prints the verdict recorded for the full run
    (``not_reproduced`` / ``within_noise``); every ``full_size`` claim's line ends with
    "judged at full size", in both runs, so the two runs print the same lines."""
    noisy, expected_false = set(within_noise), set(not_reproduced)
    lines = []
    for c in claims:
        own = c.source == "this project"
        holds = c.holds if c.judged else c.text not in expected_false
        if c.text in noisy:
            verdict = "within the seed noise"
        elif own:
            verdict = "holds" if holds else "does not hold"
        else:
            verdict = "reproduced" if holds else "NOT reproduced"
        tag = " [judged at full size]" if c.full_size else ""
        lines.append(f"[{verdict}] {c.text} ({c.source}: {c.published}){tag}")
    return "\n".join(lines)


def check_claims(claims: Sequence[Claim], not_reproduced: Iterable[str] = (),
                 within_noise: Iterable[str] = ()) -> str:
    """Assert each claim is decided as recorded; return :func:`verdicts` for nbval to compare.

    Every claim must hold, except those in ``not_reproduced`` (this project's data contradict the
    source; the notebook's prose says so), which must *not* hold, and those in ``within_noise``:
    claims whose statistic came out within ``NOISE_MARGIN_SE`` (2.83) standard errors of the point
    where the verdict flips (``Claim.within_noise`` on the run that recorded them). Another
    machine's rounding, like another seed, may decide those either way, so their verdict is not
    asserted; instead they must stay within ``NOISE_BAND_SE`` (5.66) standard errors of flipping
    (a claim that moves far from its bound must be decided again). Claims not judged in this run
    (:func:`at_full_size` in a quick run) are not asserted; their lines repeat the recorded verdict.

    Raises:
        AssertionError: naming every claim decided otherwise than recorded.
        ValueError: a name in ``not_reproduced`` / ``within_noise`` that is not a claim, or in both.
    """
    texts = {c.text for c in claims}
    expected_false, noisy = set(not_reproduced), set(within_noise)
    unknown = (expected_false | noisy) - texts
    if unknown:
        raise ValueError(f"not_reproduced / within_noise name unknown claims: {sorted(unknown)}")
    if expected_false & noisy:
        raise ValueError(f"claims both not_reproduced and within_noise: {sorted(expected_false & noisy)}")
    judged = [c for c in claims if c.judged]
    wrong = [c for c in judged if c.text not in noisy and c.holds == (c.text in expected_false)]
    drifted = [c for c in judged if c.text in noisy and not abs(c.margin) <= NOISE_BAND_SE * c.se]
    if wrong or drifted:
        raise AssertionError("claims decided otherwise than recorded:\n" + "\n".join(
            [f"  {c.text}: measured {_fmt(c.measured)} ± {c.tolerance:.3f} over {c.n_seeds} seeds, "
             f"published {c.published}, holds={c.holds}" for c in wrong]
            + [f"  {c.text}: recorded as within the seed noise but {c.margin:+.3g} from flipping "
               f"(SE {c.se:.3g})" for c in drifted]))
    return verdicts(claims, noisy, expected_false)
