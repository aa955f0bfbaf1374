"""Tests for mixed precision (saelib.core.precision) in SAE training, harvesting and LM losses.

bf16 (bfloat16) keeps 8 significant bits, so one rounding moves a value by at most 2**-8 of its
size (``U`` below): the tolerances are multiples of that unit, fixed from the format, not from a run.
"""

import pytest
import torch
from transformer_lens import utils

import saelib.core.sae as sae_module
from saelib.core.metrics import cosine_matrix, mcc
from saelib.core.precision import PRECISIONS, autocast, cpu_bf16_support, has_fast_bf16, resolve_precision
from saelib.core.sae import SAE, SAEConfig, float32_sum
from saelib.core.train import TrainConfig, train_sae
from saelib.data.corpus import tokenize_documents
from saelib.lm.activations import harvest_activations
from saelib.lm.models import LanguageModel, mean_next_token_loss
from tests.builders import WORDS, tiny_language_model, word_level_tokenizer

U = 2.0**-8  # bf16's unit roundoff

CPUINFO_AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\nprocessor\t: 1\n"
CPUINFO_AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
CPUINFO_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see tests/conftest.py


# ------------------------------------------------------------------------------- detection
@pytest.mark.parametrize("text, expected", [(CPUINFO_AMX, "amx_bf16"), (CPUINFO_AVX512_BF16, "avx512_bf16"),
                                            (CPUINFO_AVX2, "none"), ("", "none")])
def test_cpu_bf16_support_reads_the_flags(text, expected):
    assert cpu_bf16_support(text) == expected
    assert has_fast_bf16("cpu", text) == (expected != "none")


@pytest.mark.parametrize("text, expected", [(CPUINFO_AMX, "bfloat16"), (CPUINFO_AVX512_BF16, "bfloat16"),
                                            (CPUINFO_AVX2, "float32")])
def test_auto_resolves_from_the_cpu(text, expected):
    assert resolve_precision("auto", "cpu", text) == expected
    for fixed in ("float32", "bfloat16"):  # a named precision is never overridden
        assert resolve_precision(fixed, "cpu", text) == fixed


def test_auto_is_float32_on_a_device_without_fast_bf16():
    assert resolve_precision("auto", "meta") == "float32"
    if not torch.cuda.is_available():
        assert not has_fast_bf16("cuda")


@pytest.mark.parametrize("bad", ["fp16", "bf16", "", "Float32"])
def test_unknown_precision_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=repr(bad)):
        resolve_precision(bad)
    with pytest.raises(ValueError, match=repr(bad)):
        TrainConfig(precision=bad)
    assert bad not in PRECISIONS


def test_bad_device_is_refused():
    with pytest.raises(ValueError, match="nonsense"):
        has_fast_bf16("nonsense")


# ------------------------------------------------------------------------------- the SAE forward
def _emulated_bf16_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bf16 product as hardware does it: bf16 inputs, float32 accumulation, bf16 output."""
    return torch.bmm(a.bfloat16().float(), b.bfloat16().float()).bfloat16()


def test_sae_forward_runs_in_bf16_under_autocast_and_matches_the_rounded_product():
    sae = SAE(SAEConfig(d_in=16, d_sae=48, n_inst=2, seed=1))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), autocast("bfloat16"):
        pre = sae.pre_acts(x)
        x_hat, acts = sae(x)
    assert pre.dtype == acts.dtype == x_hat.dtype == torch.bfloat16  # element-wise passes in bf16 too
    assert sae.W_enc.dtype == torch.float32  # master weights untouched
    centered = (x[:, None, :] - sae.b_dec).transpose(0, 1)  # [inst, batch, d_in]
    expected = (_emulated_bf16_product(centered, sae.W_enc) + sae.b_enc.bfloat16()[:, None, :]).transpose(0, 1)
    # the product may round once differently (accumulation order), the bias add once more
    assert ((pre.float() - expected.float()).abs() <= 2 * U * expected.float().abs() + 1e-6).all()


def test_float32_precision_switches_off_an_outer_autocast():
    sae = SAE(SAEConfig(d_in=8, d_sae=16))
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast("float32"), torch.no_grad():
        x_hat, acts = sae(x)
    assert x_hat.dtype == acts.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(x_hat, sae(x)[0])


def test_float32_sum_accumulates_bf16_in_float32_and_leaves_float32_alone():
    t = torch.full((4096, 3), 1.0, dtype=torch.bfloat16)
    assert float32_sum(t, 0).dtype == torch.float32 and float32_sum(t, 0).tolist() == [4096.0] * 3
    f = torch.randn(100, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(float32_sum(f, 0), f.sum(0)) and torch.equal(float32_sum(f, 1, keepdim=True), f.sum(1, keepdim=True))


def _gradients(sae: SAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    sae.zero_grad(set_to_none=True)
    with autocast("bfloat16"):
        x_hat, acts = sae(x)
    ((x - x_hat.float()).pow(2).sum(-1).mean() + float32_sum(acts, 0).sum() / len(x)).backward()
    return {n: p.grad.clone() for n, p in sae.named_parameters()}


def test_centered_encode_backward_under_bf16_matches_autograd(monkeypatch):
    """The hand-written backward of the large-SAE encoder (b_dec's gradient without the input
    gradient) gives autograd's gradients under bf16 too, in float32."""
    sae = SAE(SAEConfig(d_in=128, d_sae=512, seed=3))
    with torch.no_grad():
        sae.b_dec.normal_(std=0.1)
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(4))
    assert 256 * 128 * 512 >= sae_module._CENTERED_ENCODE_MIN_MACS  # the custom function is used
    fast = _gradients(sae, x)
    monkeypatch.setattr(sae_module, "_CENTERED_ENCODE_MIN_MACS", 1 << 62)  # plain autograd
    plain = _gradients(sae, x)
    for name in fast:
        assert fast[name].dtype == torch.float32, name
        # both paths round the same bf16 products; the batch sums differ in order and in where
        # they round to bf16 (at most a few units of U relative to the gradient's size)
        scale = plain[name].abs().max()
        assert (fast[name] - plain[name]).abs().max() <= 8 * U * scale, name


# ------------------------------------------------------------------------------- training
def _sparse_data(n: int, d_in: int, n_feat: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(n_feat, d_in, generator=g), dim=-1)
    coef = (torch.rand(n, n_feat, generator=g) < 3 / n_feat) * torch.rand(n, n_feat, generator=g)
    return coef @ feats, feats


def test_bf16_training_keeps_float32_state_and_learns_the_same_sae():
    """(b) of the same-science check, at toy size: the bf16 SAE trained from the same seed as a
    float32 one is at least as close to it (MCC of decoders) as a float32 SAE of another seed is."""
    data, feats = _sparse_data(8192, 24, 32, seed=0)

    def run(precision: str, seed: int) -> tuple[SAE, object]:
        sae = SAE(SAEConfig(d_in=24, d_sae=32, seed=seed))
        cfg = TrainConfig(steps=600, batch_size=256, lr=1e-2, l1_coeff=0.05, seed=seed, progress=False,
                          precision=precision, log_every=50)
        return sae, train_sae(sae, data, cfg)

    f32, h32 = run("float32", 0)
    bf, hbf = run("bfloat16", 0)
    other, _ = run("float32", 1)
    assert h32.precision == "float32" and hbf.precision == "bfloat16"
    assert all(p.dtype == torch.float32 for p in bf.parameters())
    assert all(torch.isfinite(p).all() for p in bf.parameters())
    same_seed = mcc(cosine_matrix(bf.W_dec[0].detach(), f32.W_dec[0].detach()))
    other_seed = mcc(cosine_matrix(other.W_dec[0].detach(), f32.W_dec[0].detach()))
    assert same_seed >= other_seed, (same_seed, other_seed)


def test_bf16_needs_a_float32_sae():
    sae = SAE(SAEConfig(d_in=4, d_sae=8, dtype="float64"))
    with pytest.raises(ValueError, match="float64"):
        train_sae(sae, torch.randn(64, 4, dtype=torch.float64), TrainConfig(steps=1, batch_size=8, precision="bfloat16", progress=False))


# ------------------------------------------------------------------------------- language model
@pytest.fixture(scope="module")
def tiny_lm() -> LanguageModel:
    return tiny_language_model(word_level_tokenizer(), n_layers=2, d_model=16, d_head=8, d_mlp=32)


def test_bf16_harvest_has_its_own_cache_entry_and_close_activations(tiny_lm, cache_dir):
    docs = tokenize_documents(["a b c d e f", "g a", "b c b c b c b c"], tiny_lm.tokenizer, 0, 12)
    hook = utils.get_act_name("resid_post", 1)
    f32 = harvest_activations(tiny_lm, docs, [hook], progress=False)
    bf = harvest_activations(tiny_lm, docs, [hook], progress=False, precision="bfloat16")
    assert f32.folder != bf.folder
    assert f32.meta["precision"] == "float32" and bf.meta["precision"] == "bfloat16"
    a, b = f32[hook], bf[hook]
    assert b.dtype == torch.float32  # stored as asked, whatever the forward's precision
    assert not torch.equal(a, b)  # the forward really ran in bf16
    # two blocks of bf16 products: a few roundings of the residual stream's size per token
    assert ((a - b).norm(dim=-1) <= 16 * U * a.norm(dim=-1)).all()
    assert harvest_activations(tiny_lm, docs, [hook], progress=False, precision="auto").folder == (
        bf.folder if has_fast_bf16("cpu") else f32.folder)


def test_bf16_loss_of_a_model_is_within_a_hundredth_of_a_nat(tiny_lm):
    """(a) of the same-science check, on a tiny model: within 0.01 nats, the budget for SmolLM2's held-out loss."""
    tokens = torch.randint(0, len(WORDS), (8, 12), generator=torch.Generator().manual_seed(0))
    f32 = mean_next_token_loss(tiny_lm.model, tokens)
    bf = mean_next_token_loss(tiny_lm.model, tokens, precision="bfloat16")
    expected = torch.nn.functional.cross_entropy(tiny_lm.model(tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert f32 == pytest.approx(float(expected.detach()), abs=1e-5)
    assert bf != f32 and abs(bf - f32) <= 0.01
