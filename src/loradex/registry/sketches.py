"""The catalogue's sketches: one row per stored version, for ``loradex similar`` (and the hook of
``search --similar-to``).

A sketch (``loradex.core.sketch``) is what a version's update looks like through fixed random
projections that depend only on (family, module shape, seed): per module the exact norm and a
``8 x 4`` unit sketch, plus a 256-number signature of the whole adapter. It is computed from the
factors (no dense update), stored compactly (int8 unit sketches, float32 norms, int64 module
keys: 44 bytes a module, ~10 KB for an SD1.5 LoRA of 232 modules, ~43 KB for an SDXL one of 986;
the signature in int8, 256 bytes) in tables of the registry's own SQLite database
(``registry.db``), and compared in two stages: the signatures of every stored version of the
family (one compact table, one pass, kept in memory while the catalogue is unchanged) pick the
``max(32, 3 * top)`` candidates, then the per-module estimator of ``core/sketch.py`` ranks them.

Tables (created here with ``CREATE TABLE IF NOT EXISTS``; no foreign key, so the registry's own
deletes never trip on them -- rows of removed versions are dropped by :func:`reindex`, by
:func:`forget` and by :func:`similar` when it meets one; a row is valid only while a version with
its id, name, number and sha256 exists)::

    sketches(version_id PK, name, number, sha256, arch, family, algo, status, modules, norm,
             skipped JSON, partial JSON, created, sig_scale, signature BLOB)  -- ~0.5 KB a row
    sketch_modules(version_id PK, keys BLOB, norms BLOB, units BLOB)    -- 44 bytes a module

``status`` is ``ok`` or ``none: <why>`` (a checkpoint, embeddings only, nothing sketchable): every
version has a row once indexed, so :func:`reindex` knows what it has seen. The per-module data
lives in its own table so that the candidate scan reads compact pages of signatures only (in one
table, a row of tens of KB pushes its signature onto an overflow page: one random page read per
version scanned).

Until the registry calls :func:`store_sketch` when it records a version (see the hooks in the
issue report), sketches are filled lazily: :func:`reindex` walks the public ``Registry`` API
(``list``, ``versions``) and sketches every version whose row is missing or stale (another
sha256, another ``ALGO``); ``loradex similar`` runs it first.

Speed: a structure (format, arch, tensor names/dtypes/shapes, scalars: the registry's own memo
key) seen once is *planned*: the reader's result is matched tensor by tensor to the file, and
later files of that structure are sketched straight from their bytes (plain LoRA modules) without
the reader, the way the registry memoizes descriptions. A structure whose reader transforms
values (fused rows, folded scales) is never planned and always goes through the reader.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loradex.core import sketch as sk
from loradex.errors import LoradexError, RegistryError
from loradex.registry.sketch_plans import arch_of, learn_plan, one_torch_thread, planned_sketch

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS sketches (
    version_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    number INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    arch TEXT,
    family TEXT,
    algo TEXT NOT NULL,
    status TEXT NOT NULL,
    modules INTEGER NOT NULL DEFAULT 0,
    norm REAL NOT NULL DEFAULT 0,
    skipped TEXT NOT NULL DEFAULT '{}',
    partial TEXT NOT NULL DEFAULT '{}',
    created TEXT NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0,
    sig_scale REAL,
    signature BLOB
);
CREATE TABLE IF NOT EXISTS sketch_modules (
    version_id INTEGER PRIMARY KEY,
    keys BLOB NOT NULL,
    norms BLOB NOT NULL,
    units BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS sketch_packs (
    family TEXT,
    algo TEXT NOT NULL,
    upto INTEGER NOT NULL,
    ids BLOB NOT NULL,
    scales BLOB NOT NULL,
    signatures BLOB NOT NULL,
    PRIMARY KEY (family, algo)
);
CREATE INDEX IF NOT EXISTS sketches_family ON sketches (family, algo, seq);
CREATE INDEX IF NOT EXISTS sketches_name ON sketches (name, number);
CREATE INDEX IF NOT EXISTS sketches_sha ON sketches (sha256);
CREATE INDEX IF NOT EXISTS sketches_seq ON sketches (seq);
"""

#: A family's signatures are re-packed when this many rows were added since its pack was made.
PACK_TAIL = 256

#: Candidates re-ranked by the per-module estimator: ``max(MIN_CANDIDATES, CANDIDATE_FACTOR * top)``.
MIN_CANDIDATES = 32
CANDIDATE_FACTOR = 3


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---- the connection -----------------------------------------------------------------------------
def connection(reg) -> sqlite3.Connection:
    """The registry's SQLite connection (``Registry.db.conn``, the sqlite-utils database the
    registry opened on ``registry.db``), with the tables ensured (one lookup in ``sqlite_master``
    when they exist; created statement by statement otherwise -- ``executescript`` would commit a
    transaction the registry has open). A registry object without it: ``registry.db`` in its
    ``home`` is opened here (kept on the object)."""
    conn = getattr(reg, "connection", None) or getattr(getattr(reg, "db", None), "conn", None)
    if conn is None:
        conn = getattr(reg, "_sketch_conn", None)
        if conn is None:
            conn = sqlite3.connect(str(Path(reg.home) / "registry.db"), timeout=60, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=60000")
            reg._sketch_conn = conn
    # the schema's last statement: when it exists, everything before it does
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'sketches_seq'").fetchone():
        return conn
    for stmt in SCHEMA.split(";"):
        if stmt.strip():
            conn.execute(stmt)
    return conn


@contextlib.contextmanager
def _write(conn: sqlite3.Connection):
    """One write transaction with the lock taken up front (as the registry's own writes); inside
    a transaction already open on the connection (a hook called from the registry's own write),
    the statements join it."""
    if conn.in_transaction:
        yield conn
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


# ---- computing one version's sketch --------------------------------------------------------------
def load_adapter(reg, v):
    """The ``Adapter`` of a stored version, read from its blob (a single safetensors file) or
    through ``Registry.load`` (folders, pickles)."""
    from loradex import api
    from loradex.converters import safetensors_io as sio

    arch = arch_of(reg, v)
    if v.layout == "file":
        path = reg.path(v)
        if sio.is_safetensors(path):
            return api.load(path, format=v.format, arch=arch)
    return reg.load(v, arch=arch)


def compute_sketch(reg, v, raw=None) -> tuple[sk.Sketch | None, str]:
    """``(sketch, "ok")`` for a stored version, or ``(None, "none: why")``. ``raw``: the file's
    ``sketch_plans._Raw`` when the caller has it (parsed header, maybe its bytes)."""
    if v.artifact == "checkpoint":
        return None, "none: a checkpoint (full model), not an adapter"
    if v.artifact != "adapter":
        return None, f"none: an {v.artifact}, not a weight adapter"
    fast = planned_sketch(reg, v, raw)
    if fast is not None:
        return fast, "ok"
    try:
        adapter = load_adapter(reg, v)
    except LoradexError as e:
        return None, f"none: cannot be read ({e})"
    if not adapter.patches:
        return None, "none: no patches (embeddings only)"
    s = sk.sketch_adapter(adapter, family=sk.family_of(arch_of(reg, v) or adapter.arch))
    learn_plan(reg, v, adapter, raw)
    if s.modules == 0:
        from collections import Counter

        why, n = Counter(s.skipped.values()).most_common(1)[0] if s.skipped else ("no patches", 0)
        rest = len(s.skipped) - n
        return None, f"none: no module could be sketched ({n} x {why}" + (f"; {rest} others" if rest else "") + ")"
    return s, "ok"


def _blob(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def pack_modules(s: sk.Sketch) -> dict[str, bytes]:
    """The per-module blobs: keys int64, norms float32 (1e-7 relative), unit sketches int8
    (``round(127 u)``; the entries of a unit vector are at most 1, so the rounding is < 0.004 an
    entry, a few thousandths on a module's cosine). 44 bytes a module."""
    return {"keys": _blob(s.keys.astype("<i8")), "norms": _blob(s.norms.astype("<f4")),
            "units": _blob(np.round(np.clip(s.units, -1.0, 1.0) * 127.0).astype(np.int8))}


def quantize(sig: np.ndarray) -> tuple[float, bytes]:
    """A signature as int8 (``round(127 v / max|v|)``) and its scale ``max|v| / 127``: 256 bytes a
    version, read and converted fast by the scan; the rounding (< 0.4% of the largest entry) is far
    below the signature's own noise (~0.06)."""
    m = float(np.abs(sig).max()) if sig.size else 0.0
    if m == 0.0:
        return 0.0, np.zeros(sig.shape, dtype=np.int8).tobytes()
    return m / 127.0, np.round(sig / m * 127.0).astype(np.int8).tobytes()


def _row(v, s: sk.Sketch | None, status: str) -> dict:
    row = {"version_id": v.id, "name": v.name, "number": v.number, "sha256": v.sha256, "arch": v.arch,
           "family": s.family if s is not None else None, "algo": sk.ALGO, "status": status,
           "modules": s.modules if s is not None else 0, "norm": s.total_norm if s is not None else 0.0,
           "skipped": json.dumps(s.skipped if s is not None else {}, sort_keys=True),
           "partial": json.dumps(s.partial if s is not None else {}, sort_keys=True),
           "created": _now(), "seq": 0, "sig_scale": None, "signature": None, "keys": None, "norms": None,
           "units": None}
    if s is not None:
        scale, sig = quantize(s.signature())
        row.update(sig_scale=scale, signature=sig, **pack_modules(s))
    return row


_MAIN = ("version_id", "name", "number", "sha256", "arch", "family", "algo", "status", "modules", "norm",
         "skipped", "partial", "created", "seq", "sig_scale", "signature")
_MODS = ("keys", "norms", "units")
_COLS = (*_MAIN, *_MODS)
_INSERT = f"INSERT OR REPLACE INTO sketches ({', '.join(_MAIN)}) VALUES ({', '.join('?' * len(_MAIN))})"
_INSERT_MODS = "INSERT OR REPLACE INTO sketch_modules (version_id, keys, norms, units) VALUES (?, ?, ?, ?)"
_SELECT = (f"SELECT {', '.join('s.' + c for c in _MAIN)}, m.keys, m.norms, m.units FROM sketches s "
           "LEFT JOIN sketch_modules m ON m.version_id = s.version_id")


def _insert(conn: sqlite3.Connection, rows: list[dict]) -> None:
    """Insert or replace rows (each gets the next ``seq``); a replaced row makes its family's pack
    stale (dropped: the next scan re-packs)."""
    if rows:
        with _write(conn):
            ids = [r["version_id"] for r in rows]
            old = {f for f, in conn.execute(
                f"SELECT DISTINCT family FROM sketches WHERE version_id IN ({','.join('?' * len(ids))})", ids)}
            _drop_packs(conn, old)
            seq = (conn.execute("SELECT max(seq) FROM sketches").fetchone()[0] or 0) + 1
            rows = [{**r, "seq": seq + i} for i, r in enumerate(rows)]
            conn.executemany(_INSERT, [[r[c] for c in _MAIN] for r in rows])
            conn.executemany("DELETE FROM sketch_modules WHERE version_id = ?",
                             [(r["version_id"],) for r in rows if r["keys"] is None])
            conn.executemany(_INSERT_MODS, [[r["version_id"], r["keys"], r["norms"], r["units"]]
                                            for r in rows if r["keys"] is not None])


def _delete(conn: sqlite3.Connection, where: str, params=()) -> int:
    """Delete the rows of ``sketches`` matching ``where`` and their per-module rows (inside a
    write transaction). Returns how many versions."""
    found = conn.execute(f"SELECT version_id, family FROM sketches WHERE {where}", params).fetchall()
    if found:
        _drop_packs(conn, {f for _, f in found})
        conn.executemany("DELETE FROM sketch_modules WHERE version_id = ?", [(i,) for i, _ in found])
        conn.executemany("DELETE FROM sketches WHERE version_id = ?", [(i,) for i, _ in found])
    return len(found)


def _drop_packs(conn: sqlite3.Connection, families) -> None:
    for f in families:
        conn.execute("DELETE FROM sketch_packs WHERE family IS ?", (f,))


def store_sketch(reg, v, sketch: sk.Sketch | None = None) -> sk.Sketch | None:
    """Compute (unless given) and store the sketch of version ``v`` (a ``Version`` or REF); the
    hook for ``Registry.add``. Never raises for a version it cannot sketch: that is recorded as
    its status. Returns the sketch (None when there is none)."""
    if isinstance(v, str):
        v = reg.get(v)
    conn = connection(reg)
    status = "ok"
    if sketch is None:
        same = _same_bytes_row(conn, v)
        if same is not None:
            _insert(conn, [{**same, "version_id": v.id, "name": v.name, "number": v.number, "created": _now()}])
            return _from_row(same)
        sketch, status = _safe_compute(reg, v)
    _insert(conn, [_row(v, sketch, status)])
    return sketch


def _safe_compute(reg, v) -> tuple[sk.Sketch | None, str]:
    """:func:`compute_sketch` (torch on one thread), with an unexpected failure recorded as the
    version's status (and logged) instead of raised: a sketch must never fail an import."""
    try:
        with one_torch_thread():
            return compute_sketch(reg, v)
    except Exception as e:  # a bug, or a file the reader chokes on: the import goes on
        log.warning("%s: no sketch (%s: %s)", v.ref, type(e).__name__, e)
        return None, f"none: sketching failed ({type(e).__name__}: {' '.join(str(e).split())[:200]})"


def _same_bytes_row(conn, v) -> dict | None:
    """A current row of another version with the same bytes and arch (its sketch is this one's)."""
    cur = conn.execute(f"{_SELECT} WHERE s.sha256 = ? AND s.algo = ? AND s.arch IS ? AND s.version_id != ? LIMIT 1",
                       (v.sha256, sk.ALGO, v.arch, v.id))
    r = cur.fetchone()
    return dict(zip(_COLS, r)) if r else None


def forget(reg, version_ids) -> int:
    """Drop the rows of these version ids (the hook for ``Registry.remove``). Returns how many."""
    ids = [int(i) for i in version_ids]
    if not ids:
        return 0
    conn = connection(reg)
    with _write(conn):
        return _delete(conn, f"version_id IN ({','.join('?' * len(ids))})", ids)


def _from_row(r: dict) -> sk.Sketch | None:
    if r.get("status") != "ok" or r.get("keys") is None:
        return None
    keys = np.frombuffer(r["keys"], dtype="<i8").astype(np.int64)
    norms = np.frombuffer(r["norms"], dtype="<f4").astype(np.float64)
    units = np.frombuffer(r["units"], dtype=np.int8).astype(np.float32).reshape(len(keys), -1) / np.float32(127.0)
    return sk.Sketch(r["family"], keys, norms, units, json.loads(r["skipped"] or "{}"),
                     json.loads(r["partial"] or "{}"), None, r["algo"])


def stored_sketch(reg, v) -> sk.Sketch | None:
    """The stored, current sketch of version ``v`` (None when there is no valid row)."""
    conn = connection(reg)
    cur = conn.execute(f"{_SELECT} WHERE s.version_id = ?", (v.id,))
    r = cur.fetchone()
    if r is None:
        return None
    d = dict(zip(_COLS, r))
    if d["sha256"] != v.sha256 or d["algo"] != sk.ALGO or d["name"] != v.name or d["number"] != v.number:
        return None
    return _from_row(d)


# ---- reindex ----------------------------------------------------------------------------------------
def reindex(reg, force: bool = False, progress: Callable[[int], None] | None = None,
            batch: int = 32) -> dict:
    """Sketch every stored version that has no current row, and drop the rows of versions that no
    longer exist, through the public ``Registry`` API (``list``, ``versions``). Cheap when nothing
    changed: one ``list()`` and one grouped query. ``force`` recomputes every row. Returns
    ``{"sketched": [refs], "none": {ref: why}, "dropped": n, "checked": adapters}``."""
    conn = connection(reg)
    have = {name: (n, top) for name, n, top in conn.execute(
        "SELECT name, count(*), max(number) FROM sketches WHERE algo = ? GROUP BY name", (sk.ALGO,))}
    listed = reg.list()
    names = {a["name"] for a in listed}
    out = {"sketched": [], "none": {}, "dropped": 0, "checked": len(listed)}
    # rows of adapters that no longer exist at all
    gone = [n for n, in conn.execute("SELECT DISTINCT name FROM sketches") if n not in names]
    if gone:
        with _write(conn):
            for n in gone:
                out["dropped"] += _delete(conn, "name = ?", (n,))
    pending: list[dict] = []
    for a in listed:
        if not force and have.get(a["name"]) == (a["versions"], a["latest"]):
            continue
        try:
            versions = reg.versions(a["name"])
        except RegistryError:  # removed meanwhile
            continue
        rows = {vid: (num, sha, algo) for vid, num, sha, algo in conn.execute(
            "SELECT version_id, number, sha256, algo FROM sketches WHERE name = ?", (a["name"],))}
        live = {v.id for v in versions}
        stale = [vid for vid in rows if vid not in live]
        if stale:
            with _write(conn):
                for vid in stale:
                    out["dropped"] += _delete(conn, "version_id = ? AND name = ?", (vid, a["name"]))
        for v in versions:
            cur = rows.get(v.id)
            if not force and cur is not None and cur == (v.number, v.sha256, sk.ALGO):
                continue
            same = None if force else _same_bytes_row(conn, v)
            if same is not None:
                pending.append({**same, "version_id": v.id, "name": v.name, "number": v.number, "created": _now()})
                s, status = _from_row(same), same["status"]
            else:
                s, status = _safe_compute(reg, v)
                pending.append(_row(v, s, status))
            if status == "ok":
                out["sketched"].append(v.ref)
            else:
                out["none"][v.ref] = status
            if progress:
                progress(1)
            if len(pending) >= batch:
                _insert(conn, pending)
                pending = []
    _insert(conn, pending)
    return out


# ---- similar --------------------------------------------------------------------------------------
@dataclass
class Hit:
    """One stored version close to the query: ``cosine`` (the sketch estimate), ``modules``
    compared, ``signature`` (the first-stage score), and ``exact`` (with ``exact=True``)."""

    ref: str
    name: str
    number: int
    sha256: str
    cosine: float
    modules: int
    signature: float
    partial: bool = False
    exact: dict | None = None

    def to_dict(self) -> dict:
        """JSON-ready (``similar --json``): every field, ``exact`` only when it was computed."""
        d = {"ref": self.ref, "name": self.name, "number": self.number, "sha256": self.sha256,
             "cosine": self.cosine, "modules": self.modules, "signature": self.signature, "partial": self.partial}
        if self.exact is not None:
            d["exact"] = self.exact
        return d


@dataclass
class SimilarReport:
    """The query, its family, how many stored versions were scanned and re-ranked, the hits."""

    query: str
    family: str | None
    modules: int
    scanned: int = 0
    candidates: int = 0
    hits: list[Hit] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    partial: dict[str, str] = field(default_factory=dict)
    exact: bool = False
    dropped_stale: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """JSON-ready (``similar --json``): the fields, hits as :meth:`Hit.to_dict`, ``seconds``
        rounded to 0.1 ms, and ``algo`` (the sketch algorithm the scores come from)."""
        return {"query": self.query, "family": self.family, "modules": self.modules, "scanned": self.scanned,
                "candidates": self.candidates, "exact": self.exact, "hits": [h.to_dict() for h in self.hits],
                "skipped": self.skipped, "partial": self.partial, "dropped_stale": self.dropped_stale,
                "seconds": round(self.seconds, 4), "algo": sk.ALGO}


_SCANS: OrderedDict[tuple, tuple] = OrderedDict()
_SCANS_LOCK = threading.Lock()


def _scan(conn, family) -> tuple[np.ndarray, np.ndarray]:
    """``(version ids (N,), signatures (N, SIGNATURE_DIM) float32)`` of every current sketch of
    ``family``: its *pack* (one row holding the signatures of every version up to a ``seq``, made
    here) plus the rows added since. Reading 10,000 signatures as 10,000 rows costs ~10 ms of
    Python objects; as one pack ~1 ms. A replaced or deleted row drops the family's pack (see
    :func:`_insert`, :func:`_delete`); more than ``PACK_TAIL`` new rows re-pack it. The result is
    kept in memory between calls while the catalogue is unchanged: SQLite's ``data_version`` moves
    when another connection commits, ``total_changes`` when this one writes (the registry's own
    writes share the connection)."""
    stamp = (conn.execute("PRAGMA data_version").fetchone()[0], conn.total_changes)
    key = (id(conn), family, sk.ALGO)
    with _SCANS_LOCK:
        hit = _SCANS.get(key)
        if hit is not None and hit[0] is conn and hit[1] == stamp:
            _SCANS.move_to_end(key)
            return hit[2], hit[3]
    ids, mat, upto, tail = _read_signatures(conn, family)
    if tail > PACK_TAIL and not conn.in_transaction:
        _repack(conn, family)
        stamp = (conn.execute("PRAGMA data_version").fetchone()[0], conn.total_changes)
    with _SCANS_LOCK:
        _SCANS[key] = (conn, stamp, ids, mat)  # the connection is held: its id cannot be reused meanwhile
        while len(_SCANS) > 4:
            _SCANS.popitem(last=False)
    return ids, mat


def _read_signatures(conn, family) -> tuple[np.ndarray, np.ndarray, int, int]:
    """``(ids, signatures, pack's seq or -1, rows read outside the pack)``."""
    d = sk.SIGNATURE_DIM
    pack = conn.execute("SELECT upto, ids, scales, signatures FROM sketch_packs WHERE family IS ? AND algo = ?",
                        (family, sk.ALGO)).fetchone()
    upto = pack[0] if pack else -1
    rows = conn.execute("SELECT version_id, sig_scale, signature FROM sketches WHERE family IS ? AND algo = ? "
                        "AND seq > ? AND status = 'ok' AND signature IS NOT NULL", (family, sk.ALGO, upto)).fetchall()
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    scales = np.fromiter((r[1] or 0.0 for r in rows), dtype=np.float32, count=len(rows))
    sigs = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.int8).reshape(len(rows), d)
    if pack:
        ids = np.concatenate([np.frombuffer(pack[1], dtype="<i8"), ids])
        scales = np.concatenate([np.frombuffer(pack[2], dtype="<f4"), scales])
        sigs = np.concatenate([np.frombuffer(pack[3], dtype=np.int8).reshape(-1, d), sigs])
    mat = sigs.astype(np.float32)
    mat *= scales[:, None]
    return ids, mat, upto, len(rows)


def _repack(conn, family) -> None:
    """Write ``family``'s pack: every current signature, up to the largest ``seq``. Done from a
    read path, so it never waits: when another process holds the write lock it is left for later."""
    before = conn.execute("PRAGMA busy_timeout").fetchone()[0]
    try:
        conn.execute("PRAGMA busy_timeout=0")
        with _write(conn):
            upto = conn.execute("SELECT max(seq) FROM sketches WHERE family IS ? AND algo = ?",
                                (family, sk.ALGO)).fetchone()[0] or 0
            rows = conn.execute("SELECT version_id, sig_scale, signature FROM sketches WHERE family IS ? AND "
                                "algo = ? AND status = 'ok' AND signature IS NOT NULL ORDER BY seq",
                                (family, sk.ALGO)).fetchall()
            ids = np.array([r[0] for r in rows], dtype="<i8").tobytes()
            scales = np.array([r[1] or 0.0 for r in rows], dtype="<f4").tobytes()
            conn.execute("INSERT OR REPLACE INTO sketch_packs (family, algo, upto, ids, scales, signatures) "
                         "VALUES (?, ?, ?, ?, ?, ?)", (family, sk.ALGO, upto, ids, scales,
                                                       b"".join(r[2] for r in rows)))
    except sqlite3.OperationalError as e:  # locked, or a read-only registry: scan the rows next time too
        log.debug("sketch pack of %s not written: %s", family, e)
    finally:
        conn.execute(f"PRAGMA busy_timeout={int(before)}")


def search(reg, query: sk.Sketch, top: int = 10, exclude: int | None = None,
           validate: bool = True) -> tuple[list[Hit], int, int, list[str]]:
    """The ``top`` stored versions closest to ``query`` by the estimated cosine:
    ``(hits, scanned, candidates, stale refs dropped)``. ``exclude``: a version id left out (the
    query's own). Hits are checked against the registry (``Registry.get``: the version exists with
    that sha256); a row that fails is dropped."""
    if top < 1:
        raise LoradexError(f"top must be at least 1, got {top}")
    conn = connection(reg)
    ids_all, mat = _scan(conn, query.family)
    if exclude is not None:
        keep = ids_all != exclude
        ids_all, mat = ids_all[keep], mat[keep]
    n_rows = len(ids_all)
    if not n_rows or query.modules == 0:
        return [], n_rows, 0, []
    scores = mat @ query.signature()
    k = min(n_rows, max(MIN_CANDIDATES, CANDIDATE_FACTOR * top))
    idx = np.argpartition(-scores, k - 1)[:k] if k < n_rows else np.arange(n_rows)
    by_id = {int(ids_all[i]): i for i in idx}
    ids = list(by_id)
    found: list[Hit] = []
    # candidates of one structure share their module keys: estimate them together
    groups: dict[bytes, list[tuple]] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        cur = conn.execute(f"{_SELECT} WHERE s.version_id IN ({','.join('?' * len(chunk))})", chunk)
        for r in cur:
            d = dict(zip(_COLS, r))
            if d["status"] == "ok" and d["keys"] is not None:
                groups.setdefault(d["keys"], []).append(d)
    for keys_blob, ds in groups.items():
        keys = np.frombuffer(keys_blob, dtype="<i8")
        norms = np.frombuffer(b"".join(d["norms"] for d in ds), dtype="<f4").astype(np.float64).reshape(len(ds), -1)
        units = np.frombuffer(b"".join(d["units"] for d in ds), dtype=np.int8).reshape(len(ds), len(keys), -1)
        units = units.astype(np.float32) / np.float32(127.0)
        est = sk.estimate_group(query, keys, norms, units)
        for d, cos, n in zip(ds, *est):
            i = by_id[d["version_id"]]
            found.append(Hit(f"{d['name']}@{d['number']}", d["name"], d["number"], d["sha256"], float(cos),
                             int(n), float(scores[i]), bool(d["partial"] not in (None, "{}") or query.partial)))
    found.sort(key=lambda h: (-h.cosine, h.ref))
    hits, stale = [], []
    for h in found:
        if len(hits) >= top:
            break
        if validate:
            try:
                v = reg.get(h.ref)
                ok = v.sha256 == h.sha256
            except RegistryError:
                ok = False
            if not ok:
                stale.append(h.ref)
                with _write(conn):
                    _delete(conn, "name = ? AND number = ? AND sha256 = ?", (h.name, h.number, h.sha256))
                continue
        hits.append(h)
    return hits, n_rows, len(ids), stale


def similar(reg, ref, top: int = 10, exact: bool = False, adapter=None, label: str | None = None) -> SimilarReport:
    """The stored versions closest to ``ref`` (a REF or ``Version``), or to ``adapter`` (a
    ``loradex.Adapter`` read from a file: then ``ref`` is None and ``label`` names it). The query's
    sketch is the stored one (computed and stored when missing). ``exact``: each hit's cosine is
    recomputed from the factors of both adapters and the hits re-ordered by it."""
    import time

    t0 = time.perf_counter()
    v = None
    if adapter is None:
        v = ref if not isinstance(ref, str) else reg.get(ref)
        q = stored_sketch(reg, v)
        if q is None:
            q = store_sketch(reg, v)
        if q is None:
            conn = connection(reg)
            st = conn.execute("SELECT status FROM sketches WHERE version_id = ?", (v.id,)).fetchone()
            raise LoradexError(f"{v.ref} has no sketch: {(st[0] if st else 'none').removeprefix('none: ')}")
        name = v.ref
    else:
        q = sk.sketch_adapter(adapter)
        name = label or "adapter"
        if q.modules == 0:
            raise LoradexError(f"{name}: no module could be sketched")
    hits, scanned, cands, stale = search(reg, q, top=top, exclude=v.id if v is not None else None)
    rep = SimilarReport(name, q.family, q.modules, scanned, cands, hits, dict(q.skipped), dict(q.partial),
                        exact, stale)
    if exact and hits:
        from loradex.core.sketch import adapter_forms, exact_cosine

        qa = adapter if adapter is not None else load_adapter(reg, v)
        qf, _ = adapter_forms(qa)
        for h in hits:
            try:
                hf, _ = adapter_forms(load_adapter(reg, reg.get(h.ref)))
            except LoradexError as e:
                h.exact = {"error": str(e)}
                continue
            ex = exact_cosine(qf, hf)
            h.exact = {"cosine": ex.cosine, "modules": ex.modules, "inner": ex.inner, "norm_query": ex.norm_a,
                       "norm_hit": ex.norm_b}
        hits.sort(key=lambda h: -(h.exact or {}).get("cosine", -2.0))
    rep.seconds = time.perf_counter() - t0
    return rep


def similar_refs(reg, ref: str, top: int = 50) -> list[tuple[str, float]]:
    """``[(REF, estimated cosine)]`` best first: what ``search --similar-to REF`` orders and
    filters its results by."""
    return [(h.ref, h.cosine) for h in similar(reg, ref, top=top).hits]
