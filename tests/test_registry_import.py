"""Folder import near the byte path, and ``add --link``: a link is the blob (same inode, read-only,
hashed right, an in-place edit caught), another file system falls back to a copy, embedding
images are imported and previews skipped, a batched folder import records exactly what one-by-one
adds record, and a failure half-way leaves nothing half-written."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loradex
from cli_util import run
from loradex import Registry, RegistryError
from loradex.core.adapter import Adapter, Embedding
from loradex.core.kinds.lora import LoraPatch
from loradex.registry import hashes, linking, sketches
from loradex.registry.store import VERIFIED

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- fixtures and helpers ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_lora(tmp_path_factory) -> Path:
    """A kohya LoRA for the tiny SD1 model (rank 4), written once per module."""
    from loradex.tiny import tiny_arch

    arch = tiny_arch("sd1")
    g = torch.Generator().manual_seed(0)
    patches = {}
    for name, info in arch.modules.items():
        if len(info.shape) == 2:
            o, i = info.shape
            patches[name] = LoraPatch(up=torch.randn(o, 4, generator=g) * 0.01,
                                      down=torch.randn(4, i, generator=g) * 0.01, alpha=torch.tensor(2.0))
    p = tmp_path_factory.mktemp("base") / "base.safetensors"
    loradex.save(Adapter(patches, arch=arch.name), p, "kohya")
    return p


def variant(base: Path, out: Path, k: int, nan: bool = False, title: str | None = None) -> Path:
    """``base`` with one value and the metadata changed: same structure, bytes of its own."""
    from loradex.converters import safetensors_io as sio

    t = load_file(base)
    key = next(n for n in sorted(t) if n.endswith("lora_down.weight"))
    t[key] = t[key].clone()
    t[key].view(-1)[0] = float("nan") if nan else float(k + 1)
    meta = {**sio.read_header(base).metadata, "ss_output_name": title or out.stem}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(t, out, metadata=meta)
    return out


def ti_file(path: Path, token: str, seed: int) -> Path:
    vec = torch.randn(2, 32, generator=torch.Generator().manual_seed(seed))
    loradex.save(Adapter(embeddings={token: Embedding(token, {"text_encoder": vec})}, arch="tiny-sd1"), path,
                 "diffusers-ti")
    return path


def independent(path: Path) -> dict:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return {"sha256": hashlib.sha256(data).hexdigest(), "autov2": hashlib.sha256(data).hexdigest()[:10].upper(),
            "autov3": hashlib.sha256(data[8 + n:]).hexdigest()[:12].upper(),
            "crc32": zlib.crc32(data).to_bytes(4, "little").hex().upper()}


def consistent(reg: Registry) -> dict:
    """verify is clean: no problem, no orphan blob, no temporary file left anywhere."""
    r = reg.verify()
    assert r["ok"] and not r["orphan_blobs"] and not r["stale_temp_files"], r
    assert not list(reg.store.tmp_dir.iterdir()) and not list(reg.tmp.iterdir())
    return r


def row(v) -> dict:
    """What the catalogue says about a version, without what differs between two registries."""
    d = v.to_dict()
    for k in ("id", "created", "name", "ref", "number", "tags"):
        d.pop(k, None)
    return d


# ---- add --link ----------------------------------------------------------------------------------------
def test_add_link_is_the_blob_read_only_and_hashed(reg, base_lora, tmp_path):
    src = variant(base_lora, tmp_path / "src" / "face.safetensors", 1)
    want = independent(src)
    v = reg.add(src, "face", link=True)
    blob = reg.store.path(v.sha256)
    bst, sst = blob.stat(), src.stat()
    assert (bst.st_dev, bst.st_ino) == (sst.st_dev, sst.st_ino)  # a hard link (ext4 cannot reflink)
    assert stat.S_IMODE(bst.st_mode) == 0o444 and stat.S_IMODE(sst.st_mode) == 0o444  # the source too
    assert v.sha256 == want["sha256"] and v.hashes["autov2"] == want["autov2"]
    assert v.hashes["autov3"] == want["autov3"] and v.hashes["crc32"] == want["crc32"]
    from loradex.converters import safetensors_io as sio

    kh = sio.kohya_hashes(src)
    assert v.hashes["sshs_model_hash"] == kh["sshs_model_hash"] and v.hashes["sshs_legacy_hash"] == kh["sshs_legacy_hash"]
    assert reg.get("face").ref == "face@1" and reg.path("face") == blob
    assert v.format == "kohya" and v.arch == "tiny-sd1" and v.artifact == "adapter"
    assert set(loradex.load(reg.path("face")).patches) == set(loradex.load(src).patches)
    assert sketches.stored_sketch(reg, v) is None  # deferred with --link: reindex (or similar) makes it
    sketches.reindex(reg)
    assert sketches.stored_sketch(reg, v) is not None
    consistent(reg)


def test_a_linked_file_the_registry_lets_go_of_is_writable_again(reg, base_lora, tmp_path):
    """``gc`` of a removed linked version (and the cleanup of a failed import, through the same
    ``BlobStore.remove``) hands the user's file back writable; no bytes are counted freed."""
    src = variant(base_lora, tmp_path / "src" / "face.safetensors", 9)
    v = reg.add(src, "face", link=True)
    assert stat.S_IMODE(src.stat().st_mode) == 0o444
    reg.remove("face@1")
    report = reg.gc()
    assert report["removed_blobs"] == [v.sha256] and report["freed_bytes"] == 0
    assert src.exists() and not reg.store.path(v.sha256).exists()
    mode = stat.S_IMODE(src.stat().st_mode)
    assert mode & stat.S_IWUSR and not mode & 0o111
    src.write_bytes(src.read_bytes())  # the user can edit it again


def test_sketches_now_or_deferred(reg, base_lora, tmp_path, home, capsys):
    """``sketch`` (default: yes, but not with ``link``): a deferred sketch is made by ``reindex``,
    which ``loradex similar`` runs first, and equals the one made at add."""
    a = reg.add(variant(base_lora, tmp_path / "a.safetensors", 1), "a")
    b = reg.add(variant(base_lora, tmp_path / "b.safetensors", 2), "b", sketch=False)
    c = reg.add(variant(base_lora, tmp_path / "c.safetensors", 3), "c", link=True, sketch=True)
    d = tmp_path / "dir"
    for k in range(4, 7):
        variant(base_lora, d / f"f{k}.safetensors", k)
    rep = reg.add_many(d, link=True)
    assert rep.linked == 3
    assert sketches.stored_sketch(reg, a) is not None and sketches.stored_sketch(reg, c) is not None
    assert all(sketches.stored_sketch(reg, v) is None for v in [b, *rep.added])
    made_at_add = sketches.stored_sketch(reg, a)
    reg.close()
    code, out, err = run(capsys, "similar", "a", "--json")
    assert code == 0, err
    hits = {h["ref"] for h in json.loads(out)["hits"]}
    assert {"b@1", "c@1"} <= hits and {v.ref for v in rep.added} <= hits
    r2 = Registry()
    try:
        assert all(sketches.stored_sketch(r2, r2.get(v.ref)) is not None for v in [b, *rep.added])
        import numpy as np

        from loradex.core import sketch as sk

        again = sketches.stored_sketch(r2, r2.get("a"))  # made at add, kept
        assert np.array_equal(again.units, made_at_add.units) and np.array_equal(again.keys, made_at_add.keys)
        late, fresh = sketches.stored_sketch(r2, r2.get("b")), sk.sketch_adapter(loradex.load(tmp_path / "b.safetensors"))
        assert np.array_equal(late.keys, fresh.keys) and np.allclose(late.units, fresh.units, atol=1 / 127)  # stored quantised
        assert np.allclose(late.norms, fresh.norms, rtol=1e-5)
    finally:
        r2.close()
    code, out, _ = run(capsys, "add", "--help")
    assert "--no-sketch" in out


def test_add_link_in_place_edit_of_the_source_is_caught(reg, base_lora, tmp_path):
    src = variant(base_lora, tmp_path / "src" / "face.safetensors", 2)
    v = reg.add(src, "face", link=True)
    assert reg.verify()["ok"]
    src.chmod(0o644)  # the user makes it writable again and edits it in place
    with open(src, "r+b") as f:
        f.seek(src.stat().st_size - 4)
        f.write(b"\x01\x02\x03\x04")
    r = reg.verify()
    assert not r["ok"] and r["problems"][0]["versions"] == ["face@1"]
    assert "content changed" in r["problems"][0]["problem"] and "add --link" in r["problems"][0]["problem"]
    with pytest.raises(RegistryError, match="face@1.*loradex verify"):
        reg.path(v)  # its mtime changed: hashed again on the next read, and refused
    VERIFIED.clear()
    with pytest.raises(RegistryError, match="do not match"):
        reg.export("face", tmp_path / "out.safetensors")


def test_add_link_to_another_file_system_copies(reg, base_lora, tmp_path, monkeypatch, caplog):
    """EXDEV (simulated: reflink and link both refuse) -> a plain copy, a warning, the source untouched."""
    src = variant(base_lora, tmp_path / "src" / "face.safetensors", 3)
    mode = stat.S_IMODE(src.stat().st_mode)

    def cross(*a, **k):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(linking, "reflink", cross)
    monkeypatch.setattr(linking.os, "link", cross)
    with caplog.at_level(logging.WARNING, logger="loradex.registry.store"):
        v = reg.add(src, "face", link=True)
    assert "another file system" in caplog.text and "copied" in caplog.text
    blob = reg.store.path(v.sha256)
    assert blob.stat().st_ino != src.stat().st_ino and stat.S_IMODE(src.stat().st_mode) == mode
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444 and v.sha256 == independent(src)["sha256"]
    report = reg.add_many(src.parent, prefix="again", link=True)
    assert report.linked == 0 and len(report.added) == 1
    consistent(reg)


def test_add_link_reflink_when_the_file_system_clones(reg, base_lora, tmp_path, monkeypatch):
    """Where FICLONE works the blob is its own inode (a clone): the source stays writable and an edit
    of it does not touch the stored version. Simulated here with a byte copy standing in for the clone."""
    src = variant(base_lora, tmp_path / "src" / "face.safetensors", 4)

    def fake_clone(src_fd: int, dst_fd: int) -> None:
        os.sendfile(dst_fd, src_fd, 0, os.fstat(src_fd).st_size)

    monkeypatch.setattr(linking, "reflink", fake_clone)
    v = reg.add(src, "face", link=True)
    blob = reg.store.path(v.sha256)
    assert blob.stat().st_ino != src.stat().st_ino and stat.S_IMODE(src.stat().st_mode) & stat.S_IWUSR
    src.write_bytes(b"edited")
    assert reg.verify()["ok"] and v.sha256 == hashlib.sha256(blob.read_bytes()).hexdigest()


def test_add_link_cli_file_and_folder(home, base_lora, tmp_path, capsys):
    d = tmp_path / "Lora"
    one = variant(base_lora, d / "one.safetensors", 5)
    variant(base_lora, d / "two.safetensors", 6)
    code, out, err = run(capsys, "add", one, "--name", "one", "--link")
    assert code == 0, err
    assert "stored one@1" in out and "linked: the blob is" in out and "read-only" in out
    code, out, err = run(capsys, "add", d, "--link", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert [v["ref"] for v in r["added"]] == ["two@1"] and r["linked"] == 1 and len(r["existing"]) == 1
    code, out, _ = run(capsys, "add", "--help")
    assert "--link" in out and "hard link" in out and "read-only" in out and "in place" in out


def test_add_link_big_file_hashed_on_threads(reg, tmp_path, monkeypatch):
    """Above PARALLEL_HASH_MIN_BYTES the link is read ahead into a few buffers while two threads hash
    (here with 1 MiB chunks): every identity equals hashlib's."""
    import loradex.registry.store as store

    monkeypatch.setattr(store, "PARALLEL_HASH_MIN_BYTES", 1 << 20)
    monkeypatch.setattr(hashes, "CHUNK", 1 << 20)
    big = tmp_path / "ckpt.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.randn(3 << 20, generator=torch.Generator().manual_seed(1))},
              big)
    want = independent(big)
    seen: list[int] = []
    v = reg.add(big, "ckpt", link=True, progress=seen.append)
    assert sum(seen) == big.stat().st_size and len(seen) >= 12
    assert v.sha256 == want["sha256"] and v.hashes["autov3"] == want["autov3"] and v.hashes["crc32"] == want["crc32"]
    assert reg.store.path(v.sha256).stat().st_ino == big.stat().st_ino and v.artifact == "checkpoint"


# ---- embedding images and previews -------------------------------------------------------------------
def test_folder_import_takes_png_embeddings_and_skips_previews(reg, base_lora, tmp_path):
    from PIL import Image

    d = tmp_path / "embeddings"
    d.mkdir()
    vec = torch.randn(3, 768, generator=torch.Generator().manual_seed(7))
    loradex.save(Adapter(embeddings={"mystyle": Embedding("mystyle", {"text_encoder": vec})}), d / "mystyle.png",
                 format="a1111-png")
    variant(base_lora, d / "face.safetensors", 8)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(d / "face.preview.png")
    Image.new("RGB", (64, 48), (30, 200, 30)).save(d / "face.png")  # A1111's other preview name
    (d / "fake.png").write_bytes(b"not a png at all")
    report = reg.add_many(d)
    added = {v.name: v for v in report.added}
    assert set(added) == {"mystyle", "face"}
    png = added["mystyle"]
    assert png.format == "a1111-png" and png.artifact == "embedding" and png.embeddings == ["mystyle"]
    assert png.sha256 == hashlib.sha256((d / "mystyle.png").read_bytes()).hexdigest()
    assert torch.equal(reg.load("mystyle").embeddings["mystyle"].vectors["text_encoder"], vec)
    skipped = dict(report.skipped)
    assert set(skipped) == {"face.preview.png", "face.png", "fake.png"}
    assert "preview" in skipped["face.preview.png"] and "preview" in skipped["face.png"]
    assert "not a PNG" in skipped["fake.png"] and str(d) not in skipped["face.png"]
    consistent(reg)


# ---- a batched folder import records what one-by-one adds record --------------------------------------
def test_batched_import_equals_one_by_one(tmp_path, base_lora, monkeypatch):
    d = tmp_path / "Lora"
    files = [variant(base_lora, d / f"lora_{k:02d}.safetensors", k) for k in range(9)]
    ti_file(d / "sks.safetensors", "sks", 1)
    # the same file name and size in another folder, another header: described as itself (a path is
    # never reused for another file, so no cache keyed by path can answer with the first one's header)
    variant(base_lora, d / "sub" / "lora_00.safetensors", 0, title="sub_x00")
    assert (d / "sub" / "lora_00.safetensors").stat().st_size == files[0].stat().st_size
    (d / "copy.safetensors").write_bytes(files[3].read_bytes())  # the same bytes under another name
    a_home, b_home = tmp_path / "a", tmp_path / "b"
    a_home.mkdir(), b_home.mkdir()
    with Registry(a_home) as a:
        report = a.add_many(d, batch=4, workers=2)
        batched = {v.name: v for v in report.added}
        sk_a = {n: sketches.stored_sketch(a, v) for n, v in batched.items()}
        consistent(a)
    with Registry(b_home) as b:
        single = {}
        for p in sorted(d.rglob("*.safetensors")):
            rel = p.relative_to(d).as_posix()
            name = rel[: -len(".safetensors")].replace("/", ".")
            single[name] = b.add(p, name)
        sk_b = {n: sketches.stored_sketch(b, v) for n, v in single.items()}
    assert set(batched) == set(single) == {f"lora_{k:02d}" for k in range(9)} | {"sks", "sub.lora_00", "copy"}
    for n in batched:
        assert row(batched[n]) == row(single[n]), n
        if sk_b[n] is None:
            assert sk_a[n] is None
            continue
        assert (sk_a[n].keys == sk_b[n].keys).all() and abs(sk_a[n].units - sk_b[n].units).max() < 0.02
        assert abs(sk_a[n].norms - sk_b[n].norms).max() <= 1e-5 * max(1.0, float(sk_b[n].norms.max()))
    assert batched["sub.lora_00"].sha256 != batched["lora_00"].sha256
    assert batched["sub.lora_00"].metadata["ss_output_name"] == "sub_x00"
    assert batched["lora_00"].metadata["ss_output_name"] == "lora_00"


def test_nan_adapter_skipped_in_a_folder_refused_alone(reg, base_lora, tmp_path):
    d = tmp_path / "Lora"
    variant(base_lora, d / "good.safetensors", 1)
    bad = variant(base_lora, d / "bad.safetensors", 2, nan=True)
    report = reg.add_many(d)
    assert [v.name for v in report.added] == ["good"]
    assert "NaN/Inf" in dict(report.skipped)["bad.safetensors"] and "lora_down" in dict(report.skipped)["bad.safetensors"]
    with pytest.raises(loradex.LoradexError, match=f"{bad}: holds NaN/Inf"):
        reg.add(bad, "bad")
    assert reg.add(bad, "bad", allow_nonfinite=True).ref == "bad@1"
    consistent(reg)


# ---- nothing half-written -----------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["record", "worker", "sync"])
def test_failure_half_way_leaves_nothing_half_written(reg, base_lora, tmp_path, monkeypatch, where):
    """A failure in the second batch's transaction, in a worker, or in the sync: the first batch
    stays (its rows were written), nothing else does -- no row, no blob, no temporary file."""
    from loradex.registry import ingest

    d = tmp_path / "Lora"
    for k in range(10):
        variant(base_lora, d / f"lora_{k:02d}.safetensors", k)
    calls = {"n": 0}
    if where == "record":
        real = ingest.Ingestor._record

        def record(self, pending):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("boom")
            return real(self, pending)

        monkeypatch.setattr(ingest.Ingestor, "_record", record)
    elif where == "worker":
        real = ingest.Ingestor._prepare_file

        def prepare(self, p, *a, **k):
            if p.name == "lora_06.safetensors":
                raise RuntimeError("boom")
            return real(self, p, *a, **k)

        monkeypatch.setattr(ingest.Ingestor, "_prepare_file", prepare)
    else:
        real = reg.store.sync

        def sync():
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("boom")
            return real()

        monkeypatch.setattr(reg.store, "sync", sync)
    with pytest.raises(RuntimeError, match="boom"):
        reg.add_many(d, batch=4, workers=2)
    names = sorted(a["name"] for a in reg.list())
    assert names == [f"lora_{k:02d}" for k in range(4)]
    r = consistent(reg)
    assert r["blobs_checked"] == 4 and len(list(reg.store.iter_blobs())) == 4


def test_stale_slot_of_a_killed_import_is_collected(reg, base_lora, tmp_path):
    """What a killed import leaves in blobs/tmp (a slot folder holding a file under its own name) is
    a stale temporary for verify and gc."""
    slot = reg.store.tmp_dir / "999999999-abcd"
    slot.mkdir()
    variant(base_lora, slot / "face.safetensors", 1)
    assert [Path(t).name for t in reg.verify()["stale_temp_files"]] == ["999999999-abcd"]
    g = reg.gc()
    assert len(g["removed_temp_files"]) == 1 and not slot.exists()


def test_slots_never_hand_out_a_path_twice(tmp_path):
    """A slot path is used once: the safetensors header cache is keyed by (path, size, mtime), and
    mtimes are only as fine as the kernel's clock tick, so a second file under a path just freed
    could be answered with the first one's header."""
    slots = linking.Slots(tmp_path)
    p1, fd = slots.create("x.safetensors", mode=0o444)
    os.close(fd)
    p1.unlink()  # renamed into place, say
    p2, fd = slots.create("x.safetensors")
    os.close(fd)
    p3, fd = slots.create("y.safetensors")
    os.close(fd)
    assert p1 != p2 and p1.name == p2.name == "x.safetensors" and p3.parent == p1.parent
    assert stat.S_IMODE(p2.stat().st_mode) == 0o600
    slots.close()
    assert not any(tmp_path.iterdir())


def test_add_link_of_another_users_file_copies(reg, base_lora, tmp_path, monkeypatch, caplog):
    """A hard link of a file the user does not own could not be made read-only: it is copied."""
    src = variant(base_lora, tmp_path / "src" / "theirs.safetensors", 9)
    monkeypatch.setattr(linking.os, "geteuid", lambda: src.stat().st_uid + 4242)
    with caplog.at_level(logging.WARNING, logger="loradex.registry.store"):
        v = reg.add(src, "theirs", link=True)
    assert "another user's file" in caplog.text and "copied instead" in caplog.text
    assert reg.store.path(v.sha256).stat().st_ino != src.stat().st_ino
    assert stat.S_IMODE(src.stat().st_mode) & stat.S_IWUSR  # untouched
