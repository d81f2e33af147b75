"""REFs: how a user names a stored version, and how a ``REF[:W]`` string carries a weight.

Grammar (case matters except in hex):

* ``NAME``          the newest version of NAME (``NAME:latest`` says the same);
* ``NAME@N``        version N (ASCII digits; a number beyond SQLite's 64-bit range is simply not
                    found, never an overflow);
* ``NAME:TAG``      the version a movable tag points at (the first ``:`` splits name and tag);
* ``sha256:PREFIX`` the version whose sha256 (of a file, or of a folder's manifest) starts with
                    PREFIX (hex, any length); a bare hex prefix of at least 8 characters means the
                    same when no adapter has that name.

``REF[:W]`` (what ``merge``/``bake``/``generate`` arguments and the server's ``"ref:w"`` strings
carry): W is the text after the LAST colon when it is a plain decimal number (``0.8``, ``-1``,
``1e-1``; not ``nan``/``inf``), and the rest is the REF, except that ``sha256:HEX`` alone is always
a REF: ``sha256:0`` is the REF ``sha256:0`` at the default weight, ``sha256:0abc:0.5`` that REF at
0.5. So ``NAME:TAG`` stays a REF unless TAG is a number: a numeric tag needs an explicit weight
(``face:2:1`` is tag ``2`` at weight 1; ``face:2`` is ``face`` at weight 2). ``split_weight``
implements the rule; every parser of such strings should call it.

Names and tags are validated here (``validate_name``/``validate_tag``), and ``resolve`` turns a REF
into the catalogue's ``Version`` through ``db``'s named queries.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from loradex.errors import LoradexError, RegistryError
from loradex.registry import db as _db
from loradex.registry.db import Version

MAX_NAME = 100
MAX_TAG = 64
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
HEX_RE = re.compile(r"^[0-9a-fA-F]+$")
NUMBER_RE = re.compile(r"^[0-9]+$")  # ASCII only: str.isdigit() accepts '²', which int() refuses
WEIGHT_RE = re.compile(r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$")
MIN_SHA_PREFIX = 8
MAX_VERSION = 2**63 - 1  # SQLite's INTEGER
RESERVED_TAGS = frozenset({"latest"})


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


def validate_tag(tag: str) -> str:
    """``tag`` when it is a valid tag: a name's characters (:func:`validate_name`), at most
    ``MAX_TAG`` (64) long, and not ``latest`` (reserved: ``NAME:latest`` is the newest version).
    RegistryError otherwise."""
    validate_name(tag, "tag", MAX_TAG)
    if tag in RESERVED_TAGS:
        raise RegistryError(f"tag {tag!r} is reserved: NAME:{tag} always names the newest version")
    return tag


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


@dataclass(frozen=True)
class Ref:
    """A parsed REF. ``kind``: ``latest`` (NAME), ``number`` (NAME@N), ``tag`` (NAME:TAG) or
    ``sha`` (sha256:PREFIX). A ``latest`` whose text is a long hex string may also be a prefix."""

    text: str
    kind: str
    name: str = ""
    number: int = 0
    tag: str = ""
    prefix: str = ""


def parse_ref(text: str) -> Ref:
    """The structure of a REF (see the module docstring); RegistryError for a malformed one."""
    if not isinstance(text, str) or not text.strip():
        raise RegistryError("empty reference")
    ref = text.strip()
    if ref.lower().startswith("sha256:"):
        p = ref[7:]
        if not p or not HEX_RE.match(p):
            raise RegistryError(f"bad sha256 prefix {p!r}")
        return Ref(ref, "sha", prefix=p.lower())
    if "@" in ref:
        name, _, num = ref.rpartition("@")
        if not NUMBER_RE.match(num):
            raise RegistryError(f"bad reference {ref!r}: the part after '@' must be a version number")
        return Ref(ref, "number", name=name, number=int(num))
    if ":" in ref:
        name, _, tag = ref.partition(":")
        if tag == "latest":
            return Ref(ref, "latest", name=name)
        return Ref(ref, "tag", name=name, tag=tag)
    hexish = len(ref) >= MIN_SHA_PREFIX and bool(HEX_RE.match(ref))
    return Ref(ref, "latest", name=ref, prefix=ref.lower() if hexish else "")


def split_weight(text: str, default: float = 1.0) -> tuple[str, float, bool]:
    """``REF[:W]`` -> ``(ref, weight, explicit)`` by the rule of the module docstring: the text
    after the last colon is the weight when it is a plain decimal number, unless what precedes it
    is exactly ``sha256`` (then the whole text is a ``sha256:HEX`` REF)."""
    head, sep, tail = text.rpartition(":")
    if sep and head and head.lower() != "sha256" and WEIGHT_RE.match(tail):
        return head, float(tail), True
    return text, default, False


def resolve(db, text: str | Version, where: str) -> Version:
    """The version a REF names (tags and, for a folder, its manifest attached); RegistryError
    naming the REF when none does or a sha prefix is ambiguous. ``where`` names the registry in
    messages."""
    r = parse_ref(text.ref if isinstance(text, Version) else text)
    if r.kind == "sha":
        return _by_sha(db, r.prefix)
    if r.kind == "number":
        found = _db.version_by_number(db, r.name, r.number) if r.number <= MAX_VERSION else None
        if found is None:
            require_adapter(db, r.name, where)
            nums = [str(v.number) for v in _db.versions_of(db, r.name, with_tags=False)]
            raise RegistryError(f"{r.name} has no version {r.number} (versions: {', '.join(nums)})")
        return _full(db, found)
    if r.kind == "tag":
        found = _db.version_by_tag(db, r.name, r.tag)
        if found is None:
            require_adapter(db, r.name, where)
            tags = _db.tags_of(db, r.name)
            raise RegistryError(f"{r.name} has no tag {r.tag!r} (tags: {', '.join(tags) or 'none'})")
        return _full(db, found)
    found = _db.latest_version(db, r.name)
    if found is not None:
        return _full(db, found)
    if r.prefix:
        return _by_sha(db, r.prefix)
    raise RegistryError(f"no adapter named {r.name!r} in {where}" + _suggest(db, r.name))


def _full(db, v: Version) -> Version:
    _db.attach_files(db, v)
    return v


def _by_sha(db, p: str) -> Version:
    found = _db.versions_with_sha_prefix(db, p, limit=20)
    if not found:
        raise RegistryError(f"no version whose sha256 starts with {p}")
    if len({v.sha256 for v in found}) > 1:
        raise RegistryError(f"sha256 prefix {p} is ambiguous: " + ", ".join(f"{v.ref} ({v.sha256[:12]})" for v in found[:5]))
    return _full(db, found[0])  # the same bytes under several names: the first stored


def require_adapter(db, name: str, where: str) -> None:
    """RegistryError "no adapter named ..." (with up to three search hits as suggestions) when
    the catalogue has no adapter ``name``; ``where`` names the registry in the message."""
    if _db.adapter_row(db, name) is None:
        raise RegistryError(f"no adapter named {name!r} in {where}" + _suggest(db, name))


def _suggest(db, name: str) -> str:
    try:
        hits = _db.search(db, name, limit=3)
    except Exception:  # a suggestion is a courtesy: never the reason a lookup fails
        return ""
    return f" (did you mean {', '.join(v.name for v in hits)}?)" if hits else ""


def renamed(e: LoradexError, paths: dict[str, str]) -> LoradexError:
    """``e`` with internal paths (a checkout or a description view under ``$LORADEX_HOME/tmp``)
    replaced by what the user named (their file, or the REF), longest first, so that no message
    shows a temporary path. The same class when it takes a message, else a RegistryError."""
    msg = str(e)
    for internal in sorted(paths, key=len, reverse=True):
        msg = msg.replace(internal, paths[internal])
    if msg == str(e):
        return e
    try:
        return type(e)(msg)
    except TypeError:
        return RegistryError(msg)
