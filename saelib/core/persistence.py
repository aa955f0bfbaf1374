"""Saving and loading SAEs, in SAELens 6.x's on-disk layout, with atomic writes.

A saved SAE is a folder holding::

    sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out],
                              b_dec [d_out] (+ threshold [d_sae] for BatchTopK), in the
                              SAE's dtype (float32 by default; d_out = d_in except for
                              transcoders)
    cfg.json                  SAELens 6.x config keys + saelib's own SAEConfig under "saelib"

so that ``sae_lens.SAE.load_from_disk(folder)`` (tested against sae-lens 6.54.12) and
:func:`load_sae` both read it. Architecture mapping (``apply_b_dec_to_input`` is copied, and
SAELens computes ``ReLU((x - b_dec·apply_b_dec_to_input) @ W_enc + b_enc)`` as saelib does):

* saelib ``"relu"`` → SAELens ``"standard"`` (identical).
* saelib ``"topk"`` → SAELens ``"topk"`` with the same ``k`` (identical, up to ties).
* saelib ``"batchtopk"`` (inference mode) → SAELens ``"jumprelu"`` with every latent's threshold
  equal to saelib's per-instance threshold ``t``. Exact, because saelib keeps
  ``pre if pre > t else 0`` and SAELens keeps ``ReLU(pre) if pre > t else 0``, the same when
  ``t >= 0`` (saelib's threshold is an average of non-negative activations). This is how SAELens
  itself exports its BatchTopK SAEs.
* transcoders (``d_out != d_in``): ``"relu"`` → ``"transcoder"``, ``"batchtopk"`` →
  ``"jumprelu_transcoder"`` (with ``d_out``).

Saved with a saelib-only architecture name (``"saelib_<architecture>"``), which :func:`load_sae`
reads and SAELens cannot: a TopK transcoder (SAELens 6.54 has no TopK transcoder), and a BatchTopK
SAE with no threshold yet (never trained, NaN) or a negative one. ``sae_lens.SAE.load_from_disk``
stops on such a folder with a bare KeyError on the architecture name; :func:`sae_lens_folder` checks a
folder first and refuses these two with a message that says why.

A save replaces the folder in one step (:func:`saelib.core.io.atomic_write_folder`): the complete
new folder is written and fsynced as a hidden sibling ``.<name>.<uuid4 hex>.saving`` in the same
parent folder, then swapped with the old one by ``renameat2(RENAME_EXCHANGE)`` on Linux (two renames
elsewhere). A process killed at any moment of a save leaves the old SAE or the new one loadable at
the path, and the path stays a plain folder that SAELens opens. Leftover siblings of killed saves are
never read, and the next save of the same folder removes them. A save refuses (FileExistsError) to
replace a folder holding files other than ``cfg.json`` and ``sae_weights.safetensors``, so it never
deletes files it did not write. ``cfg.json`` records the SHA-256 of the weights
(``metadata.saelib_weights_sha256``), so :func:`load_sae` also catches a folder whose files were
mixed or damaged by other means.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from .io import atomic_write_bytes  # noqa: F401  (re-exported: notebook 07 imports it from here)
from .io import atomic_write_folder, cache_dir, config_hash
from .sae import SAE, SAEConfig, dtype_name

if TYPE_CHECKING:  # only for annotations: train imports nothing from here, but keep the load order plain
    from .data_streams import DataSource
    from .train_config import TrainConfig

__all__ = ["save_sae", "save_instances", "load_sae", "sae_lens_folder", "load_or_train", "load_checkpoints",
           "checkpoint_folder", "check_reload", "WEIGHTS_FILENAME", "CFG_FILENAME"]

WEIGHTS_FILENAME = "sae_weights.safetensors"
CFG_FILENAME = "cfg.json"
# SAELens release whose cfg.json layout this writes; loaders older than 6.0 treat a config
# without a version as pre-6.0 and rewrite it, so the version must be present.
SAELENS_FORMAT_VERSION = "6.54.12"


# ---------------------------------------------------------------------------- saving
def save_sae(
    sae: SAE,
    path: str | Path,
    instance: int = 0,
    metadata: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Save instance ``instance`` of ``sae`` as a SAELens-layout folder at ``path``.

    ``metadata`` adds SAELens metadata keys to ``cfg.json`` (``model_name``, ``hook_name``,
    ``dataset_path``, ``context_size``, ``prepend_bos``: what the SAE reads and was trained on);
    ``training`` is stored under ``"saelib_training"`` (e.g. the ``TrainConfig`` and the input
    scale). Both must be JSON-serialisable (ValueError otherwise).

    Writes ``sae_weights.safetensors`` (in the parameters' dtype, float32 by default, from the
    CPU) and ``cfg.json`` (see the module docstring for the architecture mapping); saelib's
    ``SAEConfig`` (with ``n_inst=1``, and the parameters' actual ``device`` and ``dtype``, also
    written as SAELens's top-level ``device`` / ``dtype``) is stored under the ``"saelib"`` key so
    :func:`load_sae` restores the instance exactly, including the BatchTopK threshold. The output is deterministic: saving the same SAE twice gives
    byte-identical files. A folder already at ``path`` is replaced in one step (see the module
    docstring): a process killed during the save leaves the old SAE or the new one. Returns the
    folder.

    Raises TypeError if ``sae`` is not a :class:`saelib.core.sae.SAE`, IndexError if ``instance`` is
    out of range, ValueError if a weight of the instance contains NaN/inf (the message names the
    parameter; nothing is written), FileExistsError if ``path`` is a file, a symbolic link, or a
    folder holding files other than an SAE's two (nothing is written or removed). The BatchTopK
    threshold may be NaN (not trained yet).
    """
    if not isinstance(sae, SAE):
        raise TypeError(f"save_sae expects a saelib.core.sae.SAE, got {type(sae).__name__}")
    if not (0 <= instance < sae.n_inst):
        raise IndexError(f"instance {instance} out of range for n_inst={sae.n_inst}")
    cfg = sae.cfg
    d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_out
    transcoder = d_out != d_in

    def one(t: Tensor) -> Tensor:
        return t[instance].detach().to("cpu").contiguous().clone()

    tensors = {
        "W_enc": one(sae.W_enc),  # [d_in, d_sae]
        "b_enc": one(sae.b_enc),  # [d_sae]
        "W_dec": one(sae.W_dec),  # [d_sae, d_out]
        "b_dec": one(sae.b_dec),  # [d_out]
    }
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            n_bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"refusing to save instance {instance}: parameter {name!r} has {n_bad} NaN/inf "
                f"value(s) of {t.numel()} (load_sae would reject the file)"
            )
    extra: dict[str, Any] = {"d_out": d_out} if transcoder else {}
    if cfg.architecture == "relu":
        architecture = "transcoder" if transcoder else "standard"
    elif cfg.architecture == "topk":
        architecture = "saelib_topk" if transcoder else "topk"
        extra.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    else:  # batchtopk
        t = float(sae.threshold[instance])
        exportable = math.isfinite(t) and t >= 0
        if exportable:
            architecture = "jumprelu_transcoder" if transcoder else "jumprelu"
        else:
            architecture = "saelib_batchtopk"
        tensors["threshold"] = torch.full((d_sae,), t, dtype=sae.W_enc.dtype)

    where = {"device": str(sae.W_enc.device), "dtype": dtype_name(sae.W_enc.dtype)}
    saelib_cfg = {**cfg.to_dict(), "n_inst": 1, **where}
    cfg_json = {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        **where,
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input),
        "normalize_activations": "none",
        "reshape_activations": "none",
        **extra,
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": SAELENS_FORMAT_VERSION,
            "saelib_instance": instance,
            **(metadata or {}),
        },
        "saelib": saelib_cfg,
    }
    if training is not None:
        cfg_json["saelib_training"] = training
    weights = st_save(tensors, metadata={"format": "pt"})
    cfg_json["metadata"]["saelib_weights_sha256"] = hashlib.sha256(weights).hexdigest()
    try:
        text = json.dumps(cfg_json, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata / training must be JSON-serialisable without NaN: {e}") from e
    return atomic_write_folder(path, {WEIGHTS_FILENAME: weights, CFG_FILENAME: text.encode("utf-8")})


def save_instances(
    sae: SAE,
    folder: str | Path,
    names: Sequence[str] | None = None,
    metadata: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    instances: Sequence[int] | None = None,
) -> list[Path]:
    """Save instances of ``sae`` with :func:`save_sae`, each in its own SAELens-layout subfolder of
    ``folder``: ``folder / names[k]`` for the k-th saved instance (default ``instance_<i>`` with
    ``i`` the instance index, zero-padded to the width of the largest index). ``instances``
    picks which (default: all, in order). ``metadata`` and ``training`` are written into every
    ``cfg.json``; each also records its instance index (``metadata.saelib_instance``).

    Returns the subfolders in the order of ``instances``. Raises IndexError for an instance out
    of range; ValueError if ``names`` does not give one distinct, non-empty name per saved
    instance or a name is not a plain folder name (no ``/``, not ``.`` or ``..``); plus every
    error of :func:`save_sae` (instances saved before a failing one stay saved). Each subfolder is
    replaced in one step, as by :func:`save_sae`.
    """
    if not isinstance(sae, SAE):
        raise TypeError(f"save_instances expects a saelib.core.sae.SAE, got {type(sae).__name__}")
    ids = list(range(sae.n_inst)) if instances is None else [int(i) for i in instances]
    out_of_range = [i for i in ids if not 0 <= i < sae.n_inst]
    if out_of_range:
        raise IndexError(f"instances {out_of_range} out of range for n_inst={sae.n_inst}")
    width = len(str(sae.n_inst - 1))
    names = [f"instance_{i:0{width}d}" for i in ids] if names is None else [str(n) for n in names]
    if len(names) != len(ids) or len(set(names)) != len(names):
        raise ValueError(f"names must give {len(ids)} distinct folder names (one per saved instance), got {names!r}")
    bad = [n for n in names if not n or n in (".", "..") or "/" in n or os.sep in n]
    if bad:
        raise ValueError(f"instance folder names must be plain names, got {bad!r}")
    root = Path(folder)
    return [save_sae(sae, root / name, instance=i, metadata=metadata, training=training) for i, name in zip(ids, names)]


# ---------------------------------------------------------------------------- loading
def _read_cfg(cfg_path: Path) -> dict[str, Any]:
    if not cfg_path.is_file():
        raise FileNotFoundError(f"SAE config file {cfg_path} not found")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _saelib_config(cfg: dict[str, Any], cfg_path: Path) -> SAEConfig:
    """saelib's SAEConfig from cfg.json: the "saelib" entry, else derived from SAELens keys."""
    if "saelib" in cfg:
        try:
            sc = SAEConfig.from_dict(cfg["saelib"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{cfg_path}: invalid 'saelib' config: {e}") from e
        if sc.n_inst != 1:
            raise ValueError(f"{cfg_path}: 'saelib' config must have n_inst=1, got {sc.n_inst}")
        for key in ("d_in", "d_sae", "d_out", "apply_b_dec_to_input", "k"):
            if key in cfg and cfg[key] != getattr(sc, key):
                raise ValueError(
                    f"{cfg_path}: {key}={cfg[key]!r} disagrees with the saelib config's "
                    f"{key}={getattr(sc, key)!r}"
                )
        return sc
    # A config written by SAELens itself: only architectures saelib computes identically.
    arch = cfg.get("architecture")
    unsupported = []
    if cfg.get("normalize_activations", "none") != "none":
        unsupported.append(f"normalize_activations={cfg.get('normalize_activations')!r}")
    if cfg.get("reshape_activations", "none") != "none":
        unsupported.append(f"reshape_activations={cfg.get('reshape_activations')!r}")
    if cfg.get("rescale_acts_by_decoder_norm", False):
        unsupported.append("rescale_acts_by_decoder_norm=True")
    if arch not in ("standard", "topk", "transcoder"):
        unsupported.append(f"architecture={arch!r}")
    if unsupported:
        raise ValueError(
            f"{cfg_path} has no 'saelib' entry and cannot be loaded into saelib: "
            f"unsupported {', '.join(unsupported)}"
        )
    try:
        return SAEConfig(
            d_in=cfg["d_in"],
            d_sae=cfg["d_sae"],
            d_out=cfg["d_out"] if arch == "transcoder" else None,
            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", arch != "transcoder")),
            architecture="topk" if arch == "topk" else "relu",
            k=cfg.get("k") if arch == "topk" else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: invalid SAELens config: {e}") from e


def load_sae(path: str | Path, device: str | None = None, dtype: str | None = None) -> SAE:
    """Load a single-instance SAE saved by :func:`save_sae` (or a SAELens ``standard``, ``topk`` or
    ``transcoder`` saved by ``sae_lens``' ``save_model``), in eval mode.

    It comes back on the device and in the dtype it was saved from (the ``"saelib"`` config's
    ``device`` / ``dtype``; ``"cpu"`` / ``"float32"`` for folders saved before those fields
    existed and for SAELens folders), unless ``device`` or ``dtype`` (strings as in
    :class:`saelib.core.sae.SAEConfig`) say otherwise, e.g. ``device="cpu"`` for an SAE saved from a
    GPU on a machine without one.

    Raises:
        FileNotFoundError: the folder, ``cfg.json`` or ``sae_weights.safetensors`` is missing
            (the message names the path).
        ValueError: ``cfg.json`` is not valid JSON or not a valid config; the safetensors file is
            corrupted or truncated, or does not match the SHA-256 recorded in ``cfg.json``; a
            tensor is missing, unexpected, or its shape does not match ``cfg.json`` (the message
            names the tensor, the expected and the found shape); a weight contains NaN/inf;
            ``use_b_dec=False`` but ``b_dec`` is nonzero.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"SAE folder {folder} not found (or not a directory)")
    cfg_path = folder / CFG_FILENAME
    cfg = _read_cfg(cfg_path)
    sc = _saelib_config(cfg, cfg_path)
    overrides = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    if overrides:
        sc = SAEConfig.from_dict({**sc.to_dict(), **overrides})

    weights_path = folder / WEIGHTS_FILENAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"SAE weights file {weights_path} not found")
    raw = weights_path.read_bytes()
    metadata = cfg.get("metadata")
    sha = metadata.get("saelib_weights_sha256") if isinstance(metadata, dict) else None
    if sha is not None and hashlib.sha256(raw).hexdigest() != sha:
        raise ValueError(
            f"{weights_path} does not match the SHA-256 recorded in {cfg_path} "
            f"(corrupted, or an interrupted save left files from two different saves)"
        )
    try:
        tensors = st_load(raw)
    except Exception as e:  # safetensors raises its own error types on corrupt headers/data
        raise ValueError(f"{weights_path} is not a valid safetensors file (corrupted or truncated?): {e}") from e

    d_in, d_sae, d_out = sc.d_in, sc.d_sae, sc.d_out
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if sc.architecture == "batchtopk":
        expected["threshold"] = (d_sae,)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{weights_path} lacks tensor(s) {missing}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"{weights_path} has unexpected tensor(s) {extra} for architecture {sc.architecture!r}")
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise ValueError(
                f"tensor {name!r} in {weights_path} has shape {tuple(t.shape)}, expected {shape} "
                f"from {CFG_FILENAME} (d_in={d_in}, d_sae={d_sae}, d_out={d_out})"
            )
        if not t.dtype.is_floating_point:
            raise ValueError(f"tensor {name!r} in {weights_path} has non-float dtype {t.dtype}")
        if name != "threshold" and not torch.isfinite(t).all():
            n_bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"tensor {name!r} in {weights_path} has {n_bad} NaN/inf value(s)")

    if not sc.use_b_dec and bool((tensors["b_dec"] != 0).any()):
        raise ValueError(f"{cfg_path} says use_b_dec=False but b_dec in {weights_path} is nonzero")
    threshold = None
    if sc.architecture == "batchtopk":
        thr = tensors["threshold"].float()
        nan = torch.isnan(thr)
        if not (nan.all() or (not nan.any() and bool((thr == thr[0]).all()))):
            raise ValueError(
                f"tensor 'threshold' in {weights_path} must hold one value for all latents "
                f"(a saelib BatchTopK threshold), got values in [{thr.min()}, {thr.max()}]"
            )
        threshold = thr[:1]  # [inst=1]

    sae = SAE(sc)
    with torch.no_grad():
        sae.W_enc.copy_(tensors["W_enc"][None])
        sae.b_enc.copy_(tensors["b_enc"][None])
        sae.W_dec.copy_(tensors["W_dec"][None])
        sae.b_dec.copy_(tensors["b_dec"][None])
        if threshold is not None:
            sae.threshold.copy_(threshold)
    return sae.eval()


_SAELENS_REFUSALS = {
    "saelib_topk": "it is a TopK transcoder (d_out != d_in), and SAELens {version} has no TopK transcoder "
    "architecture (its 'transcoder' is a ReLU encoder, its 'topk' has d_out = d_in)",
    "saelib_batchtopk": "it is a BatchTopK SAE whose inference threshold is not set (NaN: never trained, or "
    "negative), so it has no JumpReLU equivalent; train it (the threshold is the running mean of the smallest "
    "kept activation) and save it again",
}


def sae_lens_folder(path: str | Path) -> str:
    """Check that SAELens can open a folder written by :func:`save_sae`, and return it as the
    string ``sae_lens.SAE.load_from_disk`` takes: ``sae_lens.SAE.load_from_disk(sae_lens_folder(f))``.

    SAELens itself stops on the two saelib-only kinds (see the module docstring) with a bare
    ``KeyError`` on the architecture name; this says why. saelib does not import SAELens (it is in
    the ``notebooks`` extra). The SAELens SAE reads the hook's activations as they were fed to
    training: multiply them by ``cfg.json``'s ``saelib_training.input_scale`` where one is stored.

    Raises:
        FileNotFoundError: the folder or its ``cfg.json`` is missing.
        ValueError: the folder holds a TopK transcoder or a BatchTopK SAE without a threshold
            (the message says why SAELens cannot represent it and points to :func:`load_sae`), or
            ``cfg.json`` is not valid JSON.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"SAE folder {folder} not found (or not a directory)")
    cfg = _read_cfg(folder / CFG_FILENAME)
    reason = _SAELENS_REFUSALS.get(cfg.get("architecture"))
    if reason is not None:
        raise ValueError(
            f"{folder} cannot be opened in SAELens: "
            + reason.format(version=SAELENS_FORMAT_VERSION)
            + "; open it with saelib.core.persistence.load_sae"
        )
    return str(folder)


# ---------------------------------------------------------------------------- trained-SAE cache
def _training_sources() -> list[Path]:
    """``saelib/core/train.py`` and every ``saelib.core`` module it imports, directly or through
    another (read from their relative ``from .x import`` lines), sorted by name."""
    core = Path(__file__).parent
    todo, seen = ["train"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        file = core / f"{name}.py"
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), str(file))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                todo.extend([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
    return [core / f"{name}.py" for name in sorted(seen)]


def _code_fingerprint(code_files: Sequence[str | Path]) -> str:
    """SHA-256 (16 hex characters) of the training modules' source and of ``code_files``."""
    h = hashlib.sha256()
    for file in _training_sources() + [Path(f) for f in code_files]:
        if not file.is_file():
            raise FileNotFoundError(f"source file {file} (to be hashed into the cache key) not found")
        h.update(file.name.encode() + b"\0")
        h.update(file.read_bytes())
    return h.hexdigest()[:16]


def checkpoint_folder(folder: str | Path, step: int) -> Path:
    """Where :func:`load_or_train` saves the checkpoint taken after ``step`` optimiser steps of the
    SAE cached at ``folder``: the sibling folder ``<folder>-step<step>`` (SAELens layout)."""
    folder = Path(folder)
    return folder.with_name(f"{folder.name}-step{int(step)}")


def load_checkpoints(folder: str | Path) -> dict[int, SAE]:
    """The checkpoints :func:`load_or_train` saved beside the SAE at ``folder``: ``{steps: SAE}``,
    fewest steps first (the final SAE itself is not included). Training tokens seen at a checkpoint
    are ``steps * TrainConfig.batch_size`` (also stored in its ``cfg.json`` under
    ``saelib_training.tokens_seen``). Returns an empty dict when there are none."""
    folder = Path(folder)
    found = {}
    for path in folder.parent.glob(f"{folder.name}-step*"):
        tail = path.name[len(folder.name) + len("-step"):]
        if tail.isdigit() and (path / CFG_FILENAME).is_file():
            found[int(tail)] = path
    return {step: load_sae(found[step]) for step in sorted(found)}


def load_or_train(
    sae: SAE,
    data: DataSource,
    cfg: TrainConfig,
    data_key: str,
    metadata: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    code_files: Sequence[str | Path] = (),
    checkpoints: Sequence[int] = (),
) -> tuple[SAE, Path, bool]:
    """Train ``sae`` (one instance) with :func:`saelib.core.train.train_sae` and save it under the
    cache, or load the SAE an identical earlier call saved.

    The cache folder is ``<cache_dir>/sae-<key>`` (:func:`saelib.core.io.cache_dir`), ``key``
    hashing ``sae.cfg`` (its seed fixes the initial weights), the ``TrainConfig``, ``data_key``
    (the caller's name for the data: e.g. the :class:`saelib.lm.activations.ActivationStore` folder,
    hook and input scale), the source of ``saelib.core.train`` and of the ``saelib.core`` modules it
    imports, the source of ``code_files`` (the caller's other files that decide what is trained,
    e.g. the module defining a data function; none by default), torch's version and thread count:
    editing any of those files trains again. Saved with :func:`save_sae` (SAELens layout, replaced
    in one step; ``metadata`` and ``training`` go into ``cfg.json``), so
    ``sae_lens.SAE.load_from_disk(folder)`` opens it too.

    ``checkpoints``: optimiser-step counts (each in ``[1, cfg.steps)``) after which the SAE is also
    saved, to :func:`checkpoint_folder` ``(folder, steps)``, e.g. ``(steps // 4, steps // 2)`` for a
    convergence curve from one run (:func:`saelib.experiments.claims.converged`); read them back
    with :func:`load_checkpoints`. They are part of the key, and a cached SAE missing one of its
    checkpoints is trained again. The final SAE is written last, so its folder marks a finished run.

    Returns ``(sae, folder, trained_now)``: the trained (or loaded) SAE, in eval mode.

    Raises ValueError if ``sae`` has more than one instance or a checkpoint is not in
    ``[1, cfg.steps)``, FileNotFoundError if a file of ``code_files`` is missing, and whatever
    ``train_sae`` / :func:`load_sae` raise.
    """
    from dataclasses import asdict

    from .train import train_sae

    if sae.n_inst != 1:
        raise ValueError(f"load_or_train saves one SAE; got n_inst={sae.n_inst}")
    steps = sorted({int(s) for s in checkpoints})
    if any(not 1 <= s < cfg.steps for s in steps):
        raise ValueError(f"checkpoints must be step counts in [1, steps={cfg.steps}), got {list(checkpoints)}")
    cfg_dict = json.loads(json.dumps(asdict(cfg), default=repr))
    key = config_hash("sae-v1", sae.cfg.to_dict(), cfg_dict, data_key, _code_fingerprint(code_files),
                      torch.__version__, torch.get_num_threads(), *([{"checkpoints": steps}] if steps else []))
    folder = cache_dir() / f"sae-{key}"
    saved = {"train_config": cfg_dict, "data_key": data_key, **(training or {})}
    if (folder / CFG_FILENAME).is_file() and all((checkpoint_folder(folder, s) / CFG_FILENAME).is_file() for s in steps):
        return load_sae(folder), folder, False

    def save_checkpoint(step: int, trained: SAE) -> None:  # step counts from 0: after step + 1 steps
        if step + 1 in steps:
            save_sae(trained, checkpoint_folder(folder, step + 1), metadata=metadata,
                     training={**saved, "checkpoint_steps": step + 1, "tokens_seen": (step + 1) * cfg.batch_size})

    train_sae(sae, data, cfg, callback=save_checkpoint if steps else None)
    save_sae(sae.eval(), folder, metadata=metadata, training=saved)
    return sae, folder, True


def check_reload(
    folder: str | Path, sae: SAE, instance: int, x: Tensor, sae_lens_load: Callable[..., Any]
) -> Any:
    """Check that the SAE saved in ``folder`` (by :func:`save_sae` or :func:`save_instances`)
    loads back and encodes as instance ``instance`` of the trained ``sae`` does, both with
    :func:`load_sae` and in SAELens: ``sae_lens_load`` is ``sae_lens.SAE.load_from_disk``, called
    as ``sae_lens_load(sae_lens_folder(folder), device=...)``. (saelib itself does not import
    SAELens, an optional dependency: the caller, e.g. a notebook, passes its loader.)

    ``x`` is ``[batch, d_in]``, in the units ``sae`` was trained in, on any device (the three SAEs
    encode it on ``sae``'s device); the latent activations ``[batch, d_sae]`` are compared with
    ``torch.testing.assert_close``'s default tolerances, with ``sae`` in eval mode (its mode is
    restored). Returns the SAELens SAE (e.g. to name its class).

    Raises AssertionError naming the loader whose encoding differs; IndexError for an instance
    outside ``[0, sae.n_inst)``; what :func:`load_sae`, :func:`sae_lens_folder` and
    ``sae_lens_load`` raise for a folder they cannot read.
    """
    if not 0 <= instance < sae.n_inst:
        raise IndexError(f"instance {instance} out of range for n_inst={sae.n_inst}")
    was_training = sae.training
    sae.eval()
    try:
        with torch.no_grad():
            dev = str(sae.W_enc.device)  # every copy encodes where the trained SAE lives
            x = x.to(dev)
            trained = sae.encode(x)[:, instance]  # [batch, d_sae]
            reloaded = load_sae(folder, device=dev).encode(x)[:, 0]
            torch.testing.assert_close(reloaded, trained, msg=lambda m: f"load_sae({str(folder)!r}) encodes differently: {m}")
            lens_sae = sae_lens_load(sae_lens_folder(folder), device=dev)
            torch.testing.assert_close(lens_sae.encode(x), trained,
                                       msg=lambda m: f"SAELens's SAE from {str(folder)!r} encodes differently: {m}")
    finally:
        sae.train(was_training)
    return lens_sae
