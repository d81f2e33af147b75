"""The registry under faults and hostile input (issue 12): damaged blobs, FIFOs / devices /
sockets, symlink loops and escapes, empty imports, full disks and short writes, hostile REFs,
temporary paths in messages, read-only homes. Real files, real SQLite, the real CLI (in process,
or in a subprocess where a regression would hang or fill the disk). OS faults are injected at the
OS boundary only (``os.write`` / ``os.copy_file_range`` raising ``ENOSPC``, SQLite's own
``max_page_count``), and a real small tmpfs is mounted where the machine allows it."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import loradex
from loradex import Registry, RegistryError
from loradex.demo import make_lycoris_reference
from loradex.registry import split_weight
from test_registry import REPO, child_env, cli, ok, ti_file


@pytest.fixture(scope="module")
def lora(bench, tmp_path_factory) -> Path:
    return make_lycoris_reference(bench, "lora", tmp_path_factory.mktemp("faults"), seed=3).path


def one_line_error(r, *needles):
    assert r.code == 2 and r.out == "" and r.err.startswith("error: ") and r.err.count("\n") == 1, r
    for n in needles:
        assert n in r.err, (n, r.err)
    return r.err


def run_cli(home: Path, *args, timeout: float = 120, max_file_bytes: int | None = None, **env):
    """``loradex ARGS`` in a fresh process (a hang is a timeout, not a stuck test run); with
    ``max_file_bytes`` the process cannot write a larger file (RLIMIT_FSIZE)."""
    def limits():
        if max_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run([sys.executable, "-c", "from loradex.cli import main; main()", *map(str, args)],
                          env=child_env(home, **env), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limits, cwd=REPO)


def flip_byte(path: Path, keep_mtime: bool = False) -> None:
    st = path.stat()
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    path.chmod(0o444)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def consistent(reg: Registry, names: list[str]) -> None:
    """Only ``names`` are catalogued, every blob is intact, and nothing is left behind."""
    assert sorted(a["name"] for a in reg.list()) == sorted(names)
    r = reg.verify()
    assert r["ok"] and not r["orphan_blobs"], r
    assert not list(reg.store.tmp_dir.iterdir()) and not list(reg.tmp.iterdir())


# ---- 1. integrity on every read ------------------------------------------------------------------------
def test_a_flipped_byte_is_refused_by_every_reader(reg, lora, tmp_path, capsys, bench):
    v = reg.add(lora, "face")
    ti = reg.add(ti_file(tmp_path / "sks.safetensors", "sks", 1), "sks")
    flip_byte(reg.store.path(v.sha256))
    need = ("face@1", "loradex verify")
    for args in (("export", "face", "-o", tmp_path / "out.safetensors"),
                 ("export", "face", "-o", tmp_path / "out.safetensors", "--to", "diffusers"),
                 ("convert", "face", "--to", "diffusers", "-o", tmp_path / "c.safetensors"),
                 ("merge", "face:0.5", "sks", "-o", tmp_path / "m.safetensors"),
                 ("inspect", "face", "--json")):
        one_line_error(cli(capsys, *args), *need)
    assert not list(tmp_path.glob("*.safetensors.*")) and not (tmp_path / "out.safetensors").exists()
    assert not (tmp_path / "c.safetensors").exists() and not (tmp_path / "m.safetensors").exists()
    for call in (lambda: reg.path("face"), lambda: reg.load("face"),
                 lambda: reg.export("face", tmp_path / "api.safetensors"),
                 lambda: reg.checkout("face").__enter__()):
        with pytest.raises(RegistryError, match=r"face@1: its stored bytes do not match.*loradex verify"):
            call()
    assert not (tmp_path / "api.safetensors").exists() and not list(reg.tmp.iterdir())
    # the engine resolves REFs through the registry: it refuses the damaged adapter too
    from loradex.inference import Engine

    eng = Engine(bench.fresh_pipe(), max_rank=8, slots=1, registry=reg)
    with pytest.raises(loradex.LoradexError, match="loradex verify"):
        eng.prefetch(["face"])
    # the untouched version still reads, and its export carries the checked hash
    d = ok(cli(capsys, "export", "sks", "-o", tmp_path / "sks-out.safetensors", "--json")).json()
    assert d["sha256"] == ti.sha256 == hashlib.sha256((tmp_path / "sks-out.safetensors").read_bytes()).hexdigest()
    assert cli(capsys, "verify").code == 1


def test_a_blob_is_hashed_once_per_process_and_state(reg, tmp_path, home):
    """``path`` hashes a blob once per process: a byte flipped behind the process's back with the
    mtime restored is only found by a fresh process (or ``verify``); one flipped with a new
    mtime is found at once."""
    v = reg.add(ti_file(tmp_path / "a.safetensors", "a", 1), "a")
    blob = reg.path(v)
    flip_byte(blob, keep_mtime=True)
    assert reg.path(v) == blob  # same (inode, size, mtime): already checked by this process
    p = run_cli(home, "export", "a", "-o", tmp_path / "fresh.safetensors")
    assert p.returncode == 2 and "a@1: its stored bytes do not match" in p.stderr and "verify" in p.stderr
    assert not reg.verify()["ok"]
    with pytest.raises(RegistryError, match="do not match"):  # verify forgot it was intact
        reg.path(v)
    flip_byte(blob)  # flipped back, new mtime: checked again, and intact
    assert reg.path(v) == blob and reg.verify()["ok"]


@pytest.mark.parametrize("copy", ["buffered", "kernel"])
def test_export_hashes_as_it_copies(reg, tmp_path, monkeypatch, copy):
    """Both copy paths (through a buffer; by the kernel, hashed from a map of the copy) check the
    bytes they write, and a damaged blob leaves no output."""
    import loradex.registry.store as store

    monkeypatch.setattr(store, "CHUNK", 1 << 20)
    monkeypatch.setattr(store, "KERNEL_COPY_MIN_BYTES", 1 << 20 if copy == "kernel" else 1 << 62)
    big = tmp_path / "big.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.randn(1 << 20)}, big)
    v = reg.add(big, "big")
    store.VERIFIED.clear()  # a fresh process: nothing checked yet
    out = reg.export(v, tmp_path / "out.safetensors")
    assert out.read_bytes() == big.read_bytes()
    flip_byte(reg.store.path(v.sha256))
    with pytest.raises(RegistryError, match="big@1: its stored bytes do not match"):
        reg.export(v, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists() and not list(tmp_path.glob(".bad.safetensors.*"))


def test_a_damaged_folder_artifact_exports_nothing(reg, lora, tmp_path, capsys):
    peft = tmp_path / "peft"
    loradex.save(loradex.load(lora), peft, "peft")
    v = reg.add(peft, "face-peft")
    weights = next(f for f in v.files if f["path"].endswith(".safetensors"))
    flip_byte(reg.store.path(weights["sha256"]))
    out = tmp_path / "exported"
    one_line_error(cli(capsys, "export", "face-peft", "-o", out), f"face-peft@1:{weights['path']}", "loradex verify")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".exported")]
    out.mkdir()  # an existing empty folder stays empty
    one_line_error(cli(capsys, "export", "face-peft", "-o", out), "loradex verify")
    assert out.is_dir() and not any(out.iterdir())


# ---- 2. only regular files are read ------------------------------------------------------------------------
def test_fifo_device_and_socket_are_refused(home, tmp_path):
    fifo = tmp_path / "p.safetensors"
    os.mkfifo(fifo)
    p = run_cli(home, "add", fifo, "--name", "x", timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "is a FIFO (named pipe), not a regular file" in p.stderr
    p = run_cli(home, "add", "/dev/zero", "--name", "z", timeout=60, max_file_bytes=1 << 20)
    assert p.returncode == 2 and "/dev/zero is a character device, not a regular file" in p.stderr
    sock_path = tmp_path / "s.safetensors"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        with Registry() as reg, pytest.raises(RegistryError, match="is a socket, not a regular file"):
            reg.add(sock_path, "s")
    with Registry() as reg:
        consistent(reg, [])


def test_a_folder_with_special_files_skips_them(home, tmp_path):
    f = tmp_path / "models"
    f.mkdir()
    ti_file(f / "tok.safetensors", "tok", 1)
    os.mkfifo(f / "pipe.safetensors")
    (f / "zero.safetensors").symlink_to("/dev/zero")
    p = run_cli(home, "add", f, "--json", timeout=120, max_file_bytes=1 << 20)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert [v["ref"] for v in r["added"]] == ["tok@1"]
    skipped = {s["path"]: s["reason"] for s in r["skipped"]}
    assert "FIFO" in skipped["pipe.safetensors"]
    assert "outside the imported folder" in skipped["zero.safetensors"]  # a link to /dev: not followed
    p = run_cli(home, "add", f, "--name", "again", "--follow-links", "--json", timeout=120, max_file_bytes=1 << 20)
    assert p.returncode == 0, p.stderr
    skipped = {s["path"]: s["reason"] for s in json.loads(p.stdout)["skipped"]}
    assert "a character device, not a regular file" in skipped["zero.safetensors"]


def test_a_special_file_inside_a_folder_artifact_is_an_error(reg, lora, tmp_path):
    peft = tmp_path / "peft"
    loradex.save(loradex.load(lora), peft, "peft")
    os.mkfifo(peft / "extra.bin")
    with pytest.raises(RegistryError, match="extra.bin: a FIFO"):
        reg.add(peft, "p")
    consistent(reg, [])


# ---- 3. symlinks in folder imports -----------------------------------------------------------------------
def test_symlink_loops_and_escapes(reg, tmp_path, capsys):
    f = tmp_path / "f"
    (f / "a").mkdir(parents=True)
    ti_file(f / "a" / "t.safetensors", "t", 1)
    (f / "a" / "up").symlink_to("..")  # a loop: ~40 versions before
    (f / "a" / "self").symlink_to("self")  # a link to itself
    (f / "etc").symlink_to("/etc")  # a whole tree outside
    outside = tmp_path / "outside"
    outside.mkdir()
    ti_file(outside / "o.safetensors", "o", 2)
    (outside / "back").symlink_to(f)  # and from there, back in: a loop through the outside
    (f / "ext").symlink_to(outside)
    (f / "same.safetensors").symlink_to(f / "a" / "t.safetensors")  # inside: followed
    (f / "gone.safetensors").symlink_to(tmp_path / "missing")
    r = ok(cli(capsys, "add", f, "--json")).json()
    assert sorted(v["ref"] for v in r["added"]) == ["a.t@1", "same@1"]
    skipped = {s["path"]: s["reason"] for s in r["skipped"]}
    assert skipped["a/up"].startswith("a symlink loop")
    assert "symlink loop" in skipped["a/self"]
    assert "/etc, outside the imported folder" in skipped["etc"] and "--follow-links" in skipped["etc"]
    assert "outside the imported folder" in skipped["ext"]
    assert "broken symlink" in skipped["gone.safetensors"]
    # --follow-links: the outside folder is walked once, the way back in is a loop
    (f / "etc").unlink()  # (it would walk all of /etc)
    r = ok(cli(capsys, "add", f, "--name", "fl", "--follow-links", "--json")).json()
    names = sorted(v["ref"] for v in r["added"] + r["existing"])
    assert names == ["fl-a.t@1", "fl-ext.o@1", "fl-same@1"], names
    reasons = {s["path"]: s["reason"] for s in r["skipped"]}
    assert "symlink loop" in reasons["ext/back"] and "symlink loop" in reasons["a/up"]
    assert reg.verify()["ok"]


def test_follow_links_is_needed_for_links_leaving_a_folder_artifact(reg, lora, tmp_path):
    store = tmp_path / "elsewhere"
    peft = tmp_path / "peft"
    loradex.save(loradex.load(lora), store, "peft")
    peft.mkdir()
    for f in store.iterdir():  # a Hugging Face snapshot: every file a link into the cache's blobs
        (peft / f.name).symlink_to(f)
    with pytest.raises(RegistryError, match="outside the folder .*--follow-links"):
        reg.add(peft, "p")
    v = reg.add(peft, "p", follow_links=True)
    assert v.layout == "folder" and reg.verify()["ok"]


# ---- 4. empty imports ------------------------------------------------------------------------------------
def test_empty_imports_are_errors(reg, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(cli(capsys, "add", empty), "nothing to import", "holds no files")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hi")
    (junk / "broken.safetensors").write_bytes(b"\x00" * 5)
    err = one_line_error(cli(capsys, "add", junk), "nothing to import", "2 skipped", "notes.txt", "broken.safetensors")
    assert str(reg.tmp) not in err
    with pytest.raises(RegistryError, match="nothing to import") as info:
        reg.add_many(junk)
    assert len(info.value.report.skipped) == 2
    consistent(reg, [])


# ---- 5. full disks and short writes -------------------------------------------------------------------------
@contextlib.contextmanager
def failing_writes(monkeypatch, under: Path, mode: str = "enospc", after: int = 0):
    """``os.write`` on files under ``under`` fails like a full disk (after ``after`` good
    writes), writes only half of each buffer (``half``), or makes no progress (``zero``)."""
    real = os.write
    calls = {"n": 0}

    def fake(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if not target.startswith(str(under)):
            return real(fd, data)
        calls["n"] += 1
        if mode == "half":
            return real(fd, memoryview(data)[: max(1, len(data) // 2)])
        if calls["n"] <= after:
            return real(fd, data)
        if mode == "zero":
            return 0
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", fake)
    try:
        yield calls
    finally:
        monkeypatch.setattr(os, "write", real)


def test_enospc_while_storing_leaves_nothing(reg, lora, home, monkeypatch, capsys):
    with failing_writes(monkeypatch, home):
        err = one_line_error(cli(capsys, "add", lora, "--name", "face"), "the disk is full", str(home / "blobs"),
                             lora.name)
    assert str(reg.store.tmp_dir) not in err and ".tmp" not in err
    consistent(reg, [])
    with failing_writes(monkeypatch, home, mode="zero"):
        with pytest.raises(RegistryError, match="the disk is full.*no progress"):
            reg.add(lora, "face")
    consistent(reg, [])
    with failing_writes(monkeypatch, home, mode="half") as calls:  # short writes are continued
        v = reg.add(lora, "face")
    assert calls["n"] > 1 and v.sha256 == hashlib.sha256(lora.read_bytes()).hexdigest()
    assert reg.path(v).read_bytes() == lora.read_bytes()
    consistent(reg, ["face"])


def test_enospc_in_the_kernel_copy_path(reg, home, tmp_path, monkeypatch):
    import loradex.registry.store as store

    big = tmp_path / "big.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.randn(1 << 20)}, big)
    monkeypatch.setattr(store, "KERNEL_COPY_MIN_BYTES", 1 << 20)
    monkeypatch.setattr(store, "CHUNK", 1 << 20)
    real = os.copy_file_range
    calls = []

    def fake(src, dst, count, offset_src=None, offset_dst=None):
        calls.append(count)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", fake)
    with pytest.raises(RegistryError, match="the disk is full: cannot write big.safetensors"):
        reg.add(big, "big")
    assert len(calls) == 2
    consistent(reg, [])


def test_full_catalogue_records_nothing(reg, tmp_path):
    """SQLite's own limit (``max_page_count``) makes the catalogue full: SQLITE_FULL."""
    reg.add(ti_file(tmp_path / "a.safetensors", "a", 1), "a")
    pages = reg.db.execute("PRAGMA page_count").fetchone()[0]
    reg.db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(RegistryError, match=r"the disk is full: cannot write the catalogue .*registry\.db"):
        reg.add(ti_file(tmp_path / "b.safetensors", "b", 2), "b", description="many words " * 20000)
    reg.db.execute("PRAGMA max_page_count = 1073741823")
    consistent(reg, ["a"])  # no row, and the blob it had stored is gone again


def test_enospc_during_a_folder_import(reg, home, tmp_path, monkeypatch, capsys):
    f = tmp_path / "many"
    f.mkdir()
    for i in range(4):
        ti_file(f / f"t{i}.safetensors", f"t{i}", i)
    with failing_writes(monkeypatch, home / "blobs", after=2):
        one_line_error(cli(capsys, "add", f), "the disk is full", "import it again after freeing space")
    consistent(reg, [])
    assert len(ok(cli(capsys, "add", f, "--json")).json()["added"]) == 4


def test_enospc_on_the_export_target(reg, lora, tmp_path, monkeypatch, capsys):
    reg.add(lora, "face")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with failing_writes(monkeypatch, out_dir):
        one_line_error(cli(capsys, "export", "face", "-o", out_dir / "f.safetensors"), "the disk is full",
                       str(out_dir / "f.safetensors"))
    assert not any(out_dir.iterdir())


@pytest.fixture
def tmpfs(tmp_path):
    """A real 1 MiB tmpfs (root with CAP_SYS_ADMIN only; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_real_full_disk(tmpfs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORADEX_HOME", str(tmpfs))
    small = ti_file(tmp_path / "small.safetensors", "small", 1)
    big = tmp_path / "big.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.randn(600_000)}, big)  # 2.4 MB > 1 MiB
    ok(cli(capsys, "add", small, "--name", "small"))
    one_line_error(cli(capsys, "add", big, "--name", "big"), "the disk is full", str(tmpfs / "blobs"))
    with Registry() as reg:
        consistent(reg, ["small"])
    filler = tmpfs / "filler"
    with open(filler, "wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 4096)
    one_line_error(cli(capsys, "add", ti_file(tmp_path / "more.safetensors", "more", 2), "--name", "more"),
                   "the disk is full")
    filler.unlink()
    with Registry() as reg:
        consistent(reg, ["small"])


# ---- 6. hostile REFs, weights, temporary paths, read-only homes ------------------------------------------------
def test_hostile_refs_are_clean_not_found(reg, tmp_path, capsys):
    reg.add(ti_file(tmp_path / "a.safetensors", "a", 1), "face")
    one_line_error(cli(capsys, "show", "face@99999999999999999999999"), "face has no version 99999999999999999999999")
    one_line_error(cli(capsys, "show", "face@\u00b2"), "version number")
    one_line_error(cli(capsys, "show", "face@-1"), "version number")
    one_line_error(cli(capsys, "show", "nobody@99999999999999999999999"), "no adapter named 'nobody'")
    one_line_error(cli(capsys, "show", "sha256:xyz"), "bad sha256 prefix")
    one_line_error(cli(capsys, "export", "face@18446744073709551616", "-o", tmp_path / "x"), "has no version")
    assert reg.get("sha256:" + reg.get("face").sha256[:1]).ref == "face@1"  # a 1-char prefix is a prefix


@pytest.mark.parametrize("text, want", [
    ("face", ("face", 1.0, False)),
    ("face:0.8", ("face", 0.8, True)),
    ("face:prod", ("face:prod", 1.0, False)),
    ("face:prod:0.5", ("face:prod", 0.5, True)),
    ("face@2:-1.5", ("face@2", -1.5, True)),
    ("face:2", ("face", 2.0, True)),  # a numeric tag needs an explicit weight...
    ("face:2:1", ("face:2", 1.0, True)),  # ...like this
    ("face:nan", ("face:nan", 1.0, False)),  # not a plain number: part of the REF
    ("face:1e-1", ("face", 0.1, True)),
    ("sha256:0", ("sha256:0", 1.0, False)),  # a sha256 REF, never REF 'sha256' at weight 0
    ("SHA256:12", ("SHA256:12", 1.0, False)),
    ("sha256:0abc:0.5", ("sha256:0abc", 0.5, True)),
    ("/a/b.safetensors:.5", ("/a/b.safetensors", 0.5, True)),
])
def test_ref_weight_rule(text, want):
    assert split_weight(text) == want


def test_messages_never_name_temporary_paths(reg, lora, tmp_path, capsys):
    reg.add(lora, "face")
    internal = str(reg.tmp)
    err = one_line_error(cli(capsys, "inspect", "face", "--arch", "sdxl"), "face:")
    assert internal not in err and "/tmp/" not in err.replace(str(tmp_path), "")
    err = one_line_error(cli(capsys, "convert", "face", "--arch", "sdxl", "--to", "kohya", "-o", tmp_path / "o"))
    assert internal not in err and err.startswith("error: face:")
    with pytest.raises(loradex.LoradexError) as info:
        reg.load("face", arch="sdxl")
    assert str(info.value).startswith("face@1:") and internal not in str(info.value)
    bad = tmp_path / "bad"  # a folder artifact whose config is broken
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{ not json")
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(loradex.LoradexError) as info:
        reg.add(bad, "bad")
    assert internal not in str(info.value) and str(reg.store.tmp_dir) not in str(info.value)
    assert str(bad) in str(info.value)
    consistent(reg, ["face"])


@contextlib.contextmanager
def read_only(folder: Path):
    if os.geteuid() == 0:  # root writes through permission bits: make the folder immutable instead
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("running as root without chattr: cannot make a read-only folder")
    else:
        folder.chmod(0o555)
    try:
        yield
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        else:
            folder.chmod(0o755)


def test_a_read_only_home_still_serves_reads(home, lora, tmp_path, capsys):
    with Registry() as reg:
        v = reg.add(lora, "face", tags=["prod"])
    with read_only(home):
        out = tmp_path / "exported.safetensors"
        assert "face" in ok(cli(capsys, "ls")).out
        assert ok(cli(capsys, "show", "face:prod", "--json")).json()["sha256"] == v.sha256
        assert ok(cli(capsys, "export", "face", "-o", out, "--json")).json()["sha256"] == v.sha256
        assert out.read_bytes() == lora.read_bytes()
        assert ok(cli(capsys, "inspect", "face", "--json")).json()["hashes"]["sha256"] == v.sha256
        assert ok(cli(capsys, "search", "face", "--json")).json()[0]["ref"] == "face@1"
        assert ok(cli(capsys, "lineage", "face")).code == 0
        assert ok(cli(capsys, "verify")).out.startswith("ok:")
        ok(cli(capsys, "convert", "face", "--to", "diffusers", "-o", tmp_path / "d.safetensors"))
        for args in (("add", lora, "--name", "x"), ("tag", "face", "dev"), ("gc",), ("rm", "face")):
            one_line_error(cli(capsys, *args), "not writable")
        with Registry(readonly=None) as reg:
            assert reg.readonly and reg.load("face").patches
            with pytest.raises(RegistryError, match="read-only"):
                reg.add(lora, "x")
        assert sorted(p.name for p in home.iterdir()) == ["blobs", "registry.db", "tmp"]  # nothing written
    with Registry(readonly=True) as reg:  # asked for on a writable home: reads only too
        assert reg.get("face").ref == "face@1"
        with pytest.raises(RegistryError, match="read-only"):
            reg.tag("face", "dev")


def test_a_read_only_empty_home_is_an_empty_registry(home, capsys):
    with read_only(home):
        assert ok(cli(capsys, "ls")).out.strip() == "(empty registry)"
        one_line_error(cli(capsys, "show", "face"), "no adapter named 'face'")
    assert list(home.iterdir()) == []


def test_the_registry_modules_import_one_way():
    """No import cycle among ``loradex/registry/*.py``, counting imports inside functions too;
    hub takes a Registry and never imports the facade (registry.py imports hub lazily)."""
    import ast

    pkg = REPO / "src" / "loradex" / "registry"
    mods = {p.stem for p in pkg.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for m in mods:
        deps = graph.setdefault(m, set())
        for node in ast.walk(ast.parse((pkg / f"{m}.py").read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "loradex.registry" \
                    else [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for n in names:
                parts = n.split(".")
                if parts[:2] == ["loradex", "registry"] and len(parts) > 2 and parts[2] in mods and parts[2] != m:
                    deps.add(parts[2])
    assert "registry" not in graph["hub"]

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for d in graph[todo.pop()] - seen:
                seen.add(d)
                todo.append(d)
        return seen

    assert [m for m in sorted(graph) if m in reach(m)] == []
