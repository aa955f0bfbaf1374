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

Every file is written atomically (a temporary file in the same folder, then ``os.replace``), so
a failed write never leaves a half-written file behind; a process killed mid-write can leave its
hidden temporary file, which the next write into the same folder removes (see
:func:`atomic_write_bytes`). The weights are written first and
``cfg.json`` records their SHA-256 (``metadata.saelib_weights_sha256``), so if a save is
interrupted between the two files :func:`load_sae` reports the mismatch instead of mixing two
saves.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import uuid
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from .sae import SAE, SAEConfig, dtype_name

__all__ = ["save_sae", "save_instances", "load_sae", "sae_lens_folder", "load_or_train", "atomic_write_bytes", "remove_stale_temp_files", "WEIGHTS_FILENAME", "CFG_FILENAME"]

WEIGHTS_FILENAME = "sae_weights.safetensors"
CFG_FILENAME = "cfg.json"
# SAELens release whose cfg.json layout this writes; loaders older than 6.0 treat a config
# without a version as pre-6.0 and rewrite it, so the version must be present.
SAELENS_FORMAT_VERSION = "6.54.12"


try:  # advisory locks tell a live writer's temporary file from a dead one's (POSIX only)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

# ``.<name>.<uuid4 hex>.tmp``: the temporary files atomic_write_bytes creates (the uuid4 version
# and variant digits make the pattern specific to them)
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}\.tmp$")


def _temp_path(path: Path) -> Path:
    return path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"


def _lock_new_temp_file(fd: int, tmp: Path) -> bool:
    """Take the writer's lock on a just-created temporary file, held until it is renamed.

    Returns False if a cleaner removed the file between its creation and the lock (it was not
    locked yet, so it looked abandoned). On a file system without locks nothing is locked and
    True is returned: cleaners cannot lock such files either, so they never remove them.
    """
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        return True
    try:
        return os.stat(tmp).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temporary files that interrupted :func:`atomic_write_bytes` calls left in
    ``folder`` (a process killed between creating and renaming its ``.<name>.<uuid>.tmp``).

    Only names of that exact form are considered, and only files no live writer holds: every
    writer keeps an exclusive ``flock`` on its temporary file until it is renamed, so a file whose
    lock can be taken belongs to a writer that died (the kernel drops the lock with the process).
    Writes in progress, in this or another process, are never disturbed. Without ``fcntl``
    (Windows) nothing is removed. Returns the removed paths.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if fcntl is None:
        return removed
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return removed
    for name in names:
        if not _TEMP_NAME.match(name):
            continue
        tmp = folder / name
        try:
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:  # gone (renamed by its writer), a link, or unreadable
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a live writer holds it
                continue
            # still the same file under that name (not renamed away meanwhile)?
            try:
                same = os.stat(tmp, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                try:
                    os.unlink(tmp)
                except OSError:  # e.g. another user's file in a shared folder: leave it
                    continue
                removed.append(tmp)
        finally:
            os.close(fd)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: the file is either the old one or the complete new
    one, never a partial write.

    Writes to a uniquely named ``.<name>.<uuid4 hex>.tmp`` file in the same folder (created if
    missing), fsyncs it, then ``os.replace``-s it onto ``path``; on any failure the temporary file
    is removed and the exception re-raised. A process killed mid-write cannot clean up, so every
    call first removes such leftovers of earlier writes in the folder
    (:func:`remove_stale_temp_files`; a write in progress holds a lock on its temporary file and
    is left alone). File permissions follow the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent)
    while True:
        tmp = _temp_path(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            claimed = _lock_new_temp_file(fd, tmp)
        except BaseException:
            os.close(fd)
            raise
        if claimed:
            break
        os.close(fd)  # removed by a cleaner before the lock was taken: try a new name
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            if fcntl is not None:  # rename while still holding the lock
                os.replace(tmp, path)
        if fcntl is None:  # Windows cannot rename an open file
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


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
    byte-identical files. Returns the folder.

    Raises TypeError if ``sae`` is not a :class:`saelib.core.sae.SAE`, IndexError if ``instance`` is
    out of range, ValueError if a weight of the instance contains NaN/inf (the message names the
    parameter; nothing is written). The BatchTopK threshold may be NaN (not trained yet).
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
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / WEIGHTS_FILENAME, weights)
    atomic_write_bytes(folder / CFG_FILENAME, text.encode("utf-8"))
    return folder


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
    error of :func:`save_sae` (instances saved before a failing one stay saved).
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
_TRAINING_SOURCES = (  # paths under saelib/
    "core/sae.py", "core/train.py", "core/train_parts.py", "core/penalties.py", "core/matryoshka.py",
    "experiments/matryoshka_probes.py", "core/distributed.py", "core/metrics.py",
)


def _training_code_fingerprint() -> str:
    """SHA-256 of the source of the modules that define training (a code change retrains)."""
    h = hashlib.sha256()
    here = Path(__file__).parents[1]  # saelib/
    for name in _TRAINING_SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def load_or_train(
    sae: SAE,
    data: Any,
    cfg: Any,
    data_key: str,
    metadata: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> tuple[SAE, Path, bool]:
    """Train ``sae`` (one instance) with :func:`saelib.core.train.train_sae` and save it under the
    cache, or load the SAE an identical earlier call saved.

    The cache folder is ``<cache_dir>/sae-<key>`` (:func:`saelib.data.corpus.cache_dir`), ``key``
    hashing ``sae.cfg`` (its seed fixes the initial weights), the ``TrainConfig``, ``data_key``
    (the caller's name for the data: e.g. the :class:`saelib.lm.activations.ActivationStore` folder,
    hook and input scale), the source of the training modules, torch's version and thread count.
    Saved with :func:`save_sae` (SAELens layout, atomic writes; ``metadata`` and ``training`` go
    into ``cfg.json``), so ``sae_lens.SAE.load_from_disk(folder)`` opens it too.

    Returns ``(sae, folder, trained_now)``: the trained (or loaded) SAE, in eval mode.

    Raises ValueError if ``sae`` has more than one instance, and whatever ``train_sae`` /
    :func:`load_sae` raise.
    """
    from dataclasses import asdict

    from ..data.corpus import cache_dir, config_hash
    from .train import train_sae

    if sae.n_inst != 1:
        raise ValueError(f"load_or_train saves one SAE; got n_inst={sae.n_inst}")
    cfg_dict = json.loads(json.dumps(asdict(cfg), default=repr))
    key = config_hash("sae-v1", sae.cfg.to_dict(), cfg_dict, data_key, _training_code_fingerprint(),
                      torch.__version__, torch.get_num_threads())
    folder = cache_dir() / f"sae-{key}"
    if (folder / CFG_FILENAME).is_file():
        return load_sae(folder), folder, False
    train_sae(sae, data, cfg)
    save_sae(sae.eval(), folder, metadata=metadata,
             training={"train_config": cfg_dict, "data_key": data_key, **(training or {})})
    return sae, folder, True
