"""File identities used by Civitai, kohya and the registry (FORMATS.md §5).

All hashes stream the file in chunks (a 7 GB checkpoint is never read whole):
* SHA256 of the whole file; AutoV2 = its first 10 hex chars (uppercase on Civitai).
* AutoV1 = sha256 of the 0x10000 bytes at offset 0x100000, first 8 hex chars.
* AutoV3 = sha256 of the bytes after the 8-byte length and the JSON header of a safetensors
  file (the tensor data; equals kohya's ``sshs_model_hash``), so editing only metadata keeps
  AutoV3 and changes AutoV2. A header length >= 16 MiB is not skipped (Civitai's rule).
* CRC32 (Civitai shows it as little-endian hex of the 32-bit value).
"""

from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

CHUNK = 1 << 22
_AUTOV3_MAX_HEADER = 16 * 1024 * 1024


def file_hashes(path: str | os.PathLike, progress=None) -> dict[str, str]:
    """{sha256, autov1, autov2, autov3, crc32} of a file, in one streaming pass (two reads of the
    64 KiB AutoV1 window). ``progress(n_bytes)`` is called per chunk when given."""
    p = Path(path)
    size = p.stat().st_size
    sha = hashlib.sha256()
    v3 = hashlib.sha256()
    crc = 0
    with open(p, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else None
        skip = 8 + n if n is not None and n < _AUTOV3_MAX_HEADER and 8 + n <= size else 0
        f.seek(0)
        pos = 0
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            crc = zlib.crc32(chunk, crc)
            if pos + len(chunk) > skip:
                v3.update(chunk[max(0, skip - pos) :])
            pos += len(chunk)
            if progress:
                progress(len(chunk))
        f.seek(0x100000)
        v1 = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    full = sha.hexdigest()
    return {
        "sha256": full,
        "autov1": v1.upper(),
        "autov2": full[:10].upper(),
        "autov3": v3.hexdigest()[:12].upper() if skip else "",
        "autov3_full": v3.hexdigest() if skip else "",
        "crc32": zlib.crc32(b"", crc).to_bytes(4, "little").hex().upper(),
    }
