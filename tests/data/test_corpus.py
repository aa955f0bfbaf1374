"""Tests for saelib.data.corpus: the deterministic split, the BPE tokenizer, sequence construction
and the on-disk cache."""

import hashlib

import pytest
import torch

from saelib.core.io import config_hash
from saelib.data import corpus as corpus_mod
from saelib.data.corpus import (
    EOT_TOKEN,
    CorpusConfig,
    load_corpus,
    load_wiki_leads,
    split_documents,
    tokenize_to_sequences,
    train_bpe_tokenizer,
)

TEXTS = [
    "The cat sat on the mat. The cat was happy.",
    "A dog ran in the park; the dog liked the park.",
    "Cats and dogs are pets. Many people keep cats and dogs.",
    "Numbers like 12 and 345 appear in text, as do symbols: $, %, &.",
] * 5


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return train_bpe_tokenizer(TEXTS, vocab_size=300, min_frequency=1)


# ---------------------------------------------------------------------------- split
def test_split_rule_matches_hash_by_hand():
    docs = {f"title {i}": f"text {i}" for i in range(200)}
    split = split_documents(docs, heldout_frac=0.25, seed=3)
    for title in docs:
        u = int(hashlib.sha256(f"3:{title}".encode()).hexdigest()[:16], 16) / 2**64
        assert (title in split.heldout_titles) == (u < 0.25)
    assert sorted(split.train_titles + split.heldout_titles) == sorted(docs)
    assert split.train_titles == sorted(split.train_titles)
    assert [docs[t] for t in split.heldout_titles] == split.heldout_texts


def test_split_is_stable_when_documents_are_added():
    docs = {f"doc {i}": "x" for i in range(100)}
    a = split_documents(docs, 0.2)
    b = split_documents({**docs, **{f"new {i}": "y" for i in range(50)}}, 0.2)
    assert set(a.heldout_titles) == set(b.heldout_titles) & set(docs)
    assert a.fingerprint() == split_documents(dict(docs), 0.2).fingerprint()
    assert a.fingerprint() != b.fingerprint()


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_bad_fraction(frac):
    with pytest.raises(ValueError, match="heldout_frac"):
        split_documents({"a": "b"}, frac)


def test_split_rejects_no_documents():
    with pytest.raises(ValueError, match=r"docs must hold at least one document.*got \{\}"):
        split_documents({})


def test_config_hash_changes_with_config():
    assert config_hash({"a": 1}) == config_hash({"a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert len(config_hash("x")) == 16


# ---------------------------------------------------------------------------- tokenizer
def test_tokenizer_layout_and_round_trip(tiny_tokenizer):
    assert tiny_tokenizer.token_to_id(EOT_TOKEN) == 0
    assert tiny_tokenizer.get_vocab_size() <= 300
    for text in TEXTS[:4] + ["unseen wörds ✓ 42"]:
        ids = tiny_tokenizer.encode(text, add_special_tokens=False).ids
        assert tiny_tokenizer.decode(ids) == text
    # merges were learned: frequent words take fewer tokens than bytes
    assert len(tiny_tokenizer.encode(TEXTS[0]).ids) < 0.75 * len(TEXTS[0].encode())


def test_tokenizer_training_is_deterministic(tiny_tokenizer):
    again = train_bpe_tokenizer(TEXTS, vocab_size=300, min_frequency=1)
    assert again.to_str() == tiny_tokenizer.to_str()


def test_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(TEXTS, vocab_size=100)


# ---------------------------------------------------------------------------- sequences
def test_sequences_match_a_hand_built_stream(tiny_tokenizer):
    bos, n_ctx = 0, 9
    stream = []
    for i, text in enumerate(TEXTS):
        if i:
            stream.append(bos)
        stream += tiny_tokenizer.encode(text, add_special_tokens=False).ids
    n_seq = len(stream) // (n_ctx - 1)
    seqs = tokenize_to_sequences(TEXTS, tiny_tokenizer, n_ctx, bos)
    assert seqs.shape == (n_seq, n_ctx)
    assert (seqs[:, 0] == bos).all()
    assert seqs[:, 1:].flatten().tolist() == stream[: n_seq * (n_ctx - 1)]
    # early stop with max_seqs gives the same first sequences
    assert torch.equal(tokenize_to_sequences(TEXTS, tiny_tokenizer, n_ctx, bos, max_seqs=3), seqs[:3])


def test_sequences_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match="n_ctx"):
        tokenize_to_sequences(TEXTS, tiny_tokenizer, 1, 0)
    with pytest.raises(ValueError, match="no complete sequence"):
        tokenize_to_sequences(["hi"], tiny_tokenizer, 50, 0)


# ---------------------------------------------------------------------------- real corpus + cache
def test_wiki_leads_are_the_packaged_text():
    docs = load_wiki_leads()
    assert len(docs) > 10_000
    assert list(docs) == sorted(docs)
    assert all(t.strip() for t in docs.values())


def test_load_corpus_caches_and_reloads(cache_dir, monkeypatch):
    cfg = CorpusConfig(vocab_size=512, n_ctx=64)
    first = load_corpus(cfg)
    files = sorted(p.name for p in cache_dir.iterdir())
    assert files == [f"tokenizer-{first.key}.json", f"tokens-{first.key}.safetensors"]
    # held-out part is about 10 % of the documents and disjoint from the training part
    n_held, n_train = len(first.split.heldout_titles), len(first.split.train_titles)
    assert 0.08 < n_held / (n_held + n_train) < 0.12
    assert not set(first.split.heldout_titles) & set(first.split.train_titles)
    assert first.train_tokens.shape[1] == 64 and (first.train_tokens[:, 0] == first.bos_id).all()
    assert int(first.train_tokens.max()) < 512

    # second call must read the cache, not retrain: make training fail if it is attempted
    def boom(*a, **k):
        raise AssertionError("tokenizer retrained despite cache")

    monkeypatch.setattr(corpus_mod, "train_bpe_tokenizer", boom)
    again = load_corpus(cfg)
    assert again.key == first.key
    assert torch.equal(again.train_tokens, first.train_tokens)
    assert torch.equal(again.heldout_tokens, first.heldout_tokens)
    # a different config is a different cache entry
    assert config_hash("corpus-v1", CorpusConfig(vocab_size=600).to_dict(), "x") != config_hash(
        "corpus-v1", CorpusConfig(vocab_size=512).to_dict(), "x"
    )
    no_tmp = [p for p in cache_dir.iterdir() if p.name.endswith(".tmp")]
    assert not no_tmp
