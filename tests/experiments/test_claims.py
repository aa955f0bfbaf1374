"""saelib.experiments.claims: seed statistics, tolerances from the seed spread, verdicts that carry no digits."""

import math

import pytest
import torch

from saelib.experiments import claims as cl

SE2 = 2 * math.sqrt(math.pi / 2) * 1.4826  # two standard errors of a median per unit MAD, times sqrt(n)


def test_tolerance_is_two_standard_errors_of_the_median_from_the_mad():
    # values 1..5: median 3, absolute deviations 2,1,0,1,2 -> MAD 1
    assert cl.seed_tolerance([1, 2, 3, 4, 5]) == pytest.approx(SE2 / math.sqrt(5))
    # one stuck seed far away does not widen it: deviations 0,0,0,1,97 -> MAD 0
    assert cl.seed_tolerance([3, 3, 3, 4, 100]) == 0.0
    assert cl.seed_median([3, 3, 3, 4, 100]) == 3.0


def test_tolerance_accepts_tensors_and_generators():
    assert cl.seed_tolerance(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])) == pytest.approx(SE2 / math.sqrt(5))
    assert cl.seed_median(v for v in (1.0, 5.0, 2.0)) == 2.0


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [float("inf")]])
def test_empty_or_nonfinite_values_are_rejected(bad):
    with pytest.raises(ValueError, match="seed values"):
        cl.above("x", bad, 0.0, source="s")


def test_approx_uses_tolerance_plus_published_precision():
    vals = [0.18, 0.18, 0.18]  # MAD 0: tolerance 0, only the precision counts
    assert cl.approx("p", vals, 0.2, 0.05, source="s").holds
    assert not cl.approx("p", vals, 0.2, 0.01, source="s").holds
    spread = [0.0, 0.1, 0.2, 0.3, 0.4]  # median 0.2, MAD 0.1
    tol = SE2 * 0.1 / math.sqrt(5)
    c = cl.approx("p", spread, 0.2 + tol + 0.01, 0.0, source="s")
    assert c.measured == pytest.approx(0.2) and c.tolerance == pytest.approx(tol) and not c.holds
    assert cl.approx("p", spread, 0.2 + tol - 0.01, 0.0, source="s").holds
    with pytest.raises(ValueError, match="precision"):
        cl.approx("p", spread, 0.2, -0.1, source="s")


def test_above_below_between_move_the_bound_by_the_tolerance():
    vals = [0.0, 0.1, 0.2, 0.3, 0.4]
    tol = SE2 * 0.1 / math.sqrt(5)  # about 0.166
    # direction claims must clear the bound by the tolerance (strict)
    assert cl.above("a", vals, 0.2 - tol - 1e-6, source="s").holds
    assert not cl.above("a", vals, 0.2 - tol + 1e-6, source="s").holds
    assert cl.below("b", vals, 0.2 + tol + 1e-6, source="s").holds
    assert not cl.below("b", vals, 0.2 + tol - 1e-6, source="s").holds
    assert cl.between("c", vals, 0.3, 0.5, source="s").holds  # 0.3 - 0.166 <= 0.2
    assert not cl.between("c", vals, 0.4, 0.5, source="s").holds
    with pytest.raises(ValueError, match="low 1 > high 0"):
        cl.between("c", vals, 1, 0, source="s")


def test_difference_adds_tolerances_in_quadrature():
    a, b = [1.0, 1.1, 1.2, 1.3, 1.4], [0.0, 0.0, 0.0, 0.0, 0.0]
    tol_a = SE2 * 0.1 / math.sqrt(5)
    c = cl.difference_approx("d", a, b, 1.2, source="s")
    assert c.measured == pytest.approx(1.2) and c.tolerance == pytest.approx(tol_a) and c.holds
    assert not cl.difference_approx("d", a, b, 0.0, source="s").holds
    assert cl.difference_above("d", a, b, 1.2 - tol_a - 1e-6, source="s").holds
    assert not cl.difference_above("d", a, b, 1.2 - tol_a + 1e-6, source="s").holds
    both = cl.difference_approx("d", a, a, source="s")
    assert both.tolerance == pytest.approx(math.sqrt(2) * tol_a)


def test_counts_are_exact():
    flags = [True, True, False, True]
    assert cl.count_at_least("c", flags, 3, source="s").holds
    assert not cl.count_at_least("c", flags, 4, source="s").holds
    assert cl.count_below("c", flags, 4, source="s").holds
    assert not cl.count_below("c", flags, 3, source="s").holds
    with pytest.raises(ValueError, match="k must be in"):
        cl.count_at_least("c", flags, 5, source="s")
    with pytest.raises(ValueError, match="no seeds"):
        cl.count_at_least("c", [], 0, source="s")


def test_verdicts_carry_no_measured_digits():
    c1 = cl.approx("parent on children", [0.18342, 0.1911, 0.2017], 0.2, 0.05, source="Nabeshima")
    c2 = cl.below("children on parent", [0.14, 0.15, 0.13], -0.0, source="Nabeshima", published="≈ -0.05")
    c3 = cl.finding("children lean to parent", True)
    text = cl.verdicts([c1, c2, c3])
    assert text.splitlines() == [
        "[reproduced] parent on children (Nabeshima: ≈ +0.2)",
        "[NOT reproduced] children on parent (Nabeshima: ≈ -0.05)",
        "[holds] children lean to parent (this project: —)",
    ]
    assert "0.18" not in text and "0.14" not in text
    table = cl.claims_table([c1, c2])
    assert "+0.191" in table and "**no**" in table


def test_check_claims_asserts_recorded_outcomes_and_returns_verdicts():
    ok = cl.finding("a", True, source="s")
    bad = cl.finding("b", False, source="s")
    assert cl.check_claims([ok, bad], not_reproduced=["b"]) == "[reproduced] a (s: —)\n[NOT reproduced] b (s: —)"
    with pytest.raises(AssertionError, match="b: measured"):
        cl.check_claims([ok, bad])
    with pytest.raises(AssertionError, match="a: measured"):
        cl.check_claims([ok, bad], not_reproduced=["a", "b"])
    with pytest.raises(ValueError, match="unknown claims"):
        cl.check_claims([ok], not_reproduced=["zz"])
    with pytest.raises(ValueError, match="both"):
        cl.check_claims([ok], not_reproduced=["a"], within_noise=["a"])


def test_margins_are_distances_to_the_flipping_point():
    vals = [0.0, 0.1, 0.2, 0.3, 0.4]
    tol = SE2 * 0.1 / math.sqrt(5)
    c = cl.above("a", vals, 0.0, source="s")  # flips where median - tol = bound
    assert c.margin == pytest.approx(0.2 - tol) and c.se == pytest.approx(tol / 2)
    c = cl.approx("x", vals, 0.25, 0.05, source="s")  # flips at |median - 0.25| = tol + 0.05
    assert c.margin == pytest.approx(tol + 0.05 - 0.05)
    c = cl.between("x", vals, 0.3, 0.5, source="s")
    assert c.margin == pytest.approx(0.2 - (0.3 - tol))
    # a count: 6 of 8 against "at least 5" is 1.5 seeds from flipping; binomial SE with the Jeffreys
    # rate (6 + 1/2) / 9: sqrt(8 * 6.5/9 * 2.5/9) = sqrt(130) / 9
    # = 1.267: 1.18 SE from flipping, inside the 2 sqrt(2) = 2.83 SE band, so within the seed noise
    c = cl.count_at_least("n", [True] * 6 + [False] * 2, 5, source="s")
    assert c.margin == 1.5 and c.se == pytest.approx(math.sqrt(130) / 9) and c.within_noise
    c = cl.count_at_least("n", [True] * 5 + [False] * 3, 5, source="s")
    assert c.margin == 0.5 and c.within_noise
    # every seed agreeing is not certainty: 8 of 8 against "all 8" (0.5 from flipping) has
    # SE sqrt(8 * 17/18 * 1/18) = sqrt(136) / 18 = 0.648 seeds, so it is within the seed noise;
    # 8 of 8 against "at least 5" (3.5 from flipping) is not
    every = cl.count_at_least("n", [True] * 8, 8, source="s")
    assert every.holds and every.se == pytest.approx(math.sqrt(136) / 18) and every.within_noise
    assert not cl.count_at_least("n", [True] * 8, 5, source="s").within_noise  # 3.5 / 0.648 = 5.4 SE
    never = cl.count_below("n", [False] * 8, 1, source="s")
    assert never.holds and never.se == pytest.approx(math.sqrt(136) / 18) and never.within_noise
    assert not cl.finding("f", True).within_noise


def test_within_noise_band_is_two_standard_errors_of_a_rerun():
    # a rerun elsewhere is an independent draw: the statistic moves by sqrt(2) SE, and a verdict is
    # decided only beyond two of those; the recorded band then allows one more such band of drift
    assert cl.NOISE_MARGIN_SE == pytest.approx(2 * math.sqrt(2))
    assert cl.NOISE_BAND_SE == pytest.approx(4 * math.sqrt(2))
    vals = [0.0, 0.1, 0.2, 0.3, 0.4]
    tol = SE2 * 0.1 / math.sqrt(5)
    se = tol / 2
    inside = cl.above("a", vals, 0.2 - tol - 2.8 * se, source="s")
    outside = cl.above("a", vals, 0.2 - tol - 2.9 * se, source="s")
    assert inside.margin / se == pytest.approx(2.8) and inside.within_noise
    assert outside.margin / se == pytest.approx(2.9) and not outside.within_noise


def test_claims_within_noise_are_not_asserted_but_must_stay_near_their_bound():
    vals = [0.0, 0.1, 0.2, 0.3, 0.4]
    tol = SE2 * 0.1 / math.sqrt(5)
    near = cl.above("near", vals, 0.2 - tol - 0.01, source="s")  # holds by 0.01 < SE
    assert near.holds and near.within_noise
    text = cl.check_claims([near], within_noise=["near"])
    assert text == f"[within the seed noise] near (s: > {0.2 - tol - 0.01:g})"
    # the same claim failing by a hair is also accepted, with the same verdict line
    flipped = cl.above("near", vals, 0.2 - tol + 0.01, source="s")
    assert not flipped.holds and cl.check_claims([flipped], within_noise=["near"]).startswith("[within the seed noise]")
    # but one that has moved more than NOISE_BAND_SE (5.66) SE from flipping must be decided again;
    # just inside that band it is still accepted
    se = tol / 2
    drifted_in = cl.above("near", vals, 0.2 - tol - 5.6 * se, source="s")
    assert cl.check_claims([drifted_in], within_noise=["near"]).startswith("[within the seed noise]")
    far = cl.above("near", vals, 0.2 - tol - 5.7 * se, source="s")
    with pytest.raises(AssertionError, match="recorded as within the seed noise"):
        cl.check_claims([far], within_noise=["near"])


def test_table_marks_claims_within_noise():
    vals = [0.0, 0.1, 0.2, 0.3, 0.4]
    tol = SE2 * 0.1 / math.sqrt(5)
    table = cl.claims_table([cl.above("near", vals, 0.2 - tol - 0.01, source="s"), cl.finding("f", True)])
    assert "| yes ~ |" in table and "| — | 5 |" not in table and "| — | 1 | yes |" in table


def test_full_size_claims_are_asserted_in_the_full_run_only_and_print_the_same_lines():
    holds = cl.finding("x is large", True, source="S")
    fails = cl.finding("y is large", False, source="S")
    full = [cl.at_full_size(holds, quick=False), cl.at_full_size(fails, quick=False)]
    out_full = cl.check_claims(full, not_reproduced=["y is large"])
    assert "[reproduced] x is large (S: —) [judged at full size]" in out_full
    assert "[NOT reproduced] y is large (S: —) [judged at full size]" in out_full
    with pytest.raises(AssertionError, match="y is large"):
        cl.check_claims(full)  # the full run asserts
    # a quick run decides the other way round: not asserted, and the recorded verdicts are printed
    quick = [cl.at_full_size(cl.finding("x is large", False, source="S"), quick=True),
             cl.at_full_size(cl.finding("y is large", True, source="S"), quick=True)]
    assert cl.check_claims(quick, not_reproduced=["y is large"]) == out_full
    # a claim not marked full-size is asserted in both runs
    with pytest.raises(AssertionError):
        cl.check_claims(quick + [cl.finding("z", False)], not_reproduced=["y is large"])


def test_seed_spread_is_the_scaled_mad_by_hand():
    from saelib.experiments.claims import seed_spread

    # median 3, absolute deviations [2, 1, 0, 1, 97] -> MAD 1: one stuck seed does not move it
    assert seed_spread([1, 2, 3, 4, 100]) == pytest.approx(1.4826)
    assert seed_spread([5.0, 5.0, 5.0]) == 0.0
    with pytest.raises(ValueError):
        seed_spread([])
    with pytest.raises(ValueError):
        seed_spread([1.0, float("nan")])
