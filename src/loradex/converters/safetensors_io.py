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

import json
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from loradex.errors import FormatError, UnsafeFileError

#: Largest header we accept. Real headers are a few hundred KiB even for FLUX checkpoints.
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Largest JSON side file (adapter_config.json, model_index.json...).
MAX_JSON_BYTES = 16 * 1024 * 1024

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
for _name, _attr, _size in (("U16", "uint16", 2), ("U32", "uint32", 4), ("U64", "uint64", 8)):
    if hasattr(torch, _attr):
        DTYPES[_name] = (getattr(torch, _attr), _size)


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    path: Path
    header_len: int
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]

    @property
    def data_offset(self) -> int:
        return 8 + self.header_len

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.tensors.items()}


def _regular_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p}: no such file")
    if p.is_dir():
        raise FormatError(f"{p}: is a directory, not a weights file")
    if not p.is_file():
        raise FormatError(f"{p}: not a regular file")
    return p


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate the header of a safetensors file. Raises FormatError.

    Cached per (path, size, mtime): detection and reading both ask for it."""
    p = _regular_file(path)
    st = p.stat()
    return _read_header(p.resolve(), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _read_header(p: Path, size: int, _mtime_ns: int) -> Header:
    if size < 8:
        raise FormatError(f"{p}: not a safetensors file ({size} bytes, too short for a header)")
    with open(p, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise FormatError(f"{p}: not a safetensors file (header length {n} does not fit the {size}-byte file)")
        raw = f.read(n)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{p}: safetensors header is not valid JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{p}: safetensors header is not a JSON object")
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise FormatError(f"{p}: safetensors __metadata__ must map strings to strings")
    data_size = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, info in obj.items():
        if not isinstance(info, dict):
            raise FormatError(f"{p}: tensor {name!r}: header entry is not an object")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPES:
            raise FormatError(f"{p}: tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise FormatError(f"{p}: tensor {name!r}: bad shape {shape!r}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            or not 0 <= offs[0] <= offs[1] <= data_size
        ):
            raise FormatError(f"{p}: tensor {name!r}: data offsets {offs!r} outside the {data_size}-byte data section")
        expected = math.prod(shape) * DTYPES[dtype][1]
        if offs[1] - offs[0] != expected:
            raise FormatError(f"{p}: tensor {name!r}: {offs[1] - offs[0]} bytes for shape {shape} {dtype} (needs {expected})")
        tensors[name] = TensorInfo(dtype, tuple(shape), offs[0], offs[1])
    spans = sorted((t.start, t.end, k) for k, t in tensors.items() if t.end > t.start)
    for (_s0, e0, k0), (s1, _e1, k1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise FormatError(f"{p}: tensors {k0!r} and {k1!r} overlap in the data section")
    return Header(p, n, dict(meta), tensors)


def is_safetensors(path: str | os.PathLike) -> bool:
    try:
        read_header(path)
        return True
    except FormatError:
        return False


def load(path: str | os.PathLike, keys: list[str] | None = None, header: Header | None = None) -> dict[str, torch.Tensor]:
    """Load tensors (all, or ``keys``) from a validated safetensors file, memory-mapped."""
    from safetensors import safe_open

    h = header or read_header(path)
    wanted = list(h.tensors) if keys is None else keys
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(h.path), framework="pt", device="cpu") as f:
            for k in wanted:
                out[k] = f.get_tensor(k)
    except Exception as e:  # safetensors' own checks (e.g. a file changed underneath)
        raise FormatError(f"{h.path}: cannot read tensors: {e}") from None
    return out


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it over ``path``."""
    dst = Path(path)
    if dst.is_dir():
        raise FormatError(f"{dst}: is a directory; give a file name")
    parent = dst.parent if str(dst.parent) else Path(".")
    if not parent.is_dir():
        raise FormatError(f"{parent}: output folder does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=suffix + ".tmp", dir=parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dst)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors that share no storage (safetensors refuses shared storage, and views are
    common here: the parts of a split FLUX qkv share their ``down`` and slice one ``up``)."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        key = v.untyped_storage().data_ptr() if v.numel() else -1
        if key in seen or not v.is_contiguous():
            v = v.contiguous() if key not in seen else v.clone(memory_format=torch.contiguous_format)
        if v.numel():
            seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def save(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file atomically. Tensors are made contiguous only when they are not."""
    from safetensors.torch import save_file

    try:  # e.g. a sparse tensor: is_contiguous() raises
        data = _unshared(tensors)
    except Exception as e:
        raise FormatError(f"{path}: cannot write: {e}") from None
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        try:
            save_file(data, str(tmp), metadata=meta or None)
        except Exception as e:
            raise FormatError(f"{path}: cannot write: {e}") from None


def write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: str | os.PathLike) -> dict:
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


PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")


def looks_like_pickle(path: str | os.PathLike) -> bool:
    """True for raw pickles (protocol 2+) and torch's zip container."""
    p = _regular_file(path)
    with open(p, "rb") as f:
        head = f.read(4)
    return head[:1] == b"\x80" or head == b"PK\x03\x04"


def _unpickling_reason(message: str) -> str:
    """The specific reason in torch's weights_only error, without its advice to retry unsafely."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", message)
    for marker in ("WeightsUnpickler error:", "Trying to load unsupported"):
        if marker in text:
            tail = text.split(marker, 1)[1] if marker.endswith(":") else marker + text.split(marker, 1)[1]
            reason = tail.strip().split("\n\n", 1)[0].strip()
            reason = reason.split(". Please use", 1)[0]  # drop the allowlisting advice
            if reason:
                return " ".join(reason.split())[:200]
    return "it holds objects other than tensors and plain containers"


def load_pickle(path: str | os.PathLike, max_bytes: int | None = None):
    """``torch.load(weights_only=True)``: tensors and plain containers only; nothing executes.

    ``max_bytes`` bounds both the file and, for torch's zip container, the declared uncompressed
    size of its records: torch inflates deflated records, so a small crafted archive could
    otherwise expand to gigabytes in memory."""
    import pickle
    import zipfile

    p = _regular_file(path)
    if max_bytes is not None:
        size = p.stat().st_size
        if size > max_bytes:
            raise FormatError(f"{p}: {size} bytes, more than the {max_bytes} accepted for this kind of file")
        if zipfile.is_zipfile(p):
            try:
                with zipfile.ZipFile(p) as z:
                    total = sum(i.file_size for i in z.infolist())
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
                raise FormatError(f"{p}: not a readable PyTorch file ({type(e).__name__})") from None
            if total > max_bytes:
                raise FormatError(f"{p}: archive expands to {total} bytes, more than the {max_bytes} accepted")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(f"{p}: refused to unpickle (weights_only): {_unpickling_reason(str(e))}") from None
    except Exception as e:  # truncated/corrupt archives, random bytes
        raise FormatError(f"{p}: not a readable PyTorch file ({type(e).__name__})") from None


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


def save_with_kohya_hashes(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str]
) -> dict[str, str]:
    """Write like ``save`` and add ``sshs_model_hash``/``sshs_legacy_hash`` computed as kohya does:
    on the file serialized with only the ``ss_*`` keys. The tensor bytes (and so the model hash,
    which equals Civitai's AutoV3) do not depend on the metadata. Returns the final metadata."""
    from safetensors.torch import save_file

    data = _unshared(tensors)
    meta = {str(k): str(v) for k, v in metadata.items() if k not in ("sshs_model_hash", "sshs_legacy_hash")}
    ss_only = {k: v for k, v in meta.items() if k.startswith("ss_")}
    with atomic_path(path) as tmp:
        try:
            save_file(data, str(tmp), metadata=ss_only or None)
            model_hash, legacy = data_section_hashes(tmp)
            meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hash, legacy
            save_file(data, str(tmp), metadata=meta)
        except FormatError:
            raise
        except Exception as e:
            raise FormatError(f"{path}: cannot write: {e}") from None
    return meta
