"""Hostile and broken inputs: each fails fast, with the right ``LoradexError`` subclass and a
one-line message, before anything large is allocated and without running code from the file;
and writes are atomic (a failed write leaves the previous file and no temporary behind)."""

from __future__ import annotations

import json
import os
import pickle
import random
import shlex
import struct
import time
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch

from loradex.converters import embeddings as E
from loradex.converters import pickle_io
from loradex.converters import safetensors_io as sio
from loradex.core.adapter import Adapter, Embedding
from loradex.errors import DiskFullError, FormatError, LoradexError, UnsafeFileError

FAST = 10.0  # a hang guard, not a benchmark: generous for a loaded 2-core machine


def expect(exc: type[LoradexError], fn, *args, **kwargs) -> LoradexError:
    """``fn`` raises ``exc`` (exactly that subclass) with one line, in under a second."""
    t0 = time.perf_counter()
    with pytest.raises(LoradexError) as info:
        fn(*args, **kwargs)
    elapsed = time.perf_counter() - t0
    err = info.value
    assert type(err) is exc, f"{type(err).__name__}: {err}"
    msg = str(err)
    assert msg and "\n" not in msg and "\x1b" not in msg, repr(msg)
    assert elapsed < FAST, f"took {elapsed:.2f}s"
    return err


def st_bytes(
    header: object, data: bytes = b"", raw_header: bytes | None = None, length: int | None = None
) -> bytes:
    """A safetensors file: 8-byte little-endian header length, header, data."""
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    n = len(h) if length is None else length
    return struct.pack("<Q", n) + h + data


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


HOSTILE: dict[str, bytes] = {
    "empty": b"",
    "seven_bytes": b"\x08\x00\x00\x00\x00\x00\x00",
    "truncated_header": st_bytes(None, raw_header=b'{"a": {"dtype": "F3', length=400),
    "header_len_2_62": struct.pack("<Q", 2**62) + b"{}",
    "header_len_max": b"\xff" * 8 + b"{}",
    "header_longer_than_file": struct.pack("<Q", 1000) + b"{}" + b" " * 50,
    "not_json": st_bytes(None, raw_header=b"this is not json at all"),
    "json_array": st_bytes([1, 2, 3]),
    "json_string": st_bytes("hello"),
    "not_utf8": st_bytes(None, raw_header=b'{"\xff\xfe": 1}'),
    "deeply_nested": st_bytes(None, raw_header=b"[" * 100_000 + b"]" * 100_000),
    "unknown_dtype": st_bytes({"t": entry(dtype="F128")}, b"\0" * 8),
    "missing_dtype": st_bytes({"t": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "entry_not_object": st_bytes({"t": [1, 2]}, b"\0" * 8),
    "negative_shape": st_bytes({"t": entry(shape=(-2,))}, b"\0" * 8),
    "float_shape": st_bytes({"t": entry(shape=(2.0,))}, b"\0" * 8),
    "bool_shape": st_bytes({"t": entry(shape=(True, True))}, b"\0" * 8),
    "shape_not_list": st_bytes({"t": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, b"\0" * 8),
    "huge_shape": st_bytes({"t": entry(shape=(2**40, 2**40))}, b"\0" * 8),
    "offsets_past_end": st_bytes({"t": entry(offsets=(0, 8))}, b"\0" * 4),
    "offsets_negative": st_bytes({"t": entry(offsets=(-8, 0))}, b"\0" * 8),
    "offsets_reversed": st_bytes({"t": entry(offsets=(8, 0))}, b"\0" * 8),
    "offsets_huge": st_bytes({"t": entry(offsets=(2**62, 2**62 + 8))}, b"\0" * 8),
    "offsets_three": st_bytes({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}}, b"\0" * 8),
    "offsets_vs_shape": st_bytes({"t": entry(shape=(4,), offsets=(0, 8))}, b"\0" * 16),
    "overlap": st_bytes(
        {"a": entry(shape=(4,), offsets=(0, 16)), "b": entry(shape=(4,), offsets=(8, 24))}, b"\0" * 24
    ),
    "metadata_int": st_bytes({"__metadata__": {"step": 5}, "t": entry()}, b"\0" * 8),
    "metadata_nested": st_bytes({"__metadata__": {"x": {"y": "z"}}, "t": entry()}, b"\0" * 8),
    "metadata_list": st_bytes({"__metadata__": ["a"], "t": entry()}, b"\0" * 8),
    "random_bytes": random.Random(0).randbytes(4096).replace(b"\x80", b"\x00").replace(b"PK", b"pk"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_read_header_rejects(tmp_path, name):
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(HOSTILE[name])
    expect(FormatError, sio.read_header, path)
    expect(FormatError, sio.load, path)
    assert not sio.is_safetensors(path)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_embedding_reading_rejects(tmp_path, name):
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(HOSTILE[name])
    expect(FormatError, E.read_embedding, path)
    assert E.detect_embedding_format(path) is None


def test_messages_say_what_is_wrong(tmp_path):
    cases = {
        "header_len_2_62": "header length",
        "not_json": "not valid JSON",
        "json_array": "not a JSON object",
        "unknown_dtype": "unknown dtype 'F128'",
        "negative_shape": "bad shape",
        "offsets_past_end": "outside",
        "offsets_vs_shape": "needs 16",
        "overlap": "overlap",
        "metadata_int": "__metadata__",
    }
    for name, needle in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(HOSTILE[name])
        assert needle in str(expect(FormatError, sio.read_header, path)), name


def test_directory_and_missing_file(tmp_path):
    for fn in (sio.read_header, sio.load, pickle_io.load_pickle, sio.read_json, E.read_embedding):
        assert "directory" in str(expect(FormatError, fn, tmp_path))
        expect(FormatError, fn, tmp_path / "missing.safetensors")
    assert E.detect_embedding_format(tmp_path) is None


def test_load_unknown_key_is_a_format_error(tmp_path):
    path = tmp_path / "ok.safetensors"
    safetensors.torch.save_file({"emb_params": torch.zeros(1, 4)}, str(path))
    expect(FormatError, sio.load, path, keys=["nope"])


def test_valid_file_still_reads(tmp_path):
    """The checks do not reject what the real serializer writes (incl. empty and zero-size tensors)."""
    path = tmp_path / "ok.safetensors"
    tensors = {
        "a": torch.randn(3, 4),
        "empty": torch.zeros(0, 5),
        "i": torch.arange(3),
        "h": torch.ones(2).half(),
    }
    safetensors.torch.save_file(tensors, str(path), metadata={"k": "v"})
    h = sio.read_header(path)
    assert h.metadata == {"k": "v"} and h.tensors["empty"].shape == (0, 5)
    out = sio.load(path)
    assert all(torch.equal(out[k], v) for k, v in tensors.items())


# ---- pickles ---------------------------------------------------------------------------------
class ShellMarker:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class OpenMarker:
    """Unpickling this would create the marker file with ``open``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [2, 4])
def test_raw_pickle_with_code_is_refused_and_never_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    # no tensor in it: pickle.dumps spells tensors with a global that is refused first
    payload = {"string_to_param": {"*": [0.0, 1.0]}, "name": ShellMarker(marker)}
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    err = expect(UnsafeFileError, E.read_embedding, path)
    if protocol == 2:  # protocol 4's FRAME opcode is refused before the global is reached
        assert "system" in str(err)  # says what it refused...
    assert "weights_only` set to `False" not in str(err)  # ...and not torch's advice to load it unsafely
    with pytest.raises(UnsafeFileError):
        E.detect_embedding_format(path)  # a hostile file is reported, not taken for "unknown"
    expect(UnsafeFileError, pickle_io.load_pickle, path)
    assert not marker.exists()


def test_torch_zip_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"emb_params": torch.zeros(1, 4), "x": OpenMarker(marker)}, path)
    assert not marker.exists() and zipfile.is_zipfile(path)
    expect(UnsafeFileError, E.read_embedding, path)
    expect(UnsafeFileError, pickle_io.load_pickle, path)
    assert not marker.exists()


def test_module_objects_are_refused(tmp_path):
    """Old A1111 files pickled a ParameterDict: a Module, so not loadable with weights_only."""
    path = tmp_path / "old.pt"
    torch.save(
        {"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.zeros(1, 4))})}, path
    )
    assert "ParameterDict" in str(expect(UnsafeFileError, E.read_embedding, path))


@pytest.mark.parametrize("cut", [0.5, 0.9, -22])
def test_truncated_torch_zip(tmp_path, cut):
    good = tmp_path / "good.pt"
    torch.save({"emb_params": torch.randn(2, 4)}, good)
    data = good.read_bytes()
    path = tmp_path / "trunc.pt"
    path.write_bytes(data[: int(len(data) * cut)] if cut > 0 else data[:cut])
    expect(FormatError, E.read_embedding, path)
    expect(FormatError, pickle_io.load_pickle, path)
    assert E.detect_embedding_format(path) is None


def test_zip_bomb_is_refused_before_inflating(tmp_path):
    """torch inflates deflated records: a 20 KB archive here declares 80 MB of tensor data."""
    plain = tmp_path / "plain.pt"
    torch.save({"emb_params": torch.zeros(20 * 1024 * 1024)}, plain)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    plain.unlink()
    assert bomb.stat().st_size < 200_000
    assert "expands to" in str(expect(FormatError, E.read_embedding, bomb))
    assert E.detect_embedding_format(bomb) is None


def test_oversized_pickle_is_refused_without_reading(tmp_path):
    path = tmp_path / "huge.pt"
    with open(path, "wb") as f:  # sparse: 100 MB on paper, nothing on disk
        f.write(b"\x80\x02")
        f.truncate(100 * 1024 * 1024)
    expect(FormatError, E.read_embedding, path)
    assert E.detect_embedding_format(path) is None


def test_garbage_after_pickle_magic(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"\x80\x02" + random.Random(1).randbytes(2000))
    # the weights-only unpickler refuses opcodes it does not know: reported as refused, never run
    expect(UnsafeFileError, E.read_embedding, path)


def test_pickle_of_the_wrong_shape(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    torch.save({"string_to_param": {"*": "not a tensor"}}, tmp_path / "str.pt")
    torch.save({"string_to_param": {"a": torch.zeros(1, 4), "b": torch.zeros(1, 4)}}, tmp_path / "two.pt")
    torch.save({1: torch.zeros(1, 4)}, tmp_path / "intkey.pt")
    assert "not a textual-inversion" in str(expect(FormatError, E.read_embedding, tmp_path / "list.pt"))
    assert "not a tensor" in str(expect(FormatError, E.read_embedding, tmp_path / "str.pt"))
    assert "exactly one" in str(expect(FormatError, E.read_embedding, tmp_path / "two.pt"))
    expect(FormatError, E.read_embedding, tmp_path / "intkey.pt")


# ---- atomic writes ---------------------------------------------------------------------------
def only_file(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_save_failure_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    dst = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"old": torch.ones(3)}, str(dst))
    before = dst.read_bytes()

    real_write = sio._write_all
    calls = []

    def half_then_fail(fd, data):
        calls.append(1)
        if len(calls) > 1:  # the header went out, then the disk filled up
            raise OSError(28, "disk full")
        real_write(fd, data)

    monkeypatch.setattr(sio, "_write_all", half_then_fail)
    err = expect(DiskFullError, sio.save, {"new": torch.zeros(3)}, dst)
    assert "disk is full" in str(err) and str(dst) in str(err) and ".tmp" not in str(err)
    assert dst.read_bytes() == before
    assert only_file(tmp_path) == ["model.safetensors"]


def test_save_writes_tensors_that_share_memory(tmp_path):
    """safetensors refuses shared storage; ``save`` writes each view as its own tensor (split FLUX
    qkv parts share their down and slice one up)."""
    t = torch.arange(8.0)
    dst = tmp_path / "shared.safetensors"
    sio.save({"a": t, "b": t, "c": t[2:5]}, dst)
    back = safetensors.torch.load_file(str(dst))
    assert torch.equal(back["a"], t) and torch.equal(back["b"], t) and torch.equal(back["c"], t[2:5])


UNSERIALIZABLE = {
    "meta": lambda: {"ok": torch.zeros(2), "m": torch.empty(3, device="meta")},  # no data to copy
    "sparse": lambda: {
        "s": torch.sparse_coo_tensor(
            torch.tensor([[0, 1]]), torch.tensor([1.0, 2.0]), (4,), check_invariants=True
        )
    },
    "not_a_tensor": lambda: {"x": [1, 2, 3]},
}


@pytest.mark.parametrize("kind", list(UNSERIALIZABLE))
def test_save_of_unserializable_tensor_keeps_previous_file(tmp_path, kind):
    dst = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"old": torch.ones(3)}, str(dst))
    before = dst.read_bytes()
    expect(FormatError, sio.save, UNSERIALIZABLE[kind](), dst)
    assert dst.read_bytes() == before
    assert only_file(tmp_path) == ["model.safetensors"]


def test_interrupted_save_leaves_no_temp(tmp_path, monkeypatch):
    dst = tmp_path / "model.safetensors"
    dst.write_bytes(b"previous")

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(sio, "_serialize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sio.save({"t": torch.zeros(1)}, dst)
    assert dst.read_bytes() == b"previous"
    assert only_file(tmp_path) == ["model.safetensors"]


def test_pt_embedding_write_is_atomic(tmp_path, monkeypatch):
    from loradex.converters.common import ConversionReport

    dst = tmp_path / "tok.pt"
    dst.write_bytes(b"previous")
    real_save = torch.save

    def half_then_fail(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        Path(f).write_bytes(Path(f).read_bytes()[:100])
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_fail)
    a = Adapter(embeddings={"tok": Embedding("tok", {"text_encoder": torch.randn(2, 8)})})
    expect(FormatError, E.A1111Embedding().write, a, dst, ConversionReport())
    assert dst.read_bytes() == b"previous"
    assert only_file(tmp_path) == ["tok.pt"]


def test_successful_save_replaces_and_leaves_no_temp(tmp_path):
    dst = tmp_path / "model.safetensors"
    dst.write_bytes(b"previous")
    sio.save({"t": torch.arange(4.0)}, dst, {"k": "v"})
    assert torch.equal(sio.load(dst)["t"], torch.arange(4.0))
    assert only_file(tmp_path) == ["model.safetensors"]
    expect(FormatError, sio.save, {"t": torch.zeros(1)}, tmp_path / "no" / "such" / "dir.safetensors")
    expect(FormatError, sio.save, {"t": torch.zeros(1)}, tmp_path)


def test_serializer_matches_safetensors_byte_for_byte(tmp_path):
    """loradex writes safetensors itself (to copy unchanged tensors file-to-file); its layout is the
    safetensors serializer's, so data-section hashes (AutoV3, sshs_model_hash) agree with other tools."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(3, 4, generator=g).half(), "a.alpha": torch.tensor(4.0),
        "c": torch.randn(5, generator=g).bfloat16(), "idx": torch.arange(3), "flag": torch.tensor([True, False]),
        "empty": torch.zeros(0, 2), "view": torch.arange(10.0)[2:7],
    }
    sio.save(tensors, tmp_path / "ours.safetensors", {"k": "v"})
    theirs = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata={"k": "v"})
    assert (tmp_path / "ours.safetensors").read_bytes() == theirs


def test_unchanged_tensors_are_copied_changed_ones_are_not(tmp_path):
    src = tmp_path / "src.safetensors"
    safetensors.torch.save_file({"x": torch.arange(6.0), "y": torch.ones(4)}, str(src))
    loaded = sio.load(src)
    loaded["y"].mul_(3)  # modified in place after loading: must be written from memory
    sio.save({"renamed.x": loaded["x"], "renamed.y": loaded["y"]}, tmp_path / "out.safetensors")
    back = safetensors.torch.load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(back["renamed.x"], torch.arange(6.0)) and torch.equal(back["renamed.y"], torch.full((4,), 3.0))
    # the source file replaced after loading: its new bytes must not leak into the output
    loaded = sio.load(src)
    safetensors.torch.save_file({"x": torch.zeros(6), "y": torch.zeros(4)}, str(src))
    sio.save({"x": loaded["x"]}, tmp_path / "out2.safetensors")
    assert torch.equal(safetensors.torch.load_file(str(tmp_path / "out2.safetensors"))["x"], torch.arange(6.0))


def test_outputs_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    """Atomic writes go through mkstemp/mkdtemp (0600/0700): the renamed output must have the
    mode a plain open() would give it, or a web server / another user cannot read what we wrote."""
    import torch

    from loradex.converters import safetensors_io as sio

    old = os.umask(0o022)
    try:
        out = tmp_path / "x.safetensors"
        sio.save({"a": torch.zeros(2)}, out)
        assert out.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        out2 = tmp_path / "y.safetensors"
        sio.save({"a": torch.zeros(2)}, out2)
        assert out2.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
