"""Sketches of a folder import: new files sketched on the import's main thread a few dozen at a
time once their blobs are in place (from the header the import parsed and, for small files, the
bytes it already holds: nothing is read or parsed twice), while the worker threads go on hashing;
files of one planned structure in one batch of products. The rows are stored with each batch of
catalogue rows, in one transaction. The registry's hooks (``Ingestor.sketch_files`` /
``Ingestor.store_sketches``) call these; neither ever raises.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

from loradex.registry import sketches
from loradex.registry.sketch_plans import one_torch_thread, plan_of, planned_sketches, raw_from_header

log = logging.getLogger(__name__)

#: files of one planned structure sketched in one batch, up to this many bytes of them
_BATCH_BYTES = 64 << 20


class _BlobAt:
    """What ``compute_sketch`` asks of a registry, for a file whose row is not written yet: its
    blob's path and the registry's archs."""

    def __init__(self, reg, path: Path, archs: dict | None = None) -> None:
        self._reg, self._path = reg, path
        self._archs = {} if archs is None else archs  # shared by one batch's files: looked up once

    def path(self, v) -> Path:
        """The staged file's blob."""
        return self._path

    def arch(self, name: str):
        """The registry's arch of that name (looked up once per batch when it is found)."""
        got = self._archs.get(name)
        if got is None:
            got = self._archs[name] = self._reg.arch(name)
        return got

    def load(self, v, arch=None):
        """Not for a staged file: only safetensors blobs are sketched before their row."""
        raise LookupError("not stored yet")


def sketch_staged(reg, items: list[tuple[Path, dict, dict]]) -> list[tuple | None]:
    """``(sketch, status)`` of each staged single safetensors file ``(blob path, record, extra)``
    (``extra``: its parsed ``header`` and maybe its bytes ``data``), or None to leave it to
    :func:`store_sketches` after its row (pickles; anything unexpected, logged). Files of a
    planned structure are sketched together (``sketch_plans.planned_sketches``); the others one by
    one through the reader (which plans a structure met again)."""
    out: list[tuple | None] = [None] * len(items)
    with one_torch_thread():
        groups: dict[tuple, list[tuple[int, object]]] = {}
        archs: dict = {}
        for i, (path, record, extra) in enumerate(items):
            if extra.get("header") is None:
                continue
            v = SimpleNamespace(layout="file", format=record.get("format"), arch=record.get("arch"),
                                artifact=record.get("artifact"), ref=record.get("filename"))
            raw = raw_from_header(extra["header"], extra.get("data"))
            raw.path, raw.digest = Path(path), extra.get("digest")
            at = _BlobAt(reg, raw.path, archs)
            try:
                found = plan_of(at, v, raw) if v.artifact == "adapter" else None
                if found is not None:
                    groups.setdefault((found[0], found[2]), []).append((i, raw, found[1]))
                else:
                    out[i] = sketches.compute_sketch(at, v, raw=raw)
            except Exception as e:  # noqa: BLE001 - computed again after the row, which records why
                log.debug("%s: sketch left for after its row (%s: %s)", path, type(e).__name__, e)
        for (_digest, family), members in groups.items():
            plan = members[0][2]
            done = 0
            while done < len(members):  # bounded batches: the factors are converted to float32 together
                part, size = [], 0
                while done < len(members) and (not part or size < _BATCH_BYTES):
                    part.append(members[done])
                    size += items[members[done][0]][1].get("size", 0)
                    done += 1
                try:
                    made = planned_sketches(plan, family, [raw for _i, raw, _p in part])
                except Exception as e:  # noqa: BLE001
                    log.debug("batched sketch failed (%s: %s); left for after the rows", type(e).__name__, e)
                    continue
                for (i, _raw, _p), s in zip(part, made):
                    out[i] = (s, "ok") if s is not None else None
    return out


def store_sketches(reg, versions: list, made: list) -> None:
    """Store the sketch rows of newly recorded ``versions`` in one transaction: ``made[i]`` is
    what :func:`sketch_staged` returned for ``versions[i]`` (None: compute it now, or reuse the row
    of a version with the same bytes). Never raises (a version it cannot sketch is logged and
    left to ``loradex reindex``)."""
    try:
        conn = sketches.connection(reg)
        rows = []
        for v, got in zip(versions, made):
            if got is None:
                same = sketches._same_bytes_row(conn, v)
                if same is not None:
                    rows.append({**same, "version_id": v.id, "name": v.name, "number": v.number,
                                 "created": sketches._now()})
                    continue
                got = sketches._safe_compute(reg, v)
            rows.append(sketches._row(v, *got))
        sketches._insert(conn, rows)
    except Exception as e:  # noqa: BLE001 - a sketch is an index, never a reason to fail an add
        log.warning("no similarity sketch for %d versions (%s); `loradex reindex` retries", len(versions), e)
