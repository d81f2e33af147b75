"""``verify`` (every row against its blob) and ``gc`` (what no row references).

``verify`` re-hashes every blob a row names (``quick``: presence and size only) and reports the
versions a problem touches; a blob found intact is remembered as such for the process (see
``store.VERIFIED``), one found changed is forgotten. ``gc`` runs under the catalogue's write lock,
so an import in progress either has its row already or re-checks its blob before writing one.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path

from loradex.registry import db as _db
from loradex.registry.store import VERIFIED, BlobStore, _alive


def verify(db, store: BlobStore, scratch: Path, quick: bool = False,
           progress: Callable[[int], None] | None = None) -> dict:
    """Check every row against its blob: present, the right size and (unless ``quick``) the
    right sha256, re-hashed by streaming. Problems name the versions. Orphan blobs and stale
    temporary files are listed (``gc`` removes them) but are not problems."""
    refs = _db.blob_references(db)
    problems, checked, nbytes = [], 0, 0
    for sha in sorted(refs):
        users = refs[sha]
        size = users[0][1]
        p = store.path(sha)
        names = sorted({u for u, _ in users})
        if not p.is_file():
            problems.append({"versions": names, "sha256": sha, "problem": "blob missing"})
            continue
        st = p.stat()
        # a blob stored by `add --link` is the user's file (a hard link): say so, it is the likely culprit
        linked = " (the blob is hard-linked to a file outside the registry, stored by add --link: was that file " \
                 "edited in place?)" if st.st_nlink > 1 else ""
        if st.st_size != size:
            problems.append({"versions": names, "sha256": sha,
                             "problem": f"blob is {st.st_size} bytes, the catalogue says {size}{linked}"})
            continue
        checked += 1
        nbytes += size
        if not quick:
            got, key = store.hash_blob(p, progress=progress)
            if got != sha:
                VERIFIED.discard(key)
                problems.append({"versions": names, "sha256": sha,
                                 "problem": f"content changed: its bytes now hash to {got[:16]}...{linked}"})
            else:
                VERIFIED.add(key)
    integrity = _db.quick_check(db)
    if integrity != "ok":
        problems.append({"versions": [], "sha256": "", "problem": f"database: {integrity}"})
    orphans = [sha for sha, _ in store.iter_blobs() if sha not in refs]
    temps = [str(t) for t in store.stale_temps()] + [str(t) for t in stale_dirs(scratch)]
    return {"ok": not problems, "problems": problems, "blobs_checked": checked, "bytes_checked": nbytes,
            "orphan_blobs": orphans, "stale_temp_files": temps, "quick": quick}


def gc(db, store: BlobStore, scratch: Path, dry_run: bool = False) -> dict:
    """Remove blobs no row references and temporary files no live import owns."""
    removed, freed = [], 0
    with _db.write(db):
        refs = _db.blob_references(db)
        for sha, p in list(store.iter_blobs()):
            if sha not in refs:
                removed.append(sha)
                freed += p.stat().st_size if dry_run else store.remove(sha)
        temps = store.stale_temps() + stale_dirs(scratch)
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


def stale_dirs(tmp: Path) -> list[Path]:
    """Describe/checkout views under ``home/tmp`` whose process is gone."""
    out = []
    if tmp.is_dir():
        for d in tmp.iterdir():
            pid = d.name.split("-", 1)[0]
            if not (pid.isdigit() and _alive(int(pid))):
                out.append(d)
    return out
