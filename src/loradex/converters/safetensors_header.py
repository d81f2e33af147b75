"""Parsing and validating a safetensors header (split from ``safetensors_io``, which re-exports
everything here): the header's JSON is checked *before* anything is allocated for the tensors --
a JSON object, no key named twice, every dtype known, every shape a list of non-negative ints
whose byte size matches its data offsets, offsets inside the data section, no two tensors
overlapping. No torch here: ``inspect`` parses headers without importing it.
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from loradex.errors import FormatError

#: The most tensors a file may hold (SDXL checkpoints hold ~2,500, the largest LyCORIS files ~20,000).
MAX_TENSORS = 100_000
#: safetensors dtype name -> (torch dtype name, bytes per element): what reading and validating a
#: header needs, without torch
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "U16": ("uint16", 2), "U32": ("uint32", 4), "U64": ("uint64", 8),
}

class TensorInfo(NamedTuple):
    """One header entry. A NamedTuple, not a dataclass: headers of a few thousand tensors are
    parsed per file, and building these is most of that time."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data (``end - start``, offsets relative to the data section)."""
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    """A validated safetensors header (:func:`parse_header`): ``header_len`` is the JSON's byte
    length (the 8-byte length prefix not included), ``metadata`` the ``__metadata__`` strings,
    ``tensors`` each entry with offsets relative to the data section. Cached by
    :func:`read_header`, so treat it as read-only."""

    path: Path
    header_len: int
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]

    @property
    def data_offset(self) -> int:
        """File offset of the data section: the 8-byte length prefix plus the header."""
        return 8 + self.header_len

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """key -> shape of every tensor (what arch detection takes)."""
        return {k: v.shape for k, v in self.tensors.items()}


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """``json.loads`` object hook: a JSON object naming a key twice is refused, as the safetensors
    library (serde) refuses it -- Python's default keeps the last value silently."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return d


def parse_header(raw: bytes, size: int, p: Path) -> Header:
    """Validate the JSON header ``raw`` of a ``size``-byte safetensors file named ``p`` (for the
    messages): dtypes known, shapes non-negative ints, offsets inside the data section, each
    tensor's byte count equal to its shape times its item size, no two tensors overlapping.

    A folder import parses a header per file, so the common case runs as a few C-level passes
    (``_parse_fast``: a plain ``json.loads``, a proof that no key repeats, whole-header checks);
    whenever one of them does not pass, the header goes through the exact checks one by one
    (``_parse_exact``), which raise the same error for the same file as they always have."""
    n = len(raw)
    # a cheap count before parsing: a header of millions of tiny tensors costs seconds and GBs to
    # parse and describe, and no adapter or checkpoint holds more than tens of thousands
    count = raw.count(b'"data_offsets"')
    if count > MAX_TENSORS:
        raise FormatError(f"{p}: holds {count} tensors, more than the {MAX_TENSORS} loradex reads "
                          "(adapters and checkpoints hold a few thousand)")
    data_size = size - 8 - n
    got = _parse_known(raw, data_size)
    if got is None:
        got = _parse_fast(raw, data_size)
    if got is None:
        return _parse_exact(raw, data_size, p)
    meta, tensors = got
    return Header(p, n, meta, tensors)


#: the tensor part of headers that passed every check (text after ``__metadata__``, data size) ->
#: their tensors: files of one trainer differ in their metadata only (``_parse_known``)
_KNOWN: OrderedDict[tuple[str, int], dict[str, TensorInfo]] = OrderedDict()
_KNOWN_LOCK = threading.Lock()
_KNOWN_MAX, _KNOWN_MAX_CHARS = 16, 4 << 20
_META_HEAD = re.compile(r'[ \t\n\r]*\{[ \t\n\r]*"__metadata__"[ \t\n\r]*:[ \t\n\r]*')
_COMMA = re.compile(r'[ \t\n\r]*,')
_META_DECODER = json.JSONDecoder(object_pairs_hook=lambda pairs: _unique_keys(pairs))


def _split_meta(text: str) -> tuple[object, str] | None:
    """``(metadata value, rest)`` of a header text that opens with ``{"__metadata__": VALUE,``
    (as every safetensors writer lays it out), ``rest`` the text after that comma: the whole text
    is a valid JSON object exactly when ``VALUE`` is valid (parsed here, refusing repeated keys)
    and ``"{" + rest`` is. None when the text does not open so or the value does not parse."""
    m = _META_HEAD.match(text)
    if m is None:
        return None
    try:
        value, end = _META_DECODER.raw_decode(text, m.end())
    except Exception:  # noqa: BLE001 - the exact path raises the error
        return None
    c = _COMMA.match(text, end)
    return None if c is None else (value, text[c.end():])


def _parse_known(raw: bytes, data_size: int) -> tuple[dict[str, str], dict[str, TensorInfo]] | None:
    """``(metadata, tensors)`` of a header whose tensor part (the text after its ``__metadata__``)
    and data size are those of a header that passed every check (``_KNOWN``): the tensor checks
    and the repeated-key check of that part (``"__metadata__"`` named again included) depend on
    nothing else, so only the metadata is checked here (a JSON object of strings, no key twice).
    None when the header is not of a known structure."""
    if not _KNOWN:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    split = _split_meta(text)
    if split is None:
        return None
    value, rest = split
    with _KNOWN_LOCK:
        tensors = _KNOWN.get((rest, data_size))
    if tensors is None:
        return None
    meta = value or {}
    if type(meta) is not dict or not set(map(type, meta.values())) <= _STR:
        return None
    return dict(meta), dict(tensors)


def _remember(raw: bytes, data_size: int, tensors: dict[str, TensorInfo]) -> None:
    """Keep the checked ``tensors`` of the header ``raw`` for :func:`_parse_known` (headers of a
    ``__metadata__`` and at least one tensor, a few MiB of text at most)."""
    if len(raw) > _KNOWN_MAX_CHARS // 4 or not tensors:
        return
    split = _split_meta(raw.decode("utf-8"))
    if split is None:
        return
    with _KNOWN_LOCK:
        _KNOWN[(split[1], data_size)] = dict(tensors)
        while len(_KNOWN) > _KNOWN_MAX or sum(len(r) for r, _ in _KNOWN) > _KNOWN_MAX_CHARS:
            _KNOWN.popitem(last=False)


def _parse_exact(raw: bytes, data_size: int, p: Path) -> Header:
    """:func:`parse_header`'s checks one by one, in file order: the first failure raises."""
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise FormatError(f"{p}: safetensors header names {e.args[0]!r} twice (the safetensors library "
                          "refuses such files)") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{p}: safetensors header is not valid JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{p}: safetensors header is not a JSON object")
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(type(k) is str and type(v) is str for k, v in meta.items()):
        raise FormatError(f"{p}: safetensors __metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    # plain loops with exact type checks (``type(x) is int`` also rejects bools)
    for name, info in obj.items():
        if type(info) is not dict:
            raise FormatError(f"{p}: tensor {name!r}: header entry is not an object")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        item = SAFETENSORS_DTYPES.get(dtype) if type(dtype) is str else None
        if item is None:
            raise FormatError(f"{p}: tensor {name!r}: unknown dtype {dtype!r}")
        if type(shape) is not list:
            raise FormatError(f"{p}: tensor {name!r}: bad shape {shape!r}")
        count = 1
        for d in shape:
            if type(d) is not int or d < 0:
                raise FormatError(f"{p}: tensor {name!r}: bad shape {shape!r}")
            count *= d
        if type(offs) is not list or len(offs) != 2 or type(offs[0]) is not int or type(offs[1]) is not int \
                or not 0 <= offs[0] <= offs[1] <= data_size:
            raise FormatError(f"{p}: tensor {name!r}: data offsets {offs!r} outside the {data_size}-byte data section")
        if offs[1] - offs[0] != count * item[1]:
            raise FormatError(f"{p}: tensor {name!r}: {offs[1] - offs[0]} bytes for shape {shape} {dtype} "
                              f"(needs {count * item[1]})")
        tensors[name] = TensorInfo(dtype, tuple(shape), offs[0], offs[1])
    spans = sorted((t.start, t.end, k) for k, t in tensors.items() if t.end > t.start)
    for (_s0, e0, k0), (s1, _e1, k1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise FormatError(f"{p}: tensors {k0!r} and {k1!r} overlap in the data section")
    return Header(p, len(raw), dict(meta), tensors)


_ENTRY = operator.itemgetter("dtype", "shape", "data_offsets")
_ITEM_SIZE = {name: size for name, (_t, size) in SAFETENSORS_DTYPES.items()}
_INT, _LIST, _STR = {int}, {list}, {str}
_new_tuple = tuple.__new__


def _no_repeated_key(raw: bytes, obj: dict, meta: dict, had_meta: bool) -> bool:
    """True only when no JSON object in ``raw`` (parsed as ``obj``, its ``__metadata__`` ``meta``)
    names a key twice (``had_meta``: whether ``obj`` held ``__metadata__`` before it was taken
    out). Outside strings, a colon appears in JSON only between a key and its value,
    so the text holds ``raw.count(b":") - (colons inside strings)`` pairs, at least as many as the
    parsed dicts hold (a repeated key's pair is in the text, not in the dict). The colons counted
    here inside strings (top-level keys, metadata keys and values) are at most those in the text
    when no ``\\u003a`` escape is present, and the pairs counted (the top level, the metadata, each
    entry's) at most those parsed: equality proves every pair of the text is in a dict -- no key
    repeats. Anything else (a colon in an uncounted string, say) is answered False: the caller
    then parses with the exact check."""
    if b"\\u003" in raw and (b"\\u003a" in raw or b"\\u003A" in raw):
        return False
    pairs = len(obj) + had_meta + len(meta) + sum(map(len, [v for v in obj.values() if type(v) is dict]))
    inside = "".join(obj).count(":") + "".join(meta).count(":") + "".join(meta.values()).count(":")
    return raw.count(b":") - inside == pairs


def _parse_fast(raw: bytes, data_size: int) -> tuple[dict[str, str], dict[str, TensorInfo]] | None:
    """``(metadata, tensors)`` of a header that passes every check of :func:`_parse_exact`, as
    whole-header C-level passes; None when any check fails or cannot be made this way (the exact
    path then names the first problem). What each check accepts is exactly what the exact path
    accepts: exact types (``set(map(type, ...))``, so bools are not ints), ranges, byte counts."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except Exception:  # noqa: BLE001 - the exact path raises the error
        return None
    if type(obj) is not dict:
        return None
    had_meta = "__metadata__" in obj
    meta = obj.pop("__metadata__", None) or {}
    if type(meta) is not dict or not set(map(type, meta.values())) <= _STR:
        return None
    if not _no_repeated_key(raw, obj, meta, had_meta):
        return None
    if not obj:
        return dict(meta), {}
    try:
        dtypes, shapes, offs = zip(*map(_ENTRY, obj.values()))
    except (TypeError, KeyError, ValueError):
        return None
    try:  # only the dtype names (strings) are keys; an unhashable dtype raises
        sizes = list(map(_ITEM_SIZE.get, dtypes))
    except TypeError:
        return None
    if None in sizes or set(map(type, shapes)) != _LIST or set(map(type, offs)) != _LIST \
            or set(map(len, offs)) != {2}:
        return None
    dims = list(itertools.chain.from_iterable(shapes))
    if dims and (not set(map(type, dims)) <= _INT or min(dims) < 0):
        return None
    starts, ends = zip(*offs)
    if not set(map(type, starts)) <= _INT or not set(map(type, ends)) <= _INT or min(starts) < 0 \
            or max(ends) > data_size or not all(map(operator.le, starts, ends)):
        return None
    if list(map(operator.sub, ends, starts)) != list(map(operator.mul, map(math.prod, shapes), sizes)):
        return None
    spans = sorted(s for s in zip(starts, ends) if s[1] > s[0])
    if len(spans) > 1:
        s_sorted, e_sorted = zip(*spans)
        if not all(map(operator.le, e_sorted[:-1], s_sorted[1:])):
            return None
    infos = map(_new_tuple, itertools.repeat(TensorInfo), zip(dtypes, map(tuple, shapes), starts, ends))
    tensors = dict(zip(obj, infos))
    _remember(raw, data_size, tensors)
    return dict(meta), tensors
