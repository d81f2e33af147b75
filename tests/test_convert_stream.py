"""Conversions at the I/O floor (issue 14): a conversion that only renames tensors streams their raw
bytes from the source into the output (``converters/direct_io.py``: O_DIRECT from an aligned buffer
filled by ``preadv`` for large files, ``copy_file_range`` through the page cache otherwise), in one
write pass with one fsync and an atomic rename; tensors that change (alphas made from metadata,
dtype casts, folded scales) are written from memory in the same pass.

Checked here: every conversion between kohya, diffusers, PEFT and ComfyUI spellings writes the same
bytes on both write paths as the decoded path (every tensor from memory through the page cache,
what loradex did before); the diffusers file loads with ``pipe.load_lora_weights`` on a base of
custom size with outputs identical to the decoded file's; ``--dtype`` still casts (nothing of a cast
tensor is copied raw); a failure part-way leaves no file, no temporary file and the input intact;
a file system that refuses O_DIRECT gets the same file through the page cache."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loradex
from loradex.converters import direct_io
from loradex.converters import safetensors_io as sio
from loradex.converters.direct_io import FileRange
from loradex.errors import DiskFullError
from loradex.tiny import quiet, tiny_arch

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = ("decoded", "buffered", "direct")


@pytest.fixture(autouse=True)
def _fixed_date(monkeypatch):
    """ModelSpec's ``modelspec.date`` is the time of the write: fixed here, so that files written a
    second apart can be compared byte for byte."""
    import datetime
    import types

    from loradex.converters import metadata

    class Fixed(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2025, 1, 1, tzinfo=tz)

    monkeypatch.setattr(metadata, "_dt", types.SimpleNamespace(datetime=Fixed, timezone=datetime.timezone))


def _kohya_lora(arch, path: Path, rank: int = 4, dtype=torch.float32, seed: int = 0, alphas=(2.0,),
                convs: bool = True, te: bool = True) -> Path:
    """A kohya LoRA on ``arch``: every attention/MLP Linear of the denoiser and (``te``) the text
    encoder's, 1x1 convs (proj_in/out) and (``convs``) resnet 3x3 convs, random factors in ``dtype``,
    alphas cycling through ``alphas``."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    i = 0
    for name, info in arch.modules.items():
        comp = name.partition(".")[0]
        if comp.startswith("text_encoder"):
            ok = te and info.type == "linear" and (".self_attn." in name or ".mlp." in name)
        elif info.type == "linear":
            ok = ".attentions." in name
        elif info.type == "conv":
            ok = ("proj_" in name and info.shape[2:] == (1, 1)) or (convs and ".resnets." in name and "conv1" in name)
        else:
            ok = False
        if not ok:
            continue
        r = min(rank, info.shape[0], info.shape[1])
        flat = arch.kohya_name(name)
        if info.type == "conv":
            down = torch.randn(r, *info.shape[1:], generator=g)
            up = torch.randn(info.shape[0], r, 1, 1, generator=g)
        else:
            down = torch.randn(r, info.shape[1], generator=g)
            up = torch.randn(info.shape[0], r, generator=g)
        out[f"{flat}.lora_down.weight"] = (down * 0.1).to(dtype)
        out[f"{flat}.lora_up.weight"] = (up * 0.1).to(dtype)
        out[f"{flat}.alpha"] = torch.tensor(alphas[i % len(alphas)], dtype=dtype)
        i += 1
    save_file(out, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})
    return path


def _comfy_from_kohya(arch, src: Path, dst: Path) -> Path:
    """The same tensors under ComfyUI's spelling (``diffusion_model.<path>``,
    ``text_encoders.clip_l.transformer.<path>``), with PEFT suffixes on the UNet as some tools write."""
    names = {arch.kohya_name(n): n for n in arch.modules}
    out = {}
    for k, v in load_file(str(src)).items():
        flat, _, suffix = k.partition(".")
        comp, _, path = names[flat].partition(".")
        if comp == "unet":
            suffix = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(suffix, suffix)
            out[f"diffusion_model.{path}.{suffix}"] = v
        else:
            out[f"text_encoders.clip_l.transformer.{path}.{suffix}"] = v
    save_file(out, str(dst))
    return dst


class Spy:
    """Records what each ``direct_io.write_pieces`` call was given and which path it took."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[list, str]] = []
        real = direct_io.write_pieces

        def spy(path, pieces, *a, **kw):
            mode = real(path, pieces, *a, **kw)
            self.calls.append((list(pieces), mode))
            return mode

        monkeypatch.setattr(direct_io, "write_pieces", spy)

    def data_pieces(self) -> list:
        """The data pieces of every file written (the header, the first piece, left out)."""
        return [p for pieces, _ in self.calls for p in pieces[1:]]


def _set_mode(mp, mode: str) -> None:
    if mode == "decoded":  # nothing copied raw, everything through the page cache: the old path
        mp.setattr(sio, "_source_range", lambda t, stamps: None)
        mp.setattr(direct_io, "DIRECT_MIN_BYTES", 1 << 62)
    elif mode == "buffered":
        mp.setattr(direct_io, "DIRECT_MIN_BYTES", 1 << 62)
    else:
        mp.setattr(direct_io, "DIRECT_MIN_BYTES", 0)
        mp.setattr(direct_io, "CHUNK_BYTES", 1 << 16)  # several buffers even for a tiny file


def _files(out: Path) -> dict[str, bytes]:
    if out.is_dir():
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    return {"": out.read_bytes()}


def _convert_all_ways(src: Path, to: str, tmp_path: Path, monkeypatch, **kw) -> dict[str, tuple[Path, Spy]]:
    """``loradex.convert(src, ..., to)`` once per write mode, each into its own folder under the same
    file name (the name is the default title)."""
    outs = {}
    for mode in MODES:
        d = tmp_path / f"out_{mode}_{to}"
        d.mkdir()
        dst = d / ("peft" if to == "peft" else "out.safetensors")
        with monkeypatch.context() as mp:
            _set_mode(mp, mode)
            spy = Spy(mp)
            loradex.convert(src, dst, to=to, **kw)
        outs[mode] = (dst, spy)
    return outs


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the same bytes on every path -------------------------------------------------------------------------
CONVERSIONS = [
    ("kohya", "diffusers"), ("kohya", "peft"), ("kohya", "kohya"), ("kohya", "comfy"),
    ("diffusers", "kohya"), ("diffusers", "peft"), ("peft", "kohya"), ("peft", "diffusers"),
    ("comfy", "kohya"), ("comfy", "diffusers"),
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same tiny-SD1 LoRA as a kohya file, a diffusers file, a PEFT folder and a ComfyUI file
    (each written by loradex from the kohya one, except ComfyUI's, which loradex does not write)."""
    d = tmp_path_factory.mktemp("src")
    arch = tiny_arch()
    kohya = _kohya_lora(arch, d / "kohya.safetensors")
    loradex.convert(kohya, d / "diffusers.safetensors", to="diffusers", arch=arch.name)
    loradex.convert(kohya, d / "peft", to="peft", arch=arch.name)
    return {"kohya": kohya, "diffusers": d / "diffusers.safetensors", "peft": d / "peft",
            "comfy": _comfy_from_kohya(arch, kohya, d / "comfy.safetensors")}


@pytest.mark.parametrize(("frm", "to"), CONVERSIONS, ids=[f"{a}->{b}" for a, b in CONVERSIONS])
def test_every_conversion_writes_the_decoded_bytes_on_both_paths(sources, tmp_path, monkeypatch, frm, to):
    src = sources[frm]
    before = _files(src)
    outs = _convert_all_ways(src, to, tmp_path, monkeypatch, arch="tiny-sd1")
    want = _files(outs["decoded"][0])
    for mode in ("buffered", "direct"):
        assert _files(outs[mode][0]) == want, mode
    assert _files(src) == before  # the input is never touched
    # the decoded path copied nothing raw; the others copied every renamed tensor raw
    assert not any(isinstance(p, FileRange) for p in outs["decoded"][1].data_pieces())
    assert {m for _, m in outs["direct"][1].calls} == {"direct"}
    assert {m for _, m in outs["buffered"][1].calls} == {"buffered"}
    for mode in ("buffered", "direct"):
        pieces = outs[mode][1].data_pieces()
        raw = sum(p.nbytes for p in pieces if isinstance(p, FileRange))
        assert raw > 0.9 * sum(direct_io.piece_size(p) for p in pieces), mode
        if frm in ("kohya", "comfy") and to == "diffusers":
            # a pure rename (the alphas go to lora_adapter_metadata): nothing decoded at all
            assert all(isinstance(p, FileRange) for p in pieces), mode


def test_kohya_to_diffusers_copies_source_ranges_merged(sources, tmp_path, monkeypatch):
    """Adjacent tensors of the source that stay adjacent in the output (a module's lora_down and
    lora_up become its lora_A and lora_B) are one copy, not two."""
    with monkeypatch.context() as mp:
        _set_mode(mp, "direct")
        captured = []
        real = direct_io._write_direct
        mp.setattr(direct_io, "_write_direct", lambda path, pieces, total, write: (
            captured.append(list(pieces)), real(path, pieces, total, write))[1])
        loradex.convert(sources["kohya"], tmp_path / "d.safetensors", to="diffusers", arch="tiny-sd1")
    ranges = [p for p in captured[0] if isinstance(p, FileRange)]
    tensors = len(load_file(str(tmp_path / "d.safetensors")))
    assert 0 < len(ranges) <= tensors // 2


def test_one_fsync_per_file(sources, tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(direct_io, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    loradex.convert(sources["kohya"], tmp_path / "d.safetensors", to="diffusers", arch="tiny-sd1")
    assert len(calls) == 1
    calls.clear()
    loradex.convert(sources["diffusers"], tmp_path / "k.safetensors", to="kohya", arch="tiny-sd1")
    assert len(calls) == 1  # the kohya hashes are computed before the one write, not read back


# ---- a base of custom size, loaded by diffusers ----------------------------------------------------------
def _custom_sd1():
    import diffusers

    from loradex.tiny import tiny_text_encoder, tiny_tokenizer, tiny_unet, tiny_vae

    with quiet():
        return diffusers.StableDiffusionPipeline(
            vae=tiny_vae(0), text_encoder=tiny_text_encoder(0, hidden=48), tokenizer=tiny_tokenizer(),
            unet=tiny_unet(0, cross_attention_dim=48, block_out_channels=(48, 96)),
            scheduler=diffusers.DDIMScheduler(num_train_timesteps=1000), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)


def test_custom_base_diffusers_file_loads_with_identical_outputs(tmp_path, monkeypatch):
    """On an SD1-topology base of custom width (no built-in table: its arch comes from the live
    models), a kohya LoRA of > 1 MiB converted to diffusers on the O_DIRECT path is the decoded
    file byte for byte, loads with ``load_lora_weights`` with identical outputs, and matches the
    kohya source loaded by diffusers' own kohya converter."""
    import copy

    from loradex.converters.pipeline import pipeline_components
    from loradex.core.archs import arch_from_models

    base = _custom_sd1()
    base.set_progress_bar_config(disable=True)
    arch = arch_from_models(pipeline_components(base), pipeline=type(base).__name__)
    src = _kohya_lora(arch, tmp_path / "k.safetensors", rank=32, convs=False)
    assert src.stat().st_size > 1 << 20
    before = _sha(src)
    outs = _convert_all_ways(src, "diffusers", tmp_path, monkeypatch, arch=arch)
    assert outs["direct"][0].read_bytes() == outs["decoded"][0].read_bytes()
    assert _sha(src) == before

    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 48, generator=g)
    ids = base.tokenizer(["a photo of a cat"], return_tensors="pt").input_ids

    @torch.no_grad()
    def outputs(path):
        pipe = copy.deepcopy(base)
        with quiet():
            pipe.load_lora_weights(str(path), adapter_name="t")
        return (pipe.unet(x, 500, encoder_hidden_states=ctx).sample.double(),
                pipe.text_encoder(ids)[0].double())

    streamed, decoded, kohya = outputs(outs["direct"][0]), outputs(outs["decoded"][0]), outputs(src)
    with torch.no_grad():
        clean = (base.unet(x, 500, encoder_hidden_states=ctx).sample.double(), base.text_encoder(ids)[0].double())
    for s, d, k, c in zip(streamed, decoded, kohya, clean):
        assert torch.equal(s, d)
        assert float((s - k).norm() / (k - c).norm()) < 1e-5


def test_kohya_target_hashes_match_kohyas_on_the_one_pass(tmp_path, monkeypatch):
    """The kohya writer's ``sshs_model_hash``/``sshs_legacy_hash`` (computed before the write now,
    from the planned bytes) are what kohya computes from the written file (``kohya_hashes``), with
    the legacy window (bytes 1 MiB..1 MiB + 64 KiB) inside the data section, on both paths."""
    arch = tiny_arch()
    src = _kohya_lora(arch, tmp_path / "k.safetensors", rank=32, alphas=(2.0, 4.0))
    loradex.convert(src, tmp_path / "d.safetensors", to="diffusers", arch=arch.name)
    assert (tmp_path / "d.safetensors").stat().st_size > 0x110000
    outs = _convert_all_ways(tmp_path / "d.safetensors", "kohya", tmp_path, monkeypatch, arch=arch.name)
    want = outs["decoded"][0].read_bytes()
    for mode in ("buffered", "direct"):
        assert outs[mode][0].read_bytes() == want, mode
    meta = sio.read_header(outs["direct"][0]).metadata
    assert sio.kohya_hashes(outs["direct"][0]) == {k: meta[k] for k in ("sshs_model_hash", "sshs_legacy_hash")}


# ---- what cannot stream --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["buffered", "direct"])
def test_dtype_cast_is_written_from_memory(sources, tmp_path, monkeypatch, mode):
    with monkeypatch.context() as mp:
        _set_mode(mp, mode)
        spy = Spy(mp)
        loradex.convert(sources["kohya"], tmp_path / "d.safetensors", to="diffusers", arch="tiny-sd1", dtype="bf16")
    assert not any(isinstance(p, FileRange) for p in spy.data_pieces())
    src, out = load_file(str(sources["kohya"])), load_file(str(tmp_path / "d.safetensors"))
    arch = tiny_arch()
    names = {arch.kohya_name(n): n for n in arch.modules}
    assert out and all(v.dtype == torch.bfloat16 for v in out.values())
    for k, v in src.items():
        flat, _, suffix = k.partition(".")
        if suffix == "alpha":
            continue
        key = f"{names[flat]}.{'lora_A' if suffix == 'lora_down.weight' else 'lora_B'}.weight"
        assert torch.equal(out[key], v.to(torch.bfloat16)), key


def test_changed_tensors_are_written_from_memory(tmp_path):
    """Only bytes that are exactly a loaded tensor's, in a source unchanged since, are copied raw:
    a tensor modified in place, a transposed view of the same memory, or a source replaced on disk
    after loading are written from what is in memory."""
    src = tmp_path / "src.safetensors"
    save_file({"a": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5), "c": torch.arange(6.0)}, str(src))
    t = sio.load(src)
    t["b"].mul_(3)  # in place: its version moves
    out = {"a_t": t["a"].T, "b": t["b"], "c": t["c"]}
    for direct in (False, True):
        dst = tmp_path / f"out{direct}.safetensors"
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(direct_io, "DIRECT_MIN_BYTES", 0 if direct else 1 << 62)
            sio.save(out, dst)
        back = load_file(str(dst))
        assert torch.equal(back["a_t"], torch.arange(12.0).reshape(3, 4).T)
        assert torch.equal(back["b"], torch.full((5,), 3.0)) and torch.equal(back["c"], torch.arange(6.0))
    # the source replaced on disk (a new file under its name): what was loaded is written
    u = sio.load(src)
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5), "c": torch.zeros(6)}, str(tmp_path / "new.safetensors"))
    os.replace(tmp_path / "new.safetensors", src)
    sio.save({"c": u["c"]}, tmp_path / "after.safetensors")
    assert torch.equal(load_file(str(tmp_path / "after.safetensors"))["c"], torch.arange(6.0))


# ---- failures ---------------------------------------------------------------------------------------------
def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.mark.parametrize("mode", ["buffered", "direct"])
@pytest.mark.parametrize("fail_at", [1, 3])
def test_disk_full_mid_write_leaves_nothing_and_the_input_intact(sources, tmp_path, monkeypatch, mode, fail_at):
    """The disk fills up part-way (after ``fail_at - 1`` writes or kernel copies went out): a
    one-line DiskFullError naming the output, no output, no temporary file, the input unchanged, and
    an existing output kept as it was."""
    src = tmp_path / "in.safetensors"
    src.write_bytes(sources["kohya"].read_bytes())
    before = _sha(src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "d.safetensors"
    _set_mode(monkeypatch, mode)
    n = [0]

    def full(*a, **kw):
        n[0] += 1
        if n[0] >= fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **kw)

    if mode == "direct":
        real = sio._write_all
        monkeypatch.setattr(sio, "_write_all", full)
    else:
        real = os.copy_file_range
        monkeypatch.setattr(os, "copy_file_range", full)
    with pytest.raises(DiskFullError, match=f"the disk is full: cannot write {dst}"):
        loradex.convert(src, dst, to="diffusers", arch="tiny-sd1")
    assert n[0] >= fail_at
    assert _listing(out_dir) == []
    assert _sha(src) == before
    assert not any(t.name == "loradex-direct-write" for t in threading.enumerate())  # the writer thread ended
    dst.write_bytes(b"previous")
    n[0] = 0
    with pytest.raises(DiskFullError):
        loradex.convert(src, dst, to="diffusers", arch="tiny-sd1")
    assert _listing(out_dir) == ["d.safetensors"] and dst.read_bytes() == b"previous"
    assert _sha(src) == before


def test_a_file_system_without_o_direct_gets_the_same_file(sources, tmp_path, monkeypatch):
    """EINVAL from opening with O_DIRECT (tmpfs on old kernels, FUSE) or from a direct write part-way
    (an alignment the device wants bigger): the file is written through the page cache, the same."""
    ref = tmp_path / "ref"
    ref.mkdir()
    with monkeypatch.context() as mp:
        _set_mode(mp, "decoded")
        loradex.convert(sources["kohya"], ref / "d.safetensors", to="diffusers", arch="tiny-sd1")
    want = (ref / "d.safetensors").read_bytes()
    real_open = os.open

    def no_direct_open(path, flags, *a, **kw):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a, **kw)

    real_write = sio._write_all
    writes = [0]

    def einval_on_second_direct_write(fd, data):
        if fcntl_direct(fd):
            writes[0] += 1
            if writes[0] == 2:
                raise OSError(errno.EINVAL, "Invalid argument")
        real_write(fd, data)

    for i, (target, fake) in enumerate(((os, no_direct_open), (sio, einval_on_second_direct_write))):
        d = tmp_path / f"out{i}"
        d.mkdir()
        with monkeypatch.context() as mp:
            _set_mode(mp, "direct")
            mp.setattr(target, "open" if target is os else "_write_all", fake)
            spy = Spy(mp)
            loradex.convert(sources["kohya"], d / "d.safetensors", to="diffusers", arch="tiny-sd1")
        assert [m for _, m in spy.calls] == ["buffered"]
        assert (d / "d.safetensors").read_bytes() == want
        assert _listing(d) == ["d.safetensors"]
    assert writes[0] >= 2


def test_a_full_disk_inside_the_direct_write_is_a_disk_full_error(sources, tmp_path, monkeypatch):
    """ENOSPC from the system call itself, on the writer thread, with the buffer still referenced by
    the error's traceback: the one-line DiskFullError, not a BufferError from releasing the buffer."""
    real = os.write

    def full(fd, data):
        if fcntl_direct(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    _set_mode(monkeypatch, "direct")
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(DiskFullError):
        loradex.convert(sources["kohya"], tmp_path / "d.safetensors", to="diffusers", arch="tiny-sd1")
    assert _listing(tmp_path) == []


def fcntl_direct(fd: int) -> bool:
    """Whether ``fd`` was opened with O_DIRECT."""
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


# ---- direct_io on its own ---------------------------------------------------------------------------------
@pytest.mark.parametrize("direct", [False, True])
def test_write_pieces_is_the_concatenation(tmp_path, monkeypatch, direct):
    """Pieces of every size across buffer boundaries (memory and file ranges, adjacent ranges
    merged, empty ones, a total that is and is not a multiple of the block size) come out as their
    concatenation."""
    monkeypatch.setattr(direct_io, "CHUNK_BYTES", 3 * direct_io.ALIGN)
    src = tmp_path / "src.bin"
    blob = os.urandom(50_000)
    src.write_bytes(blob)
    s = str(src)
    cases = [
        [b"head", FileRange(s, 0, 100), FileRange(s, 100, 20_000), b"", bytearray(b"x" * 5000), FileRange(s, 7, 0)],
        [FileRange(s, 1, 49_999), memoryview(blob)[:123]],
        [b"a" * direct_io.ALIGN * 3, FileRange(s, 0, direct_io.ALIGN)],
        [],
    ]
    for i, pieces in enumerate(cases):
        want = b"".join(blob[p.offset : p.offset + p.nbytes] if isinstance(p, FileRange) else bytes(p) for p in pieces)
        dst = tmp_path / f"out{i}"
        mode = direct_io.write_pieces(dst, pieces, direct=direct)
        assert mode == ("direct" if direct else "buffered")
        assert dst.read_bytes() == want, i
        assert b"".join(bytes(c) for c in direct_io.chunks(pieces, size=777)) == want
        assert direct_io.span(pieces, 10, 30_000) == want[10:30_000]


def test_a_source_that_shrank_is_an_error(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 100)
    for direct in (False, True):
        with pytest.raises(Exception, match="shrank"):
            direct_io.write_pieces(tmp_path / "out", [FileRange(str(src), 50, 100)], direct=direct)
