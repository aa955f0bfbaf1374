"""CPU allocator tuning for training: :func:`retain_freed_cpu_memory` makes glibc keep freed
blocks in the process heap (``mallopt`` via :mod:`ctypes`), so that a training step on the CPU
stops page-faulting its large tensors in again on every step. Used by
:func:`saelib.core.train.train_sae` when ``TrainConfig.retain_cpu_memory`` is set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["retain_freed_cpu_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (glibc malloc.h)
_HEAP_LIMIT = 1 << 30  # blocks up to 1 GiB come from the heap; up to 1 GiB of free top is kept
_heap_retained = False


def retain_freed_cpu_memory() -> bool:
    """Make glibc keep freed blocks of up to 1 GiB in the heap for reuse (process-wide, once).

    By default glibc serves every allocation over its mmap threshold (at most 32 MiB) with a fresh
    ``mmap`` and unmaps it on free, so a training step that allocates ``[batch, d_sae]`` tensors of
    64 MiB page-faults all of that memory in again on every step (the kernel zeroes each 4 KiB
    page). This sets ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to 1 GiB with ``mallopt``
    (the same effect as the ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment
    variables, which must be set before the process starts). It changes where memory comes from,
    never a computed value; the process keeps its peak heap instead of returning it to the OS.

    Returns True if the setting is in force, False where it does not apply (not Linux, or a C
    library without glibc's ``mallopt``, e.g. musl), where nothing is changed.
    """
    global _heap_retained
    if _heap_retained:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    # glibc only (gnu_get_libc_version exists): musl's mallopt is a no-op stub
    if not (hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")):
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, _HEAP_LIMIT) == 1 and mallopt(_M_TRIM_THRESHOLD, _HEAP_LIMIT) == 1
    _heap_retained = ok
    return ok
