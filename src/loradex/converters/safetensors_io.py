"""The only place in loradex that opens weight files.

Every safetensors header is validated *before* anything is allocated: the 8-byte length is
bounded and must fit the file, the header must be a JSON object, every dtype must be known, every
shape must be a list of non-negative ints whose byte size matches its data offsets, and the
offset ranges must lie inside the data section without overlapping. Hostile files therefore fail
fast with ``FormatError`` instead of exhausting memory.

Pickles (``.pt``/``.ckpt``/``.bin``) are only ever opened with ``torch.load(weights_only=True)``:
a pickle that needs anything but tensors and plain containers raises ``UnsafeFileError`` and no
code in it runs.

Writes are atomic: a temporary file in the destination folder, fsync, then ``os.replace``.
"""

from __future__ import annotations

import contextvars
import errno
import itertools
import json
import math
import operator
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from loradex.converters.safetensors_header import (  # noqa: F401  (re-exported)
    MAX_TENSORS,
    SAFETENSORS_DTYPES,
    Header,
    TensorInfo,
    parse_header,
)
from loradex.core.lazy import LazyMapping
from loradex.errors import DiskFullError, FormatError, LoradexError
from loradex.fsutil import fsync_path, write_all  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)

#: Largest header we accept. Real headers are a few hundred KiB even for FLUX checkpoints.
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Largest JSON side file (adapter_config.json, model_index.json...).
MAX_JSON_BYTES = 16 * 1024 * 1024

#: safetensors dtype name -> (torch dtype, bytes per element), built (importing torch) on first use
DTYPES: Mapping[str, tuple[torch.dtype, int]] = LazyMapping(lambda: {
    name: (getattr(torch, attr), size) for name, (attr, size) in SAFETENSORS_DTYPES.items()
    if hasattr(torch, attr)})


def _regular_file(path: str | os.PathLike) -> Path:
    return _stat_regular(Path(path))[0]


def _stat_regular(p: Path) -> tuple[Path, os.stat_result]:
    """``p`` and its stat (one system call), or FormatError naming what it is instead."""
    try:
        st = p.stat()
    except FileNotFoundError:
        raise FormatError(f"{p}: no such file") from None
    except OSError as e:
        raise FormatError(f"{p}: cannot read ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise FormatError(f"{p}: is a directory, not a weights file")
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"{p}: not a regular file")
    return p, st


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate the header of a safetensors file. Raises FormatError.

    Cached per (absolute path, size, mtime): detection and reading both ask for it."""
    p, st = _stat_regular(Path(path))
    return _read_header(Path(os.path.abspath(p)), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _read_header(p: Path, size: int, _mtime_ns: int) -> Header:
    if size < 8:
        raise FormatError(f"{p}: not a safetensors file ({size} bytes, too short for a header)")
    with open(p, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise FormatError(f"{p}: not a safetensors file (header length {n} does not fit the {size}-byte file)")
        raw = f.read(n)
    return parse_header(raw, size, p)


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file whose safetensors header passes :func:`read_header`."""
    try:
        read_header(path)
        return True
    except FormatError:
        return False


_STRUCTURE_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("loradex_structure_only", default=False)


@contextmanager
def structure_only() -> Iterator[None]:
    """Within this block ``load`` reads no tensor data: tensors of more than one element come back
    on the meta device (shape and dtype only), scalars (alpha, on_input) are read. Enough to
    describe an adapter (kinds, ranks, alphas, modules) from the header at the cost of a few small
    reads -- what the registry does for every import -- but no math can run on the result."""
    token = _STRUCTURE_ONLY.set(True)
    try:
        yield
    finally:
        _STRUCTURE_ONLY.reset(token)


def load(path: str | os.PathLike, keys: list[str] | None = None, header: Header | None = None) -> dict[str, torch.Tensor]:
    """Load tensors (all, or ``keys``) from a validated safetensors file, memory-mapped."""
    from safetensors import safe_open

    h = header or read_header(path)
    wanted = list(h.tensors) if keys is None else keys
    if _STRUCTURE_ONLY.get():
        out = {k: torch.empty(h.tensors[k].shape, dtype=DTYPES[h.tensors[k].dtype][0], device="meta") for k in wanted}
        small = [k for k in wanted if math.prod(h.tensors[k].shape) <= 1]
        wanted = small
        if not small:
            return out
    else:
        out = {}
    st = h.path.stat()
    stamp = (st.st_size, st.st_mtime_ns)
    try:
        with safe_open(str(h.path), framework="pt", device="cpu") as f:
            for k in wanted:
                t = out[k] = f.get_tensor(k)
                info = h.tensors[k]
                # provenance: where these bytes sit in the file, so that ``save`` can copy them
                # file-to-file (``direct_io``: preadv into its O_DIRECT buffer, or copy_file_range)
                # instead of serializing them again, as long as the tensor was not modified in
                # place (torch bumps ``_version``) or replaced
                t._loradex_src = (str(h.path), h.data_offset + info.start, info.nbytes, t._version, t.data_ptr(), stamp)
    except Exception as e:  # safetensors' own checks (e.g. a file changed underneath)
        raise FormatError(f"{h.path}: cannot read tensors: {e}") from None
    return out


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it over ``path``.
    On any failure the temporary file is removed; a full disk (ENOSPC/EDQUOT) becomes
    DiskFullError naming ``path``."""
    dst = Path(path)
    if dst.is_dir():
        raise FormatError(f"{dst}: is a directory; give a file name")
    parent = dst.parent if str(dst.parent) else Path(".")
    if not parent.is_dir():
        raise FormatError(f"{parent}: output folder does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=suffix + ".tmp", dir=parent)
    tmp_path = Path(tmp)
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes it 0600; outputs get a normal file's mode
        os.close(fd)
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dst)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            # every writer (checkpoints, embeddings, images, training outputs) gets the one-line
            # error naming the user's path, not the temporary file's
            raise write_failure(e, dst) from None
        raise


def umask() -> int:
    """The process umask (read by setting and restoring it: there is no getter before Python 3.13's
    os.umask semantics, and the value is needed to give atomically written outputs, made by mkstemp
    / mkdtemp with modes 0600 / 0700, the mode a plain ``open(path, "w")`` would have)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_DTYPE_NAMES: Mapping = LazyMapping(lambda: {dt: name for name, (dt, _) in DTYPES.items()})


def _source_range(t: torch.Tensor, stamps: dict[str, tuple[int, int] | None]) -> tuple[str, int, int] | None:
    """(file, offset, length) when ``t`` still holds exactly the bytes ``load`` read from a file
    that has not changed since (same size and mtime): not modified in place, the same memory, all
    of it, in order (a transposed or otherwise non-contiguous view of the same memory holds the same
    bytes in another order). ``stamps`` caches each file's stat for one write."""
    src = getattr(t, "_loradex_src", None)
    if src is None:
        return None
    path, offset, nbytes, version, ptr, stamp = src
    if t._version != version or t.data_ptr() != ptr or t.numel() * t.element_size() != nbytes \
            or not t.is_contiguous():
        return None
    if path not in stamps:
        try:
            st = os.stat(path)
            stamps[path] = (st.st_size, st.st_mtime_ns)
        except OSError:
            stamps[path] = None
    return (path, offset, nbytes) if stamps[path] == stamp else None


def _write_all(fd: int, data) -> None:
    """``fsutil.write_all`` (every write of the serializer goes through this name, so that tests
    can inject a fault there)."""
    write_all(fd, data)


def write_failure(e: OSError, path: str | os.PathLike) -> LoradexError:
    """The one-line error for an OSError while writing the user's output ``path`` (never the
    temporary file next to it): DiskFullError for ENOSPC/EDQUOT, FormatError otherwise."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"the disk is full: cannot write {path} ({e.strerror or 'no space left'}); "
                             "nothing was left half-written")
    return FormatError(f"{path}: cannot write ({e.strerror or e})")


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes at ``offset`` of ``src_fd`` to ``dst_fd``'s position, in the kernel
    where it can (``direct_io.copy_range``: copy_file_range, else pread + ``_write_all``)."""
    from loradex.converters import direct_io

    direct_io.copy_range(src_fd, dst_fd, offset, count, lambda fd, data: _write_all(fd, data))


class _Layout(NamedTuple):
    """A planned safetensors file: ``names`` in data order, each tensor's ``entries`` for the
    header, and ``data``: the data section as ``direct_io`` pieces (a source file's byte range for a
    tensor ``load`` read and nobody changed, the tensor's bytes in memory otherwise)."""

    names: list[str]
    entries: dict[str, dict]
    data: list


def _layout(tensors: Mapping[str, torch.Tensor], path: Path) -> _Layout:
    """Plan the file ``_serialize`` writes: tensors by dtype, widest first, then by name, as the
    safetensors serializer orders them. FormatError for anything that is not a dense tensor with
    data and a safetensors dtype."""
    from loradex.converters.direct_io import FileRange

    order = _serializer_dtype_order()
    dtype_names = dict(_DTYPE_NAMES)  # plain dicts and locals: this runs for every tensor of every write
    tensor_type, strided, uint8 = torch.Tensor, torch.strided, torch.uint8
    for k, t in tensors.items():
        if not isinstance(t, tensor_type) or t.layout != strided or t.device.type == "meta":
            raise FormatError(f"{path}: cannot write {k!r}: not a dense tensor with data")
        if t.dtype not in dtype_names:
            raise FormatError(f"{path}: cannot write {k!r}: dtype {t.dtype} has no safetensors name")
    names = sorted(tensors, key=lambda k: (order.get(dtype_names[tensors[k].dtype], len(order)), k))
    entries: dict[str, dict] = {}
    data: list = []
    stamps: dict[str, tuple[int, int] | None] = {}
    off = 0
    for k in names:
        t = tensors[k]
        n = t.numel() * t.element_size()
        entries[k] = {"dtype": dtype_names[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
        if not n:
            continue
        src = _source_range(t, stamps)
        if src is not None:
            data.append(FileRange(*src))
        else:
            if t.device.type != "cpu":
                t = t.cpu()
            flat = t.detach().reshape(-1)
            if not flat.is_contiguous():
                flat = flat.contiguous()
            data.append(memoryview(flat.view(uint8).numpy()))
    return _Layout(names, entries, data)


def _header(layout: _Layout, metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length and the compact JSON header (``__metadata__`` first, then the tensors in
    data order), padded with spaces to a multiple of 8 bytes, as the safetensors serializer writes it."""
    entries: dict[str, object] = {}
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    entries.update(layout.entries)
    head = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head += b" " * ((8 - len(head) % 8) % 8)
    return len(head).to_bytes(8, "little") + head


def _write_layout(path: Path, head: bytes, layout: _Layout) -> str:
    """One pass of ``head`` and the layout's data into ``path`` (``direct_io.write_pieces``: O_DIRECT
    for large files, else through the page cache with kernel copies of file ranges); every byte
    written from memory goes through ``_write_all``. Returns the path taken."""
    from loradex.converters import direct_io

    return direct_io.write_pieces(path, [head, *layout.data], write=lambda fd, data: _write_all(fd, data),
                                  copy=lambda s, d, o, n: _copy_range(s, d, o, n))


def _serialize(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None) -> None:
    """Write a safetensors file exactly as the safetensors serializer lays it out (tensors by dtype,
    widest first, then by name; compact JSON header padded with spaces to 8 bytes), so hashes of
    the data section (AutoV3, kohya's sshs_model_hash) match other tools'. Tensors that ``load``
    read and nobody changed are copied file-to-file as raw byte ranges (a rename-only conversion
    decodes and re-encodes nothing); the others are written from memory, in the same pass."""
    layout = _layout(tensors, path)
    _write_layout(path, _header(layout, metadata), layout)


def save(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file atomically (see ``_serialize``; views and tensors sharing storage
    are fine: each is written as its own bytes). One write pass, one fsync, one rename."""
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    try:
        with atomic_path(path) as tmp:
            try:
                _serialize(tensors, tmp, meta or None)
            except (FormatError, OSError):
                raise
            except Exception as e:
                raise FormatError(f"{path}: cannot write: {e}") from None
    except OSError as e:  # the write, the fsync or the rename: the temporary file is gone already
        raise write_failure(e, path) from None


def write_text(text: str, path: str | os.PathLike) -> None:
    """Write a text file (configs, model cards) atomically."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as e:
        raise write_failure(e, path) from None


def read_json(path: str | os.PathLike) -> dict:
    """A JSON side file (``adapter_config.json``, ``model_index.json``...) that must be a JSON
    object, read as UTF-8; FormatError when it is missing, not a regular file, larger than
    ``MAX_JSON_BYTES`` (16 MiB), not valid JSON or not an object."""
    p = _regular_file(path)
    if p.stat().st_size > MAX_JSON_BYTES:
        raise FormatError(f"{p}: JSON file too large")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{p}: not valid JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{p}: JSON file is not an object")
    return obj


def data_section_hashes(path: str | os.PathLike, header: Header | None = None) -> tuple[str, str]:
    """kohya's ``sshs_model_hash`` (sha256 of everything after the header: the tensor bytes) and
    ``sshs_legacy_hash`` (first 8 hex chars of the sha256 of file bytes 0x100000..0x110000),
    streamed. kohya computes both on the file re-serialized with only its ``ss_*`` metadata."""
    import hashlib

    h = header or read_header(path)
    full = hashlib.sha256()
    with open(h.path, "rb") as f:
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
        f.seek(h.data_offset)
        while chunk := f.read(1 << 22):
            full.update(chunk)
    return full.hexdigest(), legacy


def structure_digest(path: str | os.PathLike, header: Header | None = None) -> str:
    """sha256 of a safetensors file's structure: every tensor's name, dtype and shape, and the bytes
    of its one-element tensors (alphas, scales), in name order. Two files with equal digests are
    read into the same adapter structure (kinds, ranks, alphas) by every reader whose result does
    not depend on tensor values; the registry memoizes descriptions by it. The scalars are read
    with one read when the data section is small, else one ``pread`` each."""
    import hashlib

    h = header or read_header(path)
    m = hashlib.sha256()
    scalars = [(k, t) for k, t in h.tensors.items() if t.nbytes and math.prod(t.shape) <= 1]
    data_size = h.path.stat().st_size - h.data_offset
    with open(h.path, "rb") as f:
        if scalars and data_size <= 8 << 20:
            f.seek(h.data_offset)
            data = f.read(data_size)

            def scalar(t: TensorInfo) -> bytes:
                return data[t.start : t.end]
        else:
            fd = f.fileno()

            def scalar(t: TensorInfo) -> bytes:
                return os.pread(fd, t.nbytes, h.data_offset + t.start)

        values = {k: scalar(t) for k, t in scalars}
    pieces = []  # hashed in one update: the same digest as one update per piece
    for k in sorted(h.tensors):
        t = h.tensors[k]
        pieces.append(f"{k}|{t.dtype}|{t.shape};".encode())
        if k in values:
            pieces.append(values[k])
    m.update(b"".join(pieces))
    return m.hexdigest()


def save_with_kohya_hashes(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str]
) -> dict[str, str]:
    """Write like ``save`` and add ``sshs_model_hash``/``sshs_legacy_hash`` computed as kohya does:
    on the file serialized with only the ``ss_*`` keys. The tensor bytes (and so the model hash,
    which equals Civitai's AutoV3) do not depend on the metadata. Both hashes are computed from the
    planned file before it is written (the data read once from memory or the sources' page cache),
    so the file is written once. Returns the final metadata."""
    import hashlib

    from loradex.converters import direct_io

    meta = {str(k): str(v) for k, v in metadata.items() if k not in ("sshs_model_hash", "sshs_legacy_hash")}
    ss_only = {k: v for k, v in meta.items() if k.startswith("ss_")}
    try:
        with atomic_path(path) as tmp:
            try:
                layout = _layout(tensors, Path(path))
                model = hashlib.sha256()
                for chunk in direct_io.chunks(layout.data):
                    model.update(chunk)
                # the legacy hash: bytes 0x100000..0x110000 of the ss_*-only file, header included
                window = direct_io.span([_header(layout, ss_only or None), *layout.data], 0x100000, 0x110000)
                meta["sshs_model_hash"] = model.hexdigest()
                meta["sshs_legacy_hash"] = hashlib.sha256(window).hexdigest()[:8]
                del layout, window
                _serialize(tensors, tmp, meta)  # the one write (it plans the same layout again: cheap)
            except (FormatError, OSError):
                raise
            except Exception as e:
                raise FormatError(f"{path}: cannot write: {e}") from None
    except OSError as e:
        raise write_failure(e, path) from None
    return meta


@lru_cache(maxsize=1)
def _serializer_dtype_order() -> dict[str, int]:
    """dtype -> position in the data section the installed safetensors serializer writes (it sorts
    tensors by dtype, widest first, then by name). Found by serializing one element of each dtype:
    exact for whatever version is installed, no table to keep in sync."""
    from safetensors.torch import save as st_save

    sample = {f"t{i}": torch.zeros(1, dtype=dt) for i, (dt, _) in enumerate(DTYPES.values())}
    raw = st_save(sample)
    n = int.from_bytes(raw[:8], "little")
    hdr = json.loads(raw[8 : 8 + n])
    order = sorted((v["data_offsets"][0], v["dtype"]) for k, v in hdr.items() if k != "__metadata__")
    return {dt: i for i, (_, dt) in enumerate(order)}


def _max_compact_header(h: Header, meta: Mapping[str, str], data_size: int | None = None) -> int:
    """An upper bound of the length prefix + padded compact JSON header kohya's re-serialization
    writes (only ``meta`` as metadata), computed without building it: JSON-escaped strings are
    at most 6 bytes per character (\\uXXXX), numbers at most as many digits as the data size
    (``data_size``: the file's, found when not given)."""
    if data_size is None:
        data_size = h.path.stat().st_size - h.data_offset
    digits = len(str(max(1, data_size)))
    total = 64 + sum(6 * (len(k) + len(v)) + 6 for k, v in meta.items())
    infos = h.tensors.values()
    dims = list(itertools.chain.from_iterable(map(operator.itemgetter(1), infos)))
    # per tensor: 6 * len(name) + 60 + len(dtype) + 2 * digits + (len(str(d)) + 1) per dimension
    total += (6 * sum(map(len, h.tensors)) + len(infos) * (60 + 2 * digits)
              + sum(map(len, map(operator.itemgetter(0), infos))) + len("".join(map(str, dims))) + len(dims))
    return 8 + total + 8


def kohya_hashes(path: str | os.PathLike, header: Header | None = None, data_sha256: str | None = None) -> dict[str, str]:
    """kohya's ``sshs_model_hash`` and ``sshs_legacy_hash`` of a safetensors file, computed as
    kohya's ``precalculate_safetensors_hashes`` does (the tensors re-serialized by safetensors with
    only the ``ss_*`` metadata) but from the header and the file's bytes, without loading a tensor.

    The model hash is the sha256 of the re-serialized tensor bytes: the file's own data section
    when it is already in the serializer's order (pass its sha256 as ``data_sha256`` to skip the
    re-read), else the tensors' bytes streamed in that order. The legacy hash is the sha256 of
    bytes 0x100000..0x110000 of the re-serialized buffer: its header is rebuilt here byte for byte
    (compact JSON, ``__metadata__`` first, tensors in the serializer's order, space-padded to 8
    bytes) and the window gathered from the original file's tensors laid out in that order.
    ``ss_*`` keys are written sorted; safetensors does not fix their order, which only matters if
    the header itself reaches 1 MiB. A file in the serializer's order whose re-serialized buffer
    ends before 0x100000 (most LoRAs: the window is empty) is answered from the header alone.
    """
    import hashlib

    h = header or read_header(path)
    tensors = h.tensors
    order = _serializer_dtype_order()
    if len(set(map(operator.itemgetter(0), tensors.values()))) <= 1:  # one dtype: by name
        names = sorted(tensors)
    else:
        names = sorted(tensors, key=lambda k: (order.get(tensors[k].dtype, len(order)), k))
    meta = {k: h.metadata[k] for k in sorted(h.metadata) if k.startswith("ss_")}
    infos = list(map(tensors.__getitem__, names))
    data_size = h.path.stat().st_size - h.data_offset
    # in the serializer's order when each tensor starts where the one before ends, the first at 0
    # and the last ending the data section (the re-serialized data section is then this one)
    starts = list(map(operator.itemgetter(2), infos))
    ends = list(map(operator.itemgetter(3), infos))
    canonical = starts[0] == 0 and starts[1:] == ends[:-1] and ends[-1] == data_size if infos else data_size == 0
    lo, hi = 0x100000, 0x110000
    if canonical and data_sha256 and data_size + _max_compact_header(h, meta, data_size) <= lo:
        # the re-serialized buffer ends before the legacy window: it hashes zero bytes
        return {"sshs_model_hash": data_sha256, "sshs_legacy_hash": hashlib.sha256(b"").hexdigest()[:8]}
    entries: dict[str, object] = {"__metadata__": meta}
    layout = []  # (name, start in the re-serialized data section, end)
    off = 0
    for k, t in zip(names, infos):
        entries[k] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        layout.append((k, off, off + t.nbytes))
        off += t.nbytes
    head = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head += b" " * ((8 - len(head) % 8) % 8)
    prefix = len(head).to_bytes(8, "little") + head
    window = bytearray(prefix[lo:hi])
    d_lo, d_hi = max(0, lo - len(prefix)), max(0, hi - len(prefix))  # the window in data coordinates
    with open(h.path, "rb") as f:
        for k, s, e in layout:
            a, b = max(s, d_lo), min(e, d_hi)
            if a < b:
                f.seek(h.data_offset + h.tensors[k].start + (a - s))
                window += f.read(b - a)
        if canonical and data_sha256:
            model_hash = data_sha256
        else:
            model = hashlib.sha256()
            for k, _s, _e in layout:
                t = h.tensors[k]
                f.seek(h.data_offset + t.start)
                left = t.nbytes
                while left > 0 and (chunk := f.read(min(left, 1 << 22))):
                    model.update(chunk)
                    left -= len(chunk)
            model_hash = model.hexdigest()
    return {"sshs_model_hash": model_hash, "sshs_legacy_hash": hashlib.sha256(bytes(window)).hexdigest()[:8]}


def canonicalize_header(path: str | os.PathLike) -> None:
    """Rewrite a safetensors file's header deterministically (``__metadata__`` keys sorted, tensors
    in data order, compact JSON, space padding) and keep its data section byte for byte.

    The Rust serializer writes metadata in hash-map order, so two writes of the same tensors and
    metadata can differ in their header bytes; after this they do not (used where a file must be
    reproducible, e.g. ``push --dry-run`` showing exactly what a push uploads)."""
    h = read_header(path)
    entries: dict[str, object] = {}
    if h.metadata:
        entries["__metadata__"] = {k: h.metadata[k] for k in sorted(h.metadata)}
    for k, t in sorted(h.tensors.items(), key=lambda kv: (kv[1].start, kv[0])):
        entries[k] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.start, t.end]}
    head = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head += b" " * ((8 - len(head) % 8) % 8)
    with atomic_path(h.path) as tmp, open(h.path, "rb") as src, open(tmp, "wb") as out:
        out.write(len(head).to_bytes(8, "little") + head)
        src.seek(h.data_offset)
        while chunk := src.read(1 << 22):
            out.write(chunk)


def tensor_bytes(header: Header, keys: list[str]) -> dict[str, bytes]:
    """The stored (little-endian) bytes of the tensors ``keys`` of a file whose ``header`` was
    validated, without torch: what describing a file reads of its data (``converters.described``:
    one-element tensors, and the bytes a NaN/Inf check scans). FormatError when the file was cut
    short since its header was read."""
    out: dict[str, bytes] = {}
    with open(header.path, "rb") as f:
        for k in keys:
            info = header.tensors[k]
            f.seek(header.data_offset + info.start)
            data = f.read(info.nbytes)
            if len(data) != info.nbytes:
                raise FormatError(f"{header.path}: tensor {k!r} is cut short (the file changed while it was read)")
            out[k] = data
    return out
