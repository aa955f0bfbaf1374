"""Tests for the base Matryoshka loss in saelib.core.matryoshka.

Every method of ``matryoshka_loss`` (and the per-prefix error kernels behind them) is checked
against a naive loop that decodes every prefix separately; the
random prefix lengths against the truncated-Pareto formula and a brute-force enumeration of
sampling without replacement.
"""

import itertools

import pytest
import torch
from scipy.stats import chi2

import saelib.core.matryoshka as mat
from saelib.core.matryoshka import MatryoshkaConfig, latent_weights, matryoshka_loss, prefix_weights
from tests.builders import matryoshka_problem


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see tests/conftest.py


def build_problem(batch=6, inst=3, d_sae=7, d_in=4, dtype=torch.float64, seed=0):
    """Random (x, acts, W_dec, b_dec) with about half the activations exactly zero."""
    return matryoshka_problem(batch, inst, d_sae, d_in, dtype, seed)


def naive_prefix_errors(x, acts, W_dec, b_dec, lengths):
    """errs[b, i, k] = ||x[b,i] - sum_{j < lengths[k]} acts[b,i,j] W_dec[i,j] - b_dec[i]||^2, by loops."""
    batch, inst, _ = x.shape
    out = torch.zeros(batch, inst, len(lengths), dtype=x.dtype)
    for b in range(batch):
        for i in range(inst):
            for k, m in enumerate(lengths):
                recon = b_dec[i].clone()
                for j in range(m):
                    recon = recon + acts[b, i, j] * W_dec[i, j]
                out[b, i, k] = (x[b, i] - recon).pow(2).sum()
    return out


def naive_weighted_loss(x, acts, W_dec, b_dec, weights):
    d_sae = acts.shape[-1]
    errs = naive_prefix_errors(x, acts, W_dec, b_dec, list(range(1, d_sae + 1))).mean(0)  # [inst, d_sae]
    return (errs * weights).sum(-1)


def leaf_copies(*ts):
    return [t.clone().requires_grad_(True) for t in ts]


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"mode": "pareto"}, r"mode.*pareto"),
        ({"mode": "fixed"}, r"prefixes"),
        ({"n_prefixes": 0}, r"n_prefixes.*0"),
        ({"pareto_power": 0.0}, r"pareto_power.*0\.0"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        MatryoshkaConfig(**kw)


def test_min_prefix_below_one_is_rejected():
    with pytest.raises(ValueError, match=r"min_prefix"):
        MatryoshkaConfig(min_prefix=0)


def test_prefix_weights_errors():
    with pytest.raises(ValueError, match=r"\[9\]"):
        prefix_weights(MatryoshkaConfig(mode="fixed", prefixes=(2, 9)), d_sae=8, n_inst=1)
    with pytest.raises(ValueError, match=r"\[0\]"):
        prefix_weights(MatryoshkaConfig(mode="fixed", prefixes=(0, 3)), d_sae=8, n_inst=1)
    # 7 distinct lengths below d_sae = 8 exist (1..7); 9 prefixes need 8 of them
    with pytest.raises(ValueError, match=r"n_prefixes=9"):
        prefix_weights(MatryoshkaConfig(n_prefixes=9), d_sae=8, n_inst=1)


# ---------------------------------------------------------------------------- prefix weights
def test_every_mode_weights():
    w = prefix_weights(MatryoshkaConfig(mode="every"), d_sae=5, n_inst=2)
    torch.testing.assert_close(w, torch.full((2, 5), 0.2))


def test_fixed_mode_adds_full_length():
    w = prefix_weights(MatryoshkaConfig(mode="fixed", prefixes=(1, 3)), d_sae=6, n_inst=2)
    expected = torch.tensor([1 / 3, 0, 1 / 3, 0, 0, 1 / 3])
    torch.testing.assert_close(w, expected.expand(2, -1))
    # the full length given explicitly is not counted twice
    w2 = prefix_weights(MatryoshkaConfig(mode="fixed", prefixes=(3, 6, 3)), d_sae=6, n_inst=1)
    torch.testing.assert_close(w2[0], torch.tensor([0, 0, 0.5, 0, 0, 0.5]))


def test_inner_weight_scales_shorter_prefixes_by_hand():
    # prefixes {1, 3, 6}: raw weights 1/3 each; inner 0.5 -> (1/6, 1/6, 1/3) / (2/3)
    w = prefix_weights(MatryoshkaConfig(mode="fixed", prefixes=(1, 3), inner_weight=0.5), d_sae=6, n_inst=1)
    torch.testing.assert_close(w[0], torch.tensor([0.25, 0, 0.25, 0, 0, 0.5]))
    w0 = prefix_weights(MatryoshkaConfig(mode="fixed", prefixes=(1, 3), inner_weight=0.0), d_sae=6, n_inst=1)
    torch.testing.assert_close(w0[0], torch.tensor([0.0, 0, 0, 0, 0, 1]))
    # every: 4 inner prefixes at weight 2, the full one at 1 -> 2/9 and 1/9
    we = prefix_weights(MatryoshkaConfig(mode="every", inner_weight=2.0), d_sae=5, n_inst=1)
    torch.testing.assert_close(we[0], torch.tensor([2 / 9, 2 / 9, 2 / 9, 2 / 9, 1 / 9]))


@pytest.mark.parametrize("inner_weight", [1.0, 0.3, 4.0])
@pytest.mark.parametrize(
    "cfg_kw", [{"mode": "every"}, {"mode": "fixed", "prefixes": (2, 5)}, {"mode": "random", "n_prefixes": 4}]
)
def test_prefix_weight_rows_sum_to_one(cfg_kw, inner_weight):
    w = prefix_weights(MatryoshkaConfig(**cfg_kw, inner_weight=inner_weight), 12, 5, torch.Generator().manual_seed(0))
    assert w.shape == (5, 12) and torch.all(w >= 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(5))
    # every chosen inner prefix weighs inner_weight times the full prefix
    inner = w[:, :-1]
    torch.testing.assert_close(inner[inner > 0], torch.full_like(inner[inner > 0], 1.0) * inner_weight * w[0, -1])


@pytest.mark.parametrize("n_prefixes, min_prefix", [(1, 1), (4, 1), (10, 1), (3, 5)])
def test_random_mode_rows(n_prefixes, min_prefix):
    d_sae = 16
    cfg = MatryoshkaConfig(n_prefixes=n_prefixes, min_prefix=min_prefix)
    w = prefix_weights(cfg, d_sae, n_inst=50, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(w.sum(-1), torch.ones(50))
    for row in w:
        lengths = (row.nonzero().flatten() + 1).tolist()
        assert len(lengths) == n_prefixes
        assert d_sae in lengths
        assert all(min_prefix <= m <= d_sae for m in lengths)
        torch.testing.assert_close(row[row > 0], torch.full((n_prefixes,), 1 / n_prefixes))
    # instances draw independently
    assert len({tuple(r.tolist()) for r in w}) > 1 or n_prefixes == 1


def test_random_mode_is_deterministic_per_generator():
    cfg = MatryoshkaConfig(n_prefixes=5)
    a = prefix_weights(cfg, 32, 4, torch.Generator().manual_seed(3))
    b = prefix_weights(cfg, 32, 4, torch.Generator().manual_seed(3))
    c = prefix_weights(cfg, 32, 4, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_independent_weights_draw_each_row_from_its_own_generator():
    """Row i is prefix_weights(configs[i], d_sae, 1, generators[i]): the same for any other
    instances beside it (TrainConfig.independent_instances)."""
    cfgs = [MatryoshkaConfig(n_prefixes=5), MatryoshkaConfig(mode="fixed", prefixes=(4,)), MatryoshkaConfig(n_prefixes=3, inner_weight=0.5)]
    plan = mat.PerInstanceMatryoshka.build(cfgs, 3)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    w = plan.independent_weights(32, gens)
    for i, (cfg, seed) in enumerate(zip(cfgs, (1, 2, 3))):
        assert torch.equal(w[i : i + 1], prefix_weights(cfg, 32, 1, torch.Generator().manual_seed(seed)))
    # the last instance alone, from the same generator state
    alone = mat.PerInstanceMatryoshka.build(cfgs[2:], 1).independent_weights(32, [torch.Generator().manual_seed(3)])
    assert torch.equal(alone, w[2:])
    with pytest.raises(ValueError, match=r"2 generators for 3 instances"):
        plan.independent_weights(32, gens[:2])


def pareto_probs(lengths, d_sae, p):
    raw = [(m / d_sae) ** p - ((m - 1) / d_sae) ** p for m in lengths]
    total = sum(raw)
    return [r / total for r in raw]


def chi_square_ok(counts, expected):
    stat = sum((c - e) ** 2 / e for c, e in zip(counts, expected))
    return stat < chi2.ppf(1 - 1e-6, len(counts) - 1), stat


@pytest.mark.parametrize("power, min_prefix", [(0.5, 1), (2.0, 3)])
def test_random_single_length_follows_truncated_pareto(power, min_prefix):
    d_sae, n = 10, 40_000
    cfg = MatryoshkaConfig(n_prefixes=2, pareto_power=power, min_prefix=min_prefix)
    w = prefix_weights(cfg, d_sae, n_inst=n, generator=torch.Generator().manual_seed(1))
    sampled = w[:, : d_sae - 1] > 0  # the one non-full length per row
    assert torch.all(sampled.sum(1) == 1)
    counts = sampled.sum(0).tolist()
    lengths = list(range(min_prefix, d_sae))
    assert all(c == 0 for c in counts[: min_prefix - 1])
    probs = pareto_probs(lengths, d_sae, power)
    ok, stat = chi_square_ok(counts[min_prefix - 1 :], [n * q for q in probs])
    assert ok, stat


def test_random_several_lengths_match_sampling_without_replacement():
    """Inclusion probability of each length when 3 distinct lengths are drawn one after another,
    each with probability proportional to the Pareto mass among those not yet drawn."""
    d_sae, n, power = 8, 40_000, 0.5
    lengths = list(range(1, d_sae))
    probs = dict(zip(lengths, pareto_probs(lengths, d_sae, power)))
    incl = {m: 0.0 for m in lengths}
    for seq in itertools.permutations(lengths, 3):
        p, left = 1.0, 1.0
        for m in seq:
            p *= probs[m] / left
            left -= probs[m]
        for m in seq:
            incl[m] += p
    assert sum(incl.values()) == pytest.approx(3.0)
    cfg = MatryoshkaConfig(n_prefixes=4, pareto_power=power)
    w = prefix_weights(cfg, d_sae, n_inst=n, generator=torch.Generator().manual_seed(2))
    counts = (w[:, : d_sae - 1] > 0).sum(0).double()
    expected = torch.tensor([n * incl[m] for m in lengths], dtype=torch.float64)
    sd = (expected * (1 - expected / n)).sqrt()
    assert torch.all((counts - expected).abs() < 5 * sd), (counts, expected)


# ---------------------------------------------------------------------------- latent weights
def test_latent_weights_by_hand():
    w = prefix_weights(MatryoshkaConfig(mode="fixed", prefixes=(1, 3)), d_sae=4, n_inst=1)
    # prefixes {1, 3, 4}: latent 0 is in all three, latents 1 and 2 in {3, 4}, latent 3 in {4}
    torch.testing.assert_close(latent_weights(w)[0], torch.tensor([1.0, 2 / 3, 2 / 3, 1 / 3]))
    g = torch.Generator().manual_seed(0)
    w = torch.rand(3, 6, generator=g)
    expected = torch.zeros(3, 6)
    for i in range(3):
        for j in range(6):
            expected[i, j] = sum(w[i, m - 1] for m in range(1, 7) if m > j)
    torch.testing.assert_close(latent_weights(w), expected)


# ---------------------------------------------------------------------------- prefix errors
def test_gram_errors_matches_naive_loop_values_and_gradients():
    x, acts, W_dec, b_dec = build_problem()
    d_sae = acts.shape[-1]
    coef = torch.rand(d_sae, dtype=torch.float64)  # an arbitrary linear functional of the errors
    a1 = leaf_copies(acts, W_dec, b_dec)
    fast = mat._gram_errors(x, *a1)
    a2 = leaf_copies(acts, W_dec, b_dec)
    slow = naive_prefix_errors(x, *a2, list(range(1, d_sae + 1)))
    torch.testing.assert_close(fast, slow, atol=1e-10, rtol=1e-10)
    (fast * coef).sum().backward()
    (slow * coef).sum().backward()
    for t1, t2, name in zip(a1, a2, ("acts", "W_dec", "b_dec")):
        torch.testing.assert_close(t1.grad, t2.grad, atol=1e-10, rtol=1e-10, msg=name)


def test_gram_errors_float32_close():
    x, acts, W_dec, b_dec = build_problem(dtype=torch.float32, seed=5)
    slow = naive_prefix_errors(x.double(), acts.double(), W_dec.double(), b_dec.double(), list(range(1, 8)))
    torch.testing.assert_close(mat._gram_errors(x, acts, W_dec, b_dec).double(), slow, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("ends", [[7], [1, 7], [2, 3, 5, 7], [1, 2, 3, 4, 5, 6, 7], [4]])
def test_block_errors_matches_naive_loop(ends):
    x, acts, W_dec, b_dec = build_problem(seed=1)
    coef = torch.rand(len(ends), dtype=torch.float64)
    a1 = leaf_copies(acts, W_dec, b_dec)
    fast = mat._block_errors(x, *a1, torch.tensor(ends))
    a2 = leaf_copies(acts, W_dec, b_dec)
    slow = naive_prefix_errors(x, *a2, ends)
    assert fast.shape == (6, 3, len(ends))
    torch.testing.assert_close(fast, slow, atol=1e-10, rtol=1e-10)
    (fast * coef).sum().backward()
    (slow * coef).sum().backward()
    for t1, t2, name in zip(a1, a2, ("acts", "W_dec", "b_dec")):
        torch.testing.assert_close(t1.grad, t2.grad, atol=1e-10, rtol=1e-10, msg=name)


# ---------------------------------------------------------------------------- loss
def loss_weights(d_sae, inst, seed=0):
    """Random prefix weights per instance (different prefix sets), rows summing to 1."""
    cfg = MatryoshkaConfig(n_prefixes=3)
    return prefix_weights(cfg, d_sae, inst, torch.Generator().manual_seed(seed)).double()


METHODS = ["loop", "gram", "blocks", "sparse", "auto"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_matches_naive_weighted_mean_values_and_gradients(method):
    x, acts, W_dec, b_dec = build_problem(seed=2)
    weights = loss_weights(7, 3)
    assert len({tuple(r.tolist()) for r in weights}) > 1  # instances use different prefixes
    a1 = leaf_copies(acts, W_dec, b_dec)
    fast = matryoshka_loss(x, *a1, weights, method=method)
    a2 = leaf_copies(acts, W_dec, b_dec)
    slow = naive_weighted_loss(x, *a2, weights)
    assert fast.shape == (3,)
    torch.testing.assert_close(fast, slow, atol=1e-10, rtol=1e-10)
    fast.sum().backward()
    slow.sum().backward()
    if method == "sparse":  # exact at the active latents, reported as 0 at the inactive ones
        active = acts != 0
        assert (a1[0].grad[~active] == 0).all()
        a2[0].grad[~active] = 0
    for t1, t2, name in zip(a1, a2, ("acts", "W_dec", "b_dec")):
        torch.testing.assert_close(t1.grad, t2.grad, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_full_prefix_only_is_plain_mse(method):
    x, acts, W_dec, b_dec = build_problem(seed=3)
    weights = torch.zeros(3, 7, dtype=torch.float64)
    weights[:, -1] = 1.0
    expected = (x - torch.einsum("bis,isd->bid", acts, W_dec) - b_dec).pow(2).sum(-1).mean(0)
    torch.testing.assert_close(matryoshka_loss(x, acts, W_dec, b_dec, weights, method=method), expected)


def test_auto_rule_picks_each_method(monkeypatch):
    x, acts, W_dec, b_dec = build_problem(seed=4)  # d_sae 7 > d_in 4, ReLU-like acts
    every = torch.full((3, 7), 1 / 7, dtype=torch.float64)
    assert mat._auto_method(x, acts, every, None) == "gram"  # small problem
    assert mat._auto_method(x, acts, every, torch.ones_like(acts)) == "gram"  # per-term weights
    monkeypatch.setattr(mat, "_DENSE_PREFIX_LIMIT", 0)  # as if the problem were large
    assert mat._auto_method(x, acts, every, None) == "sparse"  # row L0 <= 6 < 7 chosen lengths
    dense = acts + 1.0  # every latent active: L0 7, not below 7 chosen lengths
    assert mat._auto_method(x, dense, every, None) == "blocks"
    assert mat._auto_method(x, dense, every, torch.ones_like(acts)) == "gram"
    wide_in = torch.randn(6, 3, 7, dtype=torch.float64)  # d_sae <= d_in keeps the Gram path
    assert mat._auto_method(wide_in, dense, every, None) == "gram"


def test_bad_arguments_raise():
    x, acts, W_dec, b_dec = build_problem(seed=5)
    w = torch.full((3, 7), 1 / 7, dtype=torch.float64)
    with pytest.raises(ValueError, match="method"):
        matryoshka_loss(x, acts, W_dec, b_dec, w, method="fast")
    with pytest.raises(ValueError, match="sparse"):
        matryoshka_loss(x, acts, W_dec, b_dec, w, keep=torch.ones_like(acts), method="sparse")
    with pytest.raises(ValueError, match="weights"):
        matryoshka_loss(x, acts, W_dec, b_dec, w[:, :4])
    with pytest.raises(ValueError, match="W_dec"):
        matryoshka_loss(x, acts, W_dec[:, :4], b_dec, w)
    with pytest.raises(ValueError, match="share batch"):
        matryoshka_loss(x[:3], acts, W_dec, b_dec, w)
    with pytest.raises(ValueError, match="inner_grad_scale"):
        matryoshka_loss(x, acts, W_dec, b_dec, w, inner_grad_scale=torch.zeros(2))
    with pytest.raises(ValueError, match="keep"):
        matryoshka_loss(x, acts, W_dec, b_dec, w, keep=torch.ones_like(acts)[:, :1])
