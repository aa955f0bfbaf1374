"""Tests for saelib.core.train: schedule, validation, convergence on toy data, determinism, instance
independence, the adaptive L1 controller, dead-latent resampling, transcoders and the Matryoshka
latent permutation with its Adam moments."""

import copy
import re

import pytest
import torch

from saelib.core.matryoshka import MatryoshkaConfig
from saelib.core.sae import SAE, SAEConfig
from saelib.data.toy_data import nabeshima_tree
from saelib.core.train import History, TrainConfig, TrainingDivergedError, train_sae, wsd_lr_factor
from saelib.core.train_parts import _permute_with_optimizer
from tests import builders

TREE = nabeshima_tree()


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see tests/conftest.py


def tree_data(batch: int, g: torch.Generator) -> torch.Tensor:
    return TREE.sample(batch, g)[0]


def build_sae_cfg(**kw) -> SAEConfig:
    """An SAE sized for the 20-feature Nabeshima tree; keyword arguments override."""
    return builders.build_sae_cfg(**{"d_in": 20, "d_sae": 20, "n_inst": 2, **kw})


def build_train_cfg(**kw) -> TrainConfig:
    """A short, quiet training run; keyword arguments override."""
    return TrainConfig(
        **{"steps": 150, "batch_size": 64, "warmup_steps": 10, "l1_coeff": 0.05, "log_every": 50, "progress": False, **kw}
    )


def params_of(sae: SAE) -> dict[str, torch.Tensor]:
    return {n: getattr(sae, n).detach().clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}


# ---------------------------------------------------------------------------- schedule
def test_wsd_lr_factor_by_hand():
    cfg = TrainConfig(steps=100, warmup_steps=10, decay_frac=0.2, end_lr_factor=0.1)
    expected = {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 50: 1.0, 79: 1.0, 80: 1.0, 90: 0.55, 95: 0.325, 100: 0.1, 150: 0.1}
    for step, want in expected.items():
        assert wsd_lr_factor(step, cfg) == pytest.approx(want), step
    # monotone: up during warm-up, flat, then down
    f = [wsd_lr_factor(s, cfg) for s in range(100)]
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))
    assert all(a >= b for a, b in zip(f[80:], f[81:]))
    no_decay = TrainConfig(steps=100, warmup_steps=0, decay_frac=0.0)
    assert [wsd_lr_factor(s, no_decay) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"steps": 0}, r"steps.*0"),
        ({"batch_size": -3}, r"batch_size.*-3"),
        ({"log_every": 0}, r"log_every.*0"),
        ({"steps": 2.5}, r"steps.*2\.5"),
        ({"lr": 0.0}, r"lr.*0\.0"),
        ({"lr": float("nan")}, r"lr.*nan"),
        ({"decay_frac": 1.5}, r"decay_frac.*1\.5"),
        ({"l1_warmup_frac": -0.1}, r"l1_warmup_frac.*-0\.1"),
        ({"grad_clip": 0.0}, r"grad_clip.*0\.0"),
    ],
)
def test_train_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_resample_dead_every_zero_is_rejected():
    with pytest.raises(ValueError, match=r"resample_dead_every"):
        TrainConfig(resample_dead_every=0)


# ---------------------------------------------------------------------------- data checks
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"l1_coeff": [0.1, 0.2, 0.3]}, r"l1_coeff.*3.*n_inst=2"),
        ({"l1_coeff": -1.0}, r"l1_coeff"),
        ({"target_l0": [1.0, 2.0, 3.0]}, r"target_l0.*3.*n_inst=2"),
        ({"target_l0": [1.0, float("nan")]}, r"target_l0"),
    ],
)
def test_per_instance_values_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        train_sae(SAE(build_sae_cfg()), tree_data, build_train_cfg(steps=2, **kw))


def test_stored_activation_checks():
    x = TREE.sample(100, torch.Generator().manual_seed(0))[0]
    bad = x.clone()
    bad[7, 3] = float("nan")
    cfg = build_train_cfg(steps=2)
    with pytest.raises(ValueError, match=r"NaN.*7"):
        train_sae(SAE(build_sae_cfg()), bad, cfg)
    with pytest.raises(ValueError, match=r"\[n_samples, 20\]"):
        train_sae(SAE(build_sae_cfg()), x[:, :5], cfg)
    tc = SAE(build_sae_cfg(d_out=4, apply_b_dec_to_input=False))
    with pytest.raises(ValueError, match=r"100.*99"):
        train_sae(tc, (x, torch.zeros(99, 4)), cfg)
    with pytest.raises(ValueError, match=r"target"):
        train_sae(tc, (x, torch.full((100, 4), float("inf"))), cfg)


def test_divergent_runs_raise():
    with pytest.raises(TrainingDivergedError, match=r"step"):
        train_sae(SAE(build_sae_cfg()), tree_data, build_train_cfg(steps=30, lr=1e4, grad_clip=None, warmup_steps=1))


@pytest.mark.parametrize("architecture, k", [("relu", None), ("topk", 3)])
def test_non_finite_batch_is_bad_data_not_divergence(architecture, k):
    """A data function that returns NaN/inf raises ValueError naming the step and the instance
    (SAE.encode itself passes NaN through), not TrainingDivergedError."""

    def nan_at_step_3_in_instance_1(batch, g, calls=[0]):
        x = tree_data(batch, g)[:, None, :].repeat(1, 2, 1)  # [batch, inst=2, d_in]
        if calls[0] == 3:
            x[5, 1, 0] = float("nan")
        calls[0] += 1
        return x

    sae = SAE(build_sae_cfg(architecture=architecture, k=k))
    with pytest.raises(ValueError, match=r"non-finite input batch at step 3 for instance\(s\) \[1\].*rows \[5\]"):
        train_sae(sae, nan_at_step_3_in_instance_1, build_train_cfg(steps=10))

    def inf_target(batch, g):  # a transcoder's targets are checked too
        x = tree_data(batch, g)
        return x, torch.where(torch.arange(4) == 2, float("inf"), x[:, :4])

    tc = SAE(build_sae_cfg(d_out=4, apply_b_dec_to_input=False, architecture=architecture, k=k))
    with pytest.raises(ValueError, match=r"non-finite target batch at step 0 for instance\(s\) \[0, 1\]"):
        train_sae(tc, inf_target, build_train_cfg(steps=5))


@pytest.mark.parametrize("target_l0, bad", [(50, [0, 1]), (0.0, [0, 1]), ([2.0, 5.0], [1])])
def test_unreachable_target_l0_is_rejected(target_l0, bad):
    """An L0 above d_sae (or <= 0) cannot be reached: rejected up front, naming both values."""
    sae = SAE(build_sae_cfg(d_sae=4))
    with pytest.raises(ValueError, match=re.escape(f"target_l0={target_l0!r}") + r".*d_sae=4.*" + re.escape(f"instance(s) {bad}")):
        train_sae(sae, tree_data, build_train_cfg(steps=2, target_l0=target_l0))
    train_sae(sae, tree_data, build_train_cfg(steps=2, target_l0=4))  # d_sae itself is reachable


def test_transcoder_given_one_tensor_is_rejected():
    x = TREE.sample(100, torch.Generator().manual_seed(0))[0]
    tc = SAE(build_sae_cfg(d_out=4, apply_b_dec_to_input=False))
    with pytest.raises(ValueError, match=r"transcoder \(d_in=20, d_out=4\).*\(inputs, targets\).*one tensor of shape \(100, 20\)"):
        train_sae(tc, x, build_train_cfg(steps=2))
    with pytest.raises(ValueError, match=r"transcoder \(d_in=20, d_out=4\).*\(inputs, targets\).*one tensor of shape \(64, 20\)"):
        train_sae(tc, tree_data, build_train_cfg(steps=2))


def test_infinite_first_loss_names_the_instance():
    """+inf at the very first step (overflowing squares, not NaN) must not pass as a baseline."""

    def overflow_in_instance_1(batch, g):
        x = tree_data(batch, g)[:, None, :].repeat(1, 2, 1)  # [batch, inst=2, d_in]
        x[:, 1] *= 1e30
        return x

    with pytest.raises(TrainingDivergedError, match=r"non-finite loss at step 0 for instance\(s\) \[1\]"):
        train_sae(SAE(build_sae_cfg(n_inst=2)), overflow_in_instance_1, build_train_cfg(steps=5))


# ---------------------------------------------------------------------------- training
def test_short_run_reduces_mse_on_toy_tree():
    sae = SAE(build_sae_cfg())
    hist = train_sae(sae, tree_data, build_train_cfg(steps=300, batch_size=128, l1_coeff=0.01))
    assert isinstance(hist, History) and not sae.training
    t = hist.as_tensors()
    assert t["step"].tolist() == [0, 50, 100, 150, 200, 250, 299]
    assert t["mse"].shape == (7, 2)
    # E||x||^2 = sum_i P(fire_i) ||f_i||^2 ~ 1.12; a fresh SAE with 0.1-norm decoders is close to that
    assert torch.all(t["mse"][0] > 0.5)
    x = TREE.sample(4000, torch.Generator().manual_seed(123))[0]
    x_hat, _ = sae(x)
    mse = (x[:, None] - x_hat).pow(2).sum(-1).mean(0)
    var = (x - x.mean(0)).pow(2).sum(-1).mean()
    assert torch.all(mse < 0.1 * var), mse / var


def test_same_seed_same_history_and_weights():
    runs = []
    for seed in (3, 3, 4):
        sae = SAE(build_sae_cfg())
        hist = train_sae(sae, tree_data, build_train_cfg(steps=60, log_every=10, seed=seed, target_l0=1.5))
        runs.append((hist.as_tensors(), params_of(sae)))
    (h1, p1), (h2, p2), (h3, p3) = runs
    for k in h1:
        assert torch.equal(h1[k], h2[k]), k
    for k in p1:
        assert torch.equal(p1[k], p2[k]), k
    assert not torch.equal(p1["W_enc"], p3["W_enc"])


def double_tree_data(batch, g):
    return tree_data(batch, g).double()


def train_together_and_alone(sae_kw=None, cfg_kw=None, prepare=None, instance=0, data=double_tree_data):
    """Train a 2-instance SAE, and a copy of its ``instance`` on its own; return both SAEs and
    histories (compare with :func:`assert_instance_equal`). With ``independent_instances`` the
    lone run says which instance it is (``instance_ids=[instance]``).

    Runs in float64: in float32 the two runs differ by ~1e-7 from reduction order alone (e.g.
    ``mean(0)`` over a ``[batch, 2]`` vs ``[batch, 1]`` tensor), and a ReLU pre-activation that
    sits within that noise of 0 can flip and send the runs apart; float64 makes such a flip
    vanishingly unlikely, while a real coupling between instances still shows up at O(1).
    """
    sae2 = SAE(build_sae_cfg(**(sae_kw or {})))
    if prepare is not None:
        prepare(sae2)
    sae1 = sae2.instance(instance).double()
    sae2.double()
    cfg_kw = {"steps": 150, **(cfg_kw or {})}
    cfg2 = build_train_cfg(**cfg_kw)
    cfg1_kw = {k: (v[instance : instance + 1] if isinstance(v, list) else v) for k, v in cfg_kw.items()}
    if cfg_kw.get("independent_instances"):
        cfg1_kw["instance_ids"] = [instance]
    cfg1 = build_train_cfg(**cfg1_kw)

    h2 = train_sae(sae2, data, cfg2)
    h1 = train_sae(sae1, data, cfg1)
    return sae2, sae1, h2, h1


def assert_instance_equal(sae2, sae1, h2, h1, atol=1e-9, instance=0):
    """Instance ``instance`` of ``sae2`` equals the only instance of ``sae1`` (weights and MSE curve)."""
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sae2, name)[instance], getattr(sae1, name)[0], atol=atol, rtol=0, msg=name)
    torch.testing.assert_close(h2.as_tensors()["mse"][:, instance], h1.as_tensors()["mse"][:, 0], atol=atol, rtol=0)


def assert_instance0_equal(sae2, sae1, h2, h1, atol=1e-9):
    assert_instance_equal(sae2, sae1, h2, h1, atol=atol, instance=0)


def kill_instance1_latents(sae):
    with torch.no_grad():
        sae.b_enc[1, :4] = -100.0


@pytest.mark.parametrize(
    "sae_kw, cfg_kw",
    [
        ({}, {"l1_coeff": [0.05, 0.5]}),  # different per-instance coefficients
        ({}, {"target_l0": [1.5, 4.0], "l1_warmup_frac": 0.1}),  # per-instance controller
        ({"architecture": "batchtopk", "k": 2}, {}),
        ({}, {"matryoshka": MatryoshkaConfig(mode="fixed", prefixes=(3, 8), permute_latents=True)}),
    ],
    ids=["l1_sweep", "target_l0", "batchtopk", "matryoshka_fixed_permute"],
)
def test_training_two_instances_equals_training_instance_zero_alone(sae_kw, cfg_kw):
    sae2, sae1, h2, h1 = train_together_and_alone(sae_kw, cfg_kw)
    assert_instance0_equal(sae2, sae1, h2, h1)
    # and the two instances really did train differently
    assert not torch.allclose(sae2.W_enc[0], sae2.W_enc[1], atol=1e-3)


def test_random_matryoshka_shared_streams_couple_instances():
    """The documented default (independent_instances=False): random Matryoshka prefix lengths come
    from one multinomial draw over all instances, so instance 0's result depends on n_inst; the
    notebooks' seed sweeps therefore set independent_instances (tested below)."""
    with pytest.raises(AssertionError):
        assert_instance0_equal(*train_together_and_alone(cfg_kw={"matryoshka": MatryoshkaConfig(n_prefixes=4)}))
    assert_instance0_equal(*train_together_and_alone(cfg_kw={"matryoshka": MatryoshkaConfig(n_prefixes=4),
                                                             "independent_instances": True}))


STORED = TREE.sample(500, torch.Generator().manual_seed(11))[0].double()
A_TC = torch.randn(20, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / 20**0.5


@pytest.mark.parametrize("instance", [0, 1])
@pytest.mark.parametrize(
    "sae_kw, cfg_kw, prepare, data",
    [
        ({}, {"matryoshka": MatryoshkaConfig(n_prefixes=4)}, None, double_tree_data),
        ({}, {"matryoshka": MatryoshkaConfig(n_prefixes=4, permute_latents=True), "target_l0": [1.5, 3.0]}, None, double_tree_data),
        ({}, {"resample_dead_every": 20}, kill_instance1_latents, double_tree_data),
        ({}, {"l1_coeff": [0.05, 0.2]}, None, STORED),
        ({"d_out": 4, "apply_b_dec_to_input": False}, {"l1_coeff": 0.003}, None, (STORED, STORED @ A_TC)),
    ],
    ids=["matryoshka_random", "matryoshka_random_permute_target_l0", "resampling", "stored_tensor", "transcoder_pair"],
)
def test_independent_instances_equal_each_instance_trained_alone(sae_kw, cfg_kw, prepare, data, instance):
    """With ``independent_instances`` every instance has its own data, prefix and resampling
    streams: instance ``i`` of a 2-instance run equals instance ``i`` trained alone
    (``instance_ids=[i]``), including the random prefixes that couple instances by default
    (float64; see :func:`train_together_and_alone`)."""
    cfg_kw = {**cfg_kw, "independent_instances": True}
    sae2, sae1, h2, h1 = train_together_and_alone(sae_kw, cfg_kw, prepare, instance=instance, data=data)
    assert_instance_equal(sae2, sae1, h2, h1, instance=instance)
    assert not torch.allclose(sae2.W_enc[0], sae2.W_enc[1], atol=1e-3)


def first_instances(sae: SAE, n: int) -> SAE:
    """A copy of the first ``n`` instances of ``sae``."""
    out = SAE(SAEConfig.from_dict({**sae.cfg.to_dict(), "n_inst": n}))
    with torch.no_grad():
        for name, t in list(sae.named_parameters()) + list(sae.named_buffers()):
            getattr(out, name).copy_(t[:n])
    return out


@pytest.mark.parametrize(
    "cfg_kw",
    [
        {"target_l0": 1.5, "l1_warmup_frac": 0.1},
        {"matryoshka": MatryoshkaConfig(n_prefixes=4, permute_latents=True)},
    ],
    ids=["relu_target_l0", "matryoshka_random_permute"],
)
def test_independent_instances_three_and_two_instance_runs_agree_exactly(cfg_kw):
    """Instance 0 (and 1) of a 3-instance run equals that of a 2-instance run bit for bit, in
    float32: with their own streams the instances get the same batches and prefixes, and on the
    CPU (one thread) every batched kernel (bmm/einsum over instances, reductions over the batch
    of a ``[batch, inst]`` tensor) computes one instance's slice the same way for 2 and 3
    instances. (A lone run, ``n_inst = 1``, takes other kernel paths and agrees only to float32
    rounding, ~1e-7 per step, which training can amplify; hence the float64 test above.)"""
    sae3 = SAE(build_sae_cfg(n_inst=3))
    sae2 = first_instances(sae3, 2)
    cfg = build_train_cfg(steps=200, independent_instances=True, **cfg_kw)
    h3, h2 = train_sae(sae3, tree_data, cfg), train_sae(sae2, tree_data, cfg)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae3, name)[:2], getattr(sae2, name)), name
    assert torch.equal(h3.as_tensors()["mse"][:, :2], h2.as_tensors()["mse"])
    assert not torch.allclose(sae3.W_enc[0], sae3.W_enc[2], atol=1e-3)


def test_data_streams_shared_by_default_and_per_instance_when_independent():
    """Default: one data call per step with the generator ``manual_seed(seed)``, its batch seen by
    every instance. ``independent_instances``: one call per instance per step, each with its own
    generator (distinct initial states, the same for the same ``(seed, instance id)``)."""
    from saelib.core.data_streams import DATA_STREAM, instance_generators

    def recorder(calls):
        def data(batch, g):
            calls.append((id(g), g.get_state()))
            return tree_data(batch, g)

        return data

    shared: list = []
    train_sae(SAE(build_sae_cfg(n_inst=3)), recorder(shared), build_train_cfg(steps=4, seed=7))
    assert len(shared) == 4 and len({i for i, _ in shared}) == 1
    assert torch.equal(shared[0][1], torch.Generator().manual_seed(7).get_state())

    own: list = []
    train_sae(SAE(build_sae_cfg(n_inst=3)), recorder(own), build_train_cfg(steps=4, seed=7, independent_instances=True))
    assert len(own) == 12 and len({i for i, _ in own}) == 3
    first = [state for _, state in own[:3]]
    want = [g.get_state() for g in instance_generators(7, [0, 1, 2], DATA_STREAM)]
    assert all(torch.equal(a, b) for a, b in zip(first, want))
    assert not any(torch.equal(first[a], first[b]) for a, b in ((0, 1), (0, 2), (1, 2)))
    lone = [g.get_state() for g in instance_generators(7, [2], DATA_STREAM)]
    assert torch.equal(lone[0], first[2])


def test_repeated_instance_ids_share_one_data_draw_and_train_alike():
    """Instances with one id (``instance_ids=[0, 1, 0, 1]``) get one data call per distinct id per
    step and the same data and prefix draws: started from the same weights, instance 2 ends
    equal to instance 0 and 3 to 1 (float64, to the 1e-9 of the tests above: batched kernels
    may round instance slices differently), while 0 and 1 differ by O(1)."""
    calls: list = []

    def data(batch, g):
        calls.append(id(g))
        return tree_data(batch, g).double()

    two = SAE(build_sae_cfg(n_inst=2, dtype="float64"))
    sae = SAE(build_sae_cfg(n_inst=4, dtype="float64"))
    with torch.no_grad():
        for name, t in list(two.named_parameters()) + list(two.named_buffers()):
            getattr(sae, name).copy_(torch.cat([t, t]))
    cfg = build_train_cfg(steps=60, independent_instances=True, instance_ids=[0, 1, 0, 1],
                          matryoshka=MatryoshkaConfig(n_prefixes=4))
    h = train_sae(sae, data, cfg).as_tensors()["mse"]
    assert len(calls) == 2 * 60 and len(set(calls)) == 2
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        w = getattr(sae, name)
        torch.testing.assert_close(w[2:], w[:2], atol=1e-9, rtol=0, msg=name)
    torch.testing.assert_close(h[:, 2:], h[:, :2], atol=1e-9, rtol=0)
    assert not torch.allclose(sae.W_enc[0], sae.W_enc[1], atol=1e-3)


def test_one_data_function_per_instance():
    """``data=[f_0, f_1]`` with ``independent_instances``: instance ``i`` draws from ``f_i`` with its
    own generator, so instance 1 of ``[f_a, f_b]`` trains exactly as instance 1 of ``[f_b, f_b]``
    (same function, same stream, same start), instance 0 differs, and ``[f, f]`` equals the single
    function ``f``. Ids that repeat still give each instance its own function's draw."""
    other = nabeshima_tree(seed=5)
    f_a, f_b = tree_data, lambda batch, g: other.sample(batch, g)[0]
    cfg = build_train_cfg(steps=80, independent_instances=True)
    runs = {}
    for name, data in {"ab": [f_a, f_b], "bb": [f_b, f_b], "aa": [f_a, f_a], "a": f_a}.items():
        runs[name] = SAE(build_sae_cfg(n_inst=2))
        train_sae(runs[name], data, cfg)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(runs["ab"], name)[1], getattr(runs["bb"], name)[1]), name
        assert torch.equal(getattr(runs["ab"], name)[0], getattr(runs["aa"], name)[0]), name
        assert torch.equal(getattr(runs["aa"], name), getattr(runs["a"], name)), name
    assert not torch.allclose(runs["ab"].W_dec[0], runs["bb"].W_dec[0], atol=1e-3)

    calls: list = []

    def recording(f):
        def data(batch, g):
            calls.append(f)
            return f(batch, g)
        return data

    train_sae(SAE(build_sae_cfg(n_inst=2)), [recording(f_a), recording(f_b)],
              build_train_cfg(steps=3, independent_instances=True, instance_ids=[0, 0]))
    assert calls == [f_a, f_b] * 3

    with pytest.raises(ValueError, match=r"list of data functions \(one per instance\) needs TrainConfig.independent_instances=True"):
        train_sae(SAE(build_sae_cfg(n_inst=2)), [f_a, f_b], build_train_cfg(steps=2))
    with pytest.raises(ValueError, match=r"one function per instance: got 1 entries .* for n_inst=2"):
        train_sae(SAE(build_sae_cfg(n_inst=2)), [f_a], build_train_cfg(steps=2, independent_instances=True))


def test_independent_instances_checks():
    with pytest.raises(ValueError, match=r"instance_ids needs independent_instances=True"):
        TrainConfig(instance_ids=[0])
    with pytest.raises(ValueError, match=r"instance_ids.*ints >= 0"):
        TrainConfig(independent_instances=True, instance_ids=[0, -1])
    with pytest.raises(ValueError, match=r"instance_ids has 1 ids but n_inst=2"):
        train_sae(SAE(build_sae_cfg()), tree_data, build_train_cfg(steps=2, independent_instances=True, instance_ids=[3]))

    def stacked(batch, g):  # [batch, inst, d]: not one instance's batch
        return tree_data(batch, g)[:, None].repeat(1, 2, 1)

    with pytest.raises(ValueError, match=r"one instance's batch \[batch, d\], got shape \(64, 2, 20\) at step 0"):
        train_sae(SAE(build_sae_cfg()), stacked, build_train_cfg(steps=2, independent_instances=True))


def test_resampling_in_instance_one_does_not_change_instance_zero():
    assert_instance0_equal(*train_together_and_alone(cfg_kw={"resample_dead_every": 20}, prepare=kill_instance1_latents))


def test_adaptive_l1_coefficient_follows_l0():
    eps, c0, steps = 0.01, 0.2, 40
    cfg = build_train_cfg(steps=steps, log_every=1, l1_coeff=c0, target_l0=[1e-3, 20.0, 1.0], l1_adapt_eps=eps, l1_warmup_frac=0.25)
    hist = train_sae(SAE(build_sae_cfg(n_inst=3)), tree_data, cfg).as_tensors()
    coeff, l0 = hist["l1_coeff"].double(), hist["l0"].double()
    warm = int(0.25 * steps)  # 10
    # linear ramp before the controller starts
    for s in range(warm - 1):
        torch.testing.assert_close(coeff[s], torch.full((3,), c0 * (s + 1) / warm, dtype=torch.float64))
    # L0 is always >= 1/64 (above target 1e-3) and < 20 = d_sae (below target 20): up and down every step
    n_updates = torch.arange(steps - warm + 1, dtype=torch.float64)  # at step warm-1: 1 update
    torch.testing.assert_close(coeff[warm - 1 :, 0], c0 * (1 + eps) ** (n_updates + 1), rtol=1e-4, atol=0)
    torch.testing.assert_close(coeff[warm - 1 :, 1], c0 * (1 - eps) ** (n_updates + 1), rtol=1e-4, atol=0)
    # instance 2 (target 1): each step's ratio follows that step's batch L0
    ratio = coeff[warm:, 2] / coeff[warm - 1 : -1, 2]
    want = torch.where(l0[warm:, 2] < 1.0, 1 - eps, 1 + eps).double()
    torch.testing.assert_close(ratio, want, rtol=1e-5, atol=0)


def test_fixed_l1_coefficient_per_instance_is_logged_after_warmup():
    cfg = build_train_cfg(steps=20, log_every=1, l1_coeff=[0.3, 0.7], l1_warmup_frac=0.5)
    coeff = train_sae(SAE(build_sae_cfg()), tree_data, cfg).as_tensors()["l1_coeff"]
    torch.testing.assert_close(coeff[4], torch.tensor([0.3, 0.7]) * 5 / 10)
    torch.testing.assert_close(coeff[-1], torch.tensor([0.3, 0.7]))


def test_resampling_revives_a_dead_latent():
    x = TREE.sample(4000, torch.Generator().manual_seed(9))[0]
    fire_rate = {}
    for every in (None, 25):
        sae = SAE(build_sae_cfg(n_inst=1))
        with torch.no_grad():
            sae.b_enc[0, 3] = -100.0
        train_sae(sae, tree_data, build_train_cfg(steps=120, batch_size=128, resample_dead_every=every, l1_coeff=0.01))
        fire_rate[every] = (sae.encode(x)[:, 0, 3] > 0).float().mean().item()
    assert fire_rate[None] == 0.0  # no gradient reaches a latent that never fires
    assert fire_rate[25] > 0.01


def test_transcoder_learns_linear_map():
    d_out = 6
    A = torch.randn(20, d_out, generator=torch.Generator().manual_seed(1)) / 20**0.5

    def pairs(batch, g):
        x = tree_data(batch, g)
        return x, x @ A

    sae = SAE(build_sae_cfg(d_out=d_out, apply_b_dec_to_input=False, n_inst=1))
    train_sae(sae, pairs, build_train_cfg(steps=300, batch_size=128, l1_coeff=0.003))
    x = TREE.sample(4000, torch.Generator().manual_seed(5))[0]
    y = x @ A
    y_hat, _ = sae(x)
    mse = (y_hat[:, 0] - y).pow(2).sum(-1).mean()
    zero_mse = y.pow(2).sum(-1).mean()
    const_mse = (y - y.mean(0)).pow(2).sum(-1).mean()  # best constant prediction
    assert mse < 0.2 * const_mse < zero_mse, (mse, const_mse, zero_mse)
    # the same with stored (inputs, targets) tensors
    sae2 = SAE(build_sae_cfg(d_out=d_out, apply_b_dec_to_input=False, n_inst=1))
    xs = TREE.sample(5000, torch.Generator().manual_seed(6))[0]
    train_sae(sae2, (xs, xs @ A), build_train_cfg(steps=300, batch_size=128, l1_coeff=0.003))
    mse2 = (sae2(x)[0][:, 0] - y).pow(2).sum(-1).mean()
    assert mse2 < 0.2 * const_mse


# ---------------------------------------------------------------------------- Matryoshka permutation
def loss_fn(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """A loss invariant to permuting latents: MSE plus a decoder-norm-weighted L1."""
    x_hat, acts = sae(x)
    return (x[:, None] - x_hat).pow(2).sum(-1).mean(0).sum() + 0.1 * (acts * sae.decoder_norms()).sum(-1).mean(0).sum()


def adam_for(sae: SAE, state_dict=None) -> torch.optim.Adam:
    opt = torch.optim.Adam([p for p in sae.parameters()], lr=0.01, betas=(0.5, 0.9375))
    if state_dict is not None:
        opt.load_state_dict(state_dict)
    return opt


def test_permute_with_optimizer_keeps_output_and_permutes_adam_moments():
    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(d_in=6, d_sae=8, n_inst=2, seed=1))
    opt = adam_for(sae)
    for _ in range(3):  # non-trivial Adam moments
        opt.zero_grad()
        loss_fn(sae, torch.randn(32, 6, generator=g)).backward()
        opt.step()
    ref = copy.deepcopy(sae)
    ref_opt = adam_for(ref, copy.deepcopy(opt.state_dict()))
    perm = torch.stack([torch.randperm(8, generator=g) for _ in range(2)])
    _permute_with_optimizer(sae, opt, perm)

    x = torch.randn(40, 6, generator=g)
    torch.testing.assert_close(sae(x)[0], ref(x)[0], atol=1e-6, rtol=1e-6)

    def permuted(t: torch.Tensor, dim: int) -> torch.Tensor:
        """new[i, ..., j, ...] = t[i, ..., perm[i, j], ...], by an explicit loop."""
        out = torch.empty_like(t)
        for i in range(2):
            for j in range(8):
                src = perm[i, j].item()
                if dim == 1:
                    out[i, j] = t[i, src]
                else:
                    out[i, :, j] = t[i, :, src]
        return out

    dims = {"W_enc": 2, "b_enc": 1, "W_dec": 1}
    for name, dim in dims.items():
        for key in ("exp_avg", "exp_avg_sq"):
            got = opt.state[getattr(sae, name)][key]
            want = permuted(ref_opt.state[getattr(ref, name)][key], dim)
            torch.testing.assert_close(got, want, atol=0, rtol=0, msg=f"{name}.{key}")
    torch.testing.assert_close(opt.state[sae.b_dec]["exp_avg"], ref_opt.state[ref.b_dec]["exp_avg"])

    # one more Adam step on both: the permuted model stays the permutation of the reference
    naive = copy.deepcopy(ref)  # permuted weights but unpermuted moments: must differ
    naive_opt = adam_for(naive, copy.deepcopy(ref_opt.state_dict()))
    naive.permute_latents(perm)
    xb = torch.randn(32, 6, generator=g)
    for model, o in ((sae, opt), (ref, ref_opt), (naive, naive_opt)):
        o.zero_grad()
        loss_fn(model, xb).backward()
        o.step()
    for name, dim in dims.items():
        want = permuted(getattr(ref, name).detach(), dim)
        torch.testing.assert_close(getattr(sae, name).detach(), want, atol=1e-6, rtol=1e-5, msg=name)
    assert not torch.allclose(naive.W_enc, permuted(ref.W_enc.detach(), 2), atol=1e-4)
    torch.testing.assert_close(sae(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)


def test_matryoshka_training_with_permutation_runs_and_learns():
    mcfg = MatryoshkaConfig(n_prefixes=5, permute_latents=True)
    sae = SAE(build_sae_cfg())
    hist = train_sae(sae, tree_data, build_train_cfg(steps=200, batch_size=128, l1_coeff=0.01, matryoshka=mcfg))
    fvu = hist.as_tensors()["fvu"]
    assert torch.all(fvu[-1] < 0.5 * fvu[0])


# ---------------------------------------------------------------------------- fast paths
def test_l1_penalty_fast_path_equals_the_general_penalty_and_its_gradients():
    from saelib.core.penalties import per_latent_penalty
    from saelib.core.train_parts import _penalty

    g = torch.Generator().manual_seed(0)
    acts = torch.relu(torch.randn(13, 2, 6, generator=g, dtype=torch.float64))
    scale = torch.rand(2, 6, generator=g, dtype=torch.float64) + 0.5
    weights = torch.randn(2, 6, generator=g, dtype=torch.float64)
    results = []
    for fn in (lambda a, s: _penalty(a, s, ["l1", "l1"], [0.05, 0.05]), lambda a, s: per_latent_penalty(a, s, "l1")):
        a, s = acts.clone().requires_grad_(True), scale.clone().requires_grad_(True)
        pen = fn(a, s)
        (pen * weights).sum().backward()
        results.append((pen.detach(), a.grad, s.grad))
    for fast, general in zip(*results):
        torch.testing.assert_close(fast, general)


RETAIN_PROBE = """
import ctypes, torch
from saelib.core.train import retain_freed_cpu_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
def free_bytes_kept_after_freeing_64_mib():
    t = torch.ones(64 << 18)  # 64 MiB
    del t
    return libc.mallinfo2().fordblks  # free bytes the heap keeps for reuse
default = free_bytes_kept_after_freeing_64_mib()
ok = retain_freed_cpu_memory()
print(default, ok, free_bytes_kept_after_freeing_64_mib())
"""


def test_retain_freed_cpu_memory_keeps_freed_blocks_in_the_heap():
    """glibc hands a freed block over its mmap threshold (at most 32 MiB by default) back to the
    OS, so the next step page-faults it in again; after retain_freed_cpu_memory the freed 64 MiB
    stays in the heap for reuse. Read from glibc's own accounting (mallinfo2), which, unlike a
    page-fault count, no other process or kernel reclaim can move; the page faults this saves are
    measured in benchmarks/ (RESULTS.md, allocator ablation)."""
    import ctypes
    import ctypes.util
    import subprocess
    import sys

    if not sys.platform.startswith("linux") or "libc.so" not in (ctypes.util.find_library("c") or ""):
        pytest.skip("mallopt tuning applies to Linux glibc only")
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("glibc older than 2.33 (no mallinfo2)")
    out = subprocess.run([sys.executable, "-c", RETAIN_PROBE], capture_output=True, text=True, check=True).stdout
    default, ok, retained = out.split()
    assert ok == "True", out
    mib64 = 64 << 20
    assert int(default) < mib64, out  # by default the 64 MiB block went back to the OS
    assert int(retained) >= mib64, out  # retained: the whole block stays in the heap


def _penalty_with(freq_target, target_l0):
    """train_sae's per-latent smooth_l0_freq penalty of one batch for these settings."""
    import saelib.core.train as tr
    from saelib.core.train_parts import _penalty
    sae = SAE(build_sae_cfg(d_in=6, d_sae=8, n_inst=2, seed=3))
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    acts = sae.encode(x)
    kinds = ["smooth_l0_freq"] * 2
    cfg = build_train_cfg(penalty="smooth_l0_freq", freq_target=freq_target, target_l0=target_l0)
    target = None if target_l0 is None else tr._per_instance(target_l0, 2, "target_l0")
    return _penalty(acts, sae.decoder_norms(), kinds, tr._freq_targets(cfg, target, 2, 8))


def test_freq_target_defaults_to_target_l0_over_d_sae():
    from saelib.core.penalties import per_latent_penalty
    sae = SAE(build_sae_cfg(d_in=6, d_sae=8, n_inst=2, seed=3))
    acts = sae.encode(torch.randn(64, 6, generator=torch.Generator().manual_seed(0)))
    got = _penalty_with(None, [2.0, 4.0])
    want = per_latent_penalty(acts, sae.decoder_norms(), "smooth_l0_freq", freq_target=[2 / 8, 4 / 8])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # no target L0: the module constant; an explicit value wins over target_l0 / d_sae
    torch.testing.assert_close(_penalty_with(None, None),
                               per_latent_penalty(acts, sae.decoder_norms(), "smooth_l0_freq"), rtol=0, atol=0)
    torch.testing.assert_close(_penalty_with(0.3, [2.0, 4.0]),
                               per_latent_penalty(acts, sae.decoder_norms(), "smooth_l0_freq", freq_target=0.3),
                               rtol=0, atol=0)
    assert not torch.equal(got, _penalty_with(None, None))


@pytest.mark.parametrize("bad", [0.0, 1.0, [0.1, 2.0], [], "a"])
def test_freq_target_validated(bad):
    with pytest.raises(ValueError, match="freq_target"):
        build_train_cfg(freq_target=bad)


def test_allocator_setting_is_opt_in():
    assert TrainConfig().retain_cpu_memory is False


# ---------------------------------------------------------------------------- device and dtype
@pytest.mark.parametrize(
    "sae_kw, train_kw",
    [
        ({}, {"target_l0": 3.0, "resample_dead_every": 20}),
        ({}, {"penalty": "smooth_l0_freq", "matryoshka": MatryoshkaConfig(mode="random", n_prefixes=4, permute_latents=True)}),
        ({"architecture": "batchtopk", "k": 3}, {"matryoshka": MatryoshkaConfig(mode="every", inner_grad_scale=0.5)}),
        ({}, {"independent_instances": True, "penalty": ["l1", "tanh"]}),
    ],
)
def test_float64_sae_trains_in_float64(sae_kw, train_kw):
    sae = SAE(build_sae_cfg(dtype="float64", **sae_kw))
    made: list[torch.Tensor] = []
    hist = train_sae(sae, tree_data, build_train_cfg(steps=60, **train_kw), callback=lambda s, m: made.append(m.W_dec))
    assert all(t.dtype == torch.float64 for t in sae.state_dict().values())
    for name, curve in hist.as_tensors().items():
        if name != "step":
            assert curve.dtype == torch.float64, name
    assert torch.isfinite(hist.final("fvu")).all() and (hist.final("fvu") < 1).all()


def test_float64_starts_where_float32_does_and_stays_close():
    """The same draw in both dtypes; float64 differs from float32 training by rounding only."""
    runs = {}
    for dtype in ("float32", "float64"):
        sae = SAE(build_sae_cfg(dtype=dtype))
        train_sae(sae, tree_data, build_train_cfg(steps=30))
        runs[dtype] = sae.W_dec.detach().double()
    assert (runs["float32"] - runs["float64"]).abs().max() < 1e-3
    assert (runs["float32"] - runs["float64"]).abs().max() > 0
