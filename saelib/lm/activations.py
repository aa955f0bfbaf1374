"""Harvest a language model's activations once, cache them on disk, stream them to training.

One path for every real-text notebook: :func:`harvest_activations` runs the model over
document-aligned sequences (:class:`saelib.data.corpus.DocumentTokens`: each row starts at a document
start with BOS, no row holds two documents), with only the requested hooks attached and the
forward pass stopped after the deepest block they need (``stop_at_layer``). Rows are batched by
length (longest first, ``tokens_per_batch`` tokens per forward pass including padding) and
right-padded; in a causal model padding after a row's end does not change the activations of
its valid positions (tested).

Every valid position is kept, BOS included, in document order: token ``t`` of the store belongs
to document ``doc[t]`` at position ``pos[t]`` (0 = BOS). The activations of each hook are one
``[n_tokens, d]`` array.

**Cache.** ``<cache_dir>/acts-<key>/`` (:func:`saelib.core.io.cache_dir`, i.e.
``$SAELIB_CACHE_DIR``), ``key`` hashing the model's name and weights (SHA-256 of every
parameter), the hooks, the token set's fingerprint, the storage dtype and the forward's precision
(float32 or bf16, :mod:`saelib.core.precision`), so a changed model,
hook, document set, dtype or precision is harvested again. The folder holds ``meta.json``, ``tokens.npy``,
``doc.npy``, ``pos.npy`` and one ``act-<i>.npy`` per hook (numpy ``.npy``: float32 or float16).
The arrays are written into a temporary folder, which is renamed into place only when complete,
so an interrupted harvest never leaves a folder that looks finished.

**Streaming.** A store opens its arrays memory-mapped (copy-on-write): training draws random rows
through :meth:`ActivationStore.sampler`, which scales each batch on the fly, so the set is never
held twice in memory (the page cache holds it once) and never copied to be normalised.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ..data.corpus import DocumentTokens
from ..core.io import atomic_write_bytes, cache_dir, config_hash
from ..core.normalisation import scale_from_mean_sq_norm
from ..core.precision import autocast, resolve_precision

if TYPE_CHECKING:
    from .models import LanguageModel

__all__ = [
    "ActivationStore",
    "harvest_activations",
    "length_batches",
    "model_fingerprint",
    "pad_by_document",
]

_FORMAT = "acts-v1"
_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (16 hex characters) of every parameter and buffer name, shape, dtype and value."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def pad_by_document(values: Tensor, lengths: Int[Tensor, " n_docs"]) -> Tensor:
    """Per-token values in document order (``[n_tokens, ...]``, as in an :class:`ActivationStore`)
    → ``[n_docs, max(lengths), ...]``, zero after each document's end.

    Raises ValueError if ``len(values) != lengths.sum()``.
    """
    n = int(lengths.sum())
    if values.shape[0] != n:
        raise ValueError(f"values has {values.shape[0]} rows but the documents hold {n} tokens")
    mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]  # [n_docs, max_len]
    out = values.new_zeros(len(lengths), mask.shape[1], *values.shape[1:])
    out[mask] = values
    return out


def length_batches(lengths: Int[Tensor, " n_docs"], tokens_per_batch: int) -> list[list[int]]:
    """Rows grouped for batched forward passes: longest first, each batch as many rows as fit in
    ``tokens_per_batch`` tokens at the length of its longest row (at least one row), so that
    padding stays small. Returns lists of row indices. Raises ValueError if
    ``tokens_per_batch < 1``."""
    if tokens_per_batch < 1:
        raise ValueError(f"tokens_per_batch must be >= 1, got {tokens_per_batch}")
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    batches, i = [], 0
    while i < len(order):
        n = max(1, tokens_per_batch // int(lengths[order[i]]))
        batches.append(order[i : i + n])
        i += n
    return batches


@dataclass
class ActivationStore:
    """Cached activations of one model at one or more hooks over one set of documents.

    Attributes:
        folder: the cache folder.
        hooks: the hook names, in the order of ``act-<i>.npy``.
        acts: ``{hook: Tensor[n_tokens, d]}`` (memory-mapped, float32 or float16).
        tokens: ``[n_tokens]`` token ids.
        doc: ``[n_tokens]`` row of the token's document in the harvested :class:`DocumentTokens`.
        pos: ``[n_tokens]`` position in the document (0 = BOS).
        lengths: ``[n_docs]`` tokens per document, BOS included.
        meta: what was harvested, when, and how fast (``meta.json``).
    """

    folder: Path
    hooks: list[str]
    acts: dict[str, Tensor] = field(repr=False)
    tokens: Tensor = field(repr=False)
    doc: Tensor = field(repr=False)
    pos: Tensor = field(repr=False)
    lengths: Tensor = field(repr=False)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: str | Path) -> "ActivationStore":
        """Open a finished cache folder (memory-mapped). Raises FileNotFoundError if it has no
        ``meta.json``."""
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())

        def load(name: str) -> Tensor:
            return torch.from_numpy(np.load(folder / name, mmap_mode="c"))

        acts = {h: load(f"act-{i}.npy") for i, h in enumerate(meta["hooks"])}
        return cls(folder, list(meta["hooks"]), acts, load("tokens.npy"), load("doc.npy"), load("pos.npy"),
                   torch.tensor(meta["lengths"]), meta)

    def __getitem__(self, hook: str) -> Tensor:
        if hook not in self.acts:
            raise KeyError(f"hook {hook!r} not in this store (it has {self.hooks})")
        return self.acts[hook]

    def read(self, hook: str, rows: Int[Tensor, " n"] | None = None, chunk: int = 65536) -> Float[Tensor, "n d"]:
        """The hook's activations at ``rows`` (all stored tokens when None) as an in-memory float32
        ``[n, d]`` tensor, the same values as ``self[hook][rows].float()``.

        Read through a mapping of its own that is closed before returning, in chunks of ``chunk``
        rows, so the file's pages do not stay mapped into the process (they would count towards its
        resident memory) and no second full-size copy is made for a float16 store. Raises KeyError
        for an unknown hook and IndexError for a row out of range."""
        if hook not in self.acts:
            raise KeyError(f"hook {hook!r} not in this store (it has {self.hooks})")
        rows = torch.arange(self.n_tokens) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= self.n_tokens):
            raise IndexError(f"rows must lie in [0, {self.n_tokens}), got {int(rows.min())}..{int(rows.max())}")
        mapped = np.load(self.folder / f"act-{self.hooks.index(hook)}.npy", mmap_mode="r")
        out = torch.empty(len(rows), mapped.shape[1], dtype=torch.float32)
        idx = rows.numpy()
        for i in range(0, len(idx), chunk):
            out[i : i + chunk] = torch.from_numpy(np.array(mapped[idx[i : i + chunk]]))  # a copy of these rows
        del mapped  # the last reference: unmapped here
        return out

    @property
    def n_tokens(self) -> int:
        """Stored tokens, BOS included."""
        return len(self.tokens)

    def rows(self, skip_bos: bool = True) -> Int[Tensor, " n"]:
        """Indices of the stored tokens, without the BOS positions when ``skip_bos``."""
        return (self.pos > 0).nonzero().flatten() if skip_bos else torch.arange(self.n_tokens)

    @torch.no_grad()
    def moments(self, hook: str, skip_bos: bool = True, chunk: int = 65536) -> dict[str, Any]:
        """``{"mean": Tensor[d], "mean_sq_norm": float}`` of the hook's activations over the
        stored tokens (BOS excluded when ``skip_bos``), in float64, read in chunks."""
        keep = self.pos > 0 if skip_bos else torch.ones(self.n_tokens, dtype=torch.bool)
        total, sq, n = torch.zeros(self[hook].shape[1], dtype=torch.float64), 0.0, 0
        for i in range(0, self.n_tokens, chunk):
            xb = self.read(hook, i + keep[i : i + chunk].nonzero().flatten()).double()  # no pages left mapped
            total += xb.sum(0)
            sq += float(xb.pow(2).sum())
            n += len(xb)
        if n == 0:
            raise ValueError(f"no token to average over in {self.folder}")
        return {"mean": (total / n).float(), "mean_sq_norm": sq / n}

    def normalisation_scale(self, hook: str, skip_bos: bool = True) -> float:
        """The scalar ``c`` with ``mean ||c x||² = d`` over the stored tokens
        (:func:`saelib.core.normalisation.normalisation_scale`, from the mean squared norm streamed
        by :meth:`moments` without loading the set). Raises ValueError if the activations are all
        zero."""
        ms = self.moments(hook, skip_bos)["mean_sq_norm"]
        return scale_from_mean_sq_norm(ms, self[hook].shape[1], what=f"{hook} has")

    def sampler(
        self,
        hook: str,
        scale: float = 1.0,
        target_hook: str | None = None,
        target_scale: float = 1.0,
        skip_bos: bool = True,
    ) -> Callable[[int, torch.Generator], Tensor | tuple[Tensor, Tensor]]:
        """A data function for :func:`saelib.core.train.train_sae`: ``sample(batch, generator)``
        draws ``batch`` stored tokens uniformly with replacement (BOS excluded when
        ``skip_bos``) and returns ``scale * x`` as float32 ``[batch, d]``, or the pair
        ``(scale * x, target_scale * y)`` with ``y`` read at ``target_hook`` (a transcoder's
        input and target). It reads through the store's own mapping (a fresh mapping per batch,
        as :meth:`read` makes, costs about 35 ms of page faults per 1024 rows), so the pages it
        touches count towards resident memory. Raises KeyError for an unknown hook and ValueError
        for a store with no token to sample."""
        rows = self.rows(skip_bos)
        if len(rows) == 0:
            raise ValueError(f"no token to sample in {self.folder}")
        x = self[hook]
        y = self[target_hook] if target_hook is not None else None

        def sample(batch: int, g: torch.Generator) -> Tensor | tuple[Tensor, Tensor]:
            idx = rows[torch.randint(len(rows), (batch,), generator=g)]
            xb = x[idx].float() * scale
            if y is None:
                return xb
            return xb, y[idx].float() * target_scale

        return sample

    def padded(self, hook: str) -> Float[Tensor, "n_docs max_len d"]:
        """The hook's activations as ``[n_docs, max_len, d]`` float32, zero after each document's
        end (:func:`pad_by_document`; for small held-out sets)."""
        return pad_by_document(self[hook].float(), self.lengths)


def _stop_layer(model: Any, hooks: Sequence[str]) -> int | None:
    from .models import hook_layer

    layers = [hook_layer(h) for h in hooks]
    if any(layer is None for layer in layers):
        return None
    stop = max(layers)  # type: ignore[type-var]
    return None if stop >= model.cfg.n_layers else stop


def _remove_dead_partials(root: Path, key: str) -> None:
    """Remove ``acts-<key>.partial-<pid>-*`` folders of processes that no longer run."""
    for p in root.glob(f"acts-{key}.partial-*"):
        try:
            pid = int(p.name.split(".partial-")[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


@torch.no_grad()
def harvest_activations(
    lm: "LanguageModel",
    docs: DocumentTokens,
    hooks: Sequence[str],
    dtype: torch.dtype = torch.float32,
    tokens_per_batch: int = 4096,
    use_cache: bool = True,
    progress: bool = True,
    precision: str = "float32",
) -> ActivationStore:
    """Activations of ``lm`` at ``hooks`` on every valid position of ``docs``, from the cache
    when present, else computed and cached (see the module docstring).

    Args:
        lm: the model (:func:`saelib.lm.models.load_model`).
        docs: document-aligned token rows (:func:`saelib.data.corpus.tokenize_documents`).
        hooks: TransformerLens hook names (``transformer_lens.utils.get_act_name``).
        dtype: storage dtype, ``torch.float32`` or ``torch.float16``.
        tokens_per_batch: rows × padded length per forward pass.
        use_cache: read an existing cache entry; if False, harvest again and replace it.
        progress: tqdm bar over tokens.
        precision: the forward's precision, ``"float32"``, ``"bfloat16"`` (bf16 products under
            autocast; the stored activations are still ``dtype``) or ``"auto"``
            (:mod:`saelib.core.precision`); the resolved precision is part of the cache key.

    Returns the :class:`ActivationStore`; its ``meta`` records ``seconds``, ``tokens_per_s`` and
    ``precision`` of the harvest that wrote it. Raises ValueError for an unknown hook, dtype or
    precision, or an empty hook list.
    """
    model = lm.model
    hooks = list(hooks)
    if not hooks:
        raise ValueError("hooks must name at least one hook")
    missing = [h for h in hooks if h not in model.hook_dict]
    if missing:
        raise ValueError(f"hook(s) {missing} not in the model (see model.hook_dict)")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype}")
    if tokens_per_batch < docs.tokens.shape[1]:
        raise ValueError(f"tokens_per_batch={tokens_per_batch} is below the longest row ({docs.tokens.shape[1]})")
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    weights = lm.info.get("weights_sha256") or model_fingerprint(model)
    lm.info["weights_sha256"] = weights
    key = config_hash(_FORMAT, lm.name, weights, hooks, docs.fingerprint(), str(dtype), precision)
    root = cache_dir()
    final = root / f"acts-{key}"
    if use_cache and (final / "meta.json").exists():
        return ActivationStore.open(final)

    root.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(root, key)
    tmp = root / f"acts-{key}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        lengths = docs.lengths
        n_tok = int(lengths.sum())
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])  # [n_docs + 1]
        mask = docs.mask
        np.save(tmp / "tokens.npy", docs.tokens[mask].numpy().astype(np.int32))
        np.save(tmp / "doc.npy", torch.arange(len(docs))[:, None].expand_as(mask)[mask].numpy().astype(np.int32))
        np.save(tmp / "pos.npy", torch.arange(mask.shape[1])[None, :].expand_as(mask)[mask].numpy().astype(np.int32))
        d = {h: None for h in hooks}
        arrays: dict[str, np.ndarray] = {}
        batches = length_batches(lengths, tokens_per_batch)
        stop = _stop_layer(model, hooks)
        current: dict[str, Tensor] = {}

        def keep(act: Tensor, hook: Any) -> None:
            current[hook.name] = act.detach()

        t0 = time.perf_counter()
        bar = tqdm(total=n_tok, disable=not progress, desc="harvest activations", unit="tok", mininterval=1.0)
        for rows in batches:
            width = int(lengths[rows[0]])
            with autocast(precision, device):
                model.run_with_hooks(docs.tokens[rows, :width].to(device), fwd_hooks=[(h, keep) for h in hooks],
                                     stop_at_layer=stop, return_type=None)
            for h in hooks:
                act = current[h]
                if h not in arrays:
                    d[h] = act.shape[-1]
                    arrays[h] = np.lib.format.open_memmap(tmp / f"act-{hooks.index(h)}.npy", mode="w+",
                                                          dtype=_DTYPES[dtype], shape=(n_tok, act.shape[-1]))
                a = act.to(dtype).cpu().numpy()
                for j, r in enumerate(rows):
                    arrays[h][int(offsets[r]) : int(offsets[r + 1])] = a[j, : int(lengths[r])]
            bar.update(int(lengths[rows].sum()))
        bar.close()
        seconds = time.perf_counter() - t0
        for arr in arrays.values():
            arr.flush()
        del arrays
        meta = {
            "format": _FORMAT,
            "model": lm.name,
            "weights_sha256": weights,
            "hooks": hooks,
            "d": d,
            "dtype": str(dtype),
            "precision": precision,
            "documents_fingerprint": docs.fingerprint(),
            "n_docs": len(docs),
            "n_tokens": n_tok,
            "n_truncated": docs.n_truncated,
            "lengths": lengths.tolist(),
            "stop_at_layer": stop,
            "tokens_per_batch": tokens_per_batch,
            "seconds": seconds,
            "tokens_per_s": n_tok / seconds if seconds > 0 else None,
            "torch_threads": torch.get_num_threads(),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        atomic_write_bytes(tmp / "meta.json", json.dumps(meta, indent=1).encode())
        if not use_cache and final.exists():
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same harvest first
            if not (final / "meta.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ActivationStore.open(final)
