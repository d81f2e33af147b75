"""Where a file being ingested is put, and how it gets there without a copy.

``Slots``: folders ``blobs/tmp/<pid>-<random>/`` in which a file being imported keeps its own file
name until it is renamed into place, so it is described where it lies (readers may use the name:
an embedding's token is its file stem) -- no separate view, no second copy. A path is used once:
files of the same name get folders of their own. ``close`` removes the folders; ``gc`` removes
those of a killed process (their pid is gone).

``add --link``: ``link_into`` puts the source itself into a slot, as a reflink (``FICLONE``: a
copy-on-write clone, its own inode, no bytes written; btrfs, XFS, bcachefs...) or, where the file
system cannot clone, a hard link (the same inode as the source). Either needs the registry on the
source's file system; an ``OSError`` says why not (``EXDEV``: another file system) and the caller
copies instead.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

#: ``_IOW(0x94, 9, int)``: clone a whole file (Linux >= 4.5; btrfs, XFS with reflink, bcachefs...)
FICLONE = 0x40049409
#: errors of a clone that mean "this file system cannot clone": try a hard link instead
_NO_CLONE = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EBADF, errno.ETXTBSY}


class Slots:
    """Folders under ``tmp_dir`` for files being ingested under their own names (see the module
    docstring). Thread-safe; ``close`` removes every folder it made (and what is left in them)."""

    def __init__(self, tmp_dir: Path) -> None:
        self.tmp_dir = Path(tmp_dir)
        self._dirs: list[Path] = []
        self._used: dict[Path, set[str]] = {}
        self._lock = threading.Lock()
        self.can_clone = True  # until a clone is refused: then hard links straight away

    def _claim(self, name: str) -> Path | None:
        with self._lock:
            for d in self._dirs:
                if name not in self._used[d]:
                    self._used[d].add(name)
                    return d
        return None

    def place(self, name: str, make: Callable[[Path], object]):
        """``(path, make(path))`` for a new path ``<slot>/<name>``: ``make`` must create the path
        exclusively (``O_EXCL``, ``os.link``...). A path is never handed out twice (caches keyed
        by path, such as the safetensors header cache, never see two files under one path), so
        files of one name take one folder each. OSErrors of ``make`` propagate."""
        d = self._claim(name)
        if d is None:
            d = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=self.tmp_dir))
            with self._lock:
                self._dirs.append(d)
                self._used[d] = {name}
        return d / name, make(d / name)

    def create(self, name: str, mode: int = 0o600) -> tuple[Path, int]:
        """``(path, fd)`` of a new, empty file ``<slot>/<name>`` open for reading and writing,
        with permissions ``mode`` (0o444 for a blob-to-be: the descriptor is writable all the same)."""
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        return self.place(name, lambda p: os.open(p, flags, mode))

    def folders(self) -> list[Path]:
        """The folders made so far."""
        with self._lock:
            return list(self._dirs)

    def close(self) -> None:
        """Remove every folder made (with any file still in one: a failed import's temporaries)."""
        with self._lock:
            dirs, self._dirs, self._used = self._dirs, [], {}
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def reflink(src_fd: int, dst_fd: int) -> None:
    """Clone ``src_fd``'s whole content into the empty ``dst_fd`` (``ioctl FICLONE``); OSError when
    the file system cannot (or the two are on different file systems: ``EXDEV``)."""
    import fcntl

    fcntl.ioctl(dst_fd, FICLONE, src_fd)


def link_into(src: Path, src_fd: int, slots: Slots) -> tuple[Path, str]:
    """Put ``src`` into a new slot path without copying its bytes: ``(path, "reflink")`` for a
    clone, else ``(path, "hardlink")``. OSError when neither can be made (``EXDEV``: another file
    system; ``EPERM``: e.g. ``fs.protected_hardlinks`` and a file that is not the user's)."""
    def clone(p: Path) -> str:
        if slots.can_clone:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(p, flags, 0o600)
            try:
                reflink(src_fd, fd)
                return "reflink"
            except OSError as e:
                os.unlink(p)
                if e.errno not in _NO_CLONE:
                    raise
                slots.can_clone = False  # this file system does not clone: do not ask for every file
            finally:
                os.close(fd)
        want = os.fstat(src_fd)
        if want.st_uid != os.geteuid() and os.geteuid() != 0:  # a blob is made read-only: only its owner can
            raise OSError(errno.EPERM, "it is another user's file (a hard link could not be made read-only)")
        os.link(src, p, follow_symlinks=True)
        st = os.stat(p)
        if (st.st_dev, st.st_ino) != (want.st_dev, want.st_ino):  # the path was given another file meanwhile
            os.unlink(p)
            raise OSError(errno.ESTALE, "the file was replaced while it was being linked")
        return "hardlink"

    path, how = slots.place(src.name, clone)
    return path, how


def why_not_linked(e: OSError, src: Path, registry: Path) -> str:
    """The one line saying why ``add --link`` copied ``src`` instead (``e`` from ``link_into``)."""
    if e.errno == errno.EXDEV:
        return (f"{src}: on another file system than the registry ({registry}): copied, not linked "
                "(--link needs both on one file system)")
    return f"{src}: cannot be linked into the registry ({e.strerror or e}): copied instead"
