"""Tests for saelib.lm.models: default-model training and caching (on a tiny config), losses against
hand computations, the layer a hook needs, and the SmolLM2 conversion (logits against
transformers' own model; loss recovered for one layer)."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer, utils

from saelib.lm import models as lm_mod
from saelib.data.corpus import CorpusConfig, TextCorpus, load_wiki_leads, split_documents, tokenize_to_sequences, train_bpe_tokenizer
from saelib.lm.models import (
    DefaultModelConfig,
    hook_layer,
    load_default_model,
    mean_next_token_loss,
    model_token_sets,
    train_language_model,
    unigram_loss,
)

TEXTS = ["one two three four five six seven eight nine ten. " * 3, "the cat sat on the mat and the dog sat on the log. " * 3] * 8
TINY_CORPUS = CorpusConfig(vocab_size=300, n_ctx=16, min_frequency=1)


def tiny_cfg(**kw) -> DefaultModelConfig:
    base = dict(n_layers=2, d_model=16, d_mlp=32, n_heads=2, d_head=8, steps=40, batch_size=4, lr=1e-2, warmup_steps=5, corpus=TINY_CORPUS)
    return DefaultModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_corpus() -> TextCorpus:
    from saelib.data.corpus import CorpusSplit

    tok = train_bpe_tokenizer(TEXTS, TINY_CORPUS.vocab_size, TINY_CORPUS.min_frequency)
    split = CorpusSplit([f"t{i}" for i in range(12)], TEXTS[:12], [f"h{i}" for i in range(4)], TEXTS[12:])
    train = tokenize_to_sequences(split.train_texts, tok, 16, 0)
    held = tokenize_to_sequences(split.heldout_texts, tok, 16, 0)
    return TextCorpus(TINY_CORPUS, tok, 0, train, held, split, key="tinykey")


def test_default_model_trains_caches_and_reloads(tiny_corpus, cache_dir, monkeypatch):
    cfg = tiny_cfg()
    first = load_default_model(cfg, tiny_corpus, progress=False)
    assert first.info["trained_now"] is True
    losses = first.info["train_loss_every_10"]
    assert losses[-1] < losses[0] - 1.0  # it learned the repetitive text
    folder = cache_dir / next(p.name for p in cache_dir.iterdir() if p.name.startswith("lm-default-"))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]

    def boom(*a, **k):
        raise AssertionError("retrained despite the cache")

    monkeypatch.setattr(lm_mod, "train_language_model", boom)
    second = load_default_model(cfg, tiny_corpus, progress=False)
    assert second.info["trained_now"] is False
    for (k, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), k
    # a changed config is a different cache entry, so it must train (and here: hit boom)
    with pytest.raises(AssertionError, match="retrained"):
        load_default_model(tiny_cfg(steps=41), tiny_corpus, progress=False)
    # so is another thread count (matmul rounding depends on it)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        with pytest.raises(AssertionError, match="retrained"):
            load_default_model(cfg, tiny_corpus, progress=False)
    finally:
        torch.set_num_threads(threads)


def test_default_model_training_is_deterministic(tiny_corpus, tmp_path, monkeypatch):
    out = []
    for sub in ("a", "b"):
        monkeypatch.setenv("SAELIB_CACHE_DIR", str(tmp_path / sub))
        out.append(load_default_model(tiny_cfg(steps=10), tiny_corpus, progress=False).model.state_dict())
    for k in out[0]:
        assert torch.equal(out[0][k], out[1][k]), k


def test_training_is_deterministic_with_two_threads(tiny_corpus):
    """With 2 threads the embedding gradient accumulates in a varying order unless deterministic
    algorithms are on (a batch of every sequence and d_model 64 showed it: 28 of 28 tensors
    differed between runs); the global flag is restored afterwards."""
    cfg = tiny_cfg(steps=5, batch_size=len(tiny_corpus.train_tokens), d_model=64, d_mlp=128)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        states = []
        for _ in range(3):
            torch.manual_seed(0)
            model = HookedTransformer(cfg.hooked_config())
            train_language_model(model, tiny_corpus.train_tokens, cfg, progress=False)
            states.append(model.state_dict())
    finally:
        torch.set_num_threads(threads)
    assert not torch.are_deterministic_algorithms_enabled()
    for state in states[1:]:
        for k in state:
            assert torch.equal(state[k], states[0][k]), k


def test_default_model_rejects_mismatched_corpus(tiny_corpus):
    with pytest.raises(ValueError, match="corpus config"):
        load_default_model(tiny_cfg(corpus=CorpusConfig(vocab_size=301, n_ctx=16)), tiny_corpus)


def test_train_language_model_errors():
    cfg = tiny_cfg()
    model = HookedTransformer(cfg.hooked_config())
    with pytest.raises(ValueError, match="batch_size"):
        train_language_model(model, torch.zeros(2, 16, dtype=torch.long), cfg)
    with pytest.raises(ValueError, match="token ids"):
        train_language_model(model, torch.full((8, 16), 300), cfg)


# ---------------------------------------------------------------------------- losses
def test_unigram_loss_by_hand():
    train = torch.tensor([[0, 1, 1, 2]])  # predicted tokens 1, 1, 2 -> counts+1 = [1, 3, 2, 1] / 7
    held = torch.tensor([[0, 2, 3]])  # predicted 2 (p=2/7), 3 (p=1/7)
    expected = -(math.log(2 / 7) + math.log(1 / 7)) / 2
    assert unigram_loss(train, held, d_vocab=4) == pytest.approx(expected)
    with pytest.raises(ValueError, match="outside"):
        unigram_loss(train, held, d_vocab=3)


def test_mean_next_token_loss_matches_cross_entropy():
    model = HookedTransformer(tiny_cfg().hooked_config()).eval()
    tokens = torch.randint(0, 300, (7, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 300).double(), tokens[:, 1:].reshape(-1)).item()
    assert mean_next_token_loss(model, tokens, batch_size=3) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("shape", [(0, 16), (3, 1)])
def test_losses_reject_tokens_with_nothing_to_predict(shape):
    model = HookedTransformer(tiny_cfg().hooked_config()).eval()
    empty = torch.zeros(shape, dtype=torch.long)
    ok = torch.tensor([[0, 1, 2]])
    want = re.escape(f"with n_seq >= 1 and pos >= 2 (at least one token to predict), got shape {shape}")
    with pytest.raises(ValueError, match=r"^tokens must be \[n_seq, pos\] " + want):
        mean_next_token_loss(model, empty)
    with pytest.raises(ValueError, match=r"^train_tokens must be \[n_seq, pos\] " + want):
        unigram_loss(empty, ok, d_vocab=4)
    with pytest.raises(ValueError, match=r"^heldout_tokens must be \[n_seq, pos\] " + want):
        unigram_loss(ok, empty, d_vocab=4)


# ---------------------------------------------------------------------------- activations
def test_hook_layer():
    assert hook_layer(utils.get_act_name("mlp_out", 0)) == 1
    assert hook_layer(utils.get_act_name("resid_mid", 3)) == 4
    assert hook_layer(utils.get_act_name("normalized", 2, "ln2")) == 3
    assert hook_layer("hook_embed") == 0
    assert hook_layer("ln_final.hook_normalized") is None


def test_model_token_sets_default_rows_come_from_the_corpus(tiny_corpus, cache_dir):
    lm = load_default_model(tiny_cfg(steps=2), tiny_corpus, progress=False)
    train, held = model_token_sets(lm, tiny_corpus, 5, 2, seed=1)
    rows = {tuple(r) for r in tiny_corpus.train_tokens.tolist()}
    assert train.shape == (5, 16) and all(tuple(r) in rows for r in train.tolist())
    assert len({tuple(r) for r in train.tolist()}) == len(set(tuple(r) for r in train.tolist()))
    assert torch.equal(model_token_sets(lm, tiny_corpus, 5, 2, seed=1)[0], train)
    with pytest.raises(ValueError, match="asked for"):
        model_token_sets(lm, tiny_corpus, 10_000, 2)


# ---------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    return lm_mod.load_smollm2(n_ctx=256, return_hf=True)


def test_smollm2_logits_match_transformers(smollm2):
    lm, hf = smollm2
    assert (lm.model.cfg.n_layers, lm.model.cfg.d_model, lm.model.cfg.d_mlp) == (30, 576, 1536)
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "Paris is the capital and largest city of France.",
        "In mathematics, a prime number is a natural number greater than 1.",
    ]
    for s in sentences:
        ids = torch.tensor([[lm.bos_id] + lm.tokenizer.encode(s, add_special_tokens=False).ids])
        with torch.no_grad():
            ours = lm.model(ids)
            theirs = hf(ids).logits
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() < 1e-3
    # the text decodes back
    assert "".join(lm.decode(lm.tokenizer.encode(sentences[0]).ids)) == sentences[0]


def test_smollm2_second_load_reads_the_converted_cache(smollm2, monkeypatch):
    # the fixture converted the GGUF (return_hf always converts) and wrote the converted weights,
    # tokenizer and config to the cache; a plain load must read them back, without transformers,
    # and give the same model and tokenizer bit for bit
    import transformers

    lm, _ = smollm2

    def convert_again(*args, **kwargs):
        raise AssertionError("load_smollm2 converted the GGUF again instead of reading its cache")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", convert_again)
    again = lm_mod.load_smollm2(n_ctx=256)
    assert again.info["loaded_from_cache"] and not lm.info["loaded_from_cache"]
    sa, sb = lm.model.state_dict(), again.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    text = "Héllo wörld, the <|endoftext|> token and 123 numbers."
    assert again.tokenizer.encode(text).ids == lm.tokenizer.encode(text).ids and again.bos_id == lm.bos_id
    ids = torch.tensor([[lm.bos_id] + lm.tokenizer.encode(text).ids])
    with torch.no_grad():
        assert torch.equal(again.model(ids), lm.model(ids))


def test_smollm2_loss_recovered_one_layer(smollm2, cache_dir):
    from saelib.data.corpus import tokenize_documents
    from saelib.experiments.sparse_mlp import SparseMLPConfig, sparse_mlp_sweep

    lm, _ = smollm2
    split = split_documents(load_wiki_leads())
    train = tokenize_documents(split.train_texts[:48], lm.tokenizer, lm.bos_id, 64)
    held = tokenize_documents(split.heldout_texts[:4], lm.tokenizer, lm.bos_id, 64)
    layer = 0  # zero-ablating SmolLM2's first MLP is catastrophic (held-out loss about 13.2 nats, measured here)
    cfg = SparseMLPConfig(S_values=(-4.0,), d_sae=576, steps=150, batch_size=256, lr=2e-3, progress=False)
    sweep = sparse_mlp_sweep(lm, train, held, cfg, layers=[layer], tokens_per_batch=256, checkpoints=(50, 100))
    res = sweep.results[layer]
    assert sweep.tokens_seen == [50 * 256, 100 * 256, 150 * 256]
    assert len(sweep.curve[layer]) == len(sweep.best_cos_curve[layer]) == len(sweep.alive_frac_curve[layer]) == 3
    assert sweep.curve[layer][-1] is res and sweep.best_cos_curve[layer][-1] is sweep.best_cos[layer]
    early = sweep.curve[layer][0]  # the same clean and ablated passes; a sparse MLP trained for a third of the steps
    assert (early.loss_orig, early.loss_zero) == (res.loss_orig, res.loss_zero) and early.loss_sparse != res.loss_sparse
    assert 1.0 < res.loss_orig < 5.0  # a real language model on English text
    assert res.loss_orig < res.loss_sparse[0] < res.loss_zero
    assert res.loss_zero > res.loss_orig + 3.0
    assert 0.5 < res.recovered[0] < 1.0
    assert res.kl_sparse[0] < res.kl_zero


def test_load_model_dispatches_hub_names_to_transformer_lens(tiny_corpus, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    calls = []

    def fake_from_pretrained(name, **kw):
        calls.append((name, kw))
        model = HookedTransformer(tiny_cfg().hooked_config())
        model.tokenizer = PreTrainedTokenizerFast(tokenizer_object=tiny_corpus.tokenizer, bos_token="<|endoftext|>")
        return model

    monkeypatch.setattr(lm_mod.HookedTransformer, "from_pretrained", staticmethod(fake_from_pretrained))
    lm = lm_mod.load_model("some-org/some-model")
    assert calls == [("some-org/some-model", {"device": "cpu"})]
    assert lm.name == "some-org/some-model" and lm.bos_id == 0
    assert lm.tokenizer.encode("the cat").ids == tiny_corpus.tokenizer.encode("the cat").ids
    assert not lm.model.training
