"""Tests for saelib.data.toy_data: validation, directions, sampling rules and analytic statistics.

Expected values are hand-computed from the sampling rules in the module docstring, or estimated
from large samples (5-sigma bounds), never taken from the code under test.
"""

import math

import pytest
import torch

from saelib.data.toy_data import (
    FeatureNode,
    HierarchySpec,
    ToyHierarchy,
    chanin_absorption_order,
    chanin_parent_children,
    nabeshima_tree,
    stacked_sampler,
)

N_BIG = 200_000


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see tests/conftest.py


def build_spec(roots=None, **kw) -> HierarchySpec:
    """A small valid spec (one parent with two independent children, one singleton)."""
    if roots is None:
        roots = (FeatureNode(0.5, children=(FeatureNode(0.3), FeatureNode(0.4))), FeatureNode(0.1))
    return HierarchySpec(roots=tuple(roots), **{"d": 8, **kw})


def mixed_tree() -> ToyHierarchy:
    """A three-level tree mixing exclusive/independent children and uniform magnitudes.

    Depth-first numbering: A=0 (root), B=1, C=2 (independent children of A), D=3, E=4 (exclusive
    children of C), F=5 (a singleton root).
    """
    C = FeatureNode(0.5, magnitude=(0.5, 2.0), children=(FeatureNode(0.3), FeatureNode(0.6)), exclusive_children=True)
    A = FeatureNode(0.5, magnitude=(1.0, 3.0), children=(FeatureNode(0.4, magnitude=2.0), C))
    F = FeatureNode(0.2, magnitude=1.5)
    return ToyHierarchy(HierarchySpec((A, F), d=6))


# hand-computed from the sampling rules for mixed_tree()
MIXED_FIRING = [0.5, 0.5 * 0.4, 0.5 * 0.5, 0.5 * 0.5 * 0.3, 0.5 * 0.5 * 0.6, 0.2]
MIXED_MEAN_MAG = [2.0, 2.0, 1.25, 1.0, 1.0, 1.5]
MIXED_MEAN_SQ = [13 / 3, 4.0, 5.25 / 3, 1.0, 1.0, 2.25]  # E[U(lo,hi)^2] = (lo^2 + lo hi + hi^2) / 3
MIXED_JOINT = {  # P(i and j fire), i < j
    (0, 1): 0.2, (0, 2): 0.25, (0, 3): 0.075, (0, 4): 0.15, (0, 5): 0.1,
    (1, 2): 0.5 * 0.4 * 0.5, (1, 3): 0.5 * 0.4 * 0.5 * 0.3, (1, 4): 0.5 * 0.4 * 0.5 * 0.6, (1, 5): 0.2 * 0.2,
    (2, 3): 0.075, (2, 4): 0.15, (2, 5): 0.25 * 0.2,
    (3, 4): 0.0, (3, 5): 0.075 * 0.2,
    (4, 5): 0.15 * 0.2,
}


def mixed_second_moment_by_hand() -> torch.Tensor:
    n = 6
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        out[i, i] = MIXED_FIRING[i] * MIXED_MEAN_SQ[i]
    for (i, j), p in MIXED_JOINT.items():
        out[i, j] = out[j, i] = p * MIXED_MEAN_MAG[i] * MIXED_MEAN_MAG[j]
    return out


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "roots, match",
    [
        ((FeatureNode(1.5),), r"roots\[0\]\.p.*1\.5"),
        ((FeatureNode(-0.1),), r"roots\[0\]\.p.*-0\.1"),
        ((FeatureNode(float("nan")),), r"roots\[0\]\.p.*nan"),
        ((FeatureNode(0.5, children=(FeatureNode(0.2), FeatureNode(2.0))),), r"roots\[0\]\.children\[1\]\.p.*2\.0"),
        (
            (FeatureNode(0.5, children=(FeatureNode(0.6), FeatureNode(0.5)), exclusive_children=True),),
            r"roots\[0\]\.children.*exclusive.*1\.1",
        ),
        ((FeatureNode(0.5, magnitude=0.0),), r"roots\[0\]\.magnitude.*0\.0"),
        ((FeatureNode(0.5, magnitude=-1.0),), r"roots\[0\]\.magnitude.*-1\.0"),
        ((FeatureNode(0.5, magnitude=float("inf")),), r"roots\[0\]\.magnitude.*inf"),
        ((FeatureNode(0.5, magnitude=(2.0, 1.0)),), r"roots\[0\]\.magnitude.*\(2\.0, 1\.0\)"),
        ((FeatureNode(0.5, magnitude=(-1.0, 1.0)),), r"roots\[0\]\.magnitude.*\(-1\.0, 1\.0\)"),
        ((FeatureNode(0.5, magnitude=(1.0, 2.0, 3.0)),), r"roots\[0\]\.magnitude.*\(1\.0, 2\.0, 3\.0\)"),
        ((FeatureNode(0.5, magnitude=(float("nan"), 1.0)),), r"roots\[0\]\.magnitude.*nan"),
        ((), r"roots.*empty"),
    ],
)
def test_invalid_nodes_raise_naming_field_and_value(roots, match):
    with pytest.raises(ValueError, match=match):
        ToyHierarchy(HierarchySpec(roots=roots, d=8))


def test_exclusive_children_summing_to_exactly_one_is_valid():
    h = ToyHierarchy(build_spec(roots=(FeatureNode(0.5, children=(FeatureNode(0.25), FeatureNode(0.75)), exclusive_children=True),)))
    assert h.n_features == 3


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"d": 0}, r"d.*0"),
        ({"d": 2.5}, r"d.*2\.5"),
        ({"directions": "gaussian"}, r"directions.*gaussian"),
        ({"norm_jitter": 0.5}, r"norm_jitter.*0\.5"),
        ({"norm_jitter": -0.1}, r"norm_jitter.*-0\.1"),
        ({"norm_jitter": float("nan")}, r"norm_jitter.*nan"),
    ],
)
def test_invalid_spec_fields_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        ToyHierarchy(build_spec(**kw))


def test_orthonormal_needs_d_at_least_n_features():
    # 4 features in d = 3
    with pytest.raises(ValueError, match=r"d=3.*n_features=4"):
        ToyHierarchy(build_spec(d=3))
    assert ToyHierarchy(build_spec(d=3, directions="random")).features.shape == (4, 3)


def test_infinite_magnitude_range_raises():
    with pytest.raises(ValueError, match=r"magnitude"):
        ToyHierarchy(HierarchySpec((FeatureNode(0.5, magnitude=(1.0, float("inf"))),), d=4))


# ---------------------------------------------------------------------------- directions
def test_orthonormal_directions_without_jitter_are_orthonormal():
    h = ToyHierarchy(build_spec(d=8))
    F = h.features.double()
    assert F.shape == (4, 8)
    torch.testing.assert_close(F @ F.T, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)


def test_orthonormal_directions_with_jitter_have_gaussian_norms():
    n = 400
    jitter = 0.05
    spec = HierarchySpec(tuple(FeatureNode(0.1) for _ in range(n)), d=n, norm_jitter=jitter, seed=3)
    F = ToyHierarchy(spec).features.double()
    norms = F.norm(dim=1)
    unit = F / norms[:, None]
    torch.testing.assert_close(unit @ unit.T, torch.eye(n, dtype=torch.float64), atol=1e-5, rtol=0)
    z = (norms - 1) / jitter  # should be n draws of N(0, 1)
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 5 / math.sqrt(2 * n)
    assert (z.abs() > 1e-3).float().mean() > 0.99  # norms really jittered


def test_random_directions_are_unit_but_not_orthogonal():
    spec = HierarchySpec(tuple(FeatureNode(0.1) for _ in range(10)), d=5, directions="random")
    F = ToyHierarchy(spec).features.double()
    torch.testing.assert_close(F.norm(dim=1), torch.ones(10, dtype=torch.float64), atol=1e-6, rtol=0)
    off = (F @ F.T - torch.eye(10, dtype=torch.float64)).abs()
    assert off.max() > 0.1  # 10 unit vectors cannot be orthogonal in 5 dimensions


def test_direction_seed_controls_directions():
    a = ToyHierarchy(build_spec(seed=1)).features
    b = ToyHierarchy(build_spec(seed=1)).features
    c = ToyHierarchy(build_spec(seed=2)).features
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


# ---------------------------------------------------------------------------- sampling
def test_sampling_is_deterministic_per_generator_seed():
    h = nabeshima_tree()
    x1, c1 = h.sample(500, torch.Generator().manual_seed(7))
    x2, c2 = h.sample(500, torch.Generator().manual_seed(7))
    x3, c3 = h.sample(500, torch.Generator().manual_seed(8))
    assert torch.equal(x1, x2) and torch.equal(c1, c2)
    assert not torch.equal(c1, c3)


@pytest.mark.parametrize("method", ["sample", "sample_coefficients"])
def test_sampling_rejects_a_bad_sample_count(method):
    h = nabeshima_tree()
    draw = getattr(h, method)
    with pytest.raises(ValueError, match=r"batch \(the number of samples\) must be >= 0, got -1"):
        draw(-1, torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match=r"must be an int, got 2\.5"):
        draw(2.5, torch.Generator().manual_seed(0))
    empty = draw(0, torch.Generator().manual_seed(0))
    assert (empty[0] if method == "sample" else empty).shape == (0, h.d if method == "sample" else h.n_features)


def reference_coefficients(h: ToyHierarchy, batch: int, g: torch.Generator) -> torch.Tensor:
    """The sampling rules drawn one rule at a time (the module docstring's order: per feature a
    root's draw, then its children's draws; then the uniform magnitudes), one rand call each."""
    flat = h._flat
    fires = torch.zeros(batch, len(flat), dtype=torch.bool)
    for i, f in enumerate(flat):
        if f.parent < 0:
            fires[:, i] = torch.rand(batch, generator=g) < f.node.p
        if f.children and f.node.exclusive_children:  # one draw picks at most one child
            u = torch.rand(batch, 1, generator=g)
            pick = (u >= torch.tensor([flat[c].node.p for c in f.children]).cumsum(0)).sum(1)
            for k, c in enumerate(f.children):
                fires[:, c] = fires[:, i] & (pick == k)
        else:
            for c in f.children:
                fires[:, c] = fires[:, i] & (torch.rand(batch, generator=g) < flat[c].node.p)
    mags = torch.zeros(batch, len(flat))
    for i, f in enumerate(flat):
        m = f.node.magnitude
        mags[:, i] = m[0] + (m[1] - m[0]) * torch.rand(batch, generator=g) if isinstance(m, tuple) else m
    return fires.float() * mags


@pytest.mark.parametrize("make", [mixed_tree, nabeshima_tree, chanin_parent_children, chanin_absorption_order])
def test_vectorised_sampling_equals_the_rules_drawn_one_at_a_time(make):
    # the one-call sampler must draw exactly what the rule-by-rule procedure draws from the same
    # generator state (so seeds keep their meaning), and leave the generator in the same state
    h = make()
    for batch in (1, 37, 4096):
        g1, g2 = torch.Generator().manual_seed(batch), torch.Generator().manual_seed(batch)
        assert torch.equal(h.sample_coefficients(batch, g1), reference_coefficients(h, batch, g2))
        assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def test_sample_x_is_coefficients_times_features():
    h = mixed_tree()
    x, c = h.sample(300, torch.Generator().manual_seed(0))
    assert x.shape == (300, 6) and c.shape == (300, 6)
    expected = torch.zeros(300, 6)
    for i in range(6):
        expected += c[:, i : i + 1] * h.features[i]
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)


def test_children_never_fire_without_parent_and_exclusive_never_cofire():
    h = mixed_tree()
    c = h.sample_coefficients(N_BIG, torch.Generator().manual_seed(1))
    # every magnitude (fixed or range) is > 0, so "fired" is "coefficient != 0"
    fires = c != 0
    parent = {1: 0, 2: 0, 3: 2, 4: 2}
    for child, par in parent.items():
        assert not (fires[:, child] & ~fires[:, par]).any(), f"child {child} fired without parent {par}"
    assert not (fires[:, 3] & fires[:, 4]).any()
    # independent children B and C do co-fire
    assert (fires[:, 1] & fires[:, 2]).any()


def test_magnitudes_are_fixed_or_in_range():
    h = mixed_tree()
    c = h.sample_coefficients(20_000, torch.Generator().manual_seed(2))
    on = c != 0
    assert torch.all(c[on[:, 1], 1] == 2.0)
    assert torch.all(c[on[:, 5], 5] == 1.5)
    a = c[on[:, 0], 0]
    assert a.min() >= 1.0 and a.max() <= 3.0 and a.max() - a.min() > 1.9


def test_empirical_firing_rates_match_hand_computed_probabilities():
    h = mixed_tree()
    torch.testing.assert_close(h.firing_prob, torch.tensor(MIXED_FIRING, dtype=torch.float64))
    c = h.sample_coefficients(N_BIG, torch.Generator().manual_seed(3))
    rate = (c != 0).double().mean(0)
    p = torch.tensor(MIXED_FIRING, dtype=torch.float64)
    sigma = (p * (1 - p) / N_BIG).sqrt()
    assert torch.all((rate - p).abs() < 5 * sigma + 1e-12), (rate, p)


def test_empirical_l0_matches_expected_l0():
    h = nabeshima_tree()
    assert h.expected_l0() == pytest.approx(1.12, abs=1e-12)
    c = h.sample_coefficients(N_BIG, torch.Generator().manual_seed(4))
    l0 = (c != 0).double().sum(1)
    se = l0.std().item() / math.sqrt(N_BIG)
    assert abs(l0.mean().item() - 1.12) < 5 * se


def test_second_moment_matches_hand_computation():
    torch.testing.assert_close(mixed_tree().second_moment(), mixed_second_moment_by_hand(), atol=1e-12, rtol=0)


def test_second_moment_matches_empirical_moment():
    h = mixed_tree()
    c = h.sample_coefficients(N_BIG, torch.Generator().manual_seed(5)).double()
    prods = c[:, :, None] * c[:, None, :]  # [N, n, n]
    emp = prods.mean(0)
    se = prods.std(0) / math.sqrt(N_BIG)
    diff = (emp - h.second_moment()).abs()
    assert torch.all(diff <= 5 * se + 1e-9), diff.max()


def test_second_moment_nabeshima_exclusive_children_zero():
    h = nabeshima_tree()
    M = h.second_moment()
    # siblings of an exclusive parent never co-fire; parent-child joint = child firing prob
    assert M[1, 2] == 0 and M[5, 7] == 0
    assert M[0, 1] == pytest.approx(0.15 * 0.2)
    assert M[0, 0] == pytest.approx(0.15)
    assert M[12, 13] == pytest.approx(0.05 * 0.05)  # independent singletons
    assert M[0, 4] == pytest.approx(0.15 * 0.15)  # two different parents


# ---------------------------------------------------------------------------- presets
def test_nabeshima_tree_structure():
    h = nabeshima_tree()
    assert h.n_features == 20 and h.d == 20
    assert h.blocks() == [(0, 4), (4, 8), (8, 12)]
    expected_parent = [-1, 0, 0, 0, -1, 4, 4, 4, -1, 8, 8, 8] + [-1] * 8
    assert h.parent_index.tolist() == expected_parent
    assert h.children_of(4) == [5, 6, 7]
    probs = [0.15, 0.03, 0.03, 0.03] * 3 + [0.05] * 8
    torch.testing.assert_close(h.firing_prob, torch.tensor(probs, dtype=torch.float64))
    norms = h.features.norm(dim=1)
    assert not torch.allclose(norms, torch.ones(20))  # default jitter 0.05
    assert (norms - 1).abs().max() < 0.05 * 5


def test_chanin_parent_children_preset():
    h = chanin_parent_children()
    assert h.n_features == 3 and h.d == 20
    assert h.parent_index.tolist() == [-1, 0, 0]
    torch.testing.assert_close(h.firing_prob, torch.tensor([0.25, 0.05, 0.05], dtype=torch.float64))
    F = h.features.double()
    torch.testing.assert_close(F @ F.T, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    assert h.second_moment()[1, 2] == 0  # exclusive by default
    hi = chanin_parent_children(p_parent=0.5, p_child=0.3, n_children=3, exclusive=False, d=5)
    assert hi.n_features == 4 and hi.d == 5
    assert hi.second_moment()[1, 2].item() == pytest.approx(0.5 * 0.3 * 0.3)


def test_chanin_absorption_order_preset():
    h = chanin_absorption_order()
    assert h.n_features == 2
    torch.testing.assert_close(h.firing_prob, torch.tensor([0.3, 0.15], dtype=torch.float64))
    M = h.second_moment()
    # E||x||^2 shares: parent 0.3 * 2^2 = 1.2, child 0.15 * 10^2 = 15
    assert M[0, 0].item() == pytest.approx(1.2)
    assert M[1, 1].item() == pytest.approx(15.0)
    assert M[0, 1].item() == pytest.approx(0.15 * 2 * 10)


# ---------------------------------------------------------------------------- stacked sampler
def test_stacked_sampler_shape_and_content():
    hs = [chanin_parent_children(p_child=q, d=6) for q in (0.1, 0.3, 0.5)]
    sample = stacked_sampler(hs)
    x = sample(64, torch.Generator().manual_seed(0))
    assert x.shape == (64, 3, 6)
    # instance 0 is exactly hierarchy 0's first draw with the same generator state
    x0, _ = hs[0].sample(64, torch.Generator().manual_seed(0))
    torch.testing.assert_close(x[:, 0], x0)


def test_stacked_sampler_rejects_mismatched_d():
    with pytest.raises(ValueError, match=r"\[5, 6\]"):
        stacked_sampler([chanin_parent_children(d=5), chanin_parent_children(d=6)])
