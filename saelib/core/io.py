"""Shared I/O: the cache folder, the hash that names a cache entry, and writes that never leave
a half-written file or folder behind. Imports nothing from the rest of saelib, so every
subpackage can use it.

**Files.** :func:`atomic_write_bytes` writes a uniquely named hidden temporary file
``.<name>.<uuid4 hex>.tmp`` in the target's folder, fsyncs it and ``os.replace``-s it onto the
target: a reader sees the old file or the complete new one.

**Folders.** :func:`atomic_write_folder` replaces a whole folder (e.g. an SAE's
``sae_weights.safetensors`` + ``cfg.json``) in one step. It writes the complete new folder as a
hidden sibling ``.<name>.<uuid4 hex>.saving`` in the same parent folder, fsyncs its files and
the folder, then swaps it with the target:

* On Linux, ``renameat2(..., RENAME_EXCHANGE)`` (glibc 2.28+, called through ctypes) exchanges
  the two folders atomically, so at every instant the target is the old folder or the new one;
  the sibling then holds the old folder and is removed. A target that does not exist yet is
  created by a plain rename, atomic too.
* Where the exchange is unavailable (another OS, an older glibc, a file system that refuses it),
  the swap is two renames: the old folder to ``.<name>.<uuid4 hex>.old``, then the new one onto
  the target. A kill between the two leaves no folder at the target; the old one is then kept in
  its ``.old`` sibling (never removed while the target is missing).

A symlink to versioned folders would also swap in one step, but would make the target a link;
the exchange keeps it a plain folder, the same for SAELens, for copies of the cache and for
folders written before.

**Leftovers.** A process killed mid-write leaves its temporary file or folder behind. The next
write removes them (:func:`remove_stale_temp_files`, :func:`remove_stale_temp_folders`): only
names of exactly the forms above, only ones no live writer holds (a writer keeps an exclusive
``flock`` on its temporary file or folder until it is done, and the kernel drops the lock of a
dead process), and in a folder only the file names its writer declared, so a file saelib does not
know is never deleted. Readers open the target only and never read a leftover. Without ``fcntl``
(Windows) nothing is locked and leftovers are left in place.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

try:  # advisory locks tell a live writer's temporary file from a dead one's (POSIX only)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "cache_dir",
    "config_hash",
    "atomic_write_bytes",
    "remove_stale_temp_files",
    "atomic_write_folder",
    "remove_stale_temp_folders",
]

_UUID4_HEX = r"[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}"  # version and variant digits fixed
# ``.<name>.<uuid4 hex>.tmp``: the temporary files atomic_write_bytes creates
_TEMP_NAME = re.compile(rf"^\..+\.{_UUID4_HEX}\.tmp$")
# ``.<name>.<uuid4 hex>.saving`` / ``.old``: the sibling folders atomic_write_folder creates
_TEMP_FOLDER = re.compile(rf"^\.(?P<name>.+)\.{_UUID4_HEX}\.(?P<kind>saving|old)$")

# Called with the name of each stage atomic_write_folder reaches (tests kill the process there).
_stage_hook: Callable[[str], None] | None = None


def _stage(name: str) -> None:
    if _stage_hook is not None:
        _stage_hook(name)


# ---------------------------------------------------------------------------------------- cache
def cache_dir() -> Path:
    """The cache folder: ``$SAELIB_CACHE_DIR`` if set, else ``~/.cache/saelib`` (created)."""
    env = os.environ.get("SAELIB_CACHE_DIR")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "saelib"
    path.mkdir(parents=True, exist_ok=True)
    return path


def config_hash(*parts: Any, length: int = 16) -> str:
    """Hex digest (``length`` characters) of JSON-serialisable parts, keys sorted."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


# ---------------------------------------------------------------------------------------- locks
def _lock_new(fd: int, path: Path) -> bool:
    """Take the writer's lock on a just-created temporary file or folder, held until it is done.

    Returns False if a cleaner removed it between its creation and the lock (it was not locked
    yet, so it looked abandoned). On a file system without locks nothing is locked and True is
    returned: cleaners cannot lock such files either, so they never remove them.
    """
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        return True
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _lock_if_abandoned(path: Path, directory: bool) -> int | None:
    """Open ``path`` and take its lock without waiting; the descriptor, or None if a live writer
    holds it, it is gone, it is a link, or it is not of the expected kind."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:  # not renamed away meanwhile
            return fd
    except OSError:  # a live writer holds it, or it was removed meanwhile
        pass
    os.close(fd)
    return None


# ---------------------------------------------------------------------------------------- files
def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temporary files that interrupted :func:`atomic_write_bytes` calls left in
    ``folder`` (a process killed between creating and renaming its ``.<name>.<uuid4 hex>.tmp``).

    Only names of that exact form are considered, and only files no live writer holds (see the
    module docstring), so writes in progress, in this or another process, are never disturbed.
    Without ``fcntl`` (Windows) nothing is removed. Returns the removed paths.
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
        fd = _lock_if_abandoned(tmp, directory=False)
        if fd is None:
            continue
        try:
            os.unlink(tmp)
            removed.append(tmp)
        except OSError:  # e.g. a folder, or another user's file in a shared folder: leave it
            pass
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
    is left alone). File permissions follow the umask. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent)
    while True:
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            claimed = _lock_new(fd, tmp)
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


# ---------------------------------------------------------------------------------------- folders
def _fsync_folder(folder: Path) -> None:
    """Make the entries of ``folder`` (creations, renames) durable; a no-op on Windows."""
    if os.name == "nt":  # pragma: no cover - folders cannot be opened there
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2  # from <linux/fs.h>
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one atomic step (``renameat2`` with ``RENAME_EXCHANGE``).

    Returns False where the exchange is unavailable (not Linux, no ``renameat2`` in the C library,
    or the file system refuses it); raises OSError for any other failure.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc before 2.28, or another C library without it
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _remove_known(folder: Path, known: Collection[str]) -> bool:
    """Delete the files of ``folder`` named in ``known`` (or temporary files of
    :func:`atomic_write_bytes`), then the folder if that emptied it. Returns True if it is gone."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return True
    for name in names:
        if name in known or _TEMP_NAME.match(name):
            try:
                os.unlink(folder / name)
            except OSError:  # gone meanwhile, or a folder: leave it
                pass
    try:
        os.rmdir(folder)
    except FileNotFoundError:
        return True
    except OSError:  # something saelib did not write is left in it: keep it
        return False
    return True


def remove_stale_temp_folders(path: str | Path, known: Collection[str]) -> list[Path]:
    """Remove the sibling folders that interrupted :func:`atomic_write_folder` calls on ``path``
    left in its parent (``.<name>.<uuid4 hex>.saving``, and ``.old`` ones while ``path`` exists).

    Only folders of exactly those names, only ones no live writer holds (see the module
    docstring), and in them only the files named in ``known`` (and temporary files of
    :func:`atomic_write_bytes`); a folder still holding anything else is kept. Without ``fcntl``
    (Windows) nothing is removed. Returns the removed folders.
    """
    path = Path(path)
    removed: list[Path] = []
    if fcntl is None:
        return removed
    try:
        names = sorted(os.listdir(path.parent))
    except FileNotFoundError:
        return removed
    for name in names:
        m = _TEMP_FOLDER.match(name)
        if m is None or m["name"] != path.name:
            continue
        if m["kind"] == "old" and not path.is_dir():  # the only copy of the old folder: keep it
            continue
        tmp = path.parent / name
        fd = _lock_if_abandoned(tmp, directory=True)
        if fd is None:
            continue
        try:
            if _remove_known(tmp, known):
                removed.append(tmp)
        finally:
            os.close(fd)
    return removed


def _check_plain_names(names: Collection[str]) -> None:
    bad = [n for n in names if not n or n in (".", "..") or "/" in n or os.sep in n]
    if bad:
        raise ValueError(f"file names in a folder must be plain names, got {bad!r}")


def atomic_write_folder(path: str | Path, files: Mapping[str, bytes]) -> Path:
    """Make ``path`` a folder holding exactly ``files`` (``{file name: content}``), replacing the
    folder there in one step: a reader, or a process killed at any moment, sees the old folder or
    the complete new one (on Linux; see the module docstring for the swap and its fallback).

    An existing folder at ``path`` is replaced only if it holds nothing but files named in
    ``files`` (and temporary files of :func:`atomic_write_bytes`). The parent folder is created if
    missing. Leftovers of interrupted earlier calls on ``path`` are removed before and after the
    swap (:func:`remove_stale_temp_folders`). Returns ``path``.

    Raises:
        ValueError: a file name is not a plain name (empty, ``.``, ``..`` or containing ``/``).
        FileExistsError: ``path`` is a file or a symbolic link, or a folder holding anything else
            (the message names the path and the entries); nothing is written or removed.
        OSError: a write, fsync or rename failed; the old folder is kept and the new one removed.
    """
    path = Path(path)
    _check_plain_names(list(files))
    known = set(files)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise FileExistsError(f"{path} exists and is not a folder (a file or a symbolic link): not replaced")
    if path.is_dir():
        foreign = sorted(
            n for n in os.listdir(path) if not (n in known and (path / n).is_file()) and not _TEMP_NAME.match(n)
        )
        if foreign:
            raise FileExistsError(
                f"{path} holds {foreign}, which saelib did not write there (it writes {sorted(known)}): "
                f"not replaced; move them away or choose another folder"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_folders(path, known)
    while True:
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.saving"
        os.mkdir(tmp)
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if os.name != "nt" else None
        if fd is None or _lock_new(fd, tmp):
            break
        os.close(fd)  # removed by a cleaner before the lock was taken: try a new name
    aside: Path | None = None  # where the two-rename fallback moved the old folder
    swapped = False
    try:
        _stage("created")
        for name, data in files.items():
            with open(tmp / name, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            _stage(f"wrote {name}")
        _fsync_folder(tmp)
        _stage("synced")
        if not os.path.lexists(path):
            os.rename(tmp, path)
            displaced = None
        elif _exchange(tmp, path):
            displaced = tmp
        else:
            aside = path.parent / f".{path.name}.{uuid.uuid4().hex}.old"
            os.rename(path, aside)
            _stage("moved old aside")
            os.rename(tmp, path)
            displaced = aside
        swapped = True
        _stage("swapped")
        _fsync_folder(path.parent)
        _stage("synced parent")
    except BaseException:
        if not swapped:
            if aside is not None:  # put the old folder back
                try:
                    os.rename(aside, path)
                except OSError:
                    pass
            _remove_known(tmp, known)
        raise
    finally:
        if fd is not None:
            os.close(fd)
    if displaced is not None:
        _remove_known(displaced, known)
        _stage("removed old")
    remove_stale_temp_folders(path, known)  # ``.old`` leftovers too, now that ``path`` holds a folder
    return path
