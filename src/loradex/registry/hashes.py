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
"""

from __future__ import annotations

import hashlib
import os
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

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._data = hashlib.sha256()  # bytes after 8 + n (kohya's sshs_model_hash, AutoV3)
        self._crc = 0
        self._v1 = bytearray()
        self._head = bytearray()
        self._skip: int | None = None  # 8 + n once the first 8 bytes are known
        self.pos = 0

    def update(self, chunk: bytes | memoryview) -> None:
        """Hash the next ``chunk`` of the file (chunks of any size, in file order; empty ones are
        ignored). ``pos`` counts the bytes seen."""
        mv = memoryview(chunk)
        if not mv:
            return
        start, end = self.pos, self.pos + len(mv)
        self._sha.update(mv)
        self._crc = zlib.crc32(mv, self._crc)
        if self._skip is None:
            self._head += mv[: 8 - len(self._head)]
            if len(self._head) == 8:
                self._skip = 8 + int.from_bytes(self._head, "little")
        if self._skip is not None and end > self._skip:
            self._data.update(mv[max(0, self._skip - start) :])
        if end > _V1_START and start < _V1_END:
            self._v1 += mv[max(0, _V1_START - start) : _V1_END - start]
        self.pos = end

    def result(self) -> dict[str, str]:
        """The identities of the bytes fed so far: ``sha256``, ``autov1`` (8 hex, upper),
        ``autov2`` (10 hex, upper), ``autov3`` (12 hex, upper) and ``autov3_full``, ``crc32``
        (little-endian hex, upper) and ``sshs_model_hash`` (lowercase hex). ``autov3*`` and
        ``sshs_model_hash`` are ``""`` when the length prefix does not fit the file; for a header
        of 16 MiB or more ``autov3`` is the whole file's sha256 (Civitai) while
        ``sshs_model_hash`` still skips the header (kohya)."""
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
