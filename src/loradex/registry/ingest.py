"""Ingestion: files and folders into the store, described, then recorded in the catalogue.

Order of an import (crash safety): the bytes are read once into a temporary file of the store
that keeps the file's own name (``linking.Slots``; ``link=True``: a reflink or hard link of the
source, not a copy) while every identity is computed from that read (both SHA-256, CRC32, AutoV1);
they are described where they lie through ``loradex.api`` (the only parsing, on the stored bytes,
never on the source that may change meanwhile; a safetensors file from its header, the kohya
hashes and the NaN/Inf check from the same parse and the bytes already in memory), renamed into
place and made durable, and only then is the catalogue row written, in one ``BEGIN IMMEDIATE``
transaction that first checks the blob is still there (a concurrent ``gc`` deletes only under the
same lock). A process killed anywhere leaves at most an unreferenced blob or a temporary file;
``gc`` removes both, ``verify`` finds nothing wrong with the rows. A full disk
(``DiskFullError``) stops the import: temporaries are removed, no row is written, and blobs this
import created that no row names are removed again.

A folder import (``add_many``) runs that on worker threads, a window ahead of the main thread,
which alone touches the catalogue, sketches each new file for ``similar`` (the registry's hook)
while the workers go on, and writes rows in batches of ``BATCH_FILES`` files or ``BATCH_BYTES``
bytes after one ``syncfs``. Descriptions are memoized by structure (``DescriptionCache``, one per
``Ingestor``, so per ``Registry``): a folder of LoRAs trained on one base at one rank shares a
structure, and each structure is read through the converters once. Error messages name the
user's file, never the temporary one it was read from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from loradex.errors import ArchError, FormatError, LoradexError, RegistryError
from loradex.registry import db as _db
from loradex.registry.describe import DescriptionCache, describe_path
from loradex.registry.faults import DiskFullError, write_error
from loradex.registry.finite import check_embedding_image, check_finite, check_finite_files  # noqa: F401
from loradex.registry.linking import Slots
from loradex.registry.refs import renamed, sanitize_name, validate_name, validate_tag
from loradex.registry.scan import (
    check_importable,
    folder_files,
    is_folder_artifact,
    scan_folder,
)
from loradex.registry.store import BlobStore, Ingested, pause_point
from loradex.registry.version import HASH_FIELDS, Version

log = logging.getLogger(__name__)

OPERATIONS = ("import", "convert", "merge", "resize", "extract", "bake", "train", "pull")
#: a folder import writes its rows (after one sync of the store) once this many files ...
BATCH_FILES = 1000
#: ... or this many bytes are waiting: a sync costs tens of milliseconds whatever it flushes
BATCH_BYTES = 2 << 30
#: a staged file's bytes up to this size travel in memory to the main thread (its sketch)
KEEP_BYTES = 4 << 20
#: staged files sketched together (those of one structure in one batch of products), at most
#: this many or this many bytes of them (a big file is sketched as soon as it is staged)
SKETCH_BATCH = 32
SKETCH_BYTES = 64 << 20


@dataclass
class ImportReport:
    """What ``add_many`` did: versions added (or found already stored), files skipped and why."""

    added: list[Version] = field(default_factory=list)
    existing: list[Version] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    linked: int = 0  # with ``link=True``: files stored as a reflink or hard link, not copied

    def same_tensors(self) -> list[list[str]]:
        """Groups of imported versions whose tensors are identical (same AutoV3), bytes differing or not."""
        groups: dict[str, list[str]] = {}
        for v in self.added + self.existing:
            if v.hashes.get("autov3_full"):
                groups.setdefault(v.hashes["autov3_full"], []).append(v.ref)
        return [g for g in groups.values() if len(g) > 1]

    def to_dict(self) -> dict:
        """JSON-ready (``add --json``): ``added``/``existing`` versions without their metadata,
        ``skipped`` as ``{"path", "reason"}``, and the :meth:`same_tensors` groups of REFs."""
        return {
            "added": [v.to_dict(metadata=False) for v in self.added],
            "existing": [v.to_dict(metadata=False) for v in self.existing],
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "same_tensors": self.same_tensors(),
            "linked": self.linked,
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
    created: list[str] = field(default_factory=list)  # blobs this import put in place
    sketch: object = None  # what the registry's sketch_files hook made of it (stored with the row)
    extra: dict | None = None  # the staged file's parsed header and (small files) bytes, for the hook


class _BlobVanished(Exception):
    pass


class Ingestor:
    """Stages and records artifacts for one registry: ``db`` (the catalogue), ``store`` (blobs),
    ``scratch`` (a folder for description views), ``resolve`` (REF -> Version, for parents)."""

    def __init__(self, db, store: BlobStore, scratch: Path, resolve: Callable[[str], Version]) -> None:
        self.db, self.store, self.scratch, self.resolve = db, store, scratch, resolve
        self.descriptions = DescriptionCache()
        #: set by the registry: ``sketch_files([(blob_path, record, extra)]) -> [sketch]`` for a
        #: folder import's new files (main thread, a few dozen at a time), ``store_sketches(versions,
        #: sketches)`` after their rows
        self.sketch_files: Callable | None = None
        self.store_sketches: Callable | None = None

    # ---- one artifact --------------------------------------------------------------------------
    def add(self, path, name: str, *, tags: Iterable[str] = (), info: dict, arch=None, base_model=None,
            parents: Iterable = (), operation: str = "import", params: dict | None = None, source: str | None = None,
            follow_links: bool = False, progress=None, allow_nonfinite: bool = False, link: bool = False) -> Version:
        """Store one artifact as the next version of ``name`` and return it; the engine of
        ``Registry.add`` (see there for the arguments; ``info`` holds the adapter-level
        ``description``/``trigger_words``/``labels``, None = unchanged). The blob is made durable
        before its row is written; bytes ``name`` already has give back that version, with
        ``tags``/``info`` applied. A blob removed by a concurrent ``gc`` before its row is written
        is stored again, up to three attempts."""
        validate_name(name)
        tags = [validate_tag(t) for t in tags]
        if operation not in OPERATIONS:
            raise RegistryError(f"unknown operation {operation!r} (one of {', '.join(OPERATIONS)})")
        p = Path(path)
        check_importable(p)
        if p.is_dir() and not is_folder_artifact(p):
            raise RegistryError(f"{p} is a folder of files, not one adapter or pipeline folder: import each file "
                                "with add_many (CLI: loradex add DIR)")
        edges = self._edges(parents, operation, params, source or str(p.resolve()))
        for _attempt in range(3):
            slots = Slots(self.store.tmp_dir)
            try:
                pend = self._stage(p, name, arch, base_model, durable=True, progress=progress,
                                   follow_links=follow_links, allow_nonfinite=allow_nonfinite, slots=slots, link=link)
            finally:
                slots.close()
            if isinstance(pend, Version):  # the same bytes are already this name's
                self.apply(name, tags, info, pend)
                return self.resolve(pend.ref)
            pend.tags, pend.edges, pend.info = tags, edges, info
            pause_point("blob-stored")
            try:
                return self._record([pend])[0]
            except _BlobVanished:
                continue  # a gc ran between the blob and the row: store it again
            except DiskFullError:
                self._drop_created([pend])
                raise
        raise RegistryError(f"{p}: could not store the file (its blob kept disappearing; is a gc running?)")

    # ---- a folder of artifacts -------------------------------------------------------------------
    def add_many(self, root, *, prefix: str | None = None, tags: Iterable[str] = (), arch=None, base_model=None,
                 batch: int = BATCH_FILES, workers: int | None = None, follow_links: bool = False, on_file=None,
                 progress=None, allow_nonfinite: bool = False, link: bool = False, sketch: bool = True) -> ImportReport:
        """Import every artifact under ``root``; the engine of ``Registry.add_many`` (see there).
        Worker threads copy (``link``: reflink or hard link), hash, describe and check files in a
        window of ``8 * workers`` ahead of the main thread, which alone reads and writes the
        catalogue, in the folder's order, and sketches new files (``sketch_files``) while the
        workers go on. Rows are written once ``batch`` files or ``BATCH_BYTES`` bytes are pending,
        after one sync of the store, in one transaction (then ``store_sketches``; ``sketch=False``:
        neither hook runs, the sketches are left to ``reindex``).
        ``on_file(rel_path, "ok"|"skipped")`` is called per candidate. A full disk stops the
        import and removes this import's unreferenced blobs; other errors of one file skip it
        (``ImportReport.skipped``)."""
        root = Path(root)
        if not root.is_dir():
            check_importable(root)
            raise RegistryError(f"{root}: not a folder")
        if prefix is not None:
            validate_name(prefix, "name prefix")
        tags = [validate_tag(t) for t in tags]
        report = ImportReport()
        candidates, skipped = scan_folder(root, follow_links=follow_links)
        report.skipped.extend(skipped)
        pending: list[_Pending] = []
        slots = Slots(self.store.tmp_dir)
        known = _db.adapter_names(self.db)  # a name not among them has no version with these bytes yet
        unsketched: list[_Pending] = []

        def flush() -> None:
            if not pending:
                return
            self._sketch_pending(unsketched)
            self.store.sync()
            pause_point("blob-stored")
            try:
                added = self._record(pending)
                sketched = [pe.sketch for pe in pending]
            except _BlobVanished:  # a concurrent gc: redo this batch one by one, durably
                added = [self.add(pe.info["_path"], pe.name, tags=pe.tags, info={}, arch=arch, base_model=base_model,
                                  follow_links=follow_links, progress=progress, allow_nonfinite=allow_nonfinite,
                                  link=link) for pe in pending]
                sketched = [None] * len(added)
            report.added.extend(added)
            known.update(pe.name for pe in pending)
            pending.clear()
            if sketch and self.store_sketches is not None:
                self.store_sketches(added, sketched)

        def prepare(path: Path):  # a worker thread: bytes in place, hashes, description; no rows
            if path.is_dir():
                return None
            if path.suffix.lower() == ".png":
                check_embedding_image(path)
            item, desc = self._prepare_file(path, arch, progress, shortcut=False, allow_nonfinite=allow_nonfinite,
                                            slots=slots, link=link)
            try:  # renamed into place here (not durable yet: one sync per batch, before its rows)
                self.store.commit(item, durable=False)
            except BaseException:
                self.store.discard(item)
                raise
            return item, desc, resolved(path)

        real_dirs: dict[Path, str] = {}

        def resolved(path: Path) -> str:  # ``str(path.resolve())``, each folder resolved once
            if path.is_symlink():
                return str(path.resolve())
            if (d := real_dirs.get(path.parent)) is None:
                d = real_dirs[path.parent] = str(path.parent.resolve())
            return os.path.join(d, path.name)

        def dropped(got) -> None:  # a staged file that will get no row
            if got is not None and got[0].created:
                self._drop_created([_Pending("", {}, [], created=[got[0].sha256])])

        # Files are read, hashed, described and put in place by ``workers`` threads (hashing and
        # file I/O run outside the GIL), in a bounded window ahead of the main thread, which alone
        # touches the catalogue and decides, in the folder's order, what each staged file becomes.
        workers = max(1, min(workers if workers is not None else (os.cpu_count() or 1), 8))
        window = 8 * workers
        waiting = [0]  # bytes of the pending files

        try:
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
                        staged = None
                        try:
                            staged = fut.result()
                            stem = rel[: -len(path.suffix)] if staged is not None and path.suffix else rel
                            name = sanitize_name(f"{prefix}-{stem}" if prefix else stem)
                            if staged is None:
                                pend = self._stage(path, name, arch, base_model, durable=False, progress=progress,
                                                   follow_links=follow_links, allow_nonfinite=allow_nonfinite,
                                                   slots=slots, link=link)
                            else:
                                pend = self._stage_prepared(path, name, staged[0], staged[1], base_model,
                                                            durable=False, committed=True, known=known)
                        except DiskFullError:
                            raise
                        except (LoradexError, OSError) as e:
                            dropped(staged)
                            report.skipped.append((rel, _reason(e, path)))
                            if on_file:
                                on_file(rel, "skipped")
                            continue
                        if isinstance(pend, Version):
                            self.apply(name, tags, {}, pend)
                            report.existing.append(pend)
                        else:
                            pend.tags = tags
                            pend.edges = self._edges((), "import", None, staged[2] if staged else str(path.resolve()))
                            pend.info = {"_path": str(path)}
                            if staged is not None and staged[0].how != "copy":
                                report.linked += 1
                            pending.append(pend)
                            if sketch:
                                unsketched.append(pend)
                            waiting[0] += pend.record["size"]
                            if len(pending) >= batch or waiting[0] >= BATCH_BYTES:
                                flush()
                                waiting[0] = 0
                            elif len(unsketched) >= SKETCH_BATCH or \
                                    sum(pe.record["size"] for pe in unsketched) >= SKETCH_BYTES:
                                self._sketch_pending(unsketched)
                        if on_file:
                            on_file(rel, "ok")
                except BaseException as e:
                    for _path, fut in futures:  # files staged but not reached: their blobs go again
                        fut.cancel()
                        with contextlib.suppress(Exception):
                            dropped(fut.result())
                    self._drop_created(pending)
                    if isinstance(e, DiskFullError):
                        done = len(report.added)
                        before = f"; {done} artifacts of {root} were stored before it filled" if done else ""
                        raise DiskFullError(f"{e}{before}; import it again after freeing space (what is stored is "
                                            "found, not stored twice)") from None
                    raise
            try:
                flush()
            except BaseException:
                self._drop_created(pending)
                raise
        finally:
            slots.close()
        if not report.added and not report.existing:
            raise _nothing_imported(root, report)
        return report

    def _sketch_pending(self, todo: list[_Pending]) -> None:
        """The similarity sketches of staged files (their blobs are in place), made together by
        the registry's ``sketch_files`` hook while the workers go on (files of one structure are
        sketched in one batch of products); their rows wait for the versions'. Empties ``todo``."""
        items = [pe for pe in todo if pe.files is None]
        extras = [pe.extra or {} for pe in items]
        for pe in todo:
            pe.extra = None
        todo.clear()
        if self.sketch_files is None or not items:
            return
        made = self.sketch_files([(self.store.path(pe.record["sha256"]), pe.record, x) for pe, x in zip(items, extras)])
        for pe, m in zip(items, made):
            pe.sketch = m

    # ---- staging ---------------------------------------------------------------------------------
    def _stage(self, p: Path, name: str, arch, base_model, durable: bool, progress,
               follow_links: bool = False, allow_nonfinite: bool = False, slots: Slots | None = None,
               link: bool = False) -> _Pending | Version:
        """Put the bytes of ``p`` in the store and describe them; no row yet."""
        if p.is_dir():
            return self._stage_folder(p, name, arch, base_model, durable, progress, follow_links, allow_nonfinite,
                                      link=link)
        item, desc = self._prepare_file(p, arch, progress, shortcut=True, name=name, allow_nonfinite=allow_nonfinite,
                                        slots=slots, link=link)
        return self._stage_prepared(p, name, item, desc, base_model, durable)

    def _prepare_file(self, p: Path, arch, progress, shortcut: bool, name: str | None = None,
                      allow_nonfinite: bool = False, slots: Slots | None = None,
                      link: bool = False) -> tuple[Ingested, dict | None]:
        """Stream ``p`` into a temporary file of the store (``slots``: under its own name; ``link``:
        reflinked or hard-linked, not copied) and describe those bytes where they lie. Without
        ``shortcut`` the catalogue is not consulted (safe in a worker thread); with it, bytes that
        ``name`` already has are not described (desc None) and a description is copied from
        another version with the same bytes and file name. An adapter or embedding holding NaN/Inf
        values is refused (FormatError naming ``p``) unless ``allow_nonfinite``: it would load
        everywhere and turn every image it touches into noise."""
        item = self.store.ingest(p, progress, slots=slots, keep=True, link=link)
        try:
            if shortcut and name is not None and _db.version_of_name_with_sha(self.db, name, item.sha256,
                                                                                with_tags=False):
                return item, None
            desc = self._describe_ingested(item, p, arch, shortcut=shortcut)
            header = desc.pop("_header", None)
            if not allow_nonfinite and desc.get("artifact") in ("adapter", "embedding"):
                check_finite(item, header, p)
            if header is not None and desc.get("artifact") == "adapter":
                desc["_extra"] = {"header": header, "data": item.data if item.size <= KEEP_BYTES else None,
                                  "digest": desc.get("_structure_digest")}
            return item, desc
        except BaseException:
            self.store.discard(item)
            raise
        finally:
            item.release()

    def _stage_prepared(self, p: Path, name: str, item: Ingested, desc: dict | None, base_model,
                        durable: bool, committed: bool = False, known: set[str] | None = None) -> _Pending | Version:
        """Commit a prepared file's blob (unless ``committed`` already) and build its row, or return
        ``name``'s version that has these bytes already (the temporary is then dropped). ``known``:
        adapter names that may have versions (others are not looked up; ``_record`` checks again)."""
        try:
            same = _db.version_of_name_with_sha(self.db, name, item.sha256) if known is None or name in known else None
            if same is not None or desc is None:
                self.store.discard(item)
                if same is not None:
                    return same
                raise RegistryError(f"{p}: its version of {name!r} vanished while it was added; add it again")
        except BaseException:
            self.store.discard(item)
            raise
        if not committed:
            self.store.commit(item, durable=durable)
        record = {k: v for k, v in desc.items() if not k.startswith("_")}
        record.update({k: item.hashes.get(k, "") for k in HASH_FIELDS})
        record.update(sha256=item.sha256, size=item.size, layout="file", filename=p.name,
                      sshs_legacy_hash=desc.get("_sshs_legacy_hash", ""))
        if desc.get("_sshs_model_hash"):
            record["sshs_model_hash"] = desc["_sshs_model_hash"]
        if base_model:
            record["base_model"] = base_model
        return _Pending(name, record, [(item.sha256, item.size)], created=[item.sha256] if item.created else [],
                        extra=desc.get("_extra"))

    def _view(self):
        """A fresh folder under the scratch folder for a description view (removed by the caller)."""
        try:
            return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=self.scratch))
        except OSError as e:
            raise write_error(e, self.scratch.parent) from None

    def _describe_ingested(self, item: Ingested, src: Path, arch, shortcut: bool = True) -> dict:
        """The description of freshly ingested bytes: copied from a version with the same bytes
        and file name when there is one, else read through ``loradex.api`` from the temporary file
        itself when it carries the original name (ingested into a slot), else from a hard link of
        it under that name (readers may use the name, e.g. a TI token). A safetensors file's
        parsed header comes back as ``_header`` (for the NaN check and the sketch)."""
        filename = src.name
        if arch is None and shortcut:
            v = _db.version_with_sha_and_filename(self.db, item.sha256, filename)
            if v is not None:
                return {"format": v.format, "arch": v.arch, "kinds": v.kinds, "ranks": v.ranks, "modules": v.modules,
                        "embeddings": v.embeddings, "metadata": v.metadata, "notes": v.notes,
                        "base_model": v.base_model, "artifact": v.artifact,
                        "_sshs_legacy_hash": v.hashes.get("sshs_legacy_hash", ""),
                        "_sshs_model_hash": v.hashes.get("sshs_model_hash", "")}
        d = None
        view = item.tmp
        try:
            if view.name != filename:
                d = self._view()
                view = d / filename
                link_or_copy(item.tmp, view, self.scratch.parent)
            try:
                desc = describe_path(view, arch=arch, cache=self.descriptions, data=item.data)
            except LoradexError as e:  # name the user's file, not the temporary one
                raise renamed(e, {str(view): str(src), str(view.parent): str(src.parent)}) from None
            if desc["format"] != "ckpt":
                with contextlib.suppress(FormatError, OSError):
                    from loradex.converters import safetensors_io as sio

                    header = sio.read_header(view)  # FormatError: not a safetensors file
                    kh = sio.kohya_hashes(view, header=header, data_sha256=item.hashes.get("sshs_model_hash") or None)
                    desc["_sshs_legacy_hash"] = kh["sshs_legacy_hash"]
                    desc["_sshs_model_hash"] = kh["sshs_model_hash"]
                    desc["_header"] = header if d is None else None
            return desc
        finally:
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)

    def _stage_folder(self, p: Path, name: str, arch, base_model, durable: bool, progress,
                      follow_links: bool = False, allow_nonfinite: bool = False, link: bool = False) -> _Pending | Version:
        """Store every file of a folder artifact (``link``: each reflinked or hard-linked) and
        describe the folder from a view of hard links to the stored blobs; no row yet."""
        slots = Slots(self.store.tmp_dir) if link else None
        try:
            return self._stage_folder_files(p, name, arch, base_model, durable, progress, follow_links,
                                            allow_nonfinite, slots)
        finally:
            if slots is not None:
                slots.close()

    def _stage_folder_files(self, p: Path, name: str, arch, base_model, durable: bool, progress,
                            follow_links: bool, allow_nonfinite: bool, slots: Slots | None) -> _Pending | Version:
        files = folder_files(p, follow_links=follow_links)
        if not files:
            raise RegistryError(f"{p}: empty folder")
        items: list[tuple[str, Ingested]] = []
        try:
            for rel, fp in files:
                items.append((rel, self.store.ingest(fp, progress, slots=slots, link=slots is not None)))
        except BaseException:
            for _, it in items:
                self.store.discard(it)
            raise
        manifest = [{"path": rel, "sha256": it.sha256, "size": it.size} for rel, it in items]
        digest = manifest_digest(manifest)
        same = _db.version_of_name_with_sha(self.db, name, digest)
        if same is not None:
            for _, it in items:
                self.store.discard(it)
            return same
        created = []
        try:
            for _, it in items:
                self.store.commit(it, durable=False)
                if it.created:
                    created.append(it.sha256)
            if durable:
                self.store.sync()
        except BaseException:
            for _, it in items:
                self.store.discard(it)
            self._drop_created([_Pending(name, {}, [], created=created)])
            raise
        # describe the stored bytes (a view of hard links), not the source that may change meanwhile
        view = p
        try:
            d = self._view()
            try:
                view = d / p.name
                for f in manifest:
                    dst = view / f["path"]
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    link_or_copy(self.store.path(f["sha256"]), dst, self.scratch.parent)
                desc = describe_path(view, arch=arch)
                if not allow_nonfinite and desc.get("artifact") in ("adapter", "embedding"):
                    check_finite_files(view, p)
            finally:
                shutil.rmtree(d, ignore_errors=True)
        except BaseException as e:  # not an artifact after all: its new blobs go again
            self._drop_created([_Pending(name, {}, [], created=created)])
            if isinstance(e, LoradexError):
                raise renamed(e, {str(view): str(p)}) from None
            raise
        record = {**desc, "sha256": digest, "size": sum(f["size"] for f in manifest), "layout": "folder",
                  "filename": p.name, **{k: "" for k in HASH_FIELDS}}
        if base_model:
            record["base_model"] = base_model
        return _Pending(name, record, [(f["sha256"], f["size"]) for f in manifest], files=manifest, created=created)

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
            v = self.resolve(s)
            edges.append({"parent_id": v.id, "parent_ref": v.ref})
        if not edges:
            edges.append({"parent_id": None, "parent_ref": source})
        for e in edges:
            e.update(operation=operation, params=params or {})
        return edges

    # ---- recording -------------------------------------------------------------------------------
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
                vid = _db.version_id_with_sha(d, adapter["id"], pe.record["sha256"])
                if vid is None:  # else a concurrent import of the same bytes won the race
                    keep_arch(d, pe.record.get("arch"))
                    vid = _db.insert_version(d, adapter, pe.record, pe.files)
                    for e in pe.edges:
                        _db.add_lineage(d, vid, e["operation"], e["params"], e["parent_id"], e["parent_ref"])
                for t in pe.tags:
                    _db.set_tag(d, adapter["id"], t, vid)
                update_info(d, adapter, pe.record, pe.info)
                ids.append(vid)
            pause_point("in-transaction")
        out = _db.versions_by_id(self.db, ids)
        for v in out:
            _db.attach_files(self.db, v)
        return out

    def apply(self, name: str, tags: Sequence[str], info: dict, v: Version) -> None:
        """Tags and adapter information given with bytes that ``name`` already had."""
        if not tags and not any(info.get(k) is not None for k in ("description", "trigger_words", "labels")):
            return
        with _db.write(self.db) as d:
            adapter = _db.adapter_row(d, name)
            for t in tags:
                _db.set_tag(d, adapter["id"], t, v.id)
            update_info(d, adapter, {}, info)

    def _drop_created(self, pending: list[_Pending]) -> None:
        """After a failed import: remove the blobs it put in place that no row names (under the
        write lock, as ``gc`` does). Best effort: what stays is an orphan ``gc`` removes."""
        shas = [s for pe in pending for s in pe.created]
        if not shas:
            return
        try:
            with _db.write(self.db):
                for sha in shas:
                    if not _db.blob_is_referenced(self.db, sha):
                        self.store.remove(sha)
        except Exception as e:  # cleanup after a failure must not mask it
            log.warning("could not remove %d unreferenced blobs after a failed import (%s); `loradex gc` will",
                        len(shas), e)


# ---- catalogue helpers ---------------------------------------------------------------------------------
def update_info(d, adapter: dict, record: dict, info: dict) -> None:
    """An adapter's description, trigger words, labels and search keywords after adding ``record``
    (trigger words found in the file when none were given or kept)."""
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


def keep_arch(d, name: str | None) -> None:
    """Record the descriptor of an arch derived from a custom base, so the name resolves on any
    machine that has this registry (built-in and embedded names need none)."""
    if not name:
        return
    from loradex.core.archs import builtin_names, get_arch, tiny_names

    if name in builtin_names() or name in tiny_names():
        return
    try:
        desc = get_arch(name).descriptor()
    except ArchError:
        return
    if desc is not None:
        _db.put_arch(d, name, desc["family"], json.dumps(desc, sort_keys=True, separators=(",", ":")))


def as_list(x) -> list[str] | None:
    """Trigger words / labels as given -> a list of stripped, non-empty strings; a lone string is
    one item (not split), None stays None (= leave the stored value alone)."""
    if x is None:
        return None
    if isinstance(x, str):
        x = [x]
    return [str(s).strip() for s in x if str(s).strip()]


def link_or_copy(src: Path, dst: Path, where: Path | None = None) -> None:
    """A hard link (no bytes written), else a copy; a failed copy names ``where`` (the registry)."""
    try:
        os.link(src, dst)
    except OSError:
        try:
            shutil.copyfile(src, dst)
        except OSError as e:
            raise write_error(e, where or dst.parent) from None


def manifest_digest(manifest: list[dict]) -> str:
    """The identity of a folder artifact: sha256 of its sorted (path, sha256, size) list."""
    rows = sorted((f["path"], f["sha256"], f["size"]) for f in manifest)
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def _reason(e: Exception, path: Path) -> str:
    msg = str(e)
    s = str(path)
    if msg.startswith(s + ": "):
        msg = msg[len(s) + 2 :]
    return msg[:300]


def _nothing_imported(root: Path, report: ImportReport) -> RegistryError:
    if report.skipped:
        shown = "; ".join(f"{p}: {r[:80]}" for p, r in report.skipped[:3])
        more = f"; and {len(report.skipped) - 3} more" if len(report.skipped) > 3 else ""
        why = f"{len(report.skipped)} skipped ({shown}{more})"
    else:
        why = "it holds no files"
    err = RegistryError(f"{root}: nothing to import: no adapter, embedding or checkpoint loradex recognises; {why}")
    err.report = report  # the API caller may still want the skip reasons
    return err
