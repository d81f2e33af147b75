"""What a path offers the registry: one importable file or folder, the files of a folder artifact,
and the candidates of a folder import (A1111's ``models/Lora``), decided before a byte is read.

Rules (issue 12: hold up under hostile input):
* only regular files are read: a FIFO, device or socket is refused when named (it would block an
  import forever, or stream without end) and skipped with the reason inside a folder;
* symlinks in a folder are followed only while they stay inside it (by real path) and do not lead
  back to a folder already walked (a loop, such as ``a/up -> ..``: folders are identified by
  ``(st_dev, st_ino)``); ``follow_links=True`` follows every link, still with that loop check;
* hidden names (``.x``) are left out of a folder import, VCS and cache folders out of an artifact.

Nothing here opens a file except ``is_folder_artifact`` (through ``converters.detect``, which
reads only the JSON configs a folder artifact announces).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from loradex.errors import LoradexError, RegistryError
from loradex.registry.store import file_kind, not_regular

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
#: pictures a folder import reads: A1111 embedding images (a preview -- any picture that holds no
#: embedding -- is skipped with that reason when its content is read)
IMAGE_SUFFIXES = (".png",)
#: names of previews, skipped without reading them (A1111 / Civitai Helper: ``x.preview.png``)
PREVIEW_SUFFIXES = (".preview.png",)
HIDDEN_DIRS = (".git", ".cache", ".huggingface")  # left out of a folder artifact
LINKS_HINT = "not followed: --follow-links follows it"


def check_importable(p: Path) -> os.stat_result:
    """The stat of a path named for import: a regular file or a folder (links followed: the user
    named it), else a one-line RegistryError saying what it is."""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise RegistryError(f"{p}: no such file or folder") from None
    except OSError as e:
        raise RegistryError(f"{p}: cannot read it ({e.strerror or e})") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise not_regular(p, st.st_mode)
    return st


def is_folder_artifact(p: Path) -> bool:
    """A folder that is one artifact (a diffusers pipeline, a PEFT adapter), not a folder of them."""
    if not p.is_dir():
        return False
    if (p / "model_index.json").is_file() or (p / "adapter_config.json").is_file():
        return True
    from loradex import converters

    try:
        return converters.detect(p).folder
    except LoradexError:
        return False


@dataclass
class Entry:
    """One name in a walked folder: a ``file`` or ``dir`` to use, or ``skip`` with the reason."""

    rel: str
    path: Path
    kind: str
    reason: str = ""


class Walker:
    """Lists folders under ``root`` by the rules of the module docstring; remembers every folder
    it handed out, so no folder is walked twice whichever way it is reached."""

    def __init__(self, root: Path, follow_links: bool = False) -> None:
        self.root = root
        self.real = os.path.realpath(root)
        self.follow_links = follow_links
        st = os.stat(root)
        self.seen: dict[tuple[int, int], str] = {(st.st_dev, st.st_ino): "."}

    def _inside(self, target: str) -> bool:
        return target == self.real or target.startswith(self.real.rstrip(os.sep) + os.sep)

    def entries(self, folder: Path) -> list[Entry]:
        """The names in ``folder`` (sorted), each classified; folders returned are marked seen."""
        out = []
        with os.scandir(folder) as it:
            names = sorted(it, key=lambda e: e.name)
        for de in names:
            p = folder / de.name
            rel = p.relative_to(self.root).as_posix()
            try:
                if de.is_symlink():
                    target = os.path.realpath(p)
                    try:
                        st = os.stat(p)
                    except OSError as e:
                        why = "a symlink loop" if e.errno == errno.ELOOP else f"a broken symlink (to {target})"
                        out.append(Entry(rel, p, "skip", why))
                        continue
                    if not self.follow_links and not self._inside(target):
                        what = "folder" if stat.S_ISDIR(st.st_mode) else "file"
                        out.append(Entry(rel, p, "skip", f"a symlink to the {what} {target}, outside the imported "
                                                         f"folder ({LINKS_HINT})"))
                        continue
                else:
                    st = de.stat(follow_symlinks=False)
            except OSError as e:
                out.append(Entry(rel, p, "skip", f"cannot read it ({e.strerror or e})"))
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in self.seen:
                    out.append(Entry(rel, p, "skip", f"a symlink loop: the same folder as {self.seen[key]}"))
                    continue
                self.seen[key] = rel
                out.append(Entry(rel, p, "dir"))
            elif stat.S_ISREG(st.st_mode):
                out.append(Entry(rel, p, "file"))
            else:
                out.append(Entry(rel, p, "skip", f"{file_kind(st.st_mode)}, not a regular file (not read)"))
        return out


def scan_folder(root: Path, follow_links: bool = False) -> tuple[list[Path], list[tuple[str, str]]]:
    """The candidates of a folder import (weights files, ``.png`` files that may be A1111
    embedding images, and sub-folders that are one artifact), in the folder's order, and what was
    skipped before reading anything (with the reason; ``*.preview.png`` are previews)."""
    if is_folder_artifact(root):
        return [root], []
    walker = Walker(root, follow_links)
    cands: list[Path] = []
    skipped: list[tuple[str, str]] = []
    stack = [root]
    while stack:
        here = stack.pop()
        entries = [e for e in walker.entries(here) if not e.path.name.startswith(".")]
        descend = []
        for e in entries:
            if e.kind == "dir":
                if is_folder_artifact(e.path):
                    cands.append(e.path)
                else:
                    descend.append(e.path)
        for e in entries:
            if e.kind == "skip":
                skipped.append((e.rel, e.reason))
            elif e.kind == "file":
                low = e.path.name.lower()
                if low.endswith(PREVIEW_SUFFIXES):
                    skipped.append((e.rel, "a preview image, not a weights file (not read)"))
                elif e.path.suffix.lower() not in WEIGHT_SUFFIXES + IMAGE_SUFFIXES:
                    skipped.append((e.rel, f"not a weights file ({e.path.suffix or 'no extension'})"))
                else:
                    cands.append(e.path)
        stack.extend(reversed(descend))  # depth first, in name order (as os.walk)
    return cands, skipped


def folder_files(p: Path, follow_links: bool = False) -> list[tuple[str, Path]]:
    """``(relative path, path)`` of every file of a folder artifact, sorted, VCS and cache folders
    left out. A FIFO, device or socket in it, or a link leaving it (unless ``follow_links``), is
    a RegistryError: storing the folder without them would store another artifact. Broken links
    and loops add nothing and are left out (logged)."""
    walker = Walker(p, follow_links)
    out = []
    stack = [p]
    while stack:
        here = stack.pop()
        descend = []
        for e in walker.entries(here):
            if e.kind == "dir":
                if e.path.name not in HIDDEN_DIRS:
                    descend.append(e.path)
            elif e.kind == "file":
                out.append((e.rel, e.path))
            elif "outside the imported folder" in e.reason or "not a regular file" in e.reason:
                raise RegistryError(f"{e.path}: {e.reason.replace('imported folder', 'folder ' + str(p))}")
            else:
                log.info("%s: %s: left out", e.path, e.reason)
        stack.extend(reversed(descend))
    return sorted(out)
