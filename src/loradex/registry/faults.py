"""OS faults on the registry's write paths, as one-line errors that name the user's paths.

A full disk (``ENOSPC``), a spent quota (``EDQUOT``), a short write that makes no progress and
SQLite's ``SQLITE_FULL`` are the same event to a user: ``DiskFullError``, whose message says the
disk is full and names the registry folder or output path that was being written (never a
temporary file inside it). Other OS errors on a write become a ``RegistryError`` naming the same
path with the system's reason. The callers remove what they had half-written before raising.
"""

from __future__ import annotations

import errno
import os

from loradex import errors
from loradex.errors import RegistryError
from loradex.fsutil import write_all  # noqa: F401  (the store writes through it)

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFullError(RegistryError, errors.DiskFullError):
    """The disk (or quota) ran out while the registry, or an export, was writing (also an
    ``errors.DiskFullError``, which the converters raise for their outputs)."""


def is_disk_full(e: BaseException, where: str | os.PathLike | None = None) -> bool:
    """Whether ``e`` means the disk is full. SQLite reports a full disk as ``SQLITE_FULL`` while it
    writes its files, but as a bare ``disk I/O error`` when it cannot even grow its WAL index: for
    I/O errors the file system holding ``where`` is asked (no block left for the user)."""
    if isinstance(e, DiskFullError):
        return True
    if isinstance(e, OSError):
        return e.errno in DISK_FULL
    code = str(getattr(e, "sqlite_errorname", "") or "")
    if code == "SQLITE_FULL":
        return True
    if where is not None and code.startswith("SQLITE_IOERR"):
        try:
            st = os.statvfs(where)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < 64 * 1024
    return False


def write_error(e: OSError, target: str | os.PathLike, what: str = "") -> RegistryError:
    """The one-line error for an OSError raised while writing ``target`` (a folder or the output
    path the user named); ``what`` says what was being written (``"face.safetensors"``)."""
    doing = f"cannot write {what} to {target}" if what else f"cannot write {target}"
    if is_disk_full(e):
        why = e.strerror or "no space left"
        return DiskFullError(f"the disk is full: {doing} ({why}); nothing was left half-written")
    return RegistryError(f"{doing}: {e.strerror or e}")
