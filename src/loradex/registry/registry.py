"""``Registry``: named, versioned, content-addressed artifacts (adapters, embeddings, checkpoints).

    reg = loradex.Registry()                       # $LORADEX_HOME, else $XDG_DATA_HOME/loradex
    v = reg.add("face.safetensors", name="face", tags=["prod"])
    reg.get("face"), reg.get("face@1"), reg.get("face:prod"), reg.get(v.sha256[:10])
    adapter = reg.load("face:prod")
    reg.export("face", "out.safetensors", to="diffusers")

A thin facade over the registry's rooms, which import one another one way only:

    registry (this facade) -> ingest -> describe, scan -> store -> faults, hashes
                           -> refs -> db -> version, faults
                           -> maintenance -> store, db
    hub -> refs, scan (a Registry is passed in; ``Registry.push``/``pull`` import hub lazily)

``refs`` parses and resolves REFs (grammar there), ``ingest`` stages, describes and records
imports (crash-safety order there), ``scan`` decides what a path offers (regular files only,
symlinks), ``store`` keeps the bytes and checks them on the way out, ``db`` holds every SQL
query, ``maintenance`` verifies and collects garbage, ``hub`` talks to the Hugging Face Hub.

Every way a stored blob leaves the registry is checked against the catalogue: ``path``,
``checkout`` and ``load`` hash a blob once per process before handing it out; ``export`` hashes
while it copies. A mismatch is a RegistryError naming the REF and asking for ``loradex verify``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from loradex.errors import ArchError, LoradexError, RegistryError
from loradex.registry import db as _db
from loradex.registry import maintenance
from loradex.registry.describe import describe_path, structure_key  # noqa: F401  (re-exported)
from loradex.registry.faults import DiskFullError, is_disk_full, write_error
from loradex.registry.ingest import (  # noqa: F401  (re-exported: their home was this module)
    BATCH_FILES,
    OPERATIONS,
    ImportReport,
    Ingestor,
    as_list,
    link_or_copy,
    manifest_digest,
    update_info,
)
from loradex.registry.refs import (  # noqa: F401  (re-exported)
    HEX_RE,
    MAX_NAME,
    MAX_TAG,
    MIN_SHA_PREFIX,
    NAME_RE,
    RESERVED_TAGS,
    renamed,
    require_adapter,
    resolve,
    sanitize_name,
    validate_name,
    validate_tag,
)
from loradex.registry.scan import WEIGHT_SUFFIXES, folder_files, is_folder_artifact, scan_folder  # noqa: F401
from loradex.registry.store import BlobStore
from loradex.registry.version import Version

log = logging.getLogger(__name__)

_structure_key = structure_key  # the name tests and benchmarks knew


def default_home() -> Path:
    """``$XDG_DATA_HOME/loradex``, else ``~/.local/share/loradex`` (the XDG base-directory
    default): the home when neither an argument nor ``$LORADEX_HOME`` names one. Not created here."""
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(xdg) / "loradex"


def _unwritable(home: Path) -> str | None:
    """Why ``home`` cannot be written (a real write: ``os.access`` says yes to root even on
    read-only or immutable folders), or None."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=home)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return str(e.strerror or e)
    return None


class Registry:
    """A registry folder: ``registry.db`` (SQLite, WAL) and ``blobs/`` (content-addressed files).

    ``home``: the folder; default ``$LORADEX_HOME``, else ``$XDG_DATA_HOME/loradex`` (created on
    first use). A home named explicitly (argument or ``LORADEX_HOME``) must exist unless
    ``create=True``. ``readonly``: False (default) needs a writable home and says so clearly;
    True opens the catalogue read-only; None opens it read-only only when the home cannot be
    written (what commands that only read use). A read-only registry serves ``get``/``list``/
    ``show``/``load``/``export``/``verify``; methods that write raise RegistryError."""

    def __init__(self, home: str | os.PathLike | None = None, create: bool = False, *,
                 readonly: bool | None = False) -> None:
        env = os.environ.get("LORADEX_HOME")
        explicit = home is not None or bool(env)
        where = "the registry home" if home is not None else ("LORADEX_HOME" if env else "the default registry home")
        self.home = Path(home if home is not None else (env or default_home())).expanduser()
        if not self.home.exists():
            if explicit and not create:
                raise RegistryError(
                    f"{where} {self.home} does not exist: create it (mkdir -p {self.home})"
                    + (" or unset LORADEX_HOME to use " + str(default_home()) if env and home is None else "")
                )
            try:
                self.home.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RegistryError(f"cannot create {where} {self.home}: {e.strerror or e}") from None
        if not self.home.is_dir():
            raise RegistryError(f"{where} {self.home} is not a folder")
        why = _unwritable(self.home)
        if why is not None and readonly is False:
            raise RegistryError(f"{where} {self.home} is not writable ({why}); "
                                "the registry needs to write its database and blobs there")
        self.readonly = bool(readonly) or why is not None
        self._why_readonly = why or "opened read-only"
        if why is not None:
            log.info("%s is not writable (%s): the registry is opened read-only", self.home, why)
        self.store = BlobStore(self.home / "blobs")
        self.tmp = self.home / "tmp"
        try:
            if not self.readonly:
                self.store.ensure()
                self.tmp.mkdir(exist_ok=True)
            self.db = _db.connect(self.home / "registry.db", readonly=self.readonly)
        except OSError as e:
            raise write_error(e, self.home) from None
        except _db.sqlite3.Error as e:
            if is_disk_full(e, self.home):
                raise DiskFullError(f"the disk is full: cannot open the registry's catalogue in {self.home} "
                                    f"({e})") from None
            raise RegistryError(f"cannot open the registry in {self.home}: {e}") from None
        self._ingest = Ingestor(self.db, self.store, self.tmp, self.get)
        if not self.readonly:
            self._ingest.sketch_files = self._sketch_staged
            self._ingest.store_sketches = self._store_sketches

    def close(self) -> None:
        """Close the catalogue's connection (also on leaving ``with Registry() as reg:``)."""
        self.db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({str(self.home)!r})"

    def _writable(self, what: str) -> None:
        if self.readonly:
            raise RegistryError(f"cannot {what}: the registry in {self.home} is read-only ({self._why_readonly})")

    # ---- references ------------------------------------------------------------------------
    def get(self, ref: str | Version) -> Version:
        """The version a REF names (RegistryError when none, or when a sha prefix is ambiguous)."""
        return resolve(self.db, ref, str(self.home))

    def _version(self, ref: str | Version) -> Version:
        return ref if isinstance(ref, Version) else self.get(ref)

    def versions(self, name: str) -> list[Version]:
        """Every version of ``name``, oldest first, with tags (RegistryError when no adapter has
        that name)."""
        require_adapter(self.db, name, str(self.home))
        return _db.versions_of(self.db, name)

    def list(self) -> list[dict]:
        """Every adapter: name, versions, newest number, tags, newest format/arch/kinds."""
        return _db.list_adapters(self.db)

    def search(self, query: str = "", arch: str | None = None, kind: str | None = None, base: str | None = None,
               limit: int = 50) -> list[Version]:
        """Newest matching version per adapter (see ``db.search``)."""
        return _db.search(self.db, query, arch=arch, kind=kind, base=base, limit=limit)

    def similar(self, ref: str, top: int = 10, exact: bool = False):
        """The stored adapters closest to ``ref`` by the cosine of their whole updates, estimated
        from the sketches (``registry.sketches.similar``; ``exact`` recomputes the hits from the
        factors). Returns a ``SimilarReport``."""
        from loradex.registry import sketches

        return sketches.similar(self, ref, top=top, exact=exact)

    # ---- stored bytes out (each checked against the catalogue) ---------------------------------
    def path(self, ref: str | Version) -> Path:
        """The blob of a single-file version (read-only; use ``export`` for a named copy), its
        bytes checked against the catalogue first (once per process)."""
        v = self._version(ref)
        if v.layout != "file":
            raise RegistryError(f"{v.ref} is a folder; use export or checkout")
        return self.store.verified(v.sha256, v.size, v.ref)

    def _scratch(self) -> Path:
        """A new folder for a checkout: under ``home/tmp`` (same file system: hard links), or the
        system's temporary folder when the home is read-only."""
        if self.readonly:
            return Path(tempfile.mkdtemp(prefix=f"loradex-{os.getpid()}-"))
        try:
            return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=self.tmp))
        except OSError as e:
            raise write_error(e, self.home) from None

    @contextlib.contextmanager
    def checkout(self, ref: str | Version) -> Iterator[Path]:
        """A temporary, read-only view of a version under its original file name (hard links to the
        blobs, each checked against the catalogue; a copy, hashed as it is made, where a link
        cannot be made), for tools that need a path; removed on exit."""
        v = self._version(ref)
        if v.layout == "folder" and not v.files:
            _db.attach_files(self.db, v)
        d = self._scratch()
        try:
            if v.layout == "file":
                out = d / (v.filename or f"{v.name}.safetensors")
                self._materialize(v.sha256, v.size, out, v.ref)
            else:
                out = d / (v.filename or v.name)
                for f in v.files:
                    dst = out / f["path"]
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    self._materialize(f["sha256"], f["size"], dst, f"{v.ref}:{f['path']}")
            yield out
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def _materialize(self, sha: str, size: int, dst: Path, what: str) -> None:
        src = self.store.present(sha, size, what)
        try:
            os.link(src, dst)
        except OSError:  # another file system (a read-only home): a copy, hashed as it is made
            where = tempfile.gettempdir() if self.readonly else self.home
            self.store.copy_verified(sha, size, dst, what, shown=where)
            return
        self.store.verified(sha, size, what)

    def load(self, ref: str | Version, arch=None):
        """The ``Adapter`` of a stored version (read through ``loradex.api.load``); errors name the
        REF, not the temporary checkout."""
        from loradex import api

        v = self._version(ref)
        if v.artifact == "checkpoint":
            raise RegistryError(f"{v.ref} is a {v.format} checkpoint, not an adapter; export it instead")
        with self.checkout(v) as p:
            # the recorded arch by default: adapters for custom bases are not detectable from keys
            try:
                return api.load(p, format=v.format, arch=arch or (self.arch(v.arch) if v.arch else None))
            except LoradexError as e:
                raise renamed(e, {str(p): v.ref, str(p.parent): v.ref}) from None

    def arch(self, name: str):
        """The ``Arch`` of a recorded arch name: a built-in or embedded one, one known to this
        process or its cache, else rebuilt from the descriptor the catalogue keeps for it."""
        from loradex.core.archs import arch_from_descriptor, get_arch

        try:
            return get_arch(name)
        except ArchError:
            desc = _db.get_arch_descriptor(self.db, name)
            if desc is None:
                raise
            return arch_from_descriptor(json.loads(desc), name=name)

    def export(self, ref: str | Version, path: str | os.PathLike, to: str | None = None, rank: int | None = None,
               dtype=None, arch=None, **options):
        """Write a version to ``path``: its exact bytes (``to=None``; a folder for folder artifacts),
        hashed as they are copied and refused unless they are the catalogue's, or converted with
        ``loradex.save`` (``to=FORMAT``; returns the ConversionReport). ``path`` may be an existing
        folder: the file keeps its stored name there. Nothing half-written stays behind."""
        from loradex import api
        from loradex.converters import safetensors_io as sio

        v = self._version(ref)
        out = Path(path)
        if to is not None:
            adapter = self.load(v, arch=arch)
            if out.is_dir() and to != "peft":
                out = out / (Path(v.filename).stem + ".safetensors")
            return api.save(adapter, out, to, rank=rank, dtype=dtype, **options)
        if v.layout == "file":
            if out.is_dir():
                out = out / (v.filename or f"{v.name}.safetensors")
            try:
                with sio.atomic_path(out) as tmp:
                    self.store.copy_verified(v.sha256, v.size, tmp, v.ref, shown=out)
                    os.chmod(tmp, 0o644)
            except OSError as e:  # the final fsync / rename of the output
                raise write_error(e, out) from None
            return out
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            out = out / (v.filename or v.name)
            if out.exists():
                raise RegistryError(f"{out} already exists")
        if not v.files:
            _db.attach_files(self.db, v)
        return self._export_folder(v, out)

    def _export_folder(self, v: Version, out: Path) -> Path:
        """A folder artifact copied into a hidden sibling of ``out``, every file verified, then
        renamed into place: a damaged blob or a full disk leaves no partial folder."""
        parent = out.parent if str(out.parent) else Path(".")
        if not parent.is_dir():
            raise RegistryError(f"{parent}: output folder does not exist")
        try:
            stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
        except OSError as e:
            raise write_error(e, out) from None
        try:
            for f in v.files:
                dst = stage / f["path"]
                dst.parent.mkdir(parents=True, exist_ok=True)
                self.store.copy_verified(f["sha256"], f["size"], dst, f"{v.ref}:{f['path']}", shown=out)
                os.chmod(dst, 0o644)
            os.chmod(stage, 0o755)
            for p in [*stage.rglob("*"), stage]:
                if p.is_file():
                    with open(p, "rb") as fh:
                        os.fsync(fh.fileno())
            if out.is_dir():
                out.rmdir()  # an existing empty folder is replaced
            os.rename(stage, out)
        except OSError as e:
            raise write_error(e, out) from None
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return out

    # ---- adding ----------------------------------------------------------------------------
    def add(self, path: str | os.PathLike, name: str, *, tags: Iterable[str] = (), description: str | None = None,
            trigger_words: Iterable[str] | None = None, labels: Iterable[str] | None = None, arch=None,
            base_model: str | None = None, parents: Iterable = (), operation: str = "import",
            params: dict | None = None, source: str | None = None, follow_links: bool = False,
            progress: Callable[[int], None] | None = None, allow_nonfinite: bool = False,
            link: bool = False, sketch: bool | None = None) -> Version:
        """Store one artifact (a file, a PEFT adapter folder or a diffusers pipeline folder) as the
        next version of ``name``. Adding bytes that ``name`` already has returns that version (its
        tags updated). ``parents``/``operation``/``params`` record lineage (REFs, Versions or paths);
        an import records its source path. ``arch`` (a name or an Arch, e.g. a ``--base``'s) reads
        the file against that architecture; ``base_model`` records the base it is for (the
        identity of a ``--base``: REF, Hub id or path). Only regular files are read;
        ``follow_links`` lets a folder's symlinks leave it (see ``registry.scan``). An adapter or
        embedding holding NaN/Inf values is refused (FormatError) unless ``allow_nonfinite``.

        ``link=True`` stores the file without copying its bytes when the registry is on its file
        system: a reflink (a copy-on-write clone: btrfs, XFS...) where the file system can make
        one, else a hard link -- the blob *is* the source file then, and is made read-only (0444),
        so the source becomes read-only too. It is hashed (from the link itself) and
        content-addressed like any blob. Editing a hard-linked source in place (after making it
        writable again) changes the stored bytes: every later read of the blob notices it
        (``path``/``load``/``export`` refuse it, naming ``loradex verify``), ``verify`` reports it;
        editors that save by writing a new file and renaming it leave the blob intact. Where no
        link can be made (another file system, ``EXDEV``; links refused), the file is copied as
        without ``link`` and a warning is logged.

        ``sketch``: store the version's similarity sketch now (``registry.sketches``; default: yes,
        unless ``link``). A linked import is about the bytes not moving, and the sketch of an
        SDXL-size file costs more than hashing it; a version without one is sketched by
        ``reindex``, which ``loradex similar`` runs first."""
        self._writable(f"add {path}")
        info = {"description": description, "trigger_words": as_list(trigger_words), "labels": as_list(labels)}
        v = self._ingest.add(path, name, tags=tags, info=info, arch=arch, base_model=base_model, parents=parents,
                             operation=operation, params=params, source=source, follow_links=follow_links,
                             progress=progress, allow_nonfinite=allow_nonfinite, link=link)
        if (not link) if sketch is None else sketch:
            self._sketch([v])
        return v

    def _sketch(self, versions: Iterable[Version]) -> None:
        """Store the similarity sketch of each new version (``registry.sketches``; never raises: a
        version it cannot sketch is recorded with the reason). A read-only registry skips it."""
        versions = list(versions)
        self._store_sketches(versions, [None] * len(versions))

    def _store_sketches(self, versions: list[Version], made: list) -> None:
        """The ``store_sketches`` hook of imports (``registry.sketch_import``); never raises."""
        if self.readonly or not versions:
            return
        from loradex.registry import sketch_import

        sketch_import.store_sketches(self, versions, made)

    def _sketch_staged(self, items: list) -> list:
        """The ``sketch_files`` hook of a folder import (``registry.sketch_import``); never raises."""
        from loradex.registry import sketch_import

        return sketch_import.sketch_staged(self, items)

    def add_many(self, root: str | os.PathLike, *, prefix: str | None = None, tags: Iterable[str] = (),
                 arch=None, base_model: str | None = None, batch: int = BATCH_FILES, workers: int | None = None,
                 follow_links: bool = False, on_file: Callable[[str, str], None] | None = None,
                 progress: Callable[[int], None] | None = None, allow_nonfinite: bool = False,
                 link: bool = False, sketch: bool | None = None) -> ImportReport:
        """Import every artifact under a folder (e.g. A1111's ``models/Lora``): each weights file,
        each A1111 embedding image (``.png``), and each sub-folder that is one artifact (PEFT
        adapter, diffusers pipeline), named after its path relative to ``root`` (``prefix-``
        prepended when given). Files loradex does not recognise, preview images (``*.preview.png``
        and PNGs holding no embedding), FIFOs/devices/sockets, symlinks leaving ``root`` (unless
        ``follow_links``) and loops are skipped with the reason; a folder with nothing importable
        is a RegistryError. Each file is read once (both SHA-256, CRC32 and AutoV1 from that read)
        and described from its header where it lies in the store. Blobs are made durable by one
        ``syncfs`` per ``batch`` files (or 2 GiB), and each batch's rows are written in one
        transaction. ``workers`` threads (default: one per CPU, at most 8) stage files ahead of the
        catalogue. ``arch`` (a name or an Arch: ``--base``'s) and ``base_model`` apply to every
        file. Adapters holding NaN/Inf values are skipped with the reason unless
        ``allow_nonfinite``. ``link``: as for :meth:`add` (``ImportReport.linked`` counts the files
        linked rather than copied); ``sketch``: as for :meth:`add` (default: yes, unless ``link``)."""
        self._writable(f"import {root}")
        return self._ingest.add_many(root, prefix=prefix, tags=tags, arch=arch, base_model=base_model, batch=batch,
                                     workers=workers, follow_links=follow_links, on_file=on_file,
                                     progress=progress, allow_nonfinite=allow_nonfinite, link=link,
                                     sketch=(not link) if sketch is None else sketch)

    def update(self, name: str, *, description: str | None = None, trigger_words: Iterable[str] | None = None,
               labels: Iterable[str] | None = None) -> dict:
        """Edit an adapter's description, trigger words or labels (they go into model cards)."""
        self._writable(f"update {name}")
        with _db.write(self.db) as d:
            row = _db.adapter_row(d, name)
            if row is None:
                raise RegistryError(f"no adapter named {name!r}")
            update_info(d, row, {}, {"description": description, "trigger_words": as_list(trigger_words),
                                     "labels": as_list(labels)})
        return self.info(name)

    def info(self, name: str) -> dict:
        """The adapter-level record of ``name``: ``name``, ``description``, ``trigger_words``,
        ``labels`` (lists), ``created``, ``updated`` (what model cards use); RegistryError when
        there is no such adapter."""
        row = _db.adapter_row(self.db, name)
        if row is None:
            raise RegistryError(f"no adapter named {name!r}")
        return {"name": row["name"], "description": row["description"] or "",
                "trigger_words": json.loads(row["trigger_words"] or "[]"), "labels": json.loads(row["labels"] or "[]"),
                "created": row["created"], "updated": row["updated"]}

    def tag(self, ref: str | Version, tag: str) -> Version:
        """Point ``tag`` of the version's adapter at it (moving it if it pointed elsewhere)."""
        validate_tag(tag)
        self._writable(f"tag {ref}")
        with _db.write(self.db) as d:
            v = self.get(ref)
            _db.set_tag(d, v.adapter_id, tag, v.id)
        return self.get(v.ref)

    def untag(self, name: str, tag: str | None = None) -> None:
        """Remove a tag: ``untag("face", "prod")`` or ``untag("face:prod")``."""
        if tag is None:
            name, sep, tag = name.partition(":")
            if not sep or not tag:
                raise RegistryError(f"untag needs NAME:TAG or NAME and TAG, not {name!r}")
        self._writable(f"untag {name}:{tag}")
        with _db.write(self.db) as d:
            require_adapter(d, name, str(self.home))
            if not _db.delete_tag(d, name, tag):
                raise RegistryError(f"{name} has no tag {tag!r}")

    def remove(self, ref: str, all_versions: bool = False) -> list[Version]:
        """Remove one version (``all_versions``: every version of the name). Blobs stay until ``gc``.
        Lineage edges that named a removed version as a parent keep it as text."""
        self._writable(f"remove {ref}")
        with _db.write(self.db) as d:
            if all_versions:  # the name of whatever version the REF names (a sha prefix too)
                victims = self.versions(self.get(ref).name)
            else:
                victims = [self.get(ref)]
            for v in victims:
                _db.delete_version(d, v)
            for aid in {v.adapter_id for v in victims}:
                _db.delete_adapter_if_empty(d, aid)
        from loradex.registry import sketches

        sketches.forget(self, [v.id for v in victims])
        return victims

    # ---- what it is and where it came from ------------------------------------------------------
    def show(self, ref: str | Version) -> dict:
        """Everything about a version: its row, its adapter, tags, direct lineage, and the other
        versions with the same bytes (sha256) or the same tensors (AutoV3, metadata differing).
        The hashes are the catalogue's (checked against the blob by every command that reads it)."""
        v = self._version(ref)
        out = v.to_dict()
        out["adapter"] = self.info(v.name)
        out["same_bytes"] = [x.ref for x in _db.same_bytes(self.db, v.sha256, v.id)]
        a3 = v.hashes.get("autov3_full")
        same_t = _db.same_tensors(self.db, a3, v.sha256) if a3 else []
        out["same_tensors"] = [x.ref for x in same_t]
        out["identity_notes"] = [f"same tensors as {x.ref} (AutoV3 {v.hashes['autov3']}), metadata differs"
                                 for x in same_t]
        out["parents"] = [{k: x for k, x in e.items() if k != "parent_id"} for e in _db.parents(self.db, v.id)]
        return out

    def lineage(self, ref: str | Version, depth: int = 32) -> dict:
        """The version's ancestry (recursively: each parent with the operation and parameters that
        made the child) and its direct descendants."""
        v = self._version(ref)

        def up(vid: int, ref_: str, sha: str, seen: frozenset, level: int) -> dict:
            node = {"ref": ref_, "sha256": sha, "parents": []}
            if level >= depth or vid in seen:
                return node
            for e in _db.parents(self.db, vid):
                pid = e.pop("parent_id")
                if pid is not None:
                    e["node"] = up(pid, e["parent"], _db.version_sha(self.db, pid), seen | {vid}, level + 1)
                node["parents"].append(e)
            return node

        tree = up(v.id, v.ref, v.sha256, frozenset(), 0)
        tree["children"] = _db.children(self.db, v.id)
        return tree

    # ---- maintenance -------------------------------------------------------------------------
    def verify(self, quick: bool = False, progress: Callable[[int], None] | None = None) -> dict:
        """Check every row against its blob (see ``registry.maintenance.verify``)."""
        return maintenance.verify(self.db, self.store, self.tmp, quick=quick, progress=progress)

    def gc(self, dry_run: bool = False) -> dict:
        """Remove blobs no row references and temporary files no live import owns (under the
        write lock; see ``registry.maintenance.gc``)."""
        self._writable("collect garbage")  # even a dry run takes the write lock
        return maintenance.gc(self.db, self.store, self.tmp, dry_run=dry_run)

    # ---- Hub (registry.hub depends on the Registry; these delegate to it lazily) ----------------
    def push(self, ref: str | Version, repo_id: str, *, private: bool = False, to: str | None = None,
             dry_run: bool = False, out_dir: str | os.PathLike | None = None, license: str | None = None,
             token: str | None = None, commit_message: str | None = None, arch=None, samples: int = 0,
             sample_prompts: Iterable[str] = (), device: str | None = None, base_model: str | None = None) -> dict:
        """Publish a version on the Hugging Face Hub with a model card (see ``registry.hub.push``):
        ``arch`` reads the stored file against that architecture (default: the recorded one),
        ``samples`` images rendered on the recorded base (or ``base_model``) go to the card's widget."""
        from loradex.registry import hub

        return hub.push(self, ref, repo_id, private=private, to=to, dry_run=dry_run, out_dir=out_dir,
                        license=license, token=token, commit_message=commit_message, arch=arch, samples=samples,
                        sample_prompts=sample_prompts, device=device, base_model=base_model)

    def pull(self, repo: str, name: str, *, revision: str | None = None, filename: str | None = None,
             tags: Iterable[str] = (), arch: str | None = None, token: str | None = None) -> Version:
        """Download ``repo`` (``ID`` or ``ID@REVISION``) with huggingface_hub and store it as
        ``name``, the source recorded in lineage (see ``registry.hub``)."""
        from loradex.registry import hub

        self._writable(f"pull {repo}")
        return hub.pull(self, repo, name, revision=revision, filename=filename, tags=tags, arch=arch, token=token)
