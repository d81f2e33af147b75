"""Durable writes shared by every room that writes files (``converters.safetensors_io``, the
registry's blob store, training checkpoints). Standard library only: importing it costs nothing.
"""

from __future__ import annotations

import errno
import os


def write_all(fd: int, data) -> None:
    """``os.write`` until every byte of ``data`` is out: a short write is continued, one that makes
    no progress is a full disk (``ENOSPC``), never a silently truncated file."""
    mv = memoryview(data).cast("B")
    while mv:
        n = os.write(fd, mv)
        if n <= 0:
            raise OSError(errno.ENOSPC, f"a write made no progress ({len(mv)} bytes left)")
        mv = mv[n:]


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file, or a folder's entry list (which makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
