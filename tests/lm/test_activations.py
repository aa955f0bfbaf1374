"""Tests for document-aligned token rows (saelib.data.corpus.tokenize_documents) and the activation
harvest / cache / sampler (saelib.lm.activations), on a tiny randomly initialised transformer with
LayerNorm (so padding invariance is tested through normalisation, attention and MLPs)."""

import json
import os

import pytest
import torch
from tokenizers import Tokenizer
from transformer_lens import utils

from saelib.lm.activations import ActivationStore, harvest_activations, model_fingerprint, pad_by_document
from saelib.data.corpus import tokenize_documents
from saelib.lm.models import LanguageModel
from tests.builders import WORDS, tiny_language_model, word_level_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return word_level_tokenizer()


def tiny_lm(tokenizer, seed=0) -> LanguageModel:
    return tiny_language_model(tokenizer, n_layers=3, d_model=8, d_head=4, d_mlp=16, seed=seed)


TEXTS = ["a b c d e f", "g", "b b b b b b b b b b b b b b b b b b b b", "", "c d"]


def test_tokenize_documents_rows_start_with_bos_and_never_mix_documents(tokenizer):
    docs = tokenize_documents(TEXTS, tokenizer, bos_id=0, n_ctx=8, titles=["t0", "t1", "t2", "t3", "t4"])
    assert docs.titles == ("t0", "t1", "t2", "t4")  # the empty text is skipped
    assert docs.lengths.tolist() == [7, 2, 8, 3]  # BOS + tokens, the long one cut at n_ctx
    assert docs.truncated.tolist() == [False, False, True, False] and docs.n_truncated == 1
    assert docs.tokens.shape == (4, 8)
    assert docs.tokens[0, :7].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert docs.tokens[1, :2].tolist() == [0, 7]
    assert docs.tokens[:, 0].tolist() == [0, 0, 0, 0]
    assert docs.mask.sum(1).tolist() == [7, 2, 8, 3] and docs.n_tokens == 20
    sub = docs.subset([3, 1])
    assert sub.titles == ("t4", "t1") and sub.tokens.shape == (2, 3) and sub.tokens[0].tolist() == [0, 3, 4]
    assert sub.fingerprint() != docs.fingerprint()
    assert tokenize_documents(TEXTS, tokenizer, 0, 8, max_docs=2).titles == ("0", "1")


def test_tokenize_documents_errors(tokenizer):
    with pytest.raises(ValueError, match="n_ctx"):
        tokenize_documents(TEXTS, tokenizer, 0, 1)
    with pytest.raises(ValueError, match="titles"):
        tokenize_documents(TEXTS, tokenizer, 0, 8, titles=["x"])
    with pytest.raises(ValueError, match="no text"):
        tokenize_documents(["", ""], tokenizer, 0, 8)


def test_pad_by_document_round_trip():
    lengths = torch.tensor([3, 1, 2])
    values = torch.arange(6.0)[:, None] * torch.ones(1, 2)
    out = pad_by_document(values, lengths)
    assert out.shape == (3, 3, 2)
    assert out[:, :, 0].tolist() == [[0, 1, 2], [3, 0, 0], [4, 5, 0]]
    with pytest.raises(ValueError, match="5 rows"):
        pad_by_document(values[:5], lengths)


def test_harvest_matches_each_document_alone_in_document_order(tokenizer, cache_dir):
    lm = tiny_lm(tokenizer)
    docs = tokenize_documents(TEXTS, tokenizer, 0, 8)
    hooks = [utils.get_act_name("resid_post", 0), utils.get_act_name("normalized", 1, "ln2")]
    # 8 tokens per batch: several rows of different lengths padded together
    store = harvest_activations(lm, docs, hooks, tokens_per_batch=8, progress=False)
    assert store.n_tokens == docs.n_tokens
    assert store.doc.tolist() == [0] * 7 + [1] * 2 + [2] * 8 + [3] * 3
    assert store.pos.tolist() == list(range(7)) + [0, 1] + list(range(8)) + [0, 1, 2]
    assert store.tokens.tolist() == docs.tokens[docs.mask].tolist()
    for i in range(len(docs)):
        n = int(docs.lengths[i])
        _, cache_i = lm.model.run_with_cache(docs.tokens[i : i + 1, :n])
        for h in hooks:
            got = store[h][store.doc == i]
            assert torch.allclose(got, cache_i[h][0], atol=1e-5), (i, h)
    padded = store.padded(hooks[0])
    assert padded.shape == (4, 8, 8) and torch.equal(padded[1, 2:], torch.zeros(6, 8))


def test_harvest_stops_after_the_deepest_hook_and_reads_the_cache(tokenizer, cache_dir, monkeypatch):
    lm = tiny_lm(tokenizer)
    docs = tokenize_documents(TEXTS, tokenizer, 0, 8)
    hook = utils.get_act_name("resid_post", 0)
    calls = []
    lm.model.blocks[1].hook_resid_pre.add_hook(lambda act, hook: calls.append(1))  # block 1 must never run
    first = harvest_activations(lm, docs, [hook], progress=False)
    lm.model.reset_hooks()
    assert calls == [] and first.meta["stop_at_layer"] == 1
    assert first.meta["n_tokens"] == docs.n_tokens and first.meta["tokens_per_s"] > 0

    def boom(*a, **k):
        raise AssertionError("the model ran although the activations are cached")

    monkeypatch.setattr(lm.model, "run_with_hooks", boom)
    again = harvest_activations(lm, docs, [hook], progress=False)
    assert again.folder == first.folder and torch.equal(again[hook], first[hook])
    # another document set, hook or dtype is another cache entry (and so runs the model)
    for kwargs in ({"docs": docs.subset([0, 1])}, {"hooks": [utils.get_act_name("resid_post", 1)]},
                   {"dtype": torch.float16}):
        args = {"docs": docs, "hooks": [hook], **kwargs}
        with pytest.raises(AssertionError, match="cached"):
            harvest_activations(lm, args["docs"], args["hooks"], dtype=kwargs.get("dtype", torch.float32), progress=False)
    # changed weights: another entry too
    other = tiny_lm(tokenizer, seed=1)
    assert model_fingerprint(other.model) != model_fingerprint(lm.model)


def test_harvest_of_hooks_in_two_blocks_stops_after_the_deeper_one(tokenizer, cache_dir):
    lm = tiny_lm(tokenizer)  # 3 blocks
    docs = tokenize_documents(TEXTS, tokenizer, 0, 8)
    hooks = [utils.get_act_name("resid_mid", 0), utils.get_act_name("mlp_out", 1)]
    calls = []
    lm.model.blocks[2].hook_resid_pre.add_hook(lambda act, hook: calls.append(1))  # block 2 must never run
    store = harvest_activations(lm, docs, hooks, tokens_per_batch=8, progress=False)
    lm.model.reset_hooks()
    assert calls == [] and store.meta["stop_at_layer"] == 2
    for i in range(len(docs)):
        _, cache_i = lm.model.run_with_cache(docs.tokens[i : i + 1, : int(docs.lengths[i])])
        for h in hooks:
            assert store[h].shape == (docs.n_tokens, 8)
            assert torch.allclose(store[h][store.doc == i], cache_i[h][0], atol=1e-5), (i, h)
    # the training rows leave out each document's BOS (position 0), and only it
    assert len(store.rows()) == docs.n_tokens - len(docs) and len(store.rows(skip_bos=False)) == docs.n_tokens


def test_interrupted_harvest_leaves_no_finished_folder(tokenizer, cache_dir, monkeypatch):
    lm = tiny_lm(tokenizer)
    docs = tokenize_documents(TEXTS, tokenizer, 0, 8)
    real = lm.model.run_with_hooks
    n = []

    def fail_second(*a, **k):
        n.append(1)
        if len(n) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(lm.model, "run_with_hooks", fail_second)
    with pytest.raises(KeyboardInterrupt):
        harvest_activations(lm, docs, [utils.get_act_name("resid_post", 0)], tokens_per_batch=8, progress=False)
    assert list(cache_dir.glob("acts-*")) == []


def test_sampler_scales_and_skips_bos_and_moments_match(tokenizer, cache_dir):
    lm = tiny_lm(tokenizer)
    docs = tokenize_documents(TEXTS, tokenizer, 0, 8)
    h_in, h_out = utils.get_act_name("normalized", 1, "ln2"), utils.get_act_name("mlp_out", 1)
    store = harvest_activations(lm, docs, [h_in, h_out], progress=False)
    rows = store.rows()
    assert torch.equal(store.pos[rows] > 0, torch.ones(len(rows), dtype=torch.bool))
    x = store[h_in][rows].double()
    mom = store.moments(h_in)
    assert torch.allclose(mom["mean"].double(), x.mean(0), atol=1e-6)
    assert mom["mean_sq_norm"] == pytest.approx(float(x.pow(2).sum(-1).mean()), rel=1e-9)
    c = store.normalisation_scale(h_in)
    assert float((c * x).pow(2).sum(-1).mean()) == pytest.approx(x.shape[1], rel=1e-6)
    sample = store.sampler(h_in, scale=2.0, target_hook=h_out, target_scale=3.0)
    xb, yb = sample(64, torch.Generator().manual_seed(0))
    assert xb.shape == (64, 8) and yb.shape == (64, 8) and xb.dtype == torch.float32
    # every drawn row is a non-BOS stored row, scaled, and the pair stays aligned
    src_x, src_y = store[h_in][rows], store[h_out][rows]
    for xr, yr in zip(xb, yb):
        j = int(((src_x * 2.0 - xr).abs().sum(-1)).argmin())
        assert torch.allclose(xr, 2.0 * src_x[j], atol=1e-6) and torch.allclose(yr, 3.0 * src_y[j], atol=1e-6)
    with pytest.raises(KeyError, match="not in this store"):
        store["blocks.0.hook_mlp_out"]


def test_harvest_rejects_bad_input(tokenizer, cache_dir):
    lm = tiny_lm(tokenizer)
    docs = tokenize_documents(TEXTS, tokenizer, 0, 8)
    with pytest.raises(ValueError, match="not in the model"):
        harvest_activations(lm, docs, ["blocks.9.hook_mlp_out"], progress=False)
    with pytest.raises(ValueError, match="at least one hook"):
        harvest_activations(lm, docs, [], progress=False)
    with pytest.raises(ValueError, match="dtype"):
        harvest_activations(lm, docs, ["blocks.0.hook_mlp_out"], dtype=torch.int32, progress=False)
    with pytest.raises(ValueError, match="longest row"):
        harvest_activations(lm, docs, ["blocks.0.hook_mlp_out"], tokens_per_batch=4, progress=False)


def test_store_reopens_from_its_folder(tokenizer, cache_dir):
    lm = tiny_lm(tokenizer)
    docs = tokenize_documents(TEXTS, tokenizer, 0, 8)
    store = harvest_activations(lm, docs, ["blocks.0.hook_mlp_out"], progress=False)
    meta = json.loads((store.folder / "meta.json").read_text())
    assert meta["hooks"] == ["blocks.0.hook_mlp_out"] and meta["documents_fingerprint"] == docs.fingerprint()
    again = ActivationStore.open(store.folder)
    assert torch.equal(again["blocks.0.hook_mlp_out"], store["blocks.0.hook_mlp_out"])


# ---------------------------------------------------------------------------- tokenize_split
def _split():
    from saelib.data.corpus import CorpusSplit

    letters = WORDS[1:]
    train = [" ".join(letters[: 1 + i % 7]) for i in range(12)]
    held = [" ".join(letters[i % 7 :]) for i in range(5)]
    return CorpusSplit([f"tr{i:02d}" for i in range(12)], train, [f"ho{i}" for i in range(5)], held)


def test_tokenize_split_keeps_parts_apart_and_samples_in_title_order(tokenizer):
    from saelib.data.corpus import tokenize_split

    split = _split()
    train, held = tokenize_split(split, tokenizer, 0, 8)
    assert train.titles == tuple(split.train_titles) and held.titles == tuple(split.heldout_titles)
    sub_train, sub_held = tokenize_split(split, tokenizer, 0, 8, n_train_docs=5, n_heldout_docs=2, seed=1)
    assert len(sub_train) == 5 and len(sub_held) == 2
    assert list(sub_train.titles) == sorted(sub_train.titles) and set(sub_train.titles) <= set(split.train_titles)
    assert set(sub_held.titles) <= set(split.heldout_titles)
    assert sub_train.titles != train.titles[:5] or sub_train.titles != tokenize_split(
        split, tokenizer, 0, 8, n_train_docs=5, seed=2)[0].titles  # a random subset, not the first five
    again = tokenize_split(split, tokenizer, 0, 8, n_train_docs=5, n_heldout_docs=2, seed=1)
    assert again[0].titles == sub_train.titles and torch.equal(again[0].tokens, sub_train.tokens)


@pytest.mark.parametrize("n", [0, 13])
def test_tokenize_split_rejects_bad_counts(tokenizer, n):
    from saelib.data.corpus import tokenize_split

    with pytest.raises(ValueError, match=f"n_train_docs must be in \\[1, 12\\] or None, got {n}"):
        tokenize_split(_split(), tokenizer, 0, 8, n_train_docs=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_read_gives_the_stored_rows_as_float32_and_leaves_no_mapping(tokenizer, cache_dir, dtype):
    lm = tiny_lm(tokenizer)
    docs = tokenize_documents(TEXTS, tokenizer, 0, 8)
    hook = utils.get_act_name("mlp_out", 1)
    store = harvest_activations(lm, docs, [hook], dtype=dtype, progress=False)
    rows = store.rows()[torch.tensor([5, 0, 3, 3, 1])]  # any order, repeats allowed
    maps = lambda: open("/proc/self/maps").read().count(str(store.folder)) if os.path.exists("/proc/self/maps") else 0
    before = maps()
    got = store.read(hook, rows, chunk=2)  # chunks of 2, 2 and 1 rows
    assert maps() == before  # its own mapping is gone
    assert got.dtype == torch.float32 and got.shape == (5, 8)
    assert torch.equal(got, store[hook][rows].float())
    assert torch.equal(store.read(hook), store[hook].float())  # rows=None: every stored token, BOS included
    with pytest.raises(KeyError, match="not in this store"):
        store.read("blocks.0.hook_mlp_out")
    with pytest.raises(IndexError, match=rf"\[0, {store.n_tokens}\)"):
        store.read(hook, torch.tensor([0, store.n_tokens]))
