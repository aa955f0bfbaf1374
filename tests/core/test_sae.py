"""Tests for saelib.core.sae: shapes, config validation, the three architectures, instance independence
and the weight-space symmetries (permutation, decoder rescaling)."""

import copy

import pytest
import torch

from saelib.core.sae import SAE, SAEConfig
from tests.builders import build_sae_cfg


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see tests/conftest.py


def randomize_biases(sae: SAE, seed: int = 1) -> SAE:
    """Give b_enc and b_dec non-zero values so formulas that ignore a bias would fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(sae.b_enc.shape, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(sae.b_dec.shape, generator=g))
    return sae


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"d_in": 0}, r"d_in.*0"),
        ({"d_sae": -1}, r"d_sae.*-1"),
        ({"n_inst": 0}, r"n_inst.*0"),
        ({"architecture": "jumprelu"}, r"architecture.*jumprelu"),
        ({"architecture": "topk"}, r"k.*None"),
        ({"architecture": "topk", "k": 8}, r"k.*8"),
        ({"architecture": "batchtopk", "k": 0}, r"k.*0"),
        ({"d_out": 3}, r"apply_b_dec_to_input.*d_out=3"),
        ({"d_out": 0, "apply_b_dec_to_input": False}, r"d_out.*0"),
        ({"dec_init_norm": 0.0}, r"dec_init_norm.*0\.0"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        build_sae_cfg(**kw)


def test_config_defaults_and_round_trip():
    cfg = build_sae_cfg(architecture="topk", k=2)
    assert cfg.d_out == 5
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    tc = build_sae_cfg(d_out=3, apply_b_dec_to_input=False)
    assert tc.d_out == 3


# ---------------------------------------------------------------------------- init
def test_init_shapes_and_decoder_norm():
    sae = SAE(build_sae_cfg(dec_init_norm=0.25))
    assert sae.W_enc.shape == (3, 5, 7) and sae.b_enc.shape == (3, 7)
    assert sae.W_dec.shape == (3, 7, 5) and sae.b_dec.shape == (3, 5)
    torch.testing.assert_close(sae.decoder_norms(), torch.full((3, 7), 0.25))
    assert torch.all(sae.b_enc == 0) and torch.all(sae.b_dec == 0)
    # the three instances are different draws
    assert not torch.allclose(sae.W_enc[0], sae.W_enc[1])
    # each decoder starts as its own encoder's transpose, rows rescaled
    for i in range(3):
        WT = sae.W_enc[i].T
        torch.testing.assert_close(sae.W_dec[i], 0.25 * WT / WT.norm(dim=1, keepdim=True))


def test_same_seed_same_init_different_seed_different():
    a, b, c = SAE(build_sae_cfg(seed=4)), SAE(build_sae_cfg(seed=4)), SAE(build_sae_cfg(seed=5))
    for name in ("W_enc", "W_dec"):
        assert torch.equal(getattr(a, name), getattr(b, name))
        assert not torch.allclose(getattr(a, name), getattr(c, name))


def test_init_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    SAE(build_sae_cfg())
    assert torch.equal(torch.rand(3), expected)


def test_use_b_dec_false_has_no_trainable_b_dec():
    sae = SAE(build_sae_cfg(use_b_dec=False))
    names = {n for n, _ in sae.named_parameters()}
    assert names == {"W_enc", "b_enc", "W_dec"}
    assert torch.all(sae.b_dec == 0)
    x = torch.randn(4, 5)
    sae(x)[0].pow(2).sum().backward()
    assert sae.b_dec.grad is None


# ---------------------------------------------------------------------------- shapes
def test_shapes_for_shared_and_per_instance_inputs():
    sae = SAE(build_sae_cfg())
    x2 = torch.randn(11, 5)
    x_hat, acts = sae(x2)
    assert x_hat.shape == (11, 3, 5) and acts.shape == (11, 3, 7)
    x3 = torch.randn(11, 3, 5)
    x_hat, acts = sae(x3)
    assert x_hat.shape == (11, 3, 5) and acts.shape == (11, 3, 7)
    # a shared input equals the same input repeated per instance
    torch.testing.assert_close(sae.encode(x2), sae.encode(x2[:, None].expand(-1, 3, -1)))


def test_transcoder_shapes():
    sae = SAE(build_sae_cfg(d_out=2, apply_b_dec_to_input=False))
    assert sae.W_dec.shape == (3, 7, 2) and sae.b_dec.shape == (3, 2)
    x_hat, acts = sae(torch.randn(4, 5))
    assert x_hat.shape == (4, 3, 2) and acts.shape == (4, 3, 7)
    torch.testing.assert_close(sae.decoder_norms(), torch.full((3, 7), 0.1))


def test_expand_instances_shares_a_2d_input_and_passes_a_3d_one():
    sae = SAE(build_sae_cfg(d_out=2, apply_b_dec_to_input=False))
    x2 = torch.arange(8.0).view(4, 2)  # [batch, d_out]: the target of a transcoder
    out = sae.expand_instances(x2, d=2)
    assert out.shape == (4, 3, 2) and all(torch.equal(out[:, i], x2) for i in range(3))
    assert out.data_ptr() == x2.data_ptr()  # a view, no copy
    x3 = torch.randn(4, 3, 5)
    assert sae.expand_instances(x3) is x3
    with pytest.raises(ValueError, match="last dimension 5 != expected 2"):
        sae.expand_instances(x3, d=2)
    with pytest.raises(ValueError, match=r"n_inst=3.*\(4, 2, 5\)"):
        sae.expand_instances(torch.randn(4, 2, 5))


@pytest.mark.parametrize("shape", [(4, 6), (4, 2, 5), (4, 3, 6), (5,), (2, 4, 3, 5)])
def test_wrong_input_shapes_raise(shape):
    sae = SAE(build_sae_cfg())
    with pytest.raises(ValueError):
        sae.encode(torch.randn(*shape))


# ---------------------------------------------------------------------------- architectures
def hand_pre_acts(sae: SAE, x: torch.Tensor, i: int, subtract_b_dec: bool = True) -> torch.Tensor:
    """Pre-activations of instance i for x [batch, d_in], with plain matrix products."""
    xi = x - sae.b_dec[i] if subtract_b_dec else x
    return xi @ sae.W_enc[i] + sae.b_enc[i]


def test_relu_encode_and_decode_match_formula_per_instance():
    sae = randomize_biases(SAE(build_sae_cfg()))
    x = torch.randn(9, 3, 5)
    x_hat, acts = sae(x)
    for i in range(3):
        a = torch.relu(hand_pre_acts(sae, x[:, i], i))
        torch.testing.assert_close(acts[:, i], a)
        torch.testing.assert_close(x_hat[:, i], a @ sae.W_dec[i] + sae.b_dec[i])
    assert (acts == 0).any() and (acts > 0).any()


def test_transcoder_does_not_subtract_b_dec():
    sae = randomize_biases(SAE(build_sae_cfg(d_out=2, apply_b_dec_to_input=False)))
    x = torch.randn(6, 5)
    acts = sae.encode(x)
    for i in range(3):
        torch.testing.assert_close(acts[:, i], torch.relu(hand_pre_acts(sae, x, i, subtract_b_dec=False)))


def test_topk_keeps_exactly_the_k_largest():
    sae = SAE(build_sae_cfg(architecture="topk", k=3))
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # all pre-activations positive
    x = torch.randn(20, 5)
    acts = sae.encode(x)
    pre = sae.pre_acts(x)
    assert torch.all((acts > 0).sum(-1) == 3)
    for b in range(20):
        for i in range(3):
            order = sorted(range(7), key=lambda j: -pre[b, i, j].item())
            top = set(order[:3])
            for j in range(7):
                want = pre[b, i, j].item() if j in top else 0.0
                assert acts[b, i, j].item() == pytest.approx(want)


def test_topk_drops_negative_preacts():
    sae = SAE(build_sae_cfg(architecture="topk", k=3))
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)  # every pre-activation negative
    assert torch.all(sae.encode(torch.randn(4, 5)) == 0)


def test_batchtopk_training_keeps_k_times_batch_per_instance_and_sets_threshold():
    sae = SAE(build_sae_cfg(architecture="batchtopk", k=2, batchtopk_threshold_ema=0.25))
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # positive pre-acts: exactly k*batch survive
    sae.train()
    x = torch.randn(10, 5)
    acts = sae.encode(x)
    pre = sae.pre_acts(x)
    kept_mins = []
    for i in range(3):
        flat = pre[:, i].flatten().tolist()
        cut = sorted(flat, reverse=True)[2 * 10 - 1]  # the (k*batch)-th largest
        assert int((acts[:, i] > 0).sum()) == 20
        keep = pre[:, i] >= cut
        torch.testing.assert_close(acts[:, i], torch.where(keep, pre[:, i], torch.zeros_like(pre[:, i])))
        kept_mins.append(cut)
    # different samples keep different numbers of latents (batch-level, not per-sample, top-k)
    counts = (acts > 0).sum(-1)
    assert counts.float().std() > 0
    # first batch: the threshold is the smallest kept activation
    torch.testing.assert_close(sae.threshold, torch.tensor(kept_mins))
    # second batch: EMA with rate 0.25
    x2 = torch.randn(10, 5)
    pre2 = sae.pre_acts(x2)
    sae.encode(x2)
    new_mins = torch.tensor([sorted(pre2[:, i].flatten().tolist(), reverse=True)[19] for i in range(3)])
    torch.testing.assert_close(sae.threshold, 0.75 * torch.tensor(kept_mins) + 0.25 * new_mins)


def test_batchtopk_eval_uses_threshold_and_needs_training_first():
    sae = SAE(build_sae_cfg(architecture="batchtopk", k=2))
    sae.eval()
    x = torch.randn(8, 5)
    with pytest.raises(RuntimeError):
        sae.encode(x)
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([0.0, 0.1, 0.3]))
    acts = sae.encode(x)
    pre = sae.pre_acts(x)
    for i, t in enumerate([0.0, 0.1, 0.3]):
        torch.testing.assert_close(acts[:, i], torch.where(pre[:, i] > t, pre[:, i], torch.zeros_like(pre[:, i])))


# ---------------------------------------------------------------------------- instances
def test_instances_are_independent():
    sae = randomize_biases(SAE(build_sae_cfg()))
    x = torch.randn(6, 3, 5)
    x_hat, acts = sae(x)
    other = copy.deepcopy(sae)
    with torch.no_grad():
        for p in other.parameters():
            p[1].mul_(-3.0).add_(0.7)
    x_hat2, acts2 = other(x)
    for i in (0, 2):
        assert torch.equal(x_hat[:, i], x_hat2[:, i]) and torch.equal(acts[:, i], acts2[:, i])
    assert not torch.allclose(x_hat[:, 1], x_hat2[:, 1])


@pytest.mark.parametrize("arch, k", [("relu", None), ("topk", 2), ("batchtopk", 2)])
def test_instance_copy_equals_slice(arch, k):
    sae = randomize_biases(SAE(build_sae_cfg(architecture=arch, k=k, use_b_dec=(arch != "topk"))))
    x = torch.randn(8, 5)
    sae.train()
    sae(x)  # sets a BatchTopK threshold
    sae.eval()
    x_hat, acts = sae(x)
    for i in range(3):
        one = sae.instance(i)
        assert one.n_inst == 1 and one.cfg.architecture == arch and not one.training
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            torch.testing.assert_close(getattr(one, name)[0], getattr(sae, name)[i], equal_nan=True)
        xh1, a1 = one(x)
        torch.testing.assert_close(xh1[:, 0], x_hat[:, i])
        torch.testing.assert_close(a1[:, 0], acts[:, i])
    # a copy, not a view
    one = sae.instance(0)
    with torch.no_grad():
        one.W_enc.zero_()
    assert sae.W_enc[0].abs().sum() > 0
    with pytest.raises(IndexError):
        sae.instance(3)


def test_instance_copy_keeps_dtype():
    sae = SAE(build_sae_cfg()).double()
    assert sae.instance(1).W_enc.dtype == torch.float64


# ---------------------------------------------------------------------------- symmetries
def test_permute_latents_moves_every_parameter_consistently():
    sae = randomize_biases(SAE(build_sae_cfg()))
    before = copy.deepcopy(sae)
    perm = torch.stack([torch.randperm(7) for _ in range(3)])
    sae.permute_latents(perm)
    for i in range(3):
        for j in range(7):
            old = perm[i, j].item()
            assert torch.equal(sae.W_enc[i, :, j], before.W_enc[i, :, old])
            assert torch.equal(sae.W_dec[i, j], before.W_dec[i, old])
            assert sae.b_enc[i, j] == before.b_enc[i, old]
    assert torch.equal(sae.b_dec, before.b_dec)
    x = torch.randn(10, 5)
    x_hat, acts = sae(x)
    x_hat0, acts0 = before(x)
    torch.testing.assert_close(x_hat, x_hat0)
    torch.testing.assert_close(acts, acts0.gather(2, perm[None].expand(10, -1, -1)))
    with pytest.raises(ValueError, match=r"perm"):
        sae.permute_latents(torch.arange(7))


def test_normalize_decoder_keeps_output_and_gives_unit_rows():
    sae = randomize_biases(SAE(build_sae_cfg(dec_init_norm=0.3)))
    with torch.no_grad():  # unequal row norms
        sae.W_dec.mul_(torch.rand(3, 7, 1) + 0.5)
    x = torch.randn(12, 5)
    x_hat, acts = sae(x)
    norms = sae.W_dec.norm(dim=-1).detach().clone()
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(3, 7))
    x_hat2, acts2 = sae(x)
    torch.testing.assert_close(x_hat2, x_hat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acts2, acts * norms, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- encoder gradients
def hand_centered_encode_grads(x, b_dec, W_enc, upstream):
    """Gradients of sum(upstream * bmm(x - b_dec, W_enc)) by plain autograd (the reference)."""
    x, b_dec, W_enc = (t.detach().clone().requires_grad_(True) for t in (x, b_dec, W_enc))
    out = torch.bmm(x - b_dec[:, None, :], W_enc)
    (out * upstream).sum().backward()
    return out.detach(), x.grad, b_dec.grad, W_enc.grad


@pytest.mark.parametrize("x_needs_grad", [False, True])
def test_centered_encode_matches_autograd(x_needs_grad):
    from saelib.core.sae import _CenteredEncode

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 11, 5, generator=g, dtype=torch.float64)
    b_dec = torch.randn(3, 5, generator=g, dtype=torch.float64)
    W_enc = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    upstream = torch.randn(3, 11, 7, generator=g, dtype=torch.float64)
    ref_out, ref_gx, ref_gb, ref_gW = hand_centered_encode_grads(x, b_dec, W_enc, upstream)

    xs = x.clone().requires_grad_(x_needs_grad)
    bs, Ws = b_dec.clone().requires_grad_(True), W_enc.clone().requires_grad_(True)
    out = _CenteredEncode.apply(xs, bs, Ws)
    (out * upstream).sum().backward()
    torch.testing.assert_close(out.detach(), ref_out, rtol=0, atol=0)  # the forward is unchanged
    torch.testing.assert_close(bs.grad, ref_gb)
    torch.testing.assert_close(Ws.grad, ref_gW)
    if x_needs_grad:
        torch.testing.assert_close(xs.grad, ref_gx)
    else:
        assert xs.grad is None
    assert torch.autograd.gradcheck(_CenteredEncode.apply, (xs.detach().requires_grad_(True), bs, Ws))


def autograd_node_names(t: torch.Tensor) -> set[str]:
    names, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            stack.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("big", [False, True])
def test_sae_gradients_equal_plain_autograd_formula(big):
    """Every parameter's gradient through SAE.forward equals autograd of the written-out formula, for
    a small SAE (plain autograd) and one past the size where the encoder skips the input gradient."""
    from saelib.core.sae import _CENTERED_ENCODE_MIN_MACS

    d_in, d_sae, batch = (64, 256, 1024) if big else (5, 7, 9)
    assert (batch * 3 * d_in * d_sae >= _CENTERED_ENCODE_MIN_MACS) == big
    sae = randomize_biases(SAE(build_sae_cfg(d_in=d_in, d_sae=d_sae)).double())
    x = torch.randn(batch, d_in, dtype=torch.float64)
    uses_custom = "_CenteredEncodeBackward" in autograd_node_names(sae.pre_acts(x))
    assert uses_custom == big
    x_hat, acts = sae(x)
    ((x[:, None] - x_hat).pow(2).sum() + acts.sum()).backward()
    ref = {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}
    pre = torch.einsum("bid,ids->bis", x[:, None] - ref["b_dec"], ref["W_enc"]) + ref["b_enc"]
    a = torch.relu(pre)
    ref_hat = torch.einsum("bis,isd->bid", a, ref["W_dec"]) + ref["b_dec"]
    ((x[:, None] - ref_hat).pow(2).sum() + a.sum()).backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, ref[name].grad, msg=f"gradient of {name}")


# ---------------------------------------------------------------------------- device and dtype
def test_device_and_dtype_default_to_cpu_float32():
    sae = SAE(SAEConfig(d_in=4, d_sae=6))
    assert (sae.cfg.device, sae.cfg.dtype) == ("cpu", "float32")
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in sae.state_dict().values())


@pytest.mark.parametrize("dtype", ["float64", "torch.float64", torch.float64])
def test_dtype_makes_parameters_of_that_dtype_from_the_same_draw(dtype):
    sae = SAE(SAEConfig(d_in=4, d_sae=6, n_inst=2, dtype=dtype))
    assert sae.cfg.dtype == "float64"  # stored as the short name (JSON-ready)
    assert all(t.dtype == torch.float64 for t in sae.state_dict().values())
    ref = SAE(SAEConfig(d_in=4, d_sae=6, n_inst=2))
    assert torch.equal(sae.W_enc, ref.W_enc.double())  # float32 draw, then cast


@pytest.mark.parametrize("kw, match", [({"dtype": "int8"}, r"dtype.*int8"), ({"device": "nonsense"}, r"device.*nonsense")])
def test_bad_device_or_dtype_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        SAEConfig(d_in=4, d_sae=6, **kw)


def test_instance_keeps_device_and_dtype():
    sae = SAE(SAEConfig(d_in=4, d_sae=6, n_inst=3, dtype="float64"))
    one = sae.instance(1)
    assert one.cfg.dtype == "float64" and one.W_dec.dtype == torch.float64
    assert torch.equal(one.W_dec[0], sae.W_dec[1])
    moved = SAE(SAEConfig(d_in=4, d_sae=6, n_inst=2)).to(torch.float64)  # moved after it was made
    assert moved.instance(0).cfg.dtype == "float64" and moved.instance(0).W_enc.dtype == torch.float64


def test_config_dict_without_device_or_dtype_loads_with_defaults():
    d = SAEConfig(d_in=4, d_sae=6).to_dict()
    del d["device"], d["dtype"]
    assert SAEConfig.from_dict(d) == SAEConfig(d_in=4, d_sae=6)
