"""Pickles (``.pt``/``.ckpt``/``.bin``), read only with ``torch.load(weights_only=True)``: the
magic-byte test, bounded loading (a crafted zip container cannot inflate to gigabytes), and
pickled *adapters* seen through the same ``Header`` view as a safetensors file, so the adapter
readers take both. Split from ``safetensors_io`` (which still answers to these names)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loradex.converters import described
from loradex.converters.safetensors_io import (
    _DTYPE_NAMES,
    Header,
    TensorInfo,
    _regular_file,
    _stat_regular,
    load,
    read_header,
)
from loradex.errors import FormatError, UnsafeFileError

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)

PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")


def looks_like_pickle(path: str | os.PathLike) -> bool:
    """True for raw pickles (``PROTO`` opcode 0x80 and a protocol 2-5) and torch's zip container.

    A safetensors file whose 8-byte little-endian header length ends in 0x80 starts with the same
    byte: it is recognised by its JSON header (``{`` at offset 8, a length that fits the file)."""
    p = _regular_file(path)
    with open(p, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return True
    if head[:1] != b"\x80" or head[1:2] not in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return False
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= p.stat().st_size - 8:
        return False  # a safetensors header
    return True


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


# ---- pickled adapters: the same Header view as a safetensors file ------------------------------
#: Largest pickled *adapter* (LoRA/LyCORIS/diffusers ``.pt``/``.ckpt``/``.bin``) the readers open.
#: Old kohya SD1 LoRAs are 9-150 MB; an SDXL rank-128 LoRA is under 1 GB. Bigger pickles are
#: full models (``checkpoint.py`` treats pickles from 50 MiB up as checkpoints and never opens them).
MAX_ADAPTER_PICKLE_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class PickledTensors:
    """A pickle read as a flat dict of tensors: ``header`` describes its top-level tensor entries
    exactly as a safetensors :class:`Header` would (dtype name, shape; offsets are 0 and the byte
    count, a pickle has no data section), ``tensors`` holds them, and ``other`` names every
    top-level entry that is not a tensor of a known dtype (key -> what it is), so a reader can
    report it rather than drop it."""

    header: Header
    tensors: dict[str, torch.Tensor]
    other: dict[str, str]


def _pickle_stamp(path: str | os.PathLike) -> tuple[Path, int, int]:
    p, st = _stat_regular(Path(path))
    return Path(os.path.abspath(p)), st.st_size, st.st_mtime_ns


#: (path, size, mtime) -> the last pickles read for detection: ``load_tensors`` takes its entry out
#: (so the tensors an Adapter holds are never handed to a second caller), two entries at most.
_PICKLE_CACHE: dict[tuple[Path, int, int], PickledTensors] = {}


def _load_pickle_mmap(p: Path, max_bytes: int):
    """:func:`load_pickle`, memory-mapping the storages of torch's zip container (``mmap=True``):
    telling a 1 GB pickled LoRA from other pickles then costs its key table, not its bytes. The
    same refusals as ``load_pickle`` (size bound, weights_only); legacy (non-zip) pickles, which
    cannot be mapped, go through ``load_pickle`` itself."""
    import pickle
    import zipfile

    if not zipfile.is_zipfile(p):
        return load_pickle(p, max_bytes=max_bytes)
    size = p.stat().st_size
    if size > max_bytes:
        raise FormatError(f"{p}: {size} bytes, more than the {max_bytes} accepted for this kind of file")
    try:
        with zipfile.ZipFile(p) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise FormatError(f"{p}: not a readable PyTorch file ({type(e).__name__})") from None
    if sum(i.file_size for i in infos) > max_bytes or any(i.compress_type != zipfile.ZIP_STORED for i in infos):
        return load_pickle(p, max_bytes=max_bytes)  # compressed records cannot be mapped
    try:
        return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(f"{p}: refused to unpickle (weights_only): {_unpickling_reason(str(e))}") from None
    except Exception as e:  # truncated/corrupt archives
        raise FormatError(f"{p}: not a readable PyTorch file ({type(e).__name__})") from None


def _read_pickled(p: Path, size: int, max_bytes: int) -> PickledTensors:
    obj = _load_pickle_mmap(p, max_bytes)
    if not isinstance(obj, dict):
        raise FormatError(f"{p}: a pickled {type(obj).__name__}, not a dict of tensors")
    tensors: dict[str, torch.Tensor] = {}
    infos: dict[str, TensorInfo] = {}
    other: dict[str, str] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            other[repr(k)] = "a key that is not a string"
            continue
        if isinstance(v, torch.Tensor) and v.dtype in _DTYPE_NAMES:
            t = v.detach()
            tensors[k] = t
            infos[k] = TensorInfo(_DTYPE_NAMES[t.dtype], tuple(t.shape), 0, t.numel() * t.element_size())
        elif isinstance(v, torch.Tensor):
            other[k] = f"a tensor of dtype {v.dtype}, which safetensors has no name for"
        else:
            other[k] = f"a pickled {type(v).__name__}, not a tensor"
    return PickledTensors(Header(p, 0, {}, infos), tensors, other)


def read_pickled_tensors(path: str | os.PathLike, max_bytes: int = MAX_ADAPTER_PICKLE_BYTES) -> PickledTensors:
    """Open a pickle (``.pt``/``.ckpt``/``.bin``) with ``torch.load(weights_only=True)`` (see
    :func:`load_pickle`: nothing in it runs; a pickle needing code is UnsafeFileError) and describe
    its top-level tensors like a safetensors header. kohya sd-scripts (``torch.save(state_dict)``
    for ``--save_model_as pt/ckpt``), LyCORIS and diffusers' ``pytorch_lora_weights.bin``
    (``save_lora_weights(safe_serialization=False)``) all write a flat ``{key: tensor}`` dict.

    Detection and reading both ask for it and a pickle, unlike a safetensors header, can only be
    read whole: the result is kept (two files at most) until :func:`load_tensors` takes it."""
    key = _pickle_stamp(path)
    hit = _PICKLE_CACHE.get(key)
    if hit is None:
        hit = _read_pickled(key[0], key[1], max_bytes)
        while len(_PICKLE_CACHE) >= 2:
            _PICKLE_CACHE.pop(next(iter(_PICKLE_CACHE)))
        _PICKLE_CACHE[key] = hit
    return hit


def read_tensor_header(path: str | os.PathLike) -> Header:
    """:func:`read_header` for a safetensors file, the :class:`PickledTensors` header of a pickle:
    the one entry point of the adapter readers, so every format is read from either container."""
    if looks_like_pickle(path):
        return read_pickled_tensors(path).header
    return read_header(path)


def load_tensors(path: str | os.PathLike, header: Header | None = None) -> dict[str, torch.Tensor]:
    """:func:`load` for a safetensors file; the tensors of a pickle (a new dict, same tensors).
    Inside ``described.described()`` a safetensors file's tensors come as descriptions (no torch)."""
    if looks_like_pickle(path):
        out = dict(read_pickled_tensors(path).tensors)
        _PICKLE_CACHE.pop(_pickle_stamp(path), None)
        return out
    if described.active():
        return described.load_specs(header or read_header(path))
    return load(path, header=header)


def pickled_extras(path: str | os.PathLike) -> dict[str, str]:
    """The top-level entries of a pickle that are not tensors (key -> what they are); ``{}`` for a
    safetensors file. Readers list them in ``Adapter.unexplained``."""
    if looks_like_pickle(path):
        return dict(read_pickled_tensors(path).other)
    return {}


def nonfinite_keys(path: str | os.PathLike) -> list[str]:
    """The floating-point tensors of a safetensors file (or a pickle of tensors) holding NaN or
    Inf, by key, sorted: what ``add`` refuses unless told otherwise. Memory-mapped, tensor by
    tensor; only floating-point dtypes are checked."""
    p = Path(path)
    if looks_like_pickle(p):
        obj = load_pickle(p)
        flat: dict[str, torch.Tensor] = {}

        def walk(x, prefix: str) -> None:
            if isinstance(x, torch.Tensor):
                flat[prefix] = x
            elif isinstance(x, dict):
                for k, v in x.items():
                    walk(v, f"{prefix}.{k}" if prefix else str(k))

        walk(obj, "")
        items = flat.items()
    else:
        h = read_header(p)
        names = [k for k, t in h.tensors.items() if t.dtype in ("F16", "BF16", "F32", "F64") and t.nbytes]
        items = load(p, keys=names, header=h).items() if names else ()
    return sorted(k for k, t in items if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()))
