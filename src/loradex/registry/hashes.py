"""File identities used by Civitai, kohya and the registry (FORMATS.md §5).

All hashes stream the file in chunks (a 7 GB checkpoint is never read whole):
* SHA256 of the whole file; AutoV2 = its first 10 hex chars (uppercase on Civitai).
* AutoV1 = sha256 of the 0x10000 bytes at offset 0x100000, first 8 hex chars.
* AutoV3 = sha256 of the bytes after the 8-byte length and the JSON header of a safetensors
  file (the tensor data; equals kohya's ``sshs_model_hash``), so editing only metadata keeps
  AutoV3 and changes AutoV2. A header length >= 16 MiB is not skipped (Civitai's rule): AutoV3
  is then the hash of the whole file. Files that are not safetensors-shaped (the length does not
  fit the file) have no AutoV3 ("").
* CRC32 (Civitai shows it as little-endian hex of the 32-bit value).

``StreamHasher`` computes all of them from a byte stream in one pass, so the registry hashes a
file while it copies it into its store; ``file_hashes`` is the same on a path. No function here
parses anything: the 8-byte length prefix is the only structure looked at.

``StreamHasher(threads=True)`` runs the two SHA-256 (whole file; data section) on two threads of
their own (``hashlib`` and ``zlib`` release the GIL), so a big file is hashed at the speed of one
SHA-256 while its next chunk is being copied; the chunks handed to it must then stay valid and
unchanged until ``result()`` (views of a memory map, not a reused buffer).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import zlib
from pathlib import Path

CHUNK = 1 << 22
_AUTOV3_MAX_HEADER = 16 * 1024 * 1024
_V1_START, _V1_END = 0x100000, 0x110000


class StreamHasher:
    """Feed the bytes of a file in order with ``update``; ``result()`` gives the identities.

    The AutoV3 section starts after ``8 + n`` bytes where ``n`` is the little-endian length
    prefix; whether the prefix is plausible (fits the file) is only known at the end, so the
    data-section hash is kept alongside and dropped when it was not."""

    def __init__(self, threads: bool = False) -> None:
        self._sha = hashlib.sha256()
        self._data = hashlib.sha256()  # bytes after 8 + n (kohya's sshs_model_hash, AutoV3)
        self._crc = 0
        self._v1 = bytearray()
        self._head = bytearray()
        self._skip: int | None = None  # 8 + n once the first 8 bytes are known
        self.pos = 0
        self._lanes: list[_Lane] = [_Lane(self._whole), _Lane(self._data.update)] if threads else []

    def _whole(self, mv: memoryview) -> None:
        self._sha.update(mv)
        self._crc = zlib.crc32(mv, self._crc)

    def update(self, chunk: bytes | memoryview, done=None) -> None:
        """Hash the next ``chunk`` of the file (chunks of any size, in file order; empty ones are
        ignored). ``pos`` counts the bytes seen. With threads, ``done()`` (when given) is called
        once no lane needs the chunk any more (its buffer may then be reused)."""
        mv = memoryview(chunk)
        if not mv:
            if done:
                done()
            return
        start, end = self.pos, self.pos + len(mv)
        if self._skip is None:
            self._head += mv[: 8 - len(self._head)]
            if len(self._head) == 8:
                self._skip = 8 + int.from_bytes(self._head, "little")
        part = mv[max(0, self._skip - start) :] if self._skip is not None and end > self._skip else None
        if end > _V1_START and start < _V1_END:
            self._v1 += mv[max(0, _V1_START - start) : _V1_END - start]
        self.pos = end
        if not self._lanes:
            self._whole(mv)
            if part is not None:
                self._data.update(part)
            return
        if done is not None and part is not None:
            left = [2]
            lock = threading.Lock()

            def one_done() -> None:
                with lock:
                    left[0] -= 1
                    last = left[0] == 0
                if last:
                    done()

            self._lanes[0].put(mv, one_done)
            self._lanes[1].put(part, one_done)
            return
        self._lanes[0].put(mv, done)
        if part is not None:
            self._lanes[1].put(part, None)

    def feed(self, fd: int, size: int, progress=None, bufs: int = 4) -> int:
        """Hash ``fd`` from its current offset to its end (``size`` is the expected length, only a
        hint), reading ahead into ``bufs`` buffers of ``CHUNK`` bytes while the lanes hash;
        returns the bytes read. Without threads, one buffer read and hashed in turn."""
        if not self._lanes:
            buf = bytearray(max(1, min(CHUNK, size or 1)))
            mv = memoryview(buf)
            total = 0
            while n := os.readv(fd, [buf]):
                self.update(mv[:n])
                total += n
                if progress:
                    progress(n)
            return total
        free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(bufs):
            free.put(bytearray(CHUNK))
        total = 0
        while True:
            buf = free.get()
            n = os.readv(fd, [buf])
            if not n:
                break
            self.update(memoryview(buf)[:n], done=lambda b=buf: free.put(b))
            total += n
            if progress:
                progress(n)
        return total

    def result(self) -> dict[str, str]:
        """The identities of the bytes fed so far: ``sha256``, ``autov1`` (8 hex, upper),
        ``autov2`` (10 hex, upper), ``autov3`` (12 hex, upper) and ``autov3_full``, ``crc32``
        (little-endian hex, upper) and ``sshs_model_hash`` (lowercase hex). ``autov3*`` and
        ``sshs_model_hash`` are ``""`` when the length prefix does not fit the file; for a header
        of 16 MiB or more ``autov3`` is the whole file's sha256 (Civitai) while
        ``sshs_model_hash`` still skips the header (kohya). With threads, waits for them first."""
        self.close()
        size = self.pos
        full = self._sha.hexdigest()
        n = self._skip - 8 if self._skip is not None else None
        shaped = n is not None and self._skip <= size  # the length prefix fits: safetensors-shaped
        data_hash = self._data.hexdigest() if shaped else ""
        if shaped and n >= _AUTOV3_MAX_HEADER:
            v3 = full  # Civitai does not skip a header this long
        else:
            v3 = data_hash
        return {
            "sha256": full,
            "autov1": hashlib.sha256(bytes(self._v1)).hexdigest()[:8].upper(),
            "autov2": full[:10].upper(),
            "autov3": v3[:12].upper(),
            "autov3_full": v3,
            "crc32": zlib.crc32(b"", self._crc).to_bytes(4, "little").hex().upper(),
            # kohya's addnet_hash_safetensors always skips the header, whatever its length
            "sshs_model_hash": data_hash,
        }

    def close(self) -> None:
        """Wait for the hashing threads (if any) to finish what they were given and stop them; no
        chunk handed to ``update`` is referenced afterwards. Safe to call more than once."""
        lanes, self._lanes = self._lanes, []
        for lane in lanes:
            lane.finish()
        for lane in lanes:
            lane.join()


class _Lane:
    """One hashing thread: runs ``fn`` on each chunk put, in order, then its ``done`` callback,
    until ``finish``."""

    def __init__(self, fn) -> None:
        self._fn = fn
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="loradex-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            mv, done = item
            item = None
            if self._error is None:
                try:
                    self._fn(mv)
                except BaseException as e:  # re-raised by join()
                    self._error = e
            mv = None  # drop the reference before ``done``: the caller may reuse or unmap the buffer
            if done is not None:
                done()

    def put(self, mv: memoryview, done=None) -> None:
        """Queue a chunk (hashed later, on the lane's thread; ``done()`` called after)."""
        self._q.put((mv, done))

    def finish(self) -> None:
        """No more chunks: the thread ends once the queued ones are hashed."""
        self._q.put(None)

    def join(self) -> None:
        """Wait for the thread; an error it met is raised here."""
        self._thread.join()
        if self._error is not None:
            raise self._error


def file_hashes(path: str | os.PathLike, progress=None) -> dict[str, str]:
    """{sha256, autov1, autov2, autov3, autov3_full, crc32, sshs_model_hash} of a file, in one
    streaming pass. ``progress(n_bytes)`` is called per chunk when given."""
    h = StreamHasher()
    with open(Path(path), "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.result()
