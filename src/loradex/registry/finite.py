"""NaN/Inf in an imported file, found without a tensor library: ``add`` refuses adapters and
embeddings holding them (they would load everywhere and turn every image they touch into noise).

A safetensors file is checked from its bytes: a float is NaN or Inf exactly when its exponent bits
are all ones, so each run of tensors of one dtype (F16, BF16, F32, F64; adjacent tensors merged)
is looked at as unsigned integers, masked, and its maximum compared with the mask -- one
vectorised pass at memory speed, over the bytes the import already holds in memory (small files)
or read back in 16 MiB pieces (big ones; no memory map, so a file shrinking meanwhile is a short
read, not a crash). Only when something is found are the offending keys listed, through
``converters.pickle_io.nonfinite_keys`` (the message names them). Pickles go through that function
directly; an embedding image (A1111 PNG) through ``loradex.api``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from loradex.errors import FormatError, RegistryError

#: dtype -> (unsigned integer of its width, the mask of its exponent bits)
MASKS = {
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
    "F32": (np.uint32, 0x7F800000),
    "F64": (np.uint64, 0x7FF0000000000000),
}
PIECE = 16 << 20


def _runs(header) -> list[tuple[int, int, str]]:
    """``(start, end, dtype)`` of the checked tensors in data-section order, adjacent tensors of
    one dtype merged into one run."""
    spans = sorted((t.start, t.end, t.dtype) for t in header.tensors.values() if t.dtype in MASKS and t.end > t.start)
    runs: list[list] = []
    for s, e, dt in spans:
        if runs and runs[-1][2] == dt and runs[-1][1] == s:
            runs[-1][1] = e
        else:
            runs.append([s, e, dt])
    return [(s, e, dt) for s, e, dt in runs]


def has_nonfinite(header, data=None) -> bool:
    """Whether a floating-point tensor of the safetensors file ``header`` (a
    ``safetensors_io.Header``) holds a NaN or an Inf. ``data``: the file's bytes (the whole file)
    when they are in memory; else ``header.path`` is read piece by piece. OSError when it cannot."""
    base = header.data_offset
    fd = None if data is not None else os.open(header.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    buf = None
    try:
        for start, end, dt in _runs(header):
            kind, mask = MASKS[dt]
            size = np.dtype(kind).itemsize
            step = PIECE - PIECE % size
            for a in range(start, end, step):
                n = min(step, end - a)
                if data is not None:
                    piece = np.frombuffer(data, dtype=kind, count=n // size, offset=base + a)
                else:
                    if buf is None or len(buf) < n:
                        buf = bytearray(n)
                    got = os.preadv(fd, [memoryview(buf)[:n]], base + a)
                    if got != n:
                        raise OSError(f"{header.path}: shorter than its header says")
                    piece = np.frombuffer(buf, dtype=kind, count=n // size)
                if piece.size and int(np.bitwise_and(piece, kind(mask)).max()) == mask:
                    return True
    finally:
        if fd is not None:
            os.close(fd)
    return False


def nonfinite_message(keys: list[str], where: Path) -> FormatError:
    """The refusal naming ``where`` (the user's path) and the first offending keys."""
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return FormatError(f"{where}: holds NaN/Inf values in {len(keys)} tensor(s): {', '.join(keys[:3])}{more} "
                       "(add --allow-nonfinite to store it anyway)")


def nonfinite_in_file(path: Path) -> list[str]:
    """The keys (tensors, or embedding tokens) of a weights file holding NaN/Inf, sorted: a
    safetensors file or pickle through ``nonfinite_keys``, an embedding image through
    ``loradex.api`` (its vectors come from JSON)."""
    from loradex.converters.a1111_png import is_png

    if is_png(path):
        import torch

        from loradex import api

        adapter = api.load(path)
        return sorted(tok for tok, e in adapter.embeddings.items()
                      if any(t.numel() and not bool(torch.isfinite(t).all()) for t in e.vectors.values()))
    from loradex.converters.pickle_io import nonfinite_keys

    return nonfinite_keys(path)


def check_finite_files(view: Path, shown: Path) -> None:
    """FormatError naming ``shown`` (the user's path) when a weights file of the artifact ``view``
    (a file or a folder: PEFT adapters) holds NaN/Inf values."""
    from loradex.registry.scan import WEIGHT_SUFFIXES

    files = [view] if view.is_file() else sorted(f for f in view.rglob("*") if f.suffix.lower() in WEIGHT_SUFFIXES)
    for f in files:
        bad = nonfinite_in_file(f)
        if bad:
            raise nonfinite_message(bad, shown if f == view else shown / f.relative_to(view))


def check_finite(item, header, shown: Path) -> None:
    """``check_finite_files`` for a file just ingested (a ``store.Ingested``): a safetensors file is checked from its
    bytes (``item.data`` when kept, else read back; ``header``: its parsed header, None to parse
    it here), the offending keys listed only when something is found."""
    from loradex.converters import safetensors_io as sio

    if header is None:
        with contextlib.suppress(FormatError):
            header = sio.read_header(item.tmp)
    if header is not None:
        try:
            if not has_nonfinite(header, item.data):
                return
        except OSError:
            pass  # read it the slow way, which names the problem
    check_finite_files(item.tmp, shown)


def check_embedding_image(path: Path) -> None:
    """For a folder import: a ``.png`` is imported only when it is an A1111 embedding image; a
    preview (any other picture) is a RegistryError whose message is the skip reason."""
    from loradex.converters.a1111_png import is_png, read_png_data

    if not is_png(path):
        raise RegistryError(f"{path}: not a PNG image despite its name (not read further)")
    try:
        found = read_png_data(path)
    except FormatError as e:
        why = str(e).removeprefix(f"{path}: ")
        raise RegistryError(f"{path}: an embedding image that cannot be read ({why})") from None
    if found is None:
        raise RegistryError(f"{path}: a preview image (a PNG holding no embedding), not imported")
