"""Content-addressed blobs: ``$LORADEX_HOME/blobs/ab/cdef...`` named by the SHA-256 of their bytes.

The store copies and hashes bytes; it never parses them. A file is streamed once into a temporary
file in ``blobs/tmp/`` while every identity is computed (``hashes.StreamHasher``), then renamed
into place: a blob path either does not exist or holds exactly the bytes its name says, and the
same bytes are stored once. Durability: ``commit(durable=True)`` fsyncs the file before the rename
and the shard folder after it; a batch import commits without fsync and calls ``sync()`` once
(``syncfs`` of the registry's file system) before its rows are written, which is one journal
flush instead of one per file. The catalogue row is always written after the blob is durable
(see ``ingest``), so no row ever names a missing or partial blob.

Only regular files are read: a path is ``stat``-ed before it is opened (a FIFO would block the
open forever, a device would stream without end) and opened with ``O_NONBLOCK`` then ``fstat``-ed,
so a FIFO swapped in between cannot block either. Every write goes through ``faults.write_all``
(a short write is continued, no progress is a full disk) and a full disk is a one-line
``DiskFullError`` naming the registry folder; the temporary file is removed first.

Integrity on the way out: a blob handed out by path (``verified``) is hashed once per process
and compared with its name before it is used; a blob copied out (``copy_verified``) is hashed as it
is copied. The set of blobs found intact is process-wide (``VERIFIED``), keyed by (device, inode,
path, size, mtime): every Registry of the process shares what was checked, and any write to a
blob changes its key, so it is checked again. A mismatch is a RegistryError naming the REF and
asking for ``loradex verify``.

Temporary files are named ``<pid>-<random>.tmp``, or keep the source's name inside a folder
``<pid>-<random>/`` (``linking.Slots``: imports describe them where they lie): ``gc`` removes those
whose process is gone (a killed import) or that are older than a day.

``ingest(link=True)`` (``add --link``) makes the temporary file a reflink or a hard link of the
source instead of a copy, then hashes it by reading the link (what is hashed is what is stored;
big files on two threads, see ``hashes``). A hard-linked blob is the user's file: ``commit`` makes
it read-only like every blob (the source with it), and an in-place edit of the source afterwards
is what the integrity checks above catch (the verified key changes with the file's mtime and
size; ``verify`` re-hashes). Where no link can be made (another file system), it copies.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import queue
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from loradex.errors import RegistryError
from loradex.fsutil import fsync_path
from loradex.registry.faults import DISK_FULL, write_all, write_error
from loradex.registry.hashes import CHUNK, StreamHasher
from loradex.registry.linking import Slots, link_into, why_not_linked

log = logging.getLogger(__name__)

HEX = set("0123456789abcdef")
STALE_TEMP_SECONDS = 24 * 3600
#: from this size on, bytes are copied by the kernel (``copy_file_range``) and hashed from a
#: memory map of the copy: no trip through a user-space buffer, about twice as fast on big files
KERNEL_COPY_MIN_BYTES = 16 << 20
#: ``ingest(keep=True)`` reads a file smaller than this (and than ``KERNEL_COPY_MIN_BYTES``) in one
#: go and keeps its bytes for the describers
KEEP_MAX_BYTES = 8 << 20
#: from this size on, the two SHA-256 run on threads of their own while the next chunk is copied
PARALLEL_HASH_MIN_BYTES = 32 << 20
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)


def pause_point(point: str) -> None:
    """Test hook: when ``LORADEX_PAUSE_AT`` names ``point``, announce it on stderr and sleep, so a
    test can SIGKILL the process at a known step of an import. A no-op otherwise."""
    if os.environ.get("LORADEX_PAUSE_AT") == point:
        sys.stderr.write(f"loradex-paused:{point}\n")
        sys.stderr.flush()
        time.sleep(3600)


@dataclass
class Ingested:
    """A file streamed into a temporary blob: its size and identities, not yet in place.
    ``created``: ``commit`` put a new blob in place (nobody had these bytes before). ``data``: the
    whole file, kept in memory when ``ingest(keep=True)`` read a small file (describers use it
    instead of reading again; ``release`` drops it). ``how``: ``copy``, ``hardlink`` or
    ``reflink``; ``note``: why a link was asked for and a copy made."""

    tmp: Path
    size: int
    hashes: dict[str, str]
    source: str = ""
    created: bool = False
    data: bytearray | None = None
    how: str = "copy"
    note: str = ""
    readonly: bool = False  # the temporary file was created read-only (no chmod at commit)
    stat: os.stat_result | None = None  # of the temporary file once written (the blob's, after the rename)

    def release(self) -> None:
        """Drop the bytes kept in memory (``data``)."""
        self.data = None

    @property
    def sha256(self) -> str:
        """The SHA-256 (lowercase hex) of the bytes: the blob's name once committed."""
        return self.hashes["sha256"]


# ---- what may be read ------------------------------------------------------------------------------
def file_kind(mode: int) -> str:
    """Words for a file type: ``a regular file``, ``a FIFO (named pipe)``, ``a character device``..."""
    for test, words in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"),
                        (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                        (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return "not a regular file"


def not_regular(path, mode: int) -> RegistryError:
    """The error for ``path`` whose ``st_mode`` is not a regular file, naming what it is."""
    return RegistryError(f"{path} is {file_kind(mode)}, not a regular file: loradex reads only regular files")


def open_regular(path: str | os.PathLike) -> tuple[int, os.stat_result]:
    """``(fd, fstat)`` of a regular file opened for reading; RegistryError for anything else,
    decided before the open can block (see the module docstring). OSError when it cannot be read."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise not_regular(path, st.st_mode)
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped for something else after the stat
            raise not_regular(path, st.st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


class _SourceError(Exception):
    """An OSError while reading the source of a copy (the caller names the source)."""

    def __init__(self, e: OSError) -> None:
        super().__init__(str(e))
        self.os_error = e


# ---- copying while hashing -------------------------------------------------------------------------
def _copy(src_fd: int, dst_fd: int, size: int, update: Callable, progress, drain: Callable | None = None) -> int:
    """Copy ``src_fd`` (from offset 0, to its end) into the empty ``dst_fd``, feeding every byte
    written to ``update`` in order; returns the bytes copied. Big files go through the kernel and
    are hashed from a memory map of the copy: ``drain()`` (when given) is called before the map is
    closed, so an ``update`` that hashes on other threads can finish with its views of it."""
    if size >= KERNEL_COPY_MIN_BYTES:
        n = _copy_hashing_in_kernel(src_fd, dst_fd, size, update, progress, drain)
        if n is not None:
            return n
    # with ``drain``, ``update`` hashes on other threads: a few buffers go round, each reused only
    # once ``update`` says it is done with it (memory stays at a few chunks)
    free: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(4 if drain is not None else 1):
        free.put(bytearray(max(1, min(CHUNK, size or 1))))
    total = 0
    with open(src_fd, "rb", buffering=0, closefd=False) as f:
        while True:
            buf = free.get()
            mv = memoryview(buf)
            try:
                n = f.readinto(buf)  # a regular file never answers "would block" (None)
            except OSError as e:
                raise _SourceError(e) from None
            if not n:
                return total
            if drain is not None:
                update(mv[:n], done=lambda b=buf: free.put(b))
            else:
                update(mv[:n])
                free.put(buf)
            write_all(dst_fd, mv[:n])
            total += n
            if progress:
                progress(n)


def _copy_hashing_in_kernel(src_fd: int, dst_fd: int, size: int, update: Callable, progress,
                            drain: Callable | None = None) -> int | None:
    """Copy ``size`` bytes chunk by chunk with ``copy_file_range`` and hash each chunk from a
    memory map of the destination (the stored bytes themselves, so a source changing meanwhile
    cannot make the name lie). None, with the destination left empty, when the kernel cannot do
    it (the caller copies through a buffer); a full disk is raised, not fallen back from."""
    import mmap

    if not hasattr(os, "copy_file_range"):
        return None
    try:
        first = os.copy_file_range(src_fd, dst_fd, min(CHUNK, size), 0, 0)
    except OSError as e:
        if e.errno in DISK_FULL:
            raise
        return None
    if first <= 0:
        return None
    os.ftruncate(dst_fd, size)
    with mmap.mmap(dst_fd, size, access=mmap.ACCESS_READ) as m:
        mv = memoryview(m)
        try:
            off, n = 0, first
            while True:
                update(mv[off : off + n])
                if progress:
                    progress(n)
                off += n
                if off >= size:
                    break
                n = os.copy_file_range(src_fd, dst_fd, min(CHUNK, size - off), off, off)
                if n <= 0:  # the source shrank under us: keep what was copied
                    break
        finally:
            if drain is not None:
                drain()
            mv.release()
    if off < size:
        os.ftruncate(dst_fd, off)
    return off


def _read_whole(fd: int, size: int) -> bytearray:
    """Every byte of ``fd`` from its current offset (``size`` expected; a file that grew meanwhile
    is read to its new end), in as few reads as the kernel allows (one, for a small file)."""
    buf = bytearray(size + 1)  # one spare byte: a file that grew is noticed without a second read
    got = 0
    while True:
        try:
            n = os.readv(fd, [memoryview(buf)[got:]])
        except OSError as e:
            raise _SourceError(e) from None
        if not n:
            del buf[got:]
            return buf
        got += n
        if got == len(buf):
            buf.extend(bytes(max(CHUNK, len(buf))))


_fsync_path = fsync_path


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


# ---- blobs found intact by this process --------------------------------------------------------------
class VerifiedBlobs:
    """Keys of blob files this process hashed and found equal to their names (bounded)."""

    def __init__(self, limit: int = 1 << 16) -> None:
        self._keys: dict[tuple, None] = {}
        self._lock = threading.Lock()
        self._limit = limit

    @staticmethod
    def key(path: Path, st: os.stat_result) -> tuple:
        """``(device, inode, path, size, mtime_ns)``: any write to the file or a new file under
        the same name gives another key, so a check is never reused for other bytes."""
        return (st.st_dev, st.st_ino, str(path), st.st_size, st.st_mtime_ns)

    def __contains__(self, key: tuple) -> bool:
        return key in self._keys

    def add(self, key: tuple) -> None:
        """Remember ``key`` as checked; at ``limit`` keys the older half is forgotten first (those
        blobs are simply hashed again when next handed out)."""
        with self._lock:
            if len(self._keys) >= self._limit:
                for k in list(self._keys)[: self._limit // 2]:
                    del self._keys[k]
            self._keys[key] = None

    def discard(self, key: tuple) -> None:
        """Forget ``key`` (no error when it was not there)."""
        with self._lock:
            self._keys.pop(key, None)

    def clear(self) -> None:
        """Forget every check (what a fresh process knows; benchmarks and tests use it)."""
        with self._lock:
            self._keys.clear()


VERIFIED = VerifiedBlobs()


def corrupt(what: str, sha: str, got: str) -> RegistryError:
    """The error for a blob of ``what`` (a REF) whose bytes hash to ``got`` instead of its recorded
    ``sha``: names both (12 hex digits each) and asks for ``loradex verify``."""
    return RegistryError(f"{what}: its stored bytes do not match the catalogue (they hash to {got[:12]}..., the "
                         f"catalogue says {sha[:12]}...); the registry copy is damaged: run `loradex verify`")


class BlobStore:
    """The ``blobs/`` folder: ``<root>/<sha[:2]>/<sha[2:]>`` read-only files named by the SHA-256
    of their bytes, and ``<root>/tmp/`` for files being ingested (see the module docstring)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self._shards: set[str] = set()  # shard folders known to exist

    def ensure(self) -> None:
        """Create the store's folders (``root`` and ``root/tmp``) when missing."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        """Where the blob of ``sha256`` lives (whether or not it exists; nothing is checked)."""
        return Path(self._where(sha256))

    def _where(self, sha256: str) -> str:
        return f"{self.root}{os.sep}{sha256[:2]}{os.sep}{sha256[2:]}"

    def has(self, sha256: str, size: int | None = None) -> bool:
        """Whether the blob exists (with ``size`` bytes when given); its bytes are not hashed."""
        try:
            st = os.stat(self._where(sha256))
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    # ---- writing -----------------------------------------------------------------------
    def ingest(self, src: str | os.PathLike, progress: Callable[[int], None] | None = None, *,
               slots: Slots | None = None, keep: bool = False, link: bool = False) -> Ingested:
        """Stream ``src`` into a temporary file of the store, hashing it on the way (one read).
        RegistryError naming ``src`` when it is not a readable regular file, DiskFullError naming
        the store when the disk fills; no temporary file is left either way.

        ``slots``: the temporary file is ``<slot>/<src's name>`` (see ``linking.Slots``), else a
        ``<pid>-<random>.tmp``. ``keep``: a file under ``KEEP_MAX_BYTES`` is read in one go and
        its bytes kept in ``Ingested.data``. ``link`` (needs ``slots``): reflink or hard
        link the source instead of copying it, then hash it (``Ingested.how``); where it cannot
        (another file system...), a copy is made and ``Ingested.note`` says why."""
        src = Path(src)
        try:
            in_fd, st = open_regular(src)
        except OSError as e:
            raise RegistryError(f"{src}: cannot read it ({e.strerror or e})") from None
        note = ""
        try:
            if link and slots is not None:
                try:
                    tmp_path, how = link_into(src, in_fd, slots)
                except OSError as e:
                    note = why_not_linked(e, src, self.root)
                    log.warning("%s", note)
                else:  # a hard link is the opened file itself: read it through the open descriptor
                    item = self._hash_linked(src, tmp_path, how, progress, keep, in_fd if how == "hardlink" else None)
                    pause_point("temp-written")
                    return item
            try:
                if slots is not None:  # created read-only: the blob's mode, no chmod to come
                    tmp_path, fd = slots.create(src.name, mode=0o444)
                else:
                    fd, tmp = tempfile.mkstemp(prefix=f"{os.getpid()}-", suffix=".tmp", dir=self.tmp_dir)
                    tmp_path = Path(tmp)
            except OSError as e:
                raise write_error(e, self.root, src.name) from None
            hasher = StreamHasher(threads=st.st_size >= PARALLEL_HASH_MIN_BYTES)
            data = None
            try:
                try:
                    if keep and st.st_size < min(KEEP_MAX_BYTES, KERNEL_COPY_MIN_BYTES):
                        data = _read_whole(in_fd, st.st_size)
                        hasher.update(data)
                        write_all(fd, data)
                        if progress:
                            progress(len(data))
                    else:
                        _copy(in_fd, fd, st.st_size, hasher.update, progress, drain=hasher.close)
                    written = os.fstat(fd)
                finally:
                    hasher.close()
                    os.close(fd)
            except BaseException as e:
                tmp_path.unlink(missing_ok=True)
                if isinstance(e, _SourceError):
                    raise RegistryError(f"{src}: cannot read it ({e.os_error.strerror or e})") from None
                if isinstance(e, OSError):
                    raise write_error(e, self.root, src.name) from None
                raise
        finally:
            os.close(in_fd)
        pause_point("temp-written")
        return Ingested(tmp_path, hasher.pos, hasher.result(), source=src.name, data=data, note=note,
                        readonly=slots is not None, stat=written)

    def _hash_linked(self, src: Path, tmp_path: Path, how: str, progress, keep: bool,
                     fd: int | None = None) -> Ingested:
        """Hash a file just linked (or cloned) into a slot, reading the link itself (``fd``: a
        descriptor of that same inode, at offset 0, left open): what is hashed is what will be
        stored. RegistryError (the link removed) when it cannot be read or its size changed while
        it was read (a writer at work on the source)."""
        own = fd is None
        try:
            if own:
                fd, st = open_regular(tmp_path)
            else:
                st = os.fstat(fd)
            try:
                hasher = StreamHasher(threads=st.st_size >= PARALLEL_HASH_MIN_BYTES)
                data = None
                try:
                    if keep and st.st_size < min(KEEP_MAX_BYTES, KERNEL_COPY_MIN_BYTES):
                        data = _read_whole(fd, st.st_size)
                        hasher.update(data)
                        if progress:
                            progress(len(data))
                    else:
                        hasher.feed(fd, st.st_size, progress)
                finally:
                    hasher.close()
                after = os.fstat(fd)
            finally:
                if own:
                    os.close(fd)
            if hasher.pos != st.st_size or after.st_size != st.st_size:
                raise RegistryError(f"{src}: it changed while it was read (another program is writing it); "
                                    "add it again once it is written")
        except BaseException as e:
            tmp_path.unlink(missing_ok=True)
            if isinstance(e, _SourceError):
                raise RegistryError(f"{src}: cannot read it ({e.os_error.strerror or e})") from None
            if isinstance(e, OSError):
                raise RegistryError(f"{src}: cannot read it ({e.strerror or e})") from None
            raise
        return Ingested(tmp_path, hasher.pos, hasher.result(), source=src.name, data=data, how=how, stat=after)

    def commit(self, item: Ingested, durable: bool = True) -> Path:
        """Move an ingested file into place (or drop it when the same bytes are already stored).
        A full disk removes the temporary file and raises DiskFullError."""
        dst = self.path(item.sha256)
        if self.has(item.sha256, item.size):
            item.tmp.unlink(missing_ok=True)
            return dst
        try:
            if durable:
                _fsync_path(item.tmp)
            if not item.readonly:
                os.chmod(item.tmp, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)  # blobs are immutable
            new_shard = False
            if item.sha256[:2] not in self._shards:  # shard folders are never removed (see ``remove``)
                new_shard = not dst.parent.is_dir()
                dst.parent.mkdir(exist_ok=True)
                self._shards.add(item.sha256[:2])
            try:
                os.replace(item.tmp, dst)
            except FileNotFoundError:  # its shard folder was removed from outside after all
                if not item.tmp.exists():
                    raise
                self._shards.discard(item.sha256[:2])
                new_shard = True
                dst.parent.mkdir(exist_ok=True)
                os.replace(item.tmp, dst)
            item.created = True
            if durable:
                _fsync_path(dst.parent)
                if new_shard:
                    _fsync_path(self.root)
        except OSError as e:
            item.tmp.unlink(missing_ok=True)
            raise write_error(e, self.root, item.source) from None
        with contextlib.suppress(OSError):  # its bytes were hashed as they were written
            VERIFIED.add(VerifiedBlobs.key(dst, item.stat or dst.stat()))
        return dst

    def discard(self, item: Ingested) -> None:
        """Drop an ingested file that will not be committed (its temporary file is removed)."""
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

    # ---- reading, checked against the name ------------------------------------------------------
    def present(self, sha: str, size: int, what: str) -> Path:
        """The blob's path when it exists with the recorded size (RegistryError naming ``what``)."""
        if not self.has(sha, size):
            raise RegistryError(f"{what}: its blob {sha[:12]} is missing or truncated; run `loradex verify`")
        return self.path(sha)

    def verified(self, sha: str, size: int, what: str) -> Path:
        """The blob's path, its bytes checked against ``sha`` (hashed once per process and state
        of the file, see the module docstring); RegistryError naming ``what`` otherwise."""
        p = self.present(sha, size, what)
        st = p.stat()
        if VerifiedBlobs.key(p, st) in VERIFIED:
            return p
        got, key = self.hash_blob(p)
        if got != sha:
            raise corrupt(what, sha, got)
        VERIFIED.add(key)
        return p

    def hash_blob(self, p: Path, progress: Callable[[int], None] | None = None) -> tuple[str, tuple]:
        """``(sha256 hex, cache key)`` of a stored file, streamed; the key is of the state hashed."""
        fd, st = open_regular(p)
        h = hashlib.sha256()
        try:
            with open(fd, "rb", buffering=0, closefd=False) as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                    if progress:
                        progress(len(chunk))
        finally:
            os.close(fd)
        return h.hexdigest(), VerifiedBlobs.key(p, st)

    def copy_verified(self, sha: str, size: int, dst: Path, what: str, shown: str | os.PathLike) -> None:
        """Copy the blob into the new file ``dst`` while hashing it, in one pass; RegistryError
        naming ``what`` when the bytes are not the recorded ones, DiskFullError naming ``shown``
        (the path the user asked for, not ``dst``) when its disk fills. ``dst`` is the caller's
        to remove on error."""
        src = self.present(sha, size, what)
        in_fd, st = open_regular(src)
        h = hashlib.sha256()
        try:
            # read-write: the kernel copy path hashes the destination through a memory map of it
            fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                _copy(in_fd, fd, st.st_size, h.update, None)
            finally:
                os.close(fd)
        except _SourceError as e:
            raise RegistryError(f"{what}: cannot read its blob ({e.os_error.strerror or e}); run `loradex verify`") from None
        except OSError as e:
            raise write_error(e, shown) from None
        finally:
            os.close(in_fd)
        got = h.hexdigest()
        if got != sha:
            raise corrupt(what, sha, got)
        VERIFIED.add(VerifiedBlobs.key(src, st))

    # ---- listing and cleaning -----------------------------------------------------------
    def iter_blobs(self) -> Iterator[tuple[str, Path]]:
        """``(sha256, path)`` of every file named like a blob (2 + 62 lowercase hex), shard by
        shard in sorted order; ``tmp/`` and anything else in the folder are skipped."""
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
        """Delete a blob; returns the bytes freed (0 when it was not there, or when the file lives
        on under another name). Callers hold the catalogue's write lock and have checked that no
        row names it (``gc``, a failed import). A blob with other hard links is a user's file that
        ``add --link`` made read-only: it is handed back writable (``0666 & ~umask``, the mode a new
        file of theirs gets; the original mode is not recorded) before the registry's name goes."""
        p = self.path(sha256)
        try:
            st = p.stat()
            if st.st_nlink > 1:
                from loradex.converters.safetensors_io import umask

                with contextlib.suppress(OSError):  # not ours to chmod (another user's): leave it
                    os.chmod(p, 0o666 & ~umask())
            p.unlink()
        except FileNotFoundError:
            return 0
        # shard folders stay: removing one could race a concurrent import renaming into it
        return st.st_size if st.st_nlink == 1 else 0


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
