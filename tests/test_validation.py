"""Validation equal to the reference parsers, and outputs that never pass for a success when they
are not one: duplicated header keys, files of absurdly many tensors, NaN/Inf adapters, full disks."""

from __future__ import annotations

import errno
import json
import struct

import pytest
import safetensors
import torch

import loradex
from cli_util import bad, run
from loradex.converters import safetensors_io as sio
from loradex.core.adapter import Adapter
from loradex.core.kinds.lora import LoraPatch
from loradex.errors import DiskFullError, FormatError
from loradex.tiny import tiny_arch

MODULE = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _raw_file(path, header: bytes, data: bytes) -> None:
    header += b" " * ((8 - len(header) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def test_duplicated_header_key_is_refused_like_the_safetensors_library(tmp_path):
    first, second = (json.dumps({"dtype": "F32", "shape": [1], "data_offsets": r}) for r in ([0, 4], [4, 8]))
    p = tmp_path / "dup.safetensors"
    _raw_file(p, f'{{"a.alpha":{first},"a.alpha":{second}}}'.encode(), b"\0" * 8)
    with pytest.raises(safetensors.SafetensorError):  # the reference parser refuses it ...
        safetensors.safe_open(str(p), "pt")
    with pytest.raises(FormatError, match="names 'a.alpha' twice"):  # ... and so do we, at the header
        sio.read_header(p)


def test_a_file_of_too_many_tensors_is_refused_before_parsing(tmp_path):
    n = sio.MAX_TENSORS + 1
    entries = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(n)}
    p = tmp_path / "many.safetensors"
    _raw_file(p, json.dumps(entries).encode(), b"\0" * n)
    with pytest.raises(FormatError, match=f"holds {n} tensors, more than the {sio.MAX_TENSORS}"):
        sio.read_header(p)


def _lora(value: float | None = None) -> Adapter:
    arch = tiny_arch("sd1")
    out, inn = arch.module(MODULE).shape
    up = torch.randn(out, 2)
    if value is not None:
        up[0, 0] = value
    return Adapter({MODULE: LoraPatch(up=up, down=torch.randn(2, inn), alpha=2.0)}, arch=arch.name)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_adapters_are_reported_and_refused_unless_allowed(tmp_path, capsys, value):
    bad_path, good_path = tmp_path / "bad.safetensors", tmp_path / "good.safetensors"
    loradex.save(_lora(value), bad_path, "kohya")
    loradex.save(_lora(), good_path, "kohya")
    assert loradex.describe(loradex.load(bad_path))["nonfinite"] == [MODULE]
    assert loradex.describe(loradex.load(good_path))["nonfinite"] == []
    # inspect shows it (text and --json)
    code, out, _ = run(capsys, "inspect", bad_path)
    assert code == 0 and "NaN/Inf:" in out and MODULE in out
    code, out, _ = run(capsys, "inspect", bad_path, "--json")
    assert json.loads(out)["nonfinite"] == [MODULE]
    # merge refuses it, names the module, writes nothing; --allow-nonfinite goes on
    dst = tmp_path / "m.safetensors"
    bad(run(capsys, "merge", good_path, bad_path, "-o", dst), "NaN/Inf")
    assert not dst.exists()
    code, _, err = run(capsys, "merge", good_path, bad_path, "-o", dst, "--allow-nonfinite")
    assert code == 0 and dst.exists(), err
    with pytest.raises(FormatError, match="merge input 2 holds NaN/Inf"):
        loradex.merge([(loradex.load(good_path), 1.0), (loradex.load(bad_path), 1.0)])


def test_bake_refuses_a_nonfinite_adapter(tmp_path):
    from loradex.merge import bake
    from loradex.tiny import tiny_sd_pipeline

    base = tmp_path / "base"
    tiny_sd_pipeline().save_pretrained(base)
    with pytest.raises(FormatError, match="bake adapter 1 holds NaN/Inf values in 1 module"):
        bake(base, [(_lora(float("nan")), 1.0)], tmp_path / "baked")
    assert not (tmp_path / "baked").exists()


def test_full_disk_on_convert_is_one_line_naming_the_output(tmp_path, capsys, monkeypatch):
    src, dst = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    loradex.save(_lora(), src, "kohya")
    real = sio._write_all

    def full(fd, data):
        if len(memoryview(data).cast("B")) > 64:  # the header goes out, the tensors do not
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(sio, "_write_all", full)
    bad(run(capsys, "convert", src, "-o", dst, "--to", "diffusers"), f"the disk is full: cannot write {dst}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]  # no temp file, no output
    with pytest.raises(DiskFullError):
        loradex.convert(src, dst, to="kohya")


def test_a_write_that_makes_no_progress_is_a_full_disk_not_a_truncated_file(tmp_path, monkeypatch):
    monkeypatch.setattr(sio.os, "write", lambda fd, data: 0)
    with pytest.raises(DiskFullError, match="disk is full"):
        sio.save({"x": torch.zeros(16)}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_add_refuses_a_nonfinite_adapter_unless_allowed(tmp_path, capsys, monkeypatch):
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("LORADEX_HOME", str(tmp_path / "home"))
    bad_path = tmp_path / "bad.safetensors"
    loradex.save(_lora(float("nan")), bad_path, "kohya")
    bad(run(capsys, "add", bad_path, "--name", "x"), "NaN/Inf")
    code, out, _ = run(capsys, "ls", "--json")
    assert code == 0 and json.loads(out) == []  # nothing stored
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "bad.safetensors").write_bytes(bad_path.read_bytes())
    loradex.save(_lora(), folder / "good.safetensors", "kohya")
    code, out, _ = run(capsys, "add", folder, "--json")
    rep = json.loads(out)
    assert code == 0 and len(rep["added"]) == 1 and any("NaN/Inf" in s["reason"] for s in rep["skipped"])
    code, _, err = run(capsys, "add", bad_path, "--name", "x", "--allow-nonfinite")
    assert code == 0, err


def test_add_refuses_a_nonfinite_peft_folder(tmp_path, monkeypatch):
    """A PEFT adapter folder is one artifact: its weights are checked like a file's."""
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("LORADEX_HOME", str(tmp_path / "home"))
    folder = tmp_path / "peft"
    loradex.save(_lora(float("nan")), folder, "peft")
    reg = loradex.Registry()
    with pytest.raises(FormatError, match="NaN/Inf"):
        reg.add(folder, name="p")
    assert reg.list() == []
    assert reg.add(folder, name="p", allow_nonfinite=True).name == "p"
    # rm --all by a sha prefix removes that version's name, not an adapter called "sha256"
    v = reg.versions("p")[0]
    assert [x.ref for x in reg.remove(f"sha256:{v.sha256[:12]}", all_versions=True)] == [v.ref]
