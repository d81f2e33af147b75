"""``Registry``: named, versioned, content-addressed artifacts (adapters, embeddings, checkpoints).

    reg = loradex.Registry()                       # $LORADEX_HOME, else $XDG_DATA_HOME/loradex
    v = reg.add("face.safetensors", name="face", tags=["prod"])
    reg.get("face"), reg.get("face@1"), reg.get("face:prod"), reg.get(v.sha256[:10])
    adapter = reg.load("face:prod")
    reg.export("face", "out.safetensors", to="diffusers")

REF grammar: ``NAME`` (the newest version), ``NAME@N`` (version N), ``NAME:TAG`` (a movable tag;
``NAME:latest`` is the newest version), ``sha256:PREFIX`` or a bare hex prefix of at least 8
characters (the sha256 of a file, or of a folder's manifest) when no adapter has that name.

Order of an import (crash safety): the bytes are streamed into a temporary file of the store while
they are hashed, described through ``loradex.api`` (the only parsing), renamed into place and made
durable, and only then is the catalogue row written, in one ``BEGIN IMMEDIATE`` transaction that
first checks the blob is still there (a concurrent ``gc`` deletes only under the same lock). A
process killed anywhere leaves at most an unreferenced blob or a temporary file; ``gc`` removes
both, ``verify`` finds nothing wrong with the rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from loradex.errors import ArchError, FormatError, LoradexError, RegistryError
from loradex.registry import db as _db
from loradex.registry.db import Version
from loradex.registry.store import BlobStore, Ingested, pause_point

MAX_NAME = 100
MAX_TAG = 64
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
HEX_RE = re.compile(r"^[0-9a-fA-F]+$")
MIN_SHA_PREFIX = 8
RESERVED_TAGS = frozenset({"latest"})
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
OPERATIONS = ("import", "convert", "merge", "resize", "extract", "bake", "train", "pull")
_HIDDEN = (".git", ".cache", ".huggingface")


def validate_name(name: str, what: str = "name", limit: int = MAX_NAME) -> str:
    """Adapter names and tags: letters, digits, ``.``, ``_``, ``-``; no path separators, no ``..``."""
    if not isinstance(name, str) or not name:
        raise RegistryError(f"{what} must be a non-empty string")
    if len(name) > limit:
        raise RegistryError(f"{what} {name[:40]!r}... is {len(name)} characters long; at most {limit} are allowed")
    if "/" in name or "\\" in name or os.sep in name:
        raise RegistryError(f"{what} {name!r} contains a path separator")
    if ".." in name:
        raise RegistryError(f"{what} {name!r} contains '..'")
    if not NAME_RE.match(name):
        raise RegistryError(f"{what} {name!r} is not allowed: use letters, digits, '.', '_' and '-', "
                            "starting with a letter or digit")
    return name


def sanitize_name(text: str, limit: int = MAX_NAME) -> str:
    """A valid name made from a file path (folder imports): separators -> '.', other characters ->
    '_'. Names that lost non-ASCII characters get a short hash of the path, so that two files
    named in another script do not become versions of one name."""
    s = re.sub(r"[\\/]+", ".", text)
    lossy = any(ord(c) > 127 for c in s)
    s = re.sub(r"[^A-Za-z0-9._-]", "_", s)
    s = re.sub(r"\.{2,}", ".", s).strip("._-")
    if not s or not s[0].isalnum():
        s = "a" + s if s else "adapter"
        lossy = True
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    if lossy:
        s = f"{s[: limit - 9].rstrip('._-')}-{digest}"
    elif len(s) > limit:
        s = s[: limit - 9].rstrip("._-") + "-" + digest
    return s


def default_home() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(xdg) / "loradex"


@dataclass
class ImportReport:
    """What ``add_many`` did: versions added (or found already stored), files skipped and why."""

    added: list[Version] = field(default_factory=list)
    existing: list[Version] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def same_tensors(self) -> list[list[str]]:
        """Groups of imported versions whose tensors are identical (same AutoV3), bytes differing or not."""
        groups: dict[str, list[str]] = {}
        for v in self.added + self.existing:
            if v.hashes.get("autov3_full"):
                groups.setdefault(v.hashes["autov3_full"], []).append(v.ref)
        return [g for g in groups.values() if len(g) > 1]

    def to_dict(self) -> dict:
        return {
            "added": [v.to_dict(metadata=False) for v in self.added],
            "existing": [v.to_dict(metadata=False) for v in self.existing],
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "same_tensors": self.same_tensors(),
        }


@dataclass
class _Pending:
    """An artifact whose bytes are in the store, waiting for its catalogue row."""

    name: str
    record: dict
    blobs: list[tuple[str, int]]  # (sha256, size) that must exist when the row is written
    files: list[dict] | None = None
    tags: Sequence[str] = ()
    edges: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # adapter-level: description, trigger_words, labels


class Registry:
    """A registry folder: ``registry.db`` (SQLite, WAL) and ``blobs/`` (content-addressed files).

    ``home``: the folder; default ``$LORADEX_HOME``, else ``$XDG_DATA_HOME/loradex`` (created on
    first use). A home named explicitly (argument or ``LORADEX_HOME``) must exist unless
    ``create=True``; a read-only one is refused with a clear error."""

    def __init__(self, home: str | os.PathLike | None = None, create: bool = False) -> None:
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
        try:  # a real write: os.access says yes to root even on read-only or immutable folders
            fd, probe = tempfile.mkstemp(prefix=".probe-", dir=self.home)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise RegistryError(f"{where} {self.home} is not writable ({e.strerror or e}); "
                                "the registry needs to write its database and blobs there") from None
        self.store = BlobStore(self.home / "blobs")
        self.tmp = self.home / "tmp"
        try:
            self.store.ensure()
            self.tmp.mkdir(exist_ok=True)
            self.db = _db.connect(self.home / "registry.db")
        except (OSError, _db.sqlite3.Error) as e:
            raise RegistryError(f"cannot open the registry in {self.home}: {e}") from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({str(self.home)!r})"

    # ---- references ------------------------------------------------------------------------
    def get(self, ref: str | Version) -> Version:
        """The version a REF names (RegistryError when none, or when a sha prefix is ambiguous)."""
        if isinstance(ref, Version):
            ref = ref.ref
        if not isinstance(ref, str) or not ref.strip():
            raise RegistryError("empty reference")
        ref = ref.strip()
        d = self.db
        if ref.lower().startswith("sha256:"):
            return self._by_sha(ref[7:])
        if "@" in ref:
            name, _, num = ref.rpartition("@")
            if not num.isdigit():
                raise RegistryError(f"bad reference {ref!r}: the part after '@' must be a version number")
            found = _db.fetch_versions(d, "a.name = ? AND v.number = ?", (name, int(num)))
            if not found:
                self._require_adapter(name)
                nums = [str(v.number) for v in self.versions(name)]
                raise RegistryError(f"{name} has no version {num} (versions: {', '.join(nums)})")
            return self._full(found[0])
        if ":" in ref:
            name, _, tag = ref.partition(":")
            if tag == "latest":
                return self.get(name)
            found = _db.fetch_versions(d, "a.name = ? AND v.id = (SELECT version_id FROM tags t WHERE t.adapter_id = "
                                       "a.id AND t.tag = ?)", (name, tag))
            if not found:
                self._require_adapter(name)
                tags = [r[0] for r in d.execute("SELECT t.tag FROM tags t JOIN adapters a ON a.id = t.adapter_id "
                                                "WHERE a.name = ? ORDER BY t.tag", (name,))]
                raise RegistryError(f"{name} has no tag {tag!r} (tags: {', '.join(tags) or 'none'})")
            return self._full(found[0])
        found = _db.fetch_versions(d, "a.name = ?", (ref,), order="v.number DESC", limit=1)
        if found:
            return self._full(found[0])
        if len(ref) >= MIN_SHA_PREFIX and HEX_RE.match(ref):
            return self._by_sha(ref)
        raise RegistryError(f"no adapter named {ref!r} in {self.home}" + self._suggest(ref))

    def _full(self, v: Version) -> Version:
        _db.attach_files(self.db, v)
        return v

    def _by_sha(self, prefix: str) -> Version:
        p = prefix.lower()
        if not p or not HEX_RE.match(p):
            raise RegistryError(f"bad sha256 prefix {prefix!r}")
        found = _db.fetch_versions(self.db, "v.sha256 >= ? AND v.sha256 < ?", (p, p + "g"), order="v.id", limit=20)
        if not found:
            raise RegistryError(f"no version whose sha256 starts with {p}")
        if len({v.sha256 for v in found}) > 1:
            raise RegistryError(f"sha256 prefix {p} is ambiguous: " + ", ".join(f"{v.ref} ({v.sha256[:12]})" for v in found[:5]))
        return self._full(found[0])  # the same bytes under several names: the first stored

    def _require_adapter(self, name: str) -> None:
        if _db.adapter_row(self.db, name) is None:
            raise RegistryError(f"no adapter named {name!r} in {self.home}" + self._suggest(name))

    def _suggest(self, name: str) -> str:
        try:
            hits = _db.search(self.db, name, limit=3)
        except Exception:
            return ""
        return f" (did you mean {', '.join(v.name for v in hits)}?)" if hits else ""

    def versions(self, name: str) -> list[Version]:
        self._require_adapter(name)
        return _db.fetch_versions(self.db, "a.name = ?", (name,), order="v.number")

    def list(self) -> list[dict]:
        """Every adapter: name, versions, newest number, tags, newest format/arch/kinds."""
        return _db.list_adapters(self.db)

    def search(self, query: str = "", arch: str | None = None, kind: str | None = None, base: str | None = None,
               limit: int = 50) -> list[Version]:
        """Newest matching version per adapter (see ``db.search``)."""
        return _db.search(self.db, query, arch=arch, kind=kind, base=base, limit=limit)

    def path(self, ref: str | Version) -> Path:
        """The blob of a single-file version (read-only; use ``export`` for a named copy)."""
        v = ref if isinstance(ref, Version) else self.get(ref)
        if v.layout != "file":
            raise RegistryError(f"{v.ref} is a folder; use export or checkout")
        return self.store.path(v.sha256)

    @contextlib.contextmanager
    def checkout(self, ref: str | Version) -> Iterator[Path]:
        """A temporary, read-only view of a version under its original file name (hard links to the
        blobs), for tools that need a path; removed on exit."""
        v = ref if isinstance(ref, Version) else self.get(ref)
        if v.layout == "folder" and not v.files:
            _db.attach_files(self.db, v)
        d = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=self.tmp))
        try:
            if v.layout == "file":
                out = d / (v.filename or f"{v.name}.safetensors")
                _link_or_copy(self._blob_for(v.sha256, v.size, v.ref), out)
            else:
                out = d / (v.filename or v.name)
                for f in v.files:
                    dst = out / f["path"]
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    _link_or_copy(self._blob_for(f["sha256"], f["size"], f"{v.ref}:{f['path']}"), dst)
            yield out
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def _blob_for(self, sha: str, size: int, what: str) -> Path:
        if not self.store.has(sha, size):
            raise RegistryError(f"{what}: its blob {sha[:12]} is missing or truncated; run `loradex verify`")
        return self.store.path(sha)

    def load(self, ref: str | Version, arch=None):
        """The ``Adapter`` of a stored version (read through ``loradex.api.load``)."""
        from loradex import api

        v = ref if isinstance(ref, Version) else self.get(ref)
        if v.artifact == "checkpoint":
            raise RegistryError(f"{v.ref} is a {v.format} checkpoint, not an adapter; export it instead")
        with self.checkout(v) as p:
            # the recorded arch by default: adapters for custom bases are not detectable from keys
            return api.load(p, format=v.format, arch=arch or (self.arch(v.arch) if v.arch else None))

    def arch(self, name: str):
        """The ``Arch`` of a recorded arch name: a built-in or embedded one, one known to this
        process or its cache, else rebuilt from the descriptor the catalogue keeps for it."""
        import json

        from loradex.core.archs import arch_from_descriptor, get_arch
        from loradex.errors import ArchError

        try:
            return get_arch(name)
        except ArchError:
            desc = _db.get_arch_descriptor(self.db, name)
            if desc is None:
                raise
            return arch_from_descriptor(json.loads(desc), name=name)

    def _keep_arch(self, d, name: str | None) -> None:
        """Record the descriptor of an arch derived from a custom base, so the name resolves on any
        machine that has this registry (built-in and embedded names need none)."""
        if not name:
            return
        import json

        from loradex.core.archs import builtin_names, get_arch, tiny_names
        from loradex.errors import ArchError

        if name in builtin_names() or name in tiny_names():
            return
        try:
            desc = get_arch(name).descriptor()
        except ArchError:
            return
        if desc is not None:
            _db.put_arch(d, name, desc["family"], json.dumps(desc, sort_keys=True, separators=(",", ":")))

    # ---- adding ----------------------------------------------------------------------------
    def add(self, path: str | os.PathLike, name: str, *, tags: Iterable[str] = (), description: str | None = None,
            trigger_words: Iterable[str] | None = None, labels: Iterable[str] | None = None, arch=None,
            base_model: str | None = None, parents: Iterable = (), operation: str = "import",
            params: dict | None = None, source: str | None = None,
            progress: Callable[[int], None] | None = None) -> Version:
        """Store one artifact (a file, a PEFT adapter folder or a diffusers pipeline folder) as the
        next version of ``name``. Adding bytes that ``name`` already has returns that version (its
        tags updated). ``parents``/``operation``/``params`` record lineage (REFs, Versions or paths);
        an import records its source path. ``arch`` (a name or an Arch, e.g. a ``--base``'s) reads
        the file against that architecture; ``base_model`` records the base it is for (the
        identity of a ``--base``: REF, Hub id or path)."""
        validate_name(name)
        tags = [validate_tag(t) for t in tags]
        if operation not in OPERATIONS:
            raise RegistryError(f"unknown operation {operation!r} (one of {', '.join(OPERATIONS)})")
        p = Path(path)
        if not p.exists():
            raise RegistryError(f"{p}: no such file or folder")
        if p.is_dir() and not is_folder_artifact(p):
            raise RegistryError(f"{p} is a folder of files, not one adapter or pipeline folder: import each file "
                                "with add_many (CLI: loradex add DIR)")
        edges = self._edges(parents, operation, params, source or str(p.resolve()))
        info = {"description": description, "trigger_words": _list(trigger_words), "labels": _list(labels)}
        for _attempt in range(3):
            pend = self._stage(p, name, arch, base_model, durable=True, progress=progress)
            if isinstance(pend, Version):  # the same bytes are already this name's
                self._apply(name, tags, info, pend)
                return self.get(pend.ref)
            pend.tags, pend.edges, pend.info = tags, edges, info
            pause_point("blob-stored")
            try:
                return self._record([pend])[0]
            except _BlobVanished:
                continue  # a gc ran between the blob and the row: store it again
        raise RegistryError(f"{p}: could not store the file (its blob kept disappearing; is a gc running?)")

    def add_many(self, root: str | os.PathLike, *, prefix: str | None = None, tags: Iterable[str] = (),
                 arch=None, base_model: str | None = None, batch: int = 64, workers: int | None = None,
                 on_file: Callable[[str, str], None] | None = None,
                 progress: Callable[[int], None] | None = None) -> ImportReport:
        """Import every artifact under a folder (e.g. A1111's ``models/Lora``): each weights file,
        and each sub-folder that is one artifact (PEFT adapter, diffusers pipeline), named after its
        path relative to ``root`` (``prefix-`` prepended when given). Files loradex does not
        recognise are skipped with the reason. Blobs are made durable once per ``batch`` (one
        ``syncfs``) and each batch's rows are written in one transaction. ``workers`` threads (default:
        one per CPU, at most 8) stage files ahead of the catalogue. ``arch`` (a name or an Arch:
        ``--base``'s) and ``base_model`` apply to every file."""
        root = Path(root)
        if not root.is_dir():
            raise RegistryError(f"{root}: not a folder")
        if prefix is not None:
            validate_name(prefix, "name prefix")
        tags = [validate_tag(t) for t in tags]
        report = ImportReport()
        candidates, skipped = scan_folder(root)
        report.skipped.extend(skipped)
        pending: list[_Pending] = []

        def flush() -> None:
            if not pending:
                return
            self.store.sync()
            pause_point("blob-stored")
            try:
                report.added.extend(self._record(pending))
            except _BlobVanished:  # a concurrent gc: redo this batch one by one, durably
                for pe in pending:
                    report.added.append(self.add(pe.info["_path"], pe.name, tags=pe.tags, arch=arch,
                                                 base_model=base_model))
            pending.clear()

        def prepare(path: Path):  # runs in a worker thread: bytes, hashes, description; no rows
            return None if path.is_dir() else self._prepare_file(path, arch, progress, shortcut=False)

        # Files are read, hashed and described by ``workers`` threads (hashing and file I/O run
        # outside the GIL), in a bounded window ahead of the main thread, which alone touches the
        # catalogue and decides, in the folder's order, what each staged file becomes.
        workers = max(1, min(workers if workers is not None else (os.cpu_count() or 1), 8))
        window = 4 * workers
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loradex-import") as pool:
            futures: deque = deque()
            todo = iter(candidates)
            for path in todo:
                futures.append((path, pool.submit(prepare, path)))
                if len(futures) >= window:
                    break
            try:
                while futures:
                    path, fut = futures.popleft()
                    nxt = next(todo, None)
                    if nxt is not None:
                        futures.append((nxt, pool.submit(prepare, nxt)))
                    rel = path.relative_to(root).as_posix()
                    stem = rel[: -len(path.suffix)] if path.is_file() and path.suffix else rel
                    name = sanitize_name(f"{prefix}-{stem}" if prefix else stem)
                    try:
                        staged = fut.result()
                        if staged is None:
                            pend = self._stage(path, name, arch, base_model, durable=False, progress=progress)
                        else:
                            pend = self._stage_prepared(path, name, staged[0], staged[1], base_model, durable=False)
                    except (LoradexError, OSError) as e:
                        report.skipped.append((rel, _reason(e, path)))
                        if on_file:
                            on_file(rel, "skipped")
                        continue
                    if isinstance(pend, Version):
                        self._apply(name, tags, {}, pend)
                        report.existing.append(pend)
                    else:
                        pend.tags = tags
                        pend.edges = self._edges((), "import", None, str(path.resolve()))
                        pend.info = {"_path": str(path)}
                        pending.append(pend)
                        if len(pending) >= batch:
                            flush()
                    if on_file:
                        on_file(rel, "ok")
            except BaseException:
                for _path, fut in futures:  # staged temporaries of files not reached: drop them
                    fut.cancel()
                    with contextlib.suppress(Exception):
                        got = fut.result()
                        if got is not None:
                            self.store.discard(got[0])
                raise
        flush()
        return report

    def _stage(self, p: Path, name: str, arch, base_model, durable: bool, progress) -> _Pending | Version:
        """Put the bytes of ``p`` in the store and describe them; no row yet."""
        if p.is_dir():
            return self._stage_folder(p, name, arch, base_model, durable, progress)
        item, desc = self._prepare_file(p, arch, progress, shortcut=True, name=name)
        return self._stage_prepared(p, name, item, desc, base_model, durable)

    def _prepare_file(self, p: Path, arch, progress, shortcut: bool, name: str | None = None
                      ) -> tuple[Ingested, dict | None]:
        """Stream ``p`` into a temporary file of the store and describe those bytes. Without
        ``shortcut`` the catalogue is not consulted (safe in a worker thread); with it, bytes that
        ``name`` already has are not described (desc None) and a description is copied from
        another version with the same bytes and file name."""
        item = self.store.ingest(p, progress)
        try:
            if shortcut and name is not None and _db.fetch_versions(
                    self.db, "a.name = ? AND v.sha256 = ?", (name, item.sha256), limit=1, with_tags=False):
                return item, None
            return item, self._describe_ingested(item, p, arch, shortcut=shortcut)
        except BaseException:
            self.store.discard(item)
            raise

    def _stage_prepared(self, p: Path, name: str, item: Ingested, desc: dict | None, base_model,
                        durable: bool) -> _Pending | Version:
        """Commit a prepared file's blob and build its row, or return ``name``'s version that has
        these bytes already (the temporary is then dropped)."""
        try:
            same = _db.fetch_versions(self.db, "a.name = ? AND v.sha256 = ?", (name, item.sha256), limit=1)
            if same or desc is None:
                self.store.discard(item)
                if same:
                    return same[0]
                raise RegistryError(f"{p}: its version of {name!r} vanished while it was added; add it again")
        except BaseException:
            self.store.discard(item)
            raise
        self.store.commit(item, durable=durable)
        record = {k: v for k, v in desc.items() if not k.startswith("_")}
        record.update({k: item.hashes.get(k, "") for k in _db.HASH_FIELDS})
        record.update(sha256=item.sha256, size=item.size, layout="file", filename=p.name,
                      sshs_legacy_hash=desc.get("_sshs_legacy_hash", ""))
        if desc.get("_sshs_model_hash"):
            record["sshs_model_hash"] = desc["_sshs_model_hash"]
        if base_model:
            record["base_model"] = base_model
        return _Pending(name, record, [(item.sha256, item.size)])

    def _describe_ingested(self, item: Ingested, src: Path, arch, shortcut: bool = True) -> dict:
        """The description of freshly ingested bytes: copied from a version with the same bytes
        and file name when there is one, else read through ``loradex.api`` from a hard link of
        the temporary file under the original name (readers may use the name, e.g. a TI token)."""
        filename = src.name
        if arch is None and shortcut:
            prev = _db.fetch_versions(self.db, "v.sha256 = ? AND v.filename = ?", (item.sha256, filename),
                                      limit=1, with_tags=False)
            if prev:
                v = prev[0]
                return {"format": v.format, "arch": v.arch, "kinds": v.kinds, "ranks": v.ranks, "modules": v.modules,
                        "embeddings": v.embeddings, "metadata": v.metadata, "notes": v.notes,
                        "base_model": v.base_model, "artifact": v.artifact,
                        "_sshs_legacy_hash": v.hashes.get("sshs_legacy_hash", ""),
                        "_sshs_model_hash": v.hashes.get("sshs_model_hash", "")}
        d = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=self.tmp))
        try:
            view = d / filename
            _link_or_copy(item.tmp, view)
            try:
                desc = describe_path(view, arch=arch)
            except LoradexError as e:  # name the user's file, not the temporary view
                raise type(e)(str(e).replace(str(view), str(src))) from None
            if desc["format"] != "ckpt":
                with contextlib.suppress(FormatError, OSError):
                    from loradex.converters import safetensors_io as sio

                    if sio.is_safetensors(view):
                        kh = sio.kohya_hashes(view, data_sha256=item.hashes.get("sshs_model_hash") or None)
                        desc["_sshs_legacy_hash"] = kh["sshs_legacy_hash"]
                        desc["_sshs_model_hash"] = kh["sshs_model_hash"]
            return desc
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def _stage_folder(self, p: Path, name: str, arch, base_model, durable: bool, progress) -> _Pending | Version:
        files = folder_files(p)
        if not files:
            raise RegistryError(f"{p}: empty folder")
        items: list[tuple[str, Ingested]] = []
        try:
            for rel, fp in files:
                items.append((rel, self.store.ingest(fp, progress)))
        except BaseException:
            for _, it in items:
                self.store.discard(it)
            raise
        manifest = [{"path": rel, "sha256": it.sha256, "size": it.size} for rel, it in items]
        digest = manifest_digest(manifest)
        same = _db.fetch_versions(self.db, "a.name = ? AND v.sha256 = ?", (name, digest), limit=1)
        if same:
            for _, it in items:
                self.store.discard(it)
            return same[0]
        for _, it in items:
            self.store.commit(it, durable=False)
        if durable:
            self.store.sync()
        # describe the stored bytes (a view of hard links), not the source that may change meanwhile
        d = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=self.tmp))
        try:
            view = d / p.name
            for f in manifest:
                dst = view / f["path"]
                dst.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(self.store.path(f["sha256"]), dst)
            desc = describe_path(view, arch=arch)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        record = {**desc, "sha256": digest, "size": sum(f["size"] for f in manifest), "layout": "folder",
                  "filename": p.name, **{k: "" for k in _db.HASH_FIELDS}}
        if base_model:
            record["base_model"] = base_model
        return _Pending(name, record, [(f["sha256"], f["size"]) for f in manifest], files=manifest)

    def _edges(self, parents: Iterable, operation: str, params: dict | None, source: str) -> list[dict]:
        edges = []
        for par in parents:
            if isinstance(par, Version):
                edges.append({"parent_id": par.id, "parent_ref": par.ref})
                continue
            s = str(par)
            if Path(s).exists():
                edges.append({"parent_id": None, "parent_ref": str(Path(s).resolve())})
                continue
            v = self.get(s)
            edges.append({"parent_id": v.id, "parent_ref": v.ref})
        if not edges:
            edges.append({"parent_id": None, "parent_ref": source})
        for e in edges:
            e.update(operation=operation, params=params or {})
        return edges

    def _record(self, pending: list[_Pending]) -> list[Version]:
        """Write the rows of staged artifacts in one transaction (after their blobs are durable)."""
        ids = []
        with _db.write(self.db) as d:
            for pe in pending:
                for sha, size in pe.blobs:
                    if not self.store.has(sha, size):
                        raise _BlobVanished(sha)
            for pe in pending:
                adapter = _db.ensure_adapter(d, pe.name)
                same = d.execute("SELECT id FROM versions WHERE adapter_id = ? AND sha256 = ?",
                                 (adapter["id"], pe.record["sha256"])).fetchone()
                if same:  # a concurrent import of the same bytes won the race
                    vid = same[0]
                else:
                    self._keep_arch(d, pe.record.get("arch"))
                    vid = _db.insert_version(d, adapter, pe.record, pe.files)
                    for e in pe.edges:
                        _db.add_lineage(d, vid, e["operation"], e["params"], e["parent_id"], e["parent_ref"])
                for t in pe.tags:
                    _db.set_tag(d, adapter["id"], t, vid)
                self._update_info(d, adapter, pe.record, pe.info)
                ids.append(vid)
            pause_point("in-transaction")
        out = _db.fetch_versions(self.db, f"v.id IN ({','.join('?' * len(ids))})", ids, order="v.id")
        by_id = {v.id: v for v in out}
        return [self._full(by_id[i]) for i in ids]

    def _update_info(self, d, adapter: dict, record: dict, info: dict) -> None:
        fields: dict = {}
        if info.get("description") is not None:
            fields["description"] = info["description"]
        if info.get("labels") is not None:
            fields["labels"] = info["labels"]
        triggers = info.get("trigger_words")
        if triggers is None and adapter.get("trigger_words") in (None, "", "[]"):
            meta = record.get("metadata") or {}
            found = [meta["modelspec.trigger_phrase"]] if meta.get("modelspec.trigger_phrase") else []
            found += list(record.get("embeddings") or [])
            triggers = found or None
        if triggers is not None:
            fields["trigger_words"] = triggers
        words = set((adapter.get("keywords") or "").split())
        meta = record.get("metadata") or {}
        for w in (record.get("filename"), record.get("format"), record.get("arch"), record.get("base_model"),
                  meta.get("modelspec.title"), meta.get("ss_output_name"), *(record.get("embeddings") or [])):
            if w:
                words.update(str(w).split())
        kw = " ".join(sorted(words))[:4000]
        if kw != (adapter.get("keywords") or ""):
            fields["keywords"] = kw
        if fields:
            _db.update_adapter(d, adapter["id"], **fields)

    def _apply(self, name: str, tags: Sequence[str], info: dict, v: Version) -> None:
        if not tags and not any(info.get(k) is not None for k in ("description", "trigger_words", "labels")):
            return
        with _db.write(self.db) as d:
            adapter = _db.adapter_row(d, name)
            for t in tags:
                _db.set_tag(d, adapter["id"], t, v.id)
            self._update_info(d, adapter, {}, info)

    # ---- editing ---------------------------------------------------------------------------
    def update(self, name: str, *, description: str | None = None, trigger_words: Iterable[str] | None = None,
               labels: Iterable[str] | None = None) -> dict:
        """Edit an adapter's description, trigger words or labels (they go into model cards)."""
        with _db.write(self.db) as d:
            row = _db.adapter_row(d, name)
            if row is None:
                raise RegistryError(f"no adapter named {name!r}")
            self._update_info(d, row, {}, {"description": description, "trigger_words": _list(trigger_words),
                                           "labels": _list(labels)})
        return self.info(name)

    def info(self, name: str) -> dict:
        row = _db.adapter_row(self.db, name)
        if row is None:
            raise RegistryError(f"no adapter named {name!r}")
        return {"name": row["name"], "description": row["description"] or "",
                "trigger_words": json.loads(row["trigger_words"] or "[]"), "labels": json.loads(row["labels"] or "[]"),
                "created": row["created"], "updated": row["updated"]}

    def tag(self, ref: str | Version, tag: str) -> Version:
        """Point ``tag`` of the version's adapter at it (moving it if it pointed elsewhere)."""
        validate_tag(tag)
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
        with _db.write(self.db) as d:
            self._require_adapter(name)
            cur = d.execute("DELETE FROM tags WHERE tag = ? AND adapter_id = (SELECT id FROM adapters WHERE name = ?)",
                            (tag, name))
            if cur.rowcount == 0:
                raise RegistryError(f"{name} has no tag {tag!r}")

    def remove(self, ref: str, all_versions: bool = False) -> list[Version]:
        """Remove one version (``all_versions``: every version of the name). Blobs stay until ``gc``.
        Lineage edges that named a removed version as a parent keep it as text."""
        with _db.write(self.db) as d:
            if all_versions:
                name = ref.split("@", 1)[0].split(":", 1)[0]
                victims = self.versions(name)
            else:
                victims = [self.get(ref)]
            for v in victims:
                _db.delete_version(d, v)
            for aid in {v.adapter_id for v in victims}:
                _db.delete_adapter_if_empty(d, aid)
        return victims

    # ---- out -------------------------------------------------------------------------------
    def export(self, ref: str | Version, path: str | os.PathLike, to: str | None = None, rank: int | None = None,
               dtype=None, arch=None, **options):
        """Write a version to ``path``: its exact bytes (``to=None``; a folder for folder artifacts),
        or converted with ``loradex.save`` (``to=FORMAT``; returns the ConversionReport). ``path``
        may be an existing folder: the file keeps its stored name there."""
        from loradex import api
        from loradex.converters import safetensors_io as sio

        v = ref if isinstance(ref, Version) else self.get(ref)
        out = Path(path)
        if to is not None:
            adapter = self.load(v, arch=arch)
            if out.is_dir() and to != "peft":
                out = out / (Path(v.filename).stem + ".safetensors")
            return api.save(adapter, out, to, rank=rank, dtype=dtype, **options)
        if v.layout == "file":
            if out.is_dir():
                out = out / (v.filename or f"{v.name}.safetensors")
            src = self._blob_for(v.sha256, v.size, v.ref)
            with sio.atomic_path(out) as tmp:
                shutil.copyfile(src, tmp)
                os.chmod(tmp, 0o644)
            return out
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            out = out / (v.filename or v.name)
            if out.exists():
                raise RegistryError(f"{out} already exists")
        if not v.files:
            _db.attach_files(self.db, v)
        for f in v.files:
            dst = out / f["path"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            with sio.atomic_path(dst) as tmp:
                shutil.copyfile(self._blob_for(f["sha256"], f["size"], f"{v.ref}:{f['path']}"), tmp)
                os.chmod(tmp, 0o644)
        return out

    def show(self, ref: str | Version) -> dict:
        """Everything about a version: its row, its adapter, tags, direct lineage, and the other
        versions with the same bytes (sha256) or the same tensors (AutoV3, metadata differing)."""
        v = ref if isinstance(ref, Version) else self.get(ref)
        out = v.to_dict()
        out["adapter"] = self.info(v.name)
        same_bytes = _db.fetch_versions(self.db, "v.sha256 = ? AND v.id != ?", (v.sha256, v.id), order="v.id",
                                        with_tags=False)
        out["same_bytes"] = [x.ref for x in same_bytes]
        a3 = v.hashes.get("autov3_full")
        same_t = (_db.fetch_versions(self.db, "v.autov3_full = ? AND v.sha256 != ?", (a3, v.sha256), order="v.id",
                                     with_tags=False) if a3 else [])
        out["same_tensors"] = [x.ref for x in same_t]
        out["identity_notes"] = [f"same tensors as {x.ref} (AutoV3 {v.hashes['autov3']}), metadata differs"
                                 for x in same_t]
        out["parents"] = [{k: x for k, x in e.items() if k != "parent_id"} for e in self._parents(v.id)]
        return out

    def _parents(self, vid: int) -> list[dict]:
        rows = self.db.execute(
            "SELECT l.operation, l.params, l.parent_id, l.parent_ref, l.created, a.name, v.number FROM lineage l "
            "LEFT JOIN versions v ON v.id = l.parent_id LEFT JOIN adapters a ON a.id = v.adapter_id "
            "WHERE l.child_id = ? ORDER BY l.id", (vid,)).fetchall()
        return [{"operation": op, "params": json.loads(params or "{}"), "created": created,
                 "parent": f"{name}@{number}" if pid is not None else None, "source": None if pid is not None else pref,
                 "parent_id": pid}
                for op, params, pid, pref, created, name, number in rows]

    def lineage(self, ref: str | Version, depth: int = 32) -> dict:
        """The version's ancestry (recursively: each parent with the operation and parameters that
        made the child) and its direct descendants."""
        v = ref if isinstance(ref, Version) else self.get(ref)

        def up(vid: int, ref_: str, sha: str, seen: frozenset, level: int) -> dict:
            node = {"ref": ref_, "sha256": sha, "parents": []}
            if level >= depth or vid in seen:
                return node
            for e in self._parents(vid):
                pid = e.pop("parent_id")
                if pid is not None:
                    prow = self.db.execute("SELECT sha256 FROM versions WHERE id = ?", (pid,)).fetchone()
                    e["node"] = up(pid, e["parent"], prow[0] if prow else "", seen | {vid}, level + 1)
                node["parents"].append(e)
            return node

        tree = up(v.id, v.ref, v.sha256, frozenset(), 0)
        children = self.db.execute(
            "SELECT l.operation, l.params, a.name, v.number FROM lineage l JOIN versions v ON v.id = l.child_id "
            "JOIN adapters a ON a.id = v.adapter_id WHERE l.parent_id = ? ORDER BY l.id", (v.id,)).fetchall()
        tree["children"] = [{"operation": op, "params": json.loads(p or "{}"), "child": f"{n}@{num}"}
                            for op, p, n, num in children]
        return tree

    # ---- maintenance -------------------------------------------------------------------------
    def verify(self, quick: bool = False, progress: Callable[[int], None] | None = None) -> dict:
        """Check every row against its blob: present, the right size and (unless ``quick``) the
        right sha256, re-hashed by streaming. Problems name the versions. Orphan blobs and stale
        temporary files are listed (``gc`` removes them) but are not problems."""
        from loradex.registry.hashes import file_hashes

        refs = _db.blob_references(self.db)
        problems, checked, nbytes = [], 0, 0
        for sha in sorted(refs):
            users = refs[sha]
            size = users[0][1]
            p = self.store.path(sha)
            names = sorted({u for u, _ in users})
            if not p.is_file():
                problems.append({"versions": names, "sha256": sha, "problem": "blob missing"})
                continue
            actual = p.stat().st_size
            if actual != size:
                problems.append({"versions": names, "sha256": sha,
                                 "problem": f"blob is {actual} bytes, the catalogue says {size}"})
                continue
            checked += 1
            nbytes += size
            if not quick:
                got = file_hashes(p, progress=progress)["sha256"]
                if got != sha:
                    problems.append({"versions": names, "sha256": sha,
                                     "problem": f"content changed: its bytes now hash to {got[:16]}..."})
        integrity = self.db.execute("PRAGMA quick_check").fetchone()[0]
        if integrity != "ok":
            problems.append({"versions": [], "sha256": "", "problem": f"database: {integrity}"})
        orphans = [sha for sha, _ in self.store.iter_blobs() if sha not in refs]
        temps = [str(t) for t in self.store.stale_temps()] + [str(t) for t in _stale_dirs(self.tmp)]
        return {"ok": not problems, "problems": problems, "blobs_checked": checked, "bytes_checked": nbytes,
                "orphan_blobs": orphans, "stale_temp_files": temps, "quick": quick}

    def gc(self, dry_run: bool = False) -> dict:
        """Remove blobs no row references and temporary files no live import owns. Runs under the
        write lock, so an import in progress either has its row already or re-checks its blob."""
        removed, freed = [], 0
        with _db.write(self.db):
            refs = _db.blob_references(self.db)
            for sha, p in list(self.store.iter_blobs()):
                if sha not in refs:
                    removed.append(sha)
                    freed += p.stat().st_size if dry_run else self.store.remove(sha)
            temps = self.store.stale_temps() + _stale_dirs(self.tmp)
            if not dry_run:
                for t in temps:
                    if t.is_dir():
                        shutil.rmtree(t, ignore_errors=True)
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            freed += t.stat().st_size
                            t.unlink()
        return {"removed_blobs": removed, "removed_temp_files": [str(t) for t in temps], "freed_bytes": freed,
                "dry_run": dry_run}

    # ---- Hub ---------------------------------------------------------------------------------
    def push(self, ref: str | Version, repo_id: str, *, private: bool = False, to: str | None = None,
             dry_run: bool = False, out_dir: str | os.PathLike | None = None, license: str | None = None,
             token: str | None = None, commit_message: str | None = None, arch=None) -> dict:
        """Publish a version on the Hugging Face Hub with a model card (see ``registry.hub``).
        ``arch`` reads the stored file against that architecture (default: the recorded one)."""
        from loradex.registry import hub

        return hub.push(self, ref, repo_id, private=private, to=to, dry_run=dry_run, out_dir=out_dir,
                        license=license, token=token, commit_message=commit_message, arch=arch)

    def pull(self, repo: str, name: str, *, revision: str | None = None, filename: str | None = None,
             tags: Iterable[str] = (), arch: str | None = None, token: str | None = None) -> Version:
        """Download ``repo`` (``ID`` or ``ID@REVISION``) with huggingface_hub and store it as
        ``name``, the source recorded in lineage (see ``registry.hub``)."""
        from loradex.registry import hub

        return hub.pull(self, repo, name, revision=revision, filename=filename, tags=tags, arch=arch, token=token)


class _BlobVanished(Exception):
    pass


def validate_tag(tag: str) -> str:
    validate_name(tag, "tag", MAX_TAG)
    if tag in RESERVED_TAGS:
        raise RegistryError(f"tag {tag!r} is reserved: NAME:{tag} always names the newest version")
    return tag


def _list(x) -> list[str] | None:
    if x is None:
        return None
    if isinstance(x, str):
        x = [x]
    return [str(s).strip() for s in x if str(s).strip()]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _stale_dirs(tmp: Path) -> list[Path]:
    """Describe/checkout views under ``home/tmp`` whose process is gone."""
    from loradex.registry.store import _alive

    out = []
    if tmp.is_dir():
        for d in tmp.iterdir():
            pid = d.name.split("-", 1)[0]
            if not (pid.isdigit() and _alive(int(pid))):
                out.append(d)
    return out


def _reason(e: Exception, path: Path) -> str:
    msg = str(e)
    s = str(path)
    if msg.startswith(s + ": "):
        msg = msg[len(s) + 2 :]
    return msg[:300]


def folder_files(p: Path) -> list[tuple[str, Path]]:
    """Files of a folder artifact, sorted, symlinks followed (a Hugging Face snapshot is made of
    them), VCS and cache folders left out."""
    out = []
    for dirpath, dirnames, filenames in os.walk(p, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if d not in _HIDDEN)
        for f in sorted(filenames):
            fp = Path(dirpath) / f
            if fp.is_file():
                out.append((fp.relative_to(p).as_posix(), fp))
    return out


def manifest_digest(manifest: list[dict]) -> str:
    """The identity of a folder artifact: sha256 of its sorted (path, sha256, size) list."""
    rows = sorted((f["path"], f["sha256"], f["size"]) for f in manifest)
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def is_folder_artifact(p: Path) -> bool:
    if not p.is_dir():
        return False
    if (p / "model_index.json").is_file() or (p / "adapter_config.json").is_file():
        return True
    from loradex import converters

    try:
        return converters.detect(p).folder
    except LoradexError:
        return False


def scan_folder(root: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The candidates of a folder import, and what was skipped before reading anything."""
    if is_folder_artifact(root):
        return [root], []
    cands: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            sub = here / d
            if d.startswith("."):
                continue
            if is_folder_artifact(sub):
                cands.append(sub)
            else:
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            fp = here / f
            rel = fp.relative_to(root).as_posix()
            if f.startswith("."):
                continue
            if fp.suffix.lower() not in WEIGHT_SUFFIXES:
                skipped.append((rel, f"not a weights file ({fp.suffix or 'no extension'})"))
                continue
            cands.append(fp)
    return cands, skipped


def describe_path(path: Path, arch=None) -> dict:
    """What the catalogue records about an artifact, read through ``loradex.api`` (adapters and
    embeddings) or ``converters.checkpoint`` (full models: header / model_index.json only)."""
    from loradex import api, converters
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
                "modules": 0,
                "embeddings": [], "metadata": meta, "notes": notes, "artifact": "checkpoint",
                "base_model": _base_model(meta)}
    key = _structure_key(path, conv.name, arch)
    memo = _DESCRIPTIONS.get(key) if key is not None else None
    if memo is not None:
        d = dict(memo)
        from loradex.converters import safetensors_io as sio

        d["metadata"] = dict(sio.read_header(path).metadata)
        d["base_model"] = _base_model(d["metadata"])
        return d
    try:
        adapter = _load_structure(path, conv.name, arch)
    except ArchError as e:
        meta: dict = {}
        with contextlib.suppress(LoradexError, OSError):
            from loradex.converters import safetensors_io as sio

            if path.is_file() and sio.is_safetensors(path):
                meta = dict(sio.read_header(path).metadata)
        return {"format": conv.name, "arch": None, "kinds": {}, "ranks": {}, "modules": 0, "embeddings": [],
                "metadata": meta, "notes": [f"base model unknown: {e}"],
                "artifact": "embedding" if conv.name.endswith("-ti") else "adapter", "base_model": _base_model(meta)}
    d = api.describe(adapter)
    artifact = "embedding" if not adapter.patches and adapter.embeddings else "adapter"
    notes = list(adapter.notes) + [f"key not understood (not read): {k} ({why})" for k, why in adapter.unexplained.items()]
    if len(notes) > 50:
        notes = notes[:49] + [f"... and {len(notes) - 49} more notes (loradex inspect lists every key)"]
    out = {"format": d["format"], "arch": d["arch"], "kinds": d["kinds"], "ranks": d["ranks"],
           "modules": d["modules"], "embeddings": list(d["embeddings"]), "metadata": dict(adapter.metadata),
           "notes": notes, "artifact": artifact, "base_model": _base_model(adapter.metadata)}
    if key is not None:
        with _DESCRIPTIONS_LOCK:  # import workers describe concurrently
            if len(_DESCRIPTIONS) >= 256:
                _DESCRIPTIONS.pop(next(iter(_DESCRIPTIONS)))
            _DESCRIPTIONS[key] = out
    return out


#: Descriptions by structure key (see ``_structure_key``); a folder of LoRAs trained on one base
#: model at one rank shares a structure, so each structure is read through the converters once.
_DESCRIPTIONS: dict[str, dict] = {}
_DESCRIPTIONS_LOCK = threading.Lock()
#: Formats whose reading depends only on the header (keys, dtypes, shapes, metadata) and the
#: scalar tensors (alphas): the same structure gives the same description.
_STRUCTURAL_FORMATS = ("kohya", "lycoris", "diffusers", "comfy")


def _structure_key(path: Path, fmt: str, arch) -> str | None:
    """sha256 of what a description depends on: the format, the ``arch`` asked for, every tensor's
    name, dtype and shape, and the bytes of the one-element tensors (alphas). None where the
    description may depend on more (embeddings, folders, pickles)."""
    import hashlib

    from loradex.converters import safetensors_io as sio

    if fmt not in _STRUCTURAL_FORMATS or not path.is_file():
        return None
    h = sio.read_header(path)
    m = hashlib.sha256(f"{fmt}|{getattr(arch, 'name', arch)}|{sio.structure_digest(path, h)}|".encode())
    # the diffusers reader takes alphas from this metadata key
    m.update(h.metadata.get("lora_adapter_metadata", "").encode())
    return m.hexdigest()


def _load_structure(path: Path, fmt: str, arch):
    """The adapter's structure (kinds, ranks, alphas, modules) without reading its tensor data:
    converters read under ``safetensors_io.structure_only`` get meta tensors except for scalars.
    A reader that needs real values on the way (e.g. an embedding check) falls back to a full read."""
    from loradex import api
    from loradex.converters import safetensors_io as sio

    try:
        with sio.structure_only():
            return api.load(path, format=fmt, arch=arch)
    except LoradexError:
        raise
    except (NotImplementedError, RuntimeError, ValueError, TypeError):
        return api.load(path, format=fmt, arch=arch)


def _base_model(meta: dict) -> str | None:
    for k in ("loradex.base_model", "ss_sd_model_name", "ss_base_model_version", "modelspec.architecture"):
        if meta.get(k):
            return str(meta[k])
    return None
