"""saelib.experiments.claims: real-model claims decided only when their statistic has converged over
training (``converged``, the ``undecided`` verdict), with uncertainty from the data (``bootstrap_ci``,
``bootstrap_ratio_ci``, claims built on a ``ConfidenceInterval``)."""

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from saelib.experiments import claims as cl

Z95 = NormalDist().inv_cdf(0.975)  # 1.95996
TOKENS = [250_000, 500_000, 1_000_000]


def ci(estimate: float, low: float, high: float) -> cl.ConfidenceInterval:
    return cl.ConfidenceInterval(estimate, low, high, level=0.95, n=40, n_boot=1000)


def curve_claim(values: list[float], half_width: float = 0.04, bound: float = 0.2) -> cl.Claim:
    """``above`` claims at three checkpoints, each with a symmetric 95 % interval of ``half_width``."""
    return cl.converged([cl.above("recovered above", ci(v, v - half_width, v + half_width), bound, source="S")
                         for v in values], TOKENS)


# ---------------------------------------------------------------------------- convergence
def test_last_two_points_within_two_standard_errors_decide_the_claim():
    # a 95 % interval of half-width 0.04 has se = 0.04 / 1.96 = 0.0204: the last step may be 0.0408
    c = curve_claim([0.50, 0.70, 0.74])
    assert c.converged and not c.undecided and c.holds and c.decided_by == ""
    assert c.curve == (0.50, 0.70, 0.74) and c.tokens == tuple(TOKENS)
    assert c.measured == 0.74 and c.interval.low == pytest.approx(0.70)  # the last point's claim
    assert cl.check_claims([c]) == "[reproduced] recovered above (S: > 0.2)"
    # a last step of 0.05 > 0.0408 leaves it undecided, although it holds at every point
    c = curve_claim([0.50, 0.70, 0.75])
    assert c.holds and c.undecided


def test_seed_claims_use_two_standard_errors_of_the_median_as_step_tolerance():
    base = np.array([0.0, 0.1, 0.2, 0.3, 0.4])  # MAD 0.1: tolerance 2 * 1.2533 * 1.4826 * 0.1 / sqrt(5) = 0.1662
    tol = 2 * math.sqrt(math.pi / 2) * 1.4826 * 0.1 / math.sqrt(5)
    points = lambda shifts: cl.converged([cl.above("a", base + s, -1.0, source="S") for s in shifts], TOKENS)
    assert points([0.0, 0.1, 0.1 + tol - 1e-9]).converged
    assert points([0.0, 0.1, 0.1 + tol + 1e-9]).undecided


def test_an_undecided_claim_says_what_scale_would_decide_it():
    # steps 0.2 then 0.1: each doubling of the tokens halves the change; the step tolerance is
    # 0.08 / 1.96 = 0.0408, reached after 2 more halvings (0.05, then 0.025): 4 x 1,000,000 tokens
    c = curve_claim([0.3, 0.5, 0.6])
    assert c.undecided
    assert c.decided_by.startswith("more training tokens than 1,000,000; about 4,000,000 by extrapolation")
    assert "not a measurement" in c.decided_by
    # steps that do not shrink give no extrapolation
    c = curve_claim([0.5, 0.6, 0.7])
    assert c.decided_by == "more training tokens than 1,000,000 (the steps are not shrinking: no extrapolation)"
    # nor does a curve that turns back
    assert "no extrapolation" in curve_claim([0.5, 0.7, 0.6]).decided_by


def test_a_boolean_finding_converges_when_its_last_two_verdicts_agree():
    f = lambda flags: cl.converged([cl.finding("chain", x, source="S") for x in flags], TOKENS)
    assert f([False, True, True]).converged and f([False, True, True]).holds
    flipped = f([True, True, False])
    assert flipped.undecided
    assert flipped.decided_by == ("more training tokens than 1,000,000 "
                                  "(the verdict changed between the last two checkpoints)")


def test_a_statistic_without_uncertainty_converges_only_if_unchanged():
    one = lambda values: cl.converged([cl.above("x", [v], 0.0, source="S") for v in values], TOKENS)
    assert one([0.1, 0.3, 0.3]).converged
    assert one([0.1, 0.3, 0.3001]).undecided


@pytest.mark.parametrize("points, tokens, match", [
    (2, [1, 2], "three or more"),
    (3, [1, 2], "3 claims but 2 token counts"),
    (3, [1, 2, 2], "strictly increasing"),
    (3, [0, 1, 2], "positive"),
])
def test_converged_rejects_bad_curves(points, tokens, match):
    with pytest.raises(ValueError, match=match):
        cl.converged([cl.finding("f", True)] * points, tokens)


def test_converged_rejects_points_of_different_claims():
    with pytest.raises(ValueError, match="one claim"):
        cl.converged([cl.finding("f", True), cl.finding("g", True), cl.finding("f", True)], [1, 2, 3])


def test_check_claims_records_undecided_claims_and_prints_no_digit():
    unsettled = curve_claim([0.3117, 0.5213, 0.6391])  # undecided, holds at its last point
    failing = cl.converged([cl.below("loss below", ci(v, v - 0.01, v + 0.01), 0.1, source="S")
                            for v in (0.9, 0.6, 0.4)], TOKENS)  # undecided, fails: its verdict is not asserted
    assert unsettled.holds and not failing.holds
    done = cl.converged([cl.above("settled", ci(v, v - 0.04, v + 0.04), 0.2, source="S") for v in (0.5, 0.7, 0.74)],
                        TOKENS)
    text = cl.check_claims([unsettled, failing, done], undecided=["recovered above", "loss below"])
    assert text.splitlines() == ["[undecided at this scale] recovered above (S: > 0.2)",
                                 "[undecided at this scale] loss below (S: < 0.1)",
                                 "[reproduced] settled (S: > 0.2)"]
    assert not any(d in text for d in ("0.3", "0.5", "0.6", "0.4", "0.9", "1,000,000"))
    # an unconverged claim that is not recorded as undecided fails, saying what would decide it
    with pytest.raises(AssertionError, match="loss below: undecided at this scale .* more training tokens"):
        cl.check_claims([unsettled, failing, done], undecided=["recovered above"], not_reproduced=[])
    # a claim recorded as undecided whose curve has settled must be decided again
    with pytest.raises(AssertionError, match="settled: recorded as undecided .* last two checkpoints agree"):
        cl.check_claims([unsettled, failing, done], undecided=["recovered above", "loss below", "settled"])
    # as must one recorded as undecided that has no curve at all
    with pytest.raises(AssertionError, match="no convergence curve"):
        cl.check_claims([cl.finding("once", True)], undecided=["once"])


def test_undecided_is_a_list_of_its_own():
    c = curve_claim([0.3, 0.5, 0.6])
    with pytest.raises(ValueError, match="both"):
        cl.check_claims([c], undecided=["recovered above"], not_reproduced=["recovered above"])
    with pytest.raises(ValueError, match="both"):
        cl.check_claims([c], undecided=["recovered above"], within_noise=["recovered above"])
    with pytest.raises(ValueError, match="unknown claims"):
        cl.check_claims([c], undecided=["zz"])


def test_quick_run_prints_the_recorded_undecided_verdict():
    # the full run records the claim as undecided; a quick run (not judged) prints the same line
    # although its own curve happens to have converged
    full = cl.at_full_size(curve_claim([0.3, 0.5, 0.6]), quick=False)
    quick = cl.at_full_size(curve_claim([0.5, 0.7, 0.72]), quick=True)
    out = cl.check_claims([full], undecided=["recovered above"])
    assert out == "[undecided at this scale] recovered above (S: > 0.2) [judged at full size]"
    assert cl.check_claims([quick], undecided=["recovered above"]) == out


def test_table_shows_the_convergence_column_only_with_curves():
    plain = cl.claims_table([cl.finding("f", True)])
    assert plain.splitlines()[0] == ("| claim | source | published | measured | ± tol (seed spread) | margin / SE "
                                     "| seeds | holds |")
    table = cl.claims_table([curve_claim([0.3, 0.5, 0.6]), curve_claim([0.5, 0.7, 0.74]), cl.finding("f", True)])
    header, _, undecided, settled, once = table.splitlines()
    assert header.endswith("| holds | convergence |")
    assert "undecided (now yes)" in undecided and "more training tokens than 1,000,000" in undecided
    assert "step +0.100 vs ± 0.041, 500,000 → 1,000,000 tokens: undecided" in undecided
    assert "step +0.040 vs ± 0.041, 500,000 → 1,000,000 tokens: converged" in settled
    assert "95% CI [+0.560, +0.640] over 40 documents" in undecided
    assert once.endswith("| yes | — |")


# ---------------------------------------------------------------------------- claims on an interval
def test_direction_claims_need_the_whole_interval_beyond_the_bound():
    interval = ci(0.5, 0.45, 0.70)  # asymmetric, as percentile intervals can be
    up = cl.above("a", interval, 0.40, source="S")
    assert up.holds and up.margin == pytest.approx(0.05) and up.measured == 0.5 and up.n_seeds == 1
    assert not cl.above("a", interval, 0.46, source="S").holds  # the low end, not the estimate, must clear it
    down = cl.below("b", interval, 0.72, source="S")
    assert down.holds and down.margin == pytest.approx(0.02)
    assert not cl.below("b", interval, 0.69, source="S").holds
    # tolerance = half the width; se from the interval's level: (0.70 - 0.45) / (2 * 1.96)
    assert up.tolerance == pytest.approx(0.125) and up.se == pytest.approx(0.25 / (2 * Z95))
    assert up.interval is interval


def test_approx_and_between_hold_when_the_interval_reaches_the_published_value():
    interval = ci(0.5, 0.45, 0.70)
    assert cl.approx("x", interval, 0.68, 0.0, source="S").holds  # inside, above the estimate
    assert cl.approx("x", interval, 0.68, 0.0, source="S").margin == pytest.approx(0.02)
    assert not cl.approx("x", interval, 0.42, 0.0, source="S").holds  # 0.03 below the low end
    assert cl.approx("x", interval, 0.42, 0.05, source="S").holds  # within the published precision
    assert cl.between("r", interval, 0.65, 0.9, source="S").holds  # overlaps at the top
    assert cl.between("r", interval, 0.1, 0.46, source="S").holds  # overlaps at the bottom
    outside = cl.between("r", interval, 0.75, 0.9, source="S")
    assert not outside.holds and outside.margin == pytest.approx(-0.05)


def test_seed_only_claims_refuse_an_interval():
    with pytest.raises(TypeError, match="confidence interval"):
        cl.within_seed_spread("w", ci(0.5, 0.4, 0.6), 0.5, source="S")


@pytest.mark.parametrize("kw, match", [
    ({"level": 1.0}, "level"), ({"level": 0.0}, "level"), ({"low": 0.7}, "low 0.7 > high"),
    ({"high": float("nan")}, "non-finite"),
])
def test_interval_validates(kw, match):
    args = {"estimate": 0.5, "low": 0.4, "high": 0.6, "level": 0.95, "n": 10, "n_boot": 100} | kw
    with pytest.raises(ValueError, match=match):
        cl.ConfidenceInterval(**args)


# ---------------------------------------------------------------------------- bootstrap
def test_constant_data_give_a_zero_width_interval():
    r = cl.bootstrap_ci([2.5] * 30)
    assert (r.estimate, r.low, r.high) == (2.5, 2.5, 2.5) and r.n == 30 and r.n_boot == 1000
    assert cl.bootstrap_ci([3.0] * 10, statistic=np.median).high == 3.0


def test_interval_of_a_mean_has_the_normal_width():
    # a sample built with mean exactly 2 and standard deviation exactly 3 (ddof 0), n = 400: the
    # bootstrap distribution of its mean has standard deviation 3 / sqrt(400) = 0.15, so the 95 %
    # interval is 2 +- 1.96 * 0.15 (width 0.588) up to Monte-Carlo error. Each end is a 2.5 %
    # quantile of n_boot = 1000 draws: its standard error is sqrt(q (1 - q) / n_boot) / phi(z) =
    # 0.0845 bootstrap standard deviations; allow 4 of those on each end (on the width, 4 * sqrt(2)).
    z = np.random.default_rng(7).normal(size=400)
    x = 2.0 + 3.0 * (z - z.mean()) / z.std()
    r = cl.bootstrap_ci(torch.tensor(x), n_boot=1000)
    se, q = 0.15, 0.025
    mc = math.sqrt(q * (1 - q) / 1000) / NormalDist().pdf(Z95) * se  # 0.0127
    assert r.estimate == pytest.approx(2.0, abs=1e-12)
    assert r.low < 2.0 < r.high
    assert r.high - r.low == pytest.approx(2 * Z95 * se, abs=4 * math.sqrt(2) * mc)
    assert (r.low + r.high) / 2 == pytest.approx(2.0, abs=4 * mc)
    assert r.se == pytest.approx(se, rel=4 * math.sqrt(2) * mc / (2 * Z95 * se))


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    # 400 samples of 50 draws from N(1, 1): the percentile interval covers 1 in about 94-95 % of them
    # (it is slightly narrow at n = 50); binomial standard error over 400 samples: 0.011
    rng = np.random.default_rng(1)
    covered = [(lambda r: r.low <= 1.0 <= r.high)(cl.bootstrap_ci(rng.normal(1.0, 1.0, 50), n_boot=1000, seed=s))
               for s in range(400)]
    assert 0.90 <= np.mean(covered) <= 0.98


def test_weights_give_a_ratio_of_sums_by_document():
    # two documents: mean loss 2.0 over 1 token and 4.0 over 3 tokens -> 14 / 4 = 3.5 nats per token
    # (the plain mean of the two documents would be 3.0). A resample is {1, 1} (2.0), {2, 2} (4.0) or
    # one of each (3.5), with chances 1/4, 1/4, 1/2: the 2.5 % and 97.5 % quantiles are 2.0 and 4.0.
    r = cl.bootstrap_ci([2.0, 4.0], weights=[1, 3])
    assert r.estimate == 3.5 and (r.low, r.high) == (2.0, 4.0)
    assert cl.bootstrap_ci([2.0, 4.0]).estimate == 3.0
    # a custom statistic receives the resampled values and weights
    wmax = cl.bootstrap_ci([2.0, 4.0], weights=[1, 3], statistic=lambda v, w: float(np.max(v * w)))
    assert wmax.estimate == 12.0 and (wmax.low, wmax.high) == (2.0, 12.0)


def test_ratio_helper_is_the_plain_ratio_on_all_documents():
    # ratio of sums 6 / 8 = 0.75 (the mean of the per-document ratios would be 0.833)
    # (the documents' own ratios are 0.5, 1.5, 0.5: a ratio of sums of positive denominators lies
    # between them, so every resample, and both ends, lie in [0.5, 1.5])
    r = cl.bootstrap_ratio_ci([1.0, 3.0, 2.0], [2.0, 2.0, 4.0])
    assert r.estimate == 0.75 and r.low <= 0.75 <= r.high and r.low >= 0.5 and r.high <= 1.5
    # loss recovered from per-token losses of three documents (3, 2 and 1 predicted tokens)
    orig = [[2.0, 2.0, 2.0], [3.0, 1.0], [2.0]]
    ablated = [[4.0, 5.0, 3.0], [4.0, 4.0], [3.0]]
    spliced = [[3.0, 3.0, 2.5], [3.5, 2.0], [2.0]]
    flat = lambda docs: np.array([v for d in docs for v in d])
    plain = (flat(ablated).mean() - flat(spliced).mean()) / (flat(ablated).mean() - flat(orig).mean())
    # by hand: ablated 23 / 6, spliced 16 / 6, original 12 / 6 -> (23 - 16) / (23 - 12) = 7 / 11
    assert plain == pytest.approx(7 / 11)
    num = [sum(a) - sum(s) for a, s in zip(ablated, spliced)]
    den = [sum(a) - sum(o) for a, o in zip(ablated, orig)]
    assert cl.bootstrap_ratio_ci(num, den).estimate == pytest.approx(7 / 11)


def test_same_seed_same_interval_other_seed_other_interval():
    x = np.random.default_rng(3).exponential(size=60)
    a, b = cl.bootstrap_ci(x, seed=5), cl.bootstrap_ci(x, seed=5)
    assert a == b
    assert cl.bootstrap_ci(x, seed=6) != a
    assert cl.bootstrap_ratio_ci(x, x + 1, seed=5) == cl.bootstrap_ratio_ci(x, x + 1, seed=5)


@pytest.mark.parametrize("call, match", [
    (lambda: cl.bootstrap_ci([]), "empty"),
    (lambda: cl.bootstrap_ci([1.0, float("nan")]), "non-finite"),
    (lambda: cl.bootstrap_ci(torch.tensor([1.0, float("inf")])), "non-finite"),
    (lambda: cl.bootstrap_ci([[1.0, 2.0]]), "1-D"),
    (lambda: cl.bootstrap_ci([1.0, 2.0], level=0.0), "level"),
    (lambda: cl.bootstrap_ci([1.0, 2.0], level=1.0), "level"),
    (lambda: cl.bootstrap_ci([1.0, 2.0], level=95), "level"),
    (lambda: cl.bootstrap_ci([1.0, 2.0], n_boot=0), "n_boot"),
    (lambda: cl.bootstrap_ci([1.0, 2.0], weights=[1.0]), "weights has 1 documents"),
    (lambda: cl.bootstrap_ci([1.0, 2.0], weights=[1.0, -1.0]), "weights must be >= 0"),
    (lambda: cl.bootstrap_ci([1.0, 2.0], weights=[0.0, 0.0]), "positive sum"),
    (lambda: cl.bootstrap_ci([1.0, 2.0], statistic=lambda v: float("nan")), "non-finite value"),
    (lambda: cl.bootstrap_ratio_ci([1.0, 2.0], [1.0]), "denominator has 1"),
    (lambda: cl.bootstrap_ratio_ci([1.0, 2.0], [1.0, -1.0]), "sums to 0 over the documents"),
    (lambda: cl.bootstrap_ratio_ci([1.0, 1.0, 1.0], [1.0, -1.0, 2.0]), "in a bootstrap resample"),
    (lambda: cl.bootstrap_ratio_ci([], []), "empty"),
])
def test_bad_input_is_rejected(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bootstrap_counts_ci_draws_what_bootstrap_ci_draws():
    """The mean through resampling counts equals the mean of the resampled values, resample by
    resample (same seed): so the two intervals are identical."""
    from saelib.experiments.bootstrap import bootstrap_counts_ci

    x = np.random.default_rng(0).normal(size=40)
    counts_ci = bootstrap_counts_ci(lambda w: float(w @ x / w.sum()), 40, n_boot=500, seed=3)
    plain = cl.bootstrap_ci(x, n_boot=500, seed=3)
    assert counts_ci.estimate == pytest.approx(x.mean())
    assert (counts_ci.low, counts_ci.high) == pytest.approx((plain.low, plain.high), abs=1e-12)
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_counts_ci(lambda w: float("nan"), 5)
    with pytest.raises(ValueError, match="n_documents"):
        bootstrap_counts_ci(lambda w: 0.0, 0)


def test_bootstrap_ci_names_its_unit_in_the_table():
    ci = cl.bootstrap_ci([0.0, 1.0] * 20, unit="links")
    assert ci.unit == "links"
    table = cl.claims_table([cl.below("a fraction", ci, 0.9, source="this project")])
    assert "over 40 links" in table


def test_converged_claims_joins_lists_point_by_point():
    def at(v, flag):
        return [cl.below("x", cl.ConfidenceInterval(v, v - 0.01, v + 0.01, 0.95, 10, 100), 1.0, source="this project"),
                cl.finding("f", flag)]

    out = cl.converged_claims([at(0.5, True), at(0.3, True), at(0.3, False)], [10, 20, 40])
    assert [c.text for c in out] == ["x", "f"]
    assert out[0].converged and out[0].curve == (0.5, 0.3, 0.3) and len(out[0].curve_se) == 3
    assert not out[1].converged  # the finding's verdict changed between the last two points
    with pytest.raises(ValueError, match="same claims"):
        cl.converged_claims([at(0.5, True), at(0.3, True)[:1], at(0.3, True)], [10, 20, 40])


def test_plot_claim_convergence_draws_numeric_curves_only():
    from matplotlib.figure import Figure

    from saelib.figures.convergence import plot_claim_convergence

    pts = [[cl.below("x", cl.ConfidenceInterval(v, v - 0.01, v + 0.01, 0.95, 10, 100), 1.0, source="this project"),
            cl.finding("f", True)] for v in (0.5, 0.4, 0.2)]
    claims = cl.converged_claims(pts, [10, 20, 40])
    fig = plot_claim_convergence(claims)
    assert isinstance(fig, Figure) and len([ax for ax in fig.axes if ax.get_visible()]) == 1
    assert "undecided" in fig.axes[0].get_title()  # 0.4 -> 0.2 is beyond two standard errors
    with pytest.raises(ValueError, match="no claim has a numeric convergence curve"):
        plot_claim_convergence([claims[1]])
