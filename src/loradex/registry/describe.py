"""What the catalogue records about stored bytes: format, arch, kinds, ranks, modules, embeddings,
metadata, notes, artifact kind and base model, read through ``loradex.api`` (the only parsing the
registry does) on a view of the stored bytes.

``describe_path(path, arch, cache)``: with a ``DescriptionCache`` (the ``Ingestor`` of each
registry owns one; nothing is cached at module level), files of one *structure* -- format, arch
asked for, tensor names/dtypes/shapes and scalar values (``structure_key``) -- are read through
the converters once; each still gets its own metadata from its own header. The structure digest
itself (``safetensors_io.structure_digest``) is memoized too, by the header's tensor table and
the bytes of its one-element tensors (all it depends on), taken from the bytes the import already
holds (``data``) when it has them.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import threading
from pathlib import Path

from loradex.errors import ArchError, FormatError, LoradexError

#: Formats whose reading depends only on the header (keys, dtypes, shapes, metadata) and the
#: scalar tensors (alphas): the same structure gives the same description.
STRUCTURAL_FORMATS = ("kohya", "lycoris", "diffusers", "comfy")


class DescriptionCache:
    """Descriptions by structure key (``structure_key``), bounded; import workers share it."""

    def __init__(self, limit: int = 256) -> None:
        self._items: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._limit = limit
        #: tensor table -> (spans of its one-element tensors, {their bytes: structure digest})
        self._digests: dict[tuple, tuple[tuple[tuple[int, int], ...], dict[bytes, str]]] = {}

    def get(self, key: str) -> dict | None:
        """The description stored under ``key``, or None. The dict is the cached one itself:
        copy it before changing it."""
        return self._items.get(key)

    def put(self, key: str, desc: dict) -> None:
        """Store ``desc`` under ``key``; at ``limit`` entries the oldest inserted goes first
        (first in, first out, not least recently used)."""
        with self._lock:
            if len(self._items) >= self._limit:
                self._items.pop(next(iter(self._items)))
            self._items[key] = desc

    def digest(self, header, data=None) -> str:
        """``safetensors_io.structure_digest`` of the file ``header`` was read from, computed once
        per tensor table and scalar values (what it depends on); ``data``: the file's bytes when
        the caller holds them (the scalars are sliced from them instead of read)."""
        from loradex.converters import safetensors_io as sio

        table = tuple(header.tensors.items())
        entry = self._digests.get(table)
        if entry is None:
            spans = tuple((t.start, t.end) for _k, t in sorted(header.tensors.items())
                          if t.nbytes and math.prod(t.shape) <= 1)
            entry = (spans, {})
            with self._lock:
                if len(self._digests) >= self._limit:
                    self._digests.pop(next(iter(self._digests)))
                self._digests[table] = entry
        spans, known = entry
        values = _scalar_bytes(header, spans, data)
        found = known.get(values)
        if found is None:
            found = sio.structure_digest(header.path, header)
            with self._lock:
                if len(known) >= self._limit:
                    known.clear()
                known[values] = found
        return found


def _scalar_bytes(header, spans: tuple[tuple[int, int], ...], data=None) -> bytes:
    """The bytes of the tensors at ``spans`` (data-section offsets) one after the other: sliced
    from ``data`` (the whole file) when given and long enough, else read from the file."""
    off = header.data_offset
    if not spans:
        return b""
    if data is not None and len(data) >= off + max(e for _s, e in spans):
        mv = memoryview(data)
        try:
            return b"".join([mv[off + s : off + e] for s, e in spans])
        finally:
            mv.release()
    fd = os.open(header.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return b"".join([os.pread(fd, e - s, off + s) for s, e in spans])
    finally:
        os.close(fd)


def describe_path(path: Path, arch=None, cache: DescriptionCache | None = None, data=None) -> dict:
    """What the catalogue records about an artifact, read through ``loradex.api`` (adapters and
    embeddings) or ``converters.checkpoint`` (full models: header / model_index.json only).
    ``cache`` memoizes descriptions by structure (see ``structure_key``); ``data``: the file's
    bytes when the caller holds them (the structure's scalars are taken from them)."""
    from loradex import converters
    from loradex.converters.checkpoint import describe_checkpoint

    try:
        conv = converters.detect(path)
    except FormatError:
        ck = describe_checkpoint(path)
        if ck is None:
            raise
        meta = ck["metadata"]
        notes = [f"base model unknown: {ck['arch_error']}"] if ck.get("arch_error") and arch is None else []
        return {"format": ck["format"], "arch": getattr(arch, "name", arch) or ck["arch"], "kinds": {}, "ranks": {},
                "modules": 0, "embeddings": [], "metadata": meta, "notes": notes, "artifact": "checkpoint",
                "base_model": _base_model(meta)}
    key, digest, header = _structure_key(path, conv.name, arch, cache, data) if cache is not None else (None, None, None)
    memo = cache.get(key) if key is not None else None
    if memo is not None:
        d = dict(memo)
        d["metadata"] = dict(header.metadata)
        d["base_model"] = _base_model(d["metadata"])
        d["_structure_digest"] = digest
        return d
    try:
        adapter, d = _load_structure(path, conv.name, arch)
    except ArchError as e:
        meta: dict = {}
        with contextlib.suppress(LoradexError, OSError):
            from loradex.converters import safetensors_io as sio

            if path.is_file() and sio.is_safetensors(path):
                meta = dict(sio.read_header(path).metadata)
        return {"format": conv.name, "arch": None, "kinds": {}, "ranks": {}, "modules": 0, "embeddings": [],
                "metadata": meta, "notes": [f"base model unknown: {e}"],
                "artifact": "embedding" if conv.name.endswith("-ti") else "adapter", "base_model": _base_model(meta)}
    artifact = "embedding" if not adapter.patches and adapter.embeddings else "adapter"
    notes = list(adapter.notes) + [f"key not understood (not read): {k} ({why})" for k, why in adapter.unexplained.items()]
    if len(notes) > 50:
        notes = notes[:49] + [f"... and {len(notes) - 49} more notes (loradex inspect lists every key)"]
    out = {"format": d["format"], "arch": d["arch"], "kinds": d["kinds"], "ranks": d["ranks"],
           "modules": d["modules"], "embeddings": list(d["embeddings"]), "metadata": dict(adapter.metadata),
           "notes": notes, "artifact": artifact, "base_model": _base_model(adapter.metadata)}
    if key is not None:
        cache.put(key, out)
        out = {**out, "_structure_digest": digest}
    return out


def structure_key(path: Path, fmt: str, arch) -> str | None:
    """sha256 of what a description depends on: the format, the ``arch`` asked for, every tensor's
    name, dtype and shape, and the bytes of the one-element tensors (alphas). None where the
    description may depend on more (embeddings, folders, pickles)."""
    return _structure_key(path, fmt, arch)[0]


def _structure_key(path: Path, fmt: str, arch, cache: DescriptionCache | None = None,
                   data=None) -> tuple[str | None, str | None, object]:
    """``(structure_key, safetensors_io.structure_digest, header)`` of the file (Nones where there
    is no key); the digest travels with the description (``_structure_digest``) so that the
    similarity sketch of the same bytes keys its plans by it without reading the file again.
    ``cache``: the digest is memoized there (``DescriptionCache.digest``)."""
    from loradex.converters import safetensors_io as sio

    if fmt not in STRUCTURAL_FORMATS or not path.is_file():
        return None, None, None
    h = sio.read_header(path)
    digest = cache.digest(h, data) if cache is not None else sio.structure_digest(path, h)
    m = hashlib.sha256(f"{fmt}|{getattr(arch, 'name', arch)}|{digest}|".encode())
    # the diffusers reader takes alphas from this metadata key
    m.update(h.metadata.get("lora_adapter_metadata", "").encode())
    return m.hexdigest(), digest, h


def _load_structure(path: Path, fmt: str, arch):
    """``(adapter, api.describe of it)`` read for its structure (kinds, ranks, alphas, modules)
    without its tensor data: converters read under ``safetensors_io.structure_only`` get meta
    tensors except for scalars. A reader or a description that needs real values on the way
    (e.g. an embedding check) falls back to a full read."""
    from loradex import api
    from loradex.converters import safetensors_io as sio

    try:
        with sio.structure_only():
            adapter = api.load(path, format=fmt, arch=arch)
        return adapter, api.describe(adapter)
    except LoradexError:
        raise
    except (NotImplementedError, RuntimeError, ValueError, TypeError):
        adapter = api.load(path, format=fmt, arch=arch)
        return adapter, api.describe(adapter)


def _base_model(meta: dict) -> str | None:
    for k in ("loradex.base_model", "ss_sd_model_name", "ss_base_model_version", "modelspec.architecture"):
        if meta.get(k):
            return str(meta[k])
    return None
