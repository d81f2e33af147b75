"""Writing a safetensors file as a stream of tensors, never holding more than one: raw byte ranges
copied file-to-file where a tensor is unchanged, producers called one at a time where it is not.
Used by ``CheckpointReader.rewrite`` (bake, checkpoints) and the extract benchmark."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from loradex.converters import safetensors_io as sio
from loradex.errors import FormatError

#: the safetensors dtypes ``rewrite(dtype=...)`` casts (integer tensors keep theirs)
FLOAT_NAMES = frozenset({"F64", "F32", "F16", "BF16"})


def dtype_name(dt: torch.dtype) -> str:
    """The safetensors name (``F16``...) of a torch dtype; FormatError when it has none."""
    for name, (d, _) in sio.DTYPES.items():
        if d == dt:
            return name
    raise FormatError(f"dtype {dt} has no safetensors name")


def casting(produce: Callable[[], torch.Tensor], dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """``produce`` whose tensor is cast to ``dtype`` when its turn comes."""
    return lambda: produce().to(dtype)


def cast_copy(src: Path, dst: Path, want: str) -> None:
    """``src`` rewritten to ``dst`` with every floating tensor cast to the safetensors dtype ``want``,
    one tensor at a time, integer tensors and metadata as they are."""
    h = sio.read_header(src)
    entries = []
    for key, info in h.tensors.items():
        if info.dtype in FLOAT_NAMES and info.dtype != want:
            entries.append((key, want, tuple(info.shape),
                            (lambda key=key: sio.load(src, keys=[key], header=h)[key].to(sio.DTYPES[want][0]))))
        else:
            entries.append((key, info.dtype, tuple(info.shape), (src, h.data_offset + info.start, info.nbytes)))
    stream_safetensors(dst, entries, dict(h.metadata) or None)


def stream_safetensors(
    dst: str | os.PathLike,
    entries: list[tuple[str, str, tuple[int, ...], object]],
    metadata: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write a safetensors file from ``(key, dtype, shape, source)`` entries without holding more
    than one tensor: ``source`` is ``(file, offset, nbytes)`` (copied file-to-file) or a callable
    returning the tensor when its turn comes. The layout is the safetensors serializer's (dtype,
    widest first, then name; compact header padded to 8 bytes), as ``safetensors_io.save`` writes
    it, so the data-section hashes match other tools'. Atomic (``safetensors_io.atomic_path``)."""
    import json

    order = sio._serializer_dtype_order()
    names = sorted(range(len(entries)), key=lambda i: (order.get(entries[i][1], len(order)), entries[i][0]))
    head: dict[str, object] = {}
    if metadata:
        head["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for i in names:
        key, dtype, shape, _ = entries[i]
        if dtype not in sio.DTYPES:
            raise FormatError(f"{dst}: {key}: unknown dtype {dtype}")
        n = sio.DTYPES[dtype][1]
        for s in shape:
            n *= s
        head[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * ((8 - len(raw) % 8) % 8)
    with sio.atomic_path(dst) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | os.O_CREAT, 0o644)
        sources: dict[str, int] = {}
        try:
            sio._write_all(fd, len(raw).to_bytes(8, "little") + raw)
            for i in names:
                key, dtype, shape, src = entries[i]
                if isinstance(src, tuple):
                    path, offset, nbytes = src
                    if str(path) not in sources:
                        sources[str(path)] = os.open(path, os.O_RDONLY)
                    sio._copy_range(sources[str(path)], fd, offset, nbytes)
                else:
                    t = src()
                    if tuple(t.shape) != tuple(shape) or dtype_name(t.dtype) != dtype:
                        raise FormatError(f"{dst}: {key}: produced {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")
                    flat = t.detach().reshape(-1).contiguous()
                    if flat.numel():
                        sio._write_all(fd, flat.view(torch.uint8).numpy())
                    del t, flat
                if progress is not None:
                    progress(1)
        finally:
            os.close(fd)
            for sfd in sources.values():
                os.close(sfd)
