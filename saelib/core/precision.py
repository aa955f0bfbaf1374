"""Numeric precision of language-model forwards and SAE training: float32, or bf16 mixed precision.

One setting, ``precision``, shared by :class:`saelib.core.train.TrainConfig` (SAE and transcoder
training), :func:`saelib.lm.activations.harvest_activations` (harvesting) and
:func:`saelib.experiments.sparse_mlp.spliced_losses` (spliced-loss evaluation):

* ``"float32"``: everything in float32 (the toy notebooks, whose recorded claims were measured so).
* ``"bfloat16"``: mixed precision as the peers train on GPUs (SAELens's ``autocast=True`` /
  ``autocast_lm=True`` with ``dtype="float32"``; sparsify's ``torch.autocast`` around the coder's
  forward): matrix products run in bf16 under :func:`torch.autocast`, the master weights and the
  Adam state stay float32, and the loss and its reductions are computed in float32.
  Inside an SAE, the element-wise passes next to the products (adding ``b_enc``, the ReLU, adding
  ``b_dec``) run in bf16 too, so that a step is not dominated by float32 passes over
  ``[batch, d_sae]`` tensors (see :meth:`saelib.core.sae.SAE.pre_acts`).
* ``"auto"``: ``"bfloat16"`` where the device has fast bf16 matrix products, else ``"float32"``
  (:func:`resolve_precision`). On a CUDA device: bf16 support as torch reports it. On a CPU: the
  AMX (``amx_bf16``) or AVX512-BF16 (``avx512_bf16``) instructions, read from the CPU's flags
  (``/proc/cpuinfo``), not assumed; a CPU with neither does bf16 products in software, several
  times slower than float32 (measured on an AMD EPYC without either, see ``benchmarks/RESULTS.md``).

Speeds measured on one Intel Xeon with AMX (2 threads): bf16 matrix products about 6-7x float32;
AMD EPYC with AVX512-BF16 but no AMX: about 2x.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Iterator, Literal

import torch

__all__ = [
    "PRECISIONS",
    "Precision",
    "cpu_bf16_support",
    "has_fast_bf16",
    "resolve_precision",
    "autocast",
]

Precision = Literal["float32", "bfloat16", "auto"]
PRECISIONS: tuple[str, ...] = ("float32", "bfloat16", "auto")

#: CPU flags (``/proc/cpuinfo``) that give fast bf16 matrix products, fastest first.
_FAST_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def _cpu_flags(cpuinfo: str) -> set[str]:
    """The ``flags`` of the first processor in a ``/proc/cpuinfo`` text (empty if none)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


@functools.lru_cache(maxsize=None)
def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags to read, so no bf16 claimed
        return ""


def cpu_bf16_support(cpuinfo: str | None = None) -> str:
    """The CPU's bf16 matrix-product hardware: ``"amx_bf16"``, ``"avx512_bf16"`` or ``"none"``.

    Args:
        cpuinfo: the text of ``/proc/cpuinfo``; None reads this machine's (``"none"`` where it
            cannot be read, e.g. not on Linux).
    """
    flags = _cpu_flags(_read_cpuinfo() if cpuinfo is None else cpuinfo)
    return next((f for f in _FAST_BF16_FLAGS if f in flags), "none")


def has_fast_bf16(device: str | torch.device = "cpu", cpuinfo: str | None = None) -> bool:
    """True if bf16 matrix products on ``device`` run in hardware (CUDA with bf16 support; a CPU
    with AMX or AVX512-BF16, see :func:`cpu_bf16_support`); False for any other device type.

    Raises ValueError if ``device`` is not a valid torch device string.
    """
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device must be a torch device (e.g. 'cpu', 'cuda'), got {device!r}") from e
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        return cpu_bf16_support(cpuinfo) != "none"
    return False


def resolve_precision(precision: str, device: str | torch.device = "cpu", cpuinfo: str | None = None) -> str:
    """The precision that runs: ``"float32"`` or ``"bfloat16"`` (``"auto"`` decided by
    :func:`has_fast_bf16` on ``device``).

    Raises ValueError naming the value if ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bfloat16" if has_fast_bf16(device, cpuinfo) else "float32"
    return precision


@contextlib.contextmanager
def autocast(precision: str, device: str | torch.device = "cpu") -> Iterator[None]:
    """Run the block in ``precision`` on ``device``: :func:`torch.autocast` to bf16 for
    ``"bfloat16"`` (and ``"auto"`` where it resolves so), nothing for ``"float32"``, which also
    turns off any autocast region around the block.

    Raises ValueError as :func:`resolve_precision`.
    """
    resolved = resolve_precision(precision, device)
    device_type = torch.device(device).type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=resolved == "bfloat16"):
        yield
