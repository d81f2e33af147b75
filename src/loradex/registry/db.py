"""The catalogue: SQLite through sqlite-utils at ``$LORADEX_HOME/registry.db``.

WAL mode (readers never block the writer), ``synchronous=NORMAL`` (a commit is atomic and survives
a killed process; a power cut may lose the last commits, never corrupt the file), a 60 s busy
timeout, and every write inside ``BEGIN IMMEDIATE``: the write lock is taken before anything is
read, so the next version number of a name is read and used inside one serialized transaction and
concurrent importers never collide.

Tables
  adapters        name (unique), description, trigger_words (JSON list), labels (JSON list),
                  keywords (searchable text gathered from its versions), next_number
  versions        (adapter_id, number) unique; sha256 (of the file, or of the manifest of a
                  folder), size, layout (file|folder), artifact (adapter|embedding|checkpoint),
                  filename, format, arch, kinds/ranks/embeddings/metadata/notes (JSON), modules,
                  base_model, Civitai autov1/autov2/autov3(+full)/crc32, kohya sshs_model_hash /
                  sshs_legacy_hash, created
  version_kinds   (version_id, kind): the kind filter of ``search`` as an indexed lookup
  version_files   (version_id, path, sha256, size): the manifest of a folder artifact
  tags            (adapter_id, tag) -> version_id: movable names such as ``prod``
  lineage         child_id <- parent_id (or an external ``parent_ref``: a path, ``hf://id@rev``),
                  operation (import, convert, merge, resize, extract, bake, train, pull), params JSON
  adapters_fts    FTS5 over name, description, trigger words, labels, keywords (sqlite-utils
                  enable_fts; triggers that fire only when one of those columns changes)
  archs           name -> family, descriptor (JSON: the family and component configs of an arch
                  derived from a custom base), so a version's ``arch`` resolves on any machine
                  (schema 2; added to schema-1 catalogues on open)

Every query is a named function here; callers pass values, never SQL. A home the process cannot
write is opened read-only (``connect(..., readonly=True)``: ``mode=ro``, or ``immutable=1`` where
SQLite cannot create its WAL index next to the file), so ``ls``/``show``/``export`` still work.
A full disk while writing (``SQLITE_FULL``) is a ``faults.DiskFullError`` naming the catalogue.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import sqlite_utils

from loradex.errors import RegistryError
from loradex.registry.faults import DiskFullError, is_disk_full
from loradex.registry.version import HASH_FIELDS, Version, json_value, row_to_version

__all__ = ["HASH_FIELDS", "Version", "row_to_version"]  # re-exported: they were born here

SCHEMA_VERSION = 2
FTS_COLUMNS = ["name", "description", "trigger_words", "labels", "keywords"]
#: a search matching at most this many adapters is ordered by relevance (FTS5 bm25), else by name
RANKED_MATCHES = 256


def now() -> str:
    """The current UTC time as ISO 8601 with microseconds and ``+00:00``: every ``created`` /
    ``updated`` column (the fixed width makes text order time order)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def connect(path: Path, readonly: bool = False) -> sqlite_utils.Database:
    """The catalogue at ``path``: WAL, schema created or upgraded; ``readonly``: opened with
    ``mode=ro`` (never written, schema left as it is; an absent file is an empty catalogue)."""
    if readonly:
        return _connect_readonly(path)
    conn = sqlite3.connect(str(path), timeout=60, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=60000")
    db = sqlite_utils.Database(conn, execute_plugins=False)
    for attempt in range(50):  # several processes opening a fresh file at once may see "locked"
        try:
            db.enable_wal()
            break
        except sqlite3.OperationalError:
            if attempt == 49:
                raise
            time.sleep(0.05)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    _ensure_schema(db)
    return db


def _connect_readonly(path: Path) -> sqlite_utils.Database:
    """``mode=ro`` first (it sees a live writer's WAL); where SQLite cannot create the WAL index
    in an unwritable folder, ``immutable=1`` (the file as it is: right for a home nobody writes)."""
    from urllib.parse import quote

    if not path.exists():  # an unwritable home without a catalogue: an empty one, in memory
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        db = sqlite_utils.Database(conn, execute_plugins=False)
        _ensure_schema(db)
        conn.execute("PRAGMA query_only=1")
        return db
    uri = "file:" + quote(str(path.resolve()))
    for extra in ("?mode=ro", "?mode=ro&immutable=1"):
        try:
            conn = sqlite3.connect(uri + extra, uri=True, timeout=60, isolation_level=None, check_same_thread=False)
            have = conn.execute("PRAGMA user_version").fetchone()[0]
            break
        except sqlite3.OperationalError:
            if extra.endswith("immutable=1"):
                raise
    if have < SCHEMA_VERSION:
        conn.close()
        raise RegistryError(f"the catalogue {path} has schema {have}, older than this loradex's "
                            f"({SCHEMA_VERSION}); open it once where its folder is writable to upgrade it")
    conn.execute("PRAGMA query_only=1")
    return sqlite_utils.Database(conn, execute_plugins=False)


def path_of(db: sqlite_utils.Database) -> str:
    """The file of the catalogue's main database (``PRAGMA database_list``), ``":memory:"`` when
    it has none; used to name the catalogue in errors."""
    row = db.execute("PRAGMA database_list").fetchone()
    return (row[2] if row else "") or ":memory:"


@contextlib.contextmanager
def write(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """One write transaction, the lock taken up front (``BEGIN IMMEDIATE``). A full disk anywhere
    in it (``SQLITE_FULL``) rolls it back and is a DiskFullError naming the catalogue."""
    try:
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            if db.conn.in_transaction:
                db.conn.execute("ROLLBACK")
            raise
        db.conn.execute("COMMIT")
    except sqlite3.Error as e:
        if db.conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.conn.execute("ROLLBACK")
        where = path_of(db)
        if is_disk_full(e, Path(where).parent if where != ":memory:" else None):
            raise DiskFullError(f"the disk is full: cannot write the catalogue {where} ({e}); "
                                "nothing was recorded") from None
        if getattr(e, "sqlite_errorname", "").startswith("SQLITE_READONLY"):
            raise RegistryError(f"the catalogue {path_of(db)} is read-only ({e})") from None
        raise


def _ensure_schema(db: sqlite_utils.Database) -> None:
    if db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
        return
    with write(db):
        have = db.execute("PRAGMA user_version").fetchone()[0]
        if have >= SCHEMA_VERSION:
            return  # another process made it meanwhile
        if have < 1:
            _create_v1(db)
        if have < 2:
            db["archs"].create({"name": str, "family": str, "descriptor": str, "created": str}, pk="name",
                               not_null={"family", "descriptor"})
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def _create_v1(db: sqlite_utils.Database) -> None:
    """The tables of schema 1 (a fresh catalogue)."""
    db["adapters"].create(
        {"id": int, "name": str, "description": str, "trigger_words": str, "labels": str, "keywords": str,
         "next_number": int, "created": str, "updated": str},
        pk="id", not_null={"name", "next_number"},
        defaults={"description": "", "trigger_words": "[]", "labels": "[]", "keywords": "", "next_number": 1},
    )
    db["adapters"].create_index(["name"], unique=True)
    db["versions"].create(
        {"id": int, "adapter_id": int, "number": int, "sha256": str, "size": int, "layout": str,
         "artifact": str, "filename": str, "format": str, "arch": str, "kinds": str, "ranks": str,
         "modules": int, "embeddings": str, "metadata": str, "notes": str, "base_model": str,
         **{h: str for h in HASH_FIELDS}, "created": str},
        pk="id", not_null={"adapter_id", "number", "sha256", "size", "layout", "artifact"},
        foreign_keys=[("adapter_id", "adapters", "id")],
    )
    db["versions"].create_index(["adapter_id", "number"], unique=True)
    db["versions"].create_index(["sha256"])
    db["versions"].create_index(["autov3_full"])
    db["versions"].create_index(["arch"])
    db["version_kinds"].create({"version_id": int, "kind": str}, pk=("version_id", "kind"),
                               foreign_keys=[("version_id", "versions", "id")])
    db["version_kinds"].create_index(["kind", "version_id"])
    db["version_files"].create({"version_id": int, "path": str, "sha256": str, "size": int},
                               pk=("version_id", "path"), foreign_keys=[("version_id", "versions", "id")])
    db["version_files"].create_index(["sha256"])
    db["tags"].create({"adapter_id": int, "tag": str, "version_id": int, "updated": str}, pk=("adapter_id", "tag"),
                      foreign_keys=[("adapter_id", "adapters", "id"), ("version_id", "versions", "id")])
    db["tags"].create_index(["version_id"])
    db["lineage"].create(
        {"id": int, "child_id": int, "parent_id": int, "parent_ref": str, "operation": str, "params": str,
         "created": str},
        pk="id", not_null={"child_id", "operation"},
        foreign_keys=[("child_id", "versions", "id"), ("parent_id", "versions", "id")],
    )
    db["lineage"].create_index(["child_id"])
    db["lineage"].create_index(["parent_id"])
    db["adapters"].enable_fts(FTS_COLUMNS, fts_version="FTS5", create_triggers=False)
    # sqlite-utils' triggers fire on any UPDATE; these only when a searchable column changes
    # (an import also bumps next_number, which must not rewrite the index)
    cols = ", ".join(FTS_COLUMNS)
    old = ", ".join(f"old.{c}" for c in FTS_COLUMNS)
    new = ", ".join(f"new.{c}" for c in FTS_COLUMNS)
    db.executescript(f"""
        CREATE TRIGGER adapters_ai AFTER INSERT ON adapters BEGIN
          INSERT INTO adapters_fts (rowid, {cols}) VALUES (new.rowid, {new});
        END;
        CREATE TRIGGER adapters_ad AFTER DELETE ON adapters BEGIN
          INSERT INTO adapters_fts (adapters_fts, rowid, {cols}) VALUES ('delete', old.rowid, {old});
        END;
        CREATE TRIGGER adapters_au AFTER UPDATE OF {cols} ON adapters BEGIN
          INSERT INTO adapters_fts (adapters_fts, rowid, {cols}) VALUES ('delete', old.rowid, {old});
          INSERT INTO adapters_fts (rowid, {cols}) VALUES (new.rowid, {new});
        END;
    """)


# ---- archs ---------------------------------------------------------------------------------------
def put_arch(db: sqlite_utils.Database, name: str, family: str, descriptor: str) -> None:
    """Record an arch's descriptor (first writer wins: a name is its modules' signature)."""
    db.execute("INSERT OR IGNORE INTO archs (name, family, descriptor, created) VALUES (?, ?, ?, ?)",
               (name, family, descriptor, now()))


def get_arch_descriptor(db: sqlite_utils.Database, name: str) -> str | None:
    """The JSON descriptor :func:`put_arch` recorded for arch ``name``, or None."""
    row = db.execute("SELECT descriptor FROM archs WHERE name = ?", (name,)).fetchone()
    return row[0] if row else None


SELECT_VERSION = "SELECT v.*, a.name AS name FROM versions v JOIN adapters a ON a.id = v.adapter_id"


def _rows(db: sqlite_utils.Database, sql: str, params=()) -> list[dict]:
    cur = db.execute(sql, params)
    cols = [c[0] for c in cur.description]
    return [dict(zip(cols, row)) for row in cur.fetchall()]


def _fetch(db: sqlite_utils.Database, where: str, params=(), order: str = "", limit: int | None = None,
           with_tags: bool = True) -> list[Version]:
    """Versions matching ``where`` (a fragment written in this module only, never by a caller)."""
    sql = f"{SELECT_VERSION} WHERE {where}" + (f" ORDER BY {order}" if order else "")
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    out = [row_to_version(r) for r in _rows(db, sql, params)]
    if with_tags and out:
        attach_tags(db, out)
    return out


def _one(found: list[Version]) -> Version | None:
    return found[0] if found else None


def version_by_number(db: sqlite_utils.Database, name: str, number: int) -> Version | None:
    """``NAME@N``: version ``number`` of adapter ``name`` (tags attached), or None."""
    return _one(_fetch(db, "a.name = ? AND v.number = ?", (name, number)))


def version_by_tag(db: sqlite_utils.Database, name: str, tag: str) -> Version | None:
    """``NAME:TAG``: the version ``tag`` points at in adapter ``name``, or None."""
    return _one(_fetch(db, "a.name = ? AND v.id = (SELECT version_id FROM tags t WHERE t.adapter_id = a.id AND "
                           "t.tag = ?)", (name, tag)))


def latest_version(db: sqlite_utils.Database, name: str) -> Version | None:
    """``NAME``: the highest-numbered version of ``name``, or None when it has none."""
    return _one(_fetch(db, "a.name = ?", (name,), order="v.number DESC", limit=1))


def versions_of(db: sqlite_utils.Database, name: str, with_tags: bool = True) -> list[Version]:
    """Every version of ``name``, oldest first."""
    return _fetch(db, "a.name = ?", (name,), order="v.number", with_tags=with_tags)


def versions_with_sha_prefix(db: sqlite_utils.Database, prefix: str, limit: int = 20) -> list[Version]:
    """Versions whose sha256 starts with the lowercase hex ``prefix`` (an index range), first stored first."""
    return _fetch(db, "v.sha256 >= ? AND v.sha256 < ?", (prefix, prefix + "g"), order="v.id", limit=limit)


def version_of_name_with_sha(db: sqlite_utils.Database, name: str, sha256: str,
                             with_tags: bool = True) -> Version | None:
    """``name``'s version holding exactly these bytes (or this folder manifest), if any."""
    return _one(_fetch(db, "a.name = ? AND v.sha256 = ?", (name, sha256), limit=1, with_tags=with_tags))


def version_with_sha_and_filename(db: sqlite_utils.Database, sha256: str, filename: str) -> Version | None:
    """Any version of these bytes stored under this file name (its description can be reused)."""
    return _one(_fetch(db, "v.sha256 = ? AND v.filename = ?", (sha256, filename), limit=1, with_tags=False))


def versions_by_id(db: sqlite_utils.Database, ids: list[int]) -> list[Version]:
    """The versions of ``ids``, in that order."""
    if not ids:
        return []
    by_id = {v.id: v for v in _fetch(db, "v.id IN (SELECT value FROM json_each(?))", (json.dumps(list(ids)),))}
    return [by_id[i] for i in ids]


def same_bytes(db: sqlite_utils.Database, sha256: str, other_than: int) -> list[Version]:
    """Other versions (any name) with these bytes."""
    return _fetch(db, "v.sha256 = ? AND v.id != ?", (sha256, other_than), order="v.id", with_tags=False)


def same_tensors(db: sqlite_utils.Database, autov3_full: str, other_bytes_than: str) -> list[Version]:
    """Versions with the same tensor data (AutoV3) and other bytes (their metadata differs)."""
    return _fetch(db, "v.autov3_full = ? AND v.sha256 != ?", (autov3_full, other_bytes_than), order="v.id",
                  with_tags=False)


def tags_of(db: sqlite_utils.Database, name: str) -> list[str]:
    """Every tag of adapter ``name``, sorted (whichever version each points at)."""
    return [r[0] for r in db.execute("SELECT t.tag FROM tags t JOIN adapters a ON a.id = t.adapter_id WHERE a.name = ? "
                                     "ORDER BY t.tag", (name,))]


def version_id_with_sha(db: sqlite_utils.Database, adapter_id: int, sha256: str) -> int | None:
    """The id of one version of ``adapter_id`` with this sha256 (an import of bytes the name
    already holds), or None."""
    row = db.execute("SELECT id FROM versions WHERE adapter_id = ? AND sha256 = ?", (adapter_id, sha256)).fetchone()
    return row[0] if row else None


def version_sha(db: sqlite_utils.Database, version_id: int) -> str:
    """The sha256 of version ``version_id``; ``""`` when there is no such row."""
    row = db.execute("SELECT sha256 FROM versions WHERE id = ?", (version_id,)).fetchone()
    return row[0] if row else ""


def parents(db: sqlite_utils.Database, version_id: int) -> list[dict]:
    """The lineage edges into a version: operation, params, created, and the parent as a REF (a
    stored version) or as the recorded source text (a path, ``hf://...``, a removed version)."""
    rows = db.execute(
        "SELECT l.operation, l.params, l.parent_id, l.parent_ref, l.created, a.name, v.number FROM lineage l "
        "LEFT JOIN versions v ON v.id = l.parent_id LEFT JOIN adapters a ON a.id = v.adapter_id "
        "WHERE l.child_id = ? ORDER BY l.id", (version_id,)).fetchall()
    return [{"operation": op, "params": json.loads(params or "{}"), "created": created,
             "parent": f"{name}@{number}" if pid is not None else None, "source": None if pid is not None else pref,
             "parent_id": pid}
            for op, params, pid, pref, created, name, number in rows]


def children(db: sqlite_utils.Database, version_id: int) -> list[dict]:
    """The lineage edges out of a version, oldest first: ``{"operation", "params", "child"}`` with
    the child as ``NAME@N`` (the inverse of :func:`parents`; only stored children have rows)."""
    rows = db.execute(
        "SELECT l.operation, l.params, a.name, v.number FROM lineage l JOIN versions v ON v.id = l.child_id "
        "JOIN adapters a ON a.id = v.adapter_id WHERE l.parent_id = ? ORDER BY l.id", (version_id,)).fetchall()
    return [{"operation": op, "params": json.loads(p or "{}"), "child": f"{n}@{num}"} for op, p, n, num in rows]


def count_versions(db: sqlite_utils.Database) -> int:
    """The number of versions in the catalogue, all adapters together."""
    return db.execute("SELECT count(*) FROM versions").fetchone()[0]


def all_shas(db: sqlite_utils.Database) -> list[str]:
    """The sha256 of every version (files and folder manifests)."""
    return [r[0] for r in db.execute("SELECT sha256 FROM versions")]


def quick_check(db: sqlite_utils.Database) -> str:
    """SQLite's own consistency check: ``"ok"`` or the first problem."""
    return db.execute("PRAGMA quick_check").fetchone()[0]


def blob_is_referenced(db: sqlite_utils.Database, sha256: str) -> bool:
    """Whether any file version or folder manifest names this blob."""
    return bool(db.execute("SELECT 1 FROM versions WHERE sha256 = ? AND layout = 'file' UNION ALL "
                           "SELECT 1 FROM version_files WHERE sha256 = ? LIMIT 1", (sha256, sha256)).fetchone())


def attach_tags(db: sqlite_utils.Database, versions: list[Version]) -> None:
    """Append each version's tags (sorted) to its ``tags`` list, in place, with one query.
    Tags already there are not cleared: call it once per fetched Version."""
    by_id = {v.id: v for v in versions}
    marks = ",".join("?" * len(by_id))
    for vid, tag in db.execute(f"SELECT version_id, tag FROM tags WHERE version_id IN ({marks}) ORDER BY tag",
                               list(by_id)):
        by_id[vid].tags.append(tag)


def attach_files(db: sqlite_utils.Database, v: Version) -> None:
    """Fill ``v.files`` with a folder version's manifest (``{"path", "sha256", "size"}`` by path);
    a file version is left as it is."""
    if v.layout == "folder":
        v.files = _rows(db, "SELECT path, sha256, size FROM version_files WHERE version_id = ? ORDER BY path", (v.id,))


def adapter_row(db: sqlite_utils.Database, name: str) -> dict | None:
    """The ``adapters`` row of ``name`` as a dict (JSON columns still as text), or None."""
    rows = _rows(db, "SELECT * FROM adapters WHERE name = ?", (name,))
    return rows[0] if rows else None


# ---- writes (call inside ``write``) ------------------------------------------------------------
def adapter_names(db: sqlite_utils.Database) -> set[str]:
    """The name of every adapter in the catalogue."""
    return {r[0] for r in db.execute("SELECT name FROM adapters").fetchall()}


def _insert(db: sqlite_utils.Database, table: str, row: dict) -> int:
    """One INSERT of known columns (the import hot path; sqlite-utils' ``insert`` introspects the
    table on every call)."""
    cols = list(row)
    sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    return db.execute(sql, [row[c] for c in cols]).lastrowid


def ensure_adapter(db: sqlite_utils.Database, name: str) -> dict:
    """The ``adapters`` row of ``name``, inserted (empty description, ``next_number`` 1) when the
    name is new. Call inside :func:`write` so that two importers cannot both insert it."""
    row = adapter_row(db, name)
    if row is None:
        t = now()
        _insert(db, "adapters", {"name": name, "created": t, "updated": t, "next_number": 1, "description": "",
                                 "trigger_words": "[]", "labels": "[]", "keywords": ""})
        row = adapter_row(db, name)
    return row


def update_adapter(db: sqlite_utils.Database, adapter_id: int, **fields) -> None:
    """Set columns of an ``adapters`` row and bump ``updated``. Lists are stored as JSON; a field
    given as None is left unchanged (so None cannot clear a column; ``""``/``[]`` do). Column
    names come from the caller's keywords: only this package's code passes them."""
    vals = {k: (json.dumps(v) if isinstance(v, list) else v) for k, v in fields.items() if v is not None}
    if vals:
        vals["updated"] = now()
        cols = list(vals)
        db.execute(f"UPDATE adapters SET {', '.join(f'{c} = ?' for c in cols)} WHERE id = ?",
                   [vals[c] for c in cols] + [adapter_id])


def insert_version(db: sqlite_utils.Database, adapter: dict, record: dict, files: list[dict] | None = None) -> int:
    """Allocate the next number of ``adapter`` and insert the version (inside ``write``)."""
    number = adapter["next_number"]
    db.execute("UPDATE adapters SET next_number = ?, updated = ? WHERE id = ?", (number + 1, now(), adapter["id"]))
    row = dict(record)
    for k in ("kinds", "ranks", "embeddings", "metadata", "notes"):
        row[k] = json.dumps(row.get(k) if row.get(k) is not None else ({} if k in ("kinds", "ranks", "metadata") else []),
                            sort_keys=True)
    row.update(adapter_id=adapter["id"], number=number, created=now())
    vid = _insert(db, "versions", row)
    kinds = list(record.get("kinds") or {})
    if record.get("embeddings"):
        kinds.append("embedding")
    if record.get("artifact") == "checkpoint":
        kinds.append("checkpoint")
    for k in dict.fromkeys(kinds):
        _insert(db, "version_kinds", {"version_id": vid, "kind": k})
    for f in files or ():
        _insert(db, "version_files", {"version_id": vid, "path": f["path"], "sha256": f["sha256"], "size": f["size"]})
    return vid


def add_lineage(db: sqlite_utils.Database, child_id: int, operation: str, params: dict | None,
                parent_id: int | None = None, parent_ref: str | None = None) -> None:
    """Record that ``child_id`` was made by ``operation`` (``import``, ``convert``, ``merge``...)
    with ``params`` (JSON, non-JSON values as ``str``), from a stored version ``parent_id`` or an
    outside source ``parent_ref`` (a path, ``hf://id@rev``). Call inside :func:`write`."""
    _insert(db, "lineage", {
        "child_id": child_id, "parent_id": parent_id, "parent_ref": parent_ref, "operation": operation,
        "params": json.dumps(params or {}, sort_keys=True, default=str), "created": now(),
    })


def set_tag(db: sqlite_utils.Database, adapter_id: int, tag: str, version_id: int) -> None:
    """Point ``tag`` of ``adapter_id`` at ``version_id``, moving it when it exists (an upsert)."""
    db.execute(
        "INSERT INTO tags (adapter_id, tag, version_id, updated) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (adapter_id, tag) DO UPDATE SET version_id = excluded.version_id, updated = excluded.updated",
        (adapter_id, tag, version_id, now()),
    )


def delete_version(db: sqlite_utils.Database, v: Version) -> None:
    """Remove a version's rows; lineage edges that name it as a parent keep its reference as text."""
    db.execute("UPDATE lineage SET parent_id = NULL, parent_ref = ? WHERE parent_id = ?",
               (f"{v.ref} (removed; sha256 {v.sha256})", v.id))
    for table, col in (("lineage", "child_id"), ("tags", "version_id"), ("version_kinds", "version_id"),
                       ("version_files", "version_id")):
        db.execute(f"DELETE FROM {table} WHERE {col} = ?", (v.id,))
    db.execute("DELETE FROM versions WHERE id = ?", (v.id,))


def delete_tag(db: sqlite_utils.Database, name: str, tag: str) -> bool:
    """Remove ``name``'s ``tag``; False when it had none."""
    cur = db.execute("DELETE FROM tags WHERE tag = ? AND adapter_id = (SELECT id FROM adapters WHERE name = ?)",
                     (tag, name))
    return cur.rowcount > 0


def delete_adapter_if_empty(db: sqlite_utils.Database, adapter_id: int) -> bool:
    """Remove the adapter row (and its tags) when no version is left; True when it was removed."""
    if db.execute("SELECT 1 FROM versions WHERE adapter_id = ? LIMIT 1", (adapter_id,)).fetchone():
        return False
    db.execute("DELETE FROM tags WHERE adapter_id = ?", (adapter_id,))
    db.execute("DELETE FROM adapters WHERE id = ?", (adapter_id,))
    return True


# ---- queries -------------------------------------------------------------------------------------
def fts_query(text: str) -> str:
    """User words -> an FTS5 query: every word must match, as a prefix; quotes neutralised."""
    words = [w.replace('"', " ").strip() for w in text.split()]
    return " ".join(f'"{w}"*' for w in words if w)


def search(db: sqlite_utils.Database, query: str = "", arch: str | None = None, kind: str | None = None,
           base: str | None = None, limit: int = 50) -> list[Version]:
    """The newest version of each adapter that matches: words against the adapter's name,
    description, trigger words, labels and version keywords (FTS5, prefix match, best first), and
    the version against ``arch`` (exact), ``kind`` (a patch kind, ``embedding`` or ``checkpoint``)
    and ``base`` (substring of the base model, case-insensitive). Without words: by name.

    Both paths stop early: adapters are walked in name order (an index) or in FTS rank order, in
    pages, and the newest matching version of each is one index probe, so the cost follows
    ``limit``, not the size of the catalogue."""
    conds, params = [], []
    if arch:
        conds.append("v2.arch = ?")
        params.append(arch)
    if base:
        conds.append("v2.base_model LIKE ?")
        params.append(f"%{base}%")
    if kind:
        conds.append("EXISTS (SELECT 1 FROM version_kinds k WHERE k.version_id = v2.id AND k.kind = ?)")
        params.append(kind.lower())
    # a filter no version matches at all: answer at once instead of walking every adapter
    if arch and not db.execute("SELECT 1 FROM versions WHERE arch = ? LIMIT 1", (arch,)).fetchone():
        return []
    if kind and not db.execute("SELECT 1 FROM version_kinds WHERE kind = ? LIMIT 1", (kind.lower(),)).fetchone():
        return []
    newest = ("(SELECT v2.id FROM versions v2 WHERE v2.adapter_id = a.id"
              + "".join(f" AND {c}" for c in conds) + " ORDER BY v2.number DESC LIMIT 1)")
    q = fts_query(query or "")
    if not q:
        sql = f"SELECT v.*, a.name AS name FROM adapters a JOIN versions v ON v.id = {newest} ORDER BY a.name LIMIT ?"
        out = [row_to_version(r) for r in _rows(db, sql, [*params, limit])]
    else:
        try:
            n = len(db.execute("SELECT rowid FROM adapters_fts WHERE adapters_fts MATCH ? LIMIT ?",
                               (q, RANKED_MATCHES + 1)).fetchall())
            if n > RANKED_MATCHES:  # too many for relevance to mean much (and bm25 costs): by name
                # '+a.id': walk adapters in name order (an index) and stop at ``limit``
                sql = (f"SELECT v.*, a.name AS name FROM adapters a JOIN versions v ON v.id = {newest} "
                       "WHERE +a.id IN (SELECT rowid FROM adapters_fts WHERE adapters_fts MATCH ?) "
                       "ORDER BY a.name LIMIT ?")
                out = [row_to_version(r) for r in _rows(db, sql, [*params, q, limit])]
                ids = []
            else:  # best first
                out = []
                ids = [r[0] for r in db.execute(
                    "SELECT rowid FROM adapters_fts WHERE adapters_fts MATCH ? ORDER BY rank", (q,))]
        except sqlite3.OperationalError as e:  # an FTS5 syntax corner case the quoting missed
            if "fts5" not in str(e).lower():
                raise
            return []
        page = max(limit, 64)
        sql = (f"SELECT v.*, a.name AS name FROM adapters a JOIN versions v ON v.id = {newest} "
               "WHERE a.id IN (SELECT value FROM json_each(?))")
        for i in range(0, len(ids), page):
            chunk = ids[i : i + page]
            found = {r["adapter_id"]: r for r in _rows(db, sql, [*params, json.dumps(chunk)])}
            for a in chunk:
                if a in found and len(out) < limit:
                    out.append(row_to_version(found[a]))
            if len(out) >= limit:
                break
    if out:
        attach_tags(db, out)
    return out


def list_adapters(db: sqlite_utils.Database) -> list[dict]:
    """One summary per adapter, by name (what ``loradex ls`` prints): name, description,
    trigger_words, labels, ``versions`` (count), ``latest`` (highest number), ``size`` (bytes of
    all its versions), ``tags`` as ``"TAG->@N"``, and format/arch/artifact/kinds of the latest
    version (None/``{}`` for an adapter without versions)."""
    rows = _rows(db, """
        SELECT a.id, a.name, a.description, a.trigger_words, a.labels, count(v.id) AS versions, max(v.number) AS latest,
               sum(v.size) AS size
        FROM adapters a LEFT JOIN versions v ON v.adapter_id = a.id GROUP BY a.id ORDER BY a.name""")
    tags: dict[int, list[str]] = {}
    for aid, tag, number in db.execute(
            "SELECT t.adapter_id, t.tag, v.number FROM tags t JOIN versions v ON v.id = t.version_id ORDER BY t.tag"):
        tags.setdefault(aid, []).append(f"{tag}->@{number}")
    latest = {}
    for r in _rows(db, f"{SELECT_VERSION} WHERE v.number = (SELECT max(number) FROM versions WHERE adapter_id = a.id)"):
        latest[r["adapter_id"]] = row_to_version(r)
    out = []
    for r in rows:
        v = latest.get(r["id"])
        out.append({
            "name": r["name"], "description": r["description"] or "",
            "trigger_words": json_value(r["trigger_words"], []), "labels": json_value(r["labels"], []),
            "versions": r["versions"], "latest": r["latest"], "size": r["size"] or 0, "tags": tags.get(r["id"], []),
            "format": v.format if v else None, "arch": v.arch if v else None, "artifact": v.artifact if v else None,
            "kinds": v.kinds if v else {},
        })
    return out


def blob_references(db: sqlite_utils.Database) -> dict[str, list[tuple[str, int]]]:
    """sha256 -> [(version ref, expected size)] for every blob a row points at."""
    out: dict[str, list[tuple[str, int]]] = {}
    for sha, size, name, number in db.execute(
            "SELECT v.sha256, v.size, a.name, v.number FROM versions v JOIN adapters a ON a.id = v.adapter_id "
            "WHERE v.layout = 'file'"):
        out.setdefault(sha, []).append((f"{name}@{number}", size))
    for sha, size, name, number, path in db.execute(
            "SELECT f.sha256, f.size, a.name, v.number, f.path FROM version_files f JOIN versions v ON v.id = f.version_id "
            "JOIN adapters a ON a.id = v.adapter_id"):
        out.setdefault(sha, []).append((f"{name}@{number}:{path}", size))
    return out
