"""The safetensors header parser's fast paths (``converters.safetensors_header``): a header of a
structure seen before (files of one trainer differ in their metadata only) and the one-pass JSON
check give exactly what the exact, key-by-key checks give -- the same header, or the same error."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from loradex.converters import safetensors_header as sh
from loradex.errors import FormatError


def header(meta: dict | None, n: int = 3) -> tuple[bytes, int]:
    """A header of ``n`` F32 tensors of 4 values and its file size."""
    obj: dict = {} if meta is None else {"__metadata__": meta}
    for i in range(n):
        obj[f"lora_unet_m{i}.lora_down.weight"] = {"dtype": "F32", "shape": [2, 2], "data_offsets": [16 * i, 16 * i + 16]}
    raw = json.dumps(obj, separators=(",", ":")).encode()
    return raw, 8 + len(raw) + 16 * n


def outcome(fn, raw: bytes, size: int):
    try:
        h = fn(raw, size)
    except FormatError as e:
        return ("error", str(e))
    return ("ok", h.metadata, {k: tuple(v) for k, v in h.tensors.items()})


def exact(raw: bytes, size: int):
    return sh._parse_exact(raw, size - 8 - len(raw), Path("f.safetensors"))


def fast(raw: bytes, size: int):
    return sh.parse_header(raw, size, Path("f.safetensors"))


def test_known_structure_reads_each_files_own_metadata():
    a, size = header({"ss_output_name": "a", "x": "1"})
    b, size_b = header({"ss_output_name": "b"})
    assert size == size_b - len(b) + len(a)
    ha = fast(a, size)
    hb = fast(b, 8 + len(b) + 48)  # the structure is known now: a cache hit
    assert ha.metadata == {"ss_output_name": "a", "x": "1"} and hb.metadata == {"ss_output_name": "b"}
    assert {k: tuple(v) for k, v in ha.tensors.items()} == {k: tuple(v) for k, v in hb.tensors.items()}


@pytest.mark.parametrize("meta_text", [
    '{"a":"1","a":"2"}',  # a repeated metadata key
    '{"a":1}',  # a value that is no string
    '[]',  # an empty list: read as no metadata by both
])
def test_known_structure_still_checks_the_metadata(meta_text):
    good, size = header({"k": "v"})
    fast(good, size)  # remembered
    tail = good.decode()[len('{"__metadata__":{"k":"v"}'):]
    bad = ('{"__metadata__":' + meta_text + tail).encode()
    size = 8 + len(bad) + 48
    assert outcome(fast, bad, size) == outcome(exact, bad, size)
    assert outcome(exact, bad, size)[0] == ("ok" if meta_text == "[]" else "error")


def test_mutated_headers_give_what_the_exact_checks_give():
    """Random byte edits of valid headers (digits, quotes, brackets, key names, offsets): every
    outcome of the fast paths equals the exact checks', error messages included."""
    rng = random.Random(0)
    alphabet = b'0123456789",:{}[]-. aF3_'
    seen = 0
    for trial in range(600):
        raw, size = header({"ss_output_name": f"n{trial % 3}"} if trial % 4 else None, n=1 + trial % 4)
        b = bytearray(raw)
        for _ in range(1 + trial % 3):
            b[rng.randrange(len(b))] = rng.choice(alphabet)
        raw = bytes(b)
        size = size + rng.choice([0, 0, 0, 16, -16])
        got, want = outcome(fast, raw, size), outcome(exact, raw, size)
        assert got == want, (raw, size)
        seen += got[0] == "ok"
    assert seen > 50  # some edits keep the header valid (metadata text, shapes that still fit)
