"""``Version``: one stored version of a named artifact, as ``Registry.get`` returns it.

A plain record made from a catalogue row (``row_to_version``); JSON columns are decoded, the
header metadata only when first asked for (kohya headers can be large). No SQL here: the queries
that make Versions are ``db``'s.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field

HASH_FIELDS = ("autov1", "autov2", "autov3", "autov3_full", "crc32", "sshs_model_hash", "sshs_legacy_hash")


@dataclass
class Version:
    """One stored version of a named artifact (what ``Registry.get`` returns)."""

    id: int
    adapter_id: int
    name: str
    number: int
    sha256: str
    size: int
    layout: str
    artifact: str
    filename: str
    format: str | None
    arch: str | None
    kinds: dict[str, int]
    ranks: dict[str, int]
    modules: int
    embeddings: list[str]
    metadata_json: str = field(repr=False)  # decoded on first use: kohya headers can be large
    notes: list[str]
    base_model: str | None
    hashes: dict[str, str]
    created: str
    tags: list[str] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)  # folder manifests only

    @property
    def ref(self) -> str:
        """``NAME@N``: the REF that names exactly this version (tags move, this does not)."""
        return f"{self.name}@{self.number}"

    @property
    def metadata(self) -> dict[str, str]:
        """The file's header metadata (``__metadata__``), decoded when first asked for."""
        cached = self.__dict__.get("_metadata")
        if cached is None:
            cached = self.__dict__["_metadata"] = json_value(self.metadata_json, {})
        return cached

    def to_dict(self, metadata: bool = True) -> dict:
        """JSON-ready (``show --json``, import reports): every field but the ids, plus ``ref``;
        ``metadata`` (the decoded header metadata) only when asked for, ``files`` only for a
        folder whose manifest is attached."""
        d = {
            "ref": self.ref, "name": self.name, "number": self.number, "sha256": self.sha256, "size": self.size,
            "layout": self.layout, "artifact": self.artifact, "filename": self.filename, "format": self.format,
            "arch": self.arch, "kinds": self.kinds, "ranks": self.ranks, "modules": self.modules,
            "embeddings": self.embeddings, "base_model": self.base_model, "hashes": self.hashes,
            "created": self.created, "tags": self.tags, "notes": self.notes,
        }
        if metadata:
            d["metadata"] = self.metadata
        if self.files:
            d["files"] = self.files
        return d


def json_value(s: str | None, default):
    """A JSON column, or an empty value of ``default``'s type for an empty or empty-looking one."""
    if not s or s in ("{}", "[]"):
        return type(default)()
    return json.loads(s)


def row_to_version(r: sqlite3.Row | dict) -> Version:
    """A ``Version`` from a ``versions`` row joined with its adapter's ``name`` (``db.SELECT_VERSION``):
    JSON columns decoded (metadata kept as text until asked for), NULLs as empty values, the
    hash columns gathered into ``hashes``. Tags and files are attached separately."""
    r = dict(r)
    return Version(
        id=r["id"], adapter_id=r["adapter_id"], name=r["name"], number=r["number"], sha256=r["sha256"], size=r["size"], layout=r["layout"],
        artifact=r["artifact"], filename=r["filename"] or "", format=r["format"], arch=r["arch"],
        kinds=json_value(r["kinds"], {}), ranks=json_value(r["ranks"], {}), modules=r["modules"] or 0,
        embeddings=json_value(r["embeddings"], []), metadata_json=r["metadata"] or "{}", notes=json_value(r["notes"], []),
        base_model=r["base_model"], hashes={h: r[h] or "" for h in HASH_FIELDS}, created=r["created"],
    )
