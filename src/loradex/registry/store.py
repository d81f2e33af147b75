"""Content-addressed blobs: ``$LORADEX_HOME/blobs/ab/cdef...`` named by the SHA-256 of their bytes.

The store copies and hashes bytes; it never parses them. A file is streamed once into a temporary
file in ``blobs/tmp/`` while every identity is computed (``hashes.StreamHasher``), then renamed
into place: a blob path either does not exist or holds exactly the bytes its name says, and the
same bytes are stored once. Durability: ``commit(durable=True)`` fsyncs the file before the rename
and the shard folder after it; a batch import commits without fsync and calls ``sync()`` once
(``syncfs`` of the registry's file system) before its rows are written, which is one journal
flush instead of one per file. The catalogue row is always written after the blob is durable
(see ``registry.Registry``), so no row ever names a missing or partial blob.

Temporary files are named ``<pid>-<random>.tmp``: ``gc`` removes those whose process is gone
(a killed import) or that are older than a day.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from loradex.registry.hashes import CHUNK, StreamHasher

HEX = set("0123456789abcdef")
STALE_TEMP_SECONDS = 24 * 3600


def pause_point(point: str) -> None:
    """Test hook: when ``LORADEX_PAUSE_AT`` names ``point``, announce it on stderr and sleep, so a
    test can SIGKILL the process at a known step of an import. A no-op otherwise."""
    if os.environ.get("LORADEX_PAUSE_AT") == point:
        sys.stderr.write(f"loradex-paused:{point}\n")
        sys.stderr.flush()
        time.sleep(3600)


@dataclass
class Ingested:
    """A file streamed into a temporary blob: its size and identities, not yet in place."""

    tmp: Path
    size: int
    hashes: dict[str, str]

    @property
    def sha256(self) -> str:
        return self.hashes["sha256"]


#: from this size on, bytes are copied by the kernel (``copy_file_range``) and hashed from a
#: memory map of the copy: no trip through a user-space buffer, about twice as fast on big files
KERNEL_COPY_MIN_BYTES = 16 << 20


def _copy_hashing_in_kernel(f, out, size: int, hasher: StreamHasher, progress) -> bool:
    """Copy ``size`` bytes of ``f`` into the empty ``out`` chunk by chunk with ``copy_file_range``
    and hash each chunk from a memory map of ``out`` (the stored bytes themselves, so a source
    changing meanwhile cannot make the name lie). False, with ``out`` left empty, when the kernel
    cannot do it (then the caller copies through a buffer)."""
    import mmap

    if not hasattr(os, "copy_file_range"):
        return False
    src_fd, dst_fd = f.fileno(), out.fileno()
    try:
        first = os.copy_file_range(src_fd, dst_fd, min(CHUNK, size), 0, 0)
    except OSError:
        return False
    if first <= 0:
        return False
    os.ftruncate(dst_fd, size)
    with mmap.mmap(dst_fd, size, access=mmap.ACCESS_READ) as m:
        mv = memoryview(m)
        try:
            off, n = 0, first
            while True:
                hasher.update(mv[off : off + n])
                if progress:
                    progress(n)
                off += n
                if off >= size:
                    break
                n = os.copy_file_range(src_fd, dst_fd, min(CHUNK, size - off), off, off)
                if n <= 0:  # the source shrank under us: keep what was copied
                    break
        finally:
            mv.release()
    if off < size:
        os.ftruncate(dst_fd, off)
    return True


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNCFS = None


def _syncfs(path: Path) -> bool:
    """``syncfs(2)`` on the file system holding ``path`` (Linux); False where unavailable."""
    global _SYNCFS
    if _SYNCFS is None:
        try:
            _SYNCFS = ctypes.CDLL(None, use_errno=True).syncfs
        except (OSError, AttributeError):
            _SYNCFS = False
    if not _SYNCFS:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        return _SYNCFS(fd) == 0
    finally:
        os.close(fd)


class BlobStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"

    def ensure(self) -> None:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256[2:]

    def has(self, sha256: str, size: int | None = None) -> bool:
        try:
            st = self.path(sha256).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    # ---- writing -----------------------------------------------------------------------
    def ingest(self, src: str | os.PathLike, progress: Callable[[int], None] | None = None) -> Ingested:
        """Stream ``src`` into a temporary file of the store, hashing it on the way (one read)."""
        src = Path(src)
        fd, tmp = tempfile.mkstemp(prefix=f"{os.getpid()}-", suffix=".tmp", dir=self.tmp_dir)
        tmp_path = Path(tmp)
        hasher = StreamHasher()
        try:
            with open(src, "rb") as f, os.fdopen(fd, "wb+", buffering=0) as out:
                size = os.fstat(f.fileno()).st_size
                if size < KERNEL_COPY_MIN_BYTES or not _copy_hashing_in_kernel(f, out, size, hasher, progress):
                    buf = bytearray(max(1, min(CHUNK, size or 1)))
                    mv = memoryview(buf)
                    while n := f.readinto(buf):
                        hasher.update(mv[:n])
                        out.write(mv[:n])
                        if progress:
                            progress(n)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
        pause_point("temp-written")
        return Ingested(tmp_path, hasher.pos, hasher.result())

    def commit(self, item: Ingested, durable: bool = True) -> Path:
        """Move an ingested file into place (or drop it when the same bytes are already stored)."""
        dst = self.path(item.sha256)
        if self.has(item.sha256, item.size):
            item.tmp.unlink(missing_ok=True)
            return dst
        if durable:
            _fsync_path(item.tmp)
        os.chmod(item.tmp, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)  # blobs are immutable
        new_shard = not dst.parent.is_dir()
        dst.parent.mkdir(exist_ok=True)
        os.replace(item.tmp, dst)
        if durable:
            _fsync_path(dst.parent)
            if new_shard:
                _fsync_path(self.root)
        return dst

    def discard(self, item: Ingested) -> None:
        item.tmp.unlink(missing_ok=True)

    def sync(self) -> None:
        """Make every blob written with ``durable=False`` durable: one ``syncfs``, or (where that
        does not exist) an fsync of every file and shard folder."""
        if _syncfs(self.root):
            return
        for _sha, p in self.iter_blobs():  # pragma: no cover - non-Linux fallback
            with contextlib.suppress(OSError):
                _fsync_path(p)
        for shard in self.root.iterdir():  # pragma: no cover
            if shard.is_dir():
                _fsync_path(shard)

    # ---- reading and cleaning -----------------------------------------------------------
    def iter_blobs(self) -> Iterator[tuple[str, Path]]:
        if not self.root.is_dir():
            return
        for shard in sorted(self.root.iterdir()):
            if len(shard.name) != 2 or not set(shard.name) <= HEX or not shard.is_dir():
                continue
            for f in shard.iterdir():
                if len(f.name) == 62 and set(f.name) <= HEX:
                    yield shard.name + f.name, f

    def stale_temps(self, max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
        """Temporary files no live import owns: their process is gone, or they are old."""
        out = []
        if not self.tmp_dir.is_dir():
            return out
        now = time.time()
        for f in self.tmp_dir.iterdir():
            pid_s = f.name.split("-", 1)[0]
            try:
                age = now - f.lstat().st_mtime
            except FileNotFoundError:
                continue
            if age > max_age or not (pid_s.isdigit() and _alive(int(pid_s))):
                out.append(f)
        return out

    def remove(self, sha256: str) -> int:
        p = self.path(sha256)
        try:
            size = p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            return 0
        # shard folders stay: removing one could race a concurrent import renaming into it
        return size


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (killed, not yet reaped by its parent) owns nothing any more
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().split(b") ", 1)[1][:1] != b"Z"
    except (OSError, IndexError):
        return True
