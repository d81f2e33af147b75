"""The registry: real SQLite in a temporary ``LORADEX_HOME`` per test, real adapter files made with
lycoris-lora / loradex writers on the tiny model, hashes checked against hashlib written here,
four concurrent importer processes, and importers SIGKILLed at known steps."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save, save_file

import loradex
from ckpt_util import sd1_single_file
from loradex import Registry, RegistryError
from loradex.cli import main
from loradex.core.adapter import Adapter, Embedding
from loradex.demo import make_lycoris_reference

REPO = Path(__file__).resolve().parents[1]


# ---- fixtures and helpers ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def refs(bench, tmp_path_factory):
    """Real adapters made once per module: lycoris-lora LoRA / LoHa / full diff, and the LoRA
    re-written by loradex's kohya writer (ss_* metadata and kohya's sshs hashes in its header)."""
    d = tmp_path_factory.mktemp("refs")
    out = {label: make_lycoris_reference(bench, label, d, seed=i).path for i, label in enumerate(("lora", "loha", "full"))}
    out["kohya"] = d / "face_kohya.safetensors"
    loradex.save(loradex.load(out["lora"]), out["kohya"], "kohya")
    out["kohya_full"] = d / "full_kohya.safetensors"  # > 1.1 MiB: AutoV1 / the legacy hash see real bytes
    loradex.save(loradex.load(out["full"]), out["kohya_full"], "kohya")
    return out


def ti_file(path: Path, token: str, seed: int) -> Path:
    """A textual-inversion embedding written by loradex's diffusers-ti writer (no arch tables needed
    to read it back, so subprocesses stay fast)."""
    vec = torch.randn(2, 32, generator=torch.Generator().manual_seed(seed))
    loradex.save(Adapter(embeddings={token: Embedding(token, {"text_encoder": vec})}, arch="tiny-sd1"), path,
                 "diffusers-ti")
    return path


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


def cli(capsys, *args) -> Run:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    code = info.value.code
    return Run(0 if code is None else code, out, err)


def ok(r: Run) -> Run:
    assert r.code == 0, r.err
    return r


def child_env(home: Path, **extra) -> dict:
    env = {**os.environ, "LORADEX_HOME": str(home), "PYTHONPATH": str(REPO / "src"), **extra}
    env.pop("LORADEX_PAUSE_AT", None)
    env.update(extra)
    return env


# ---- identity -----------------------------------------------------------------------------------------
def independent_hashes(path: Path) -> dict:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "autov1": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8].upper(),
        "autov2": hashlib.sha256(data).hexdigest()[:10].upper(),
        "autov3": hashlib.sha256(data[8 + n :]).hexdigest()[:12].upper(),
        "crc32": zlib.crc32(data).to_bytes(4, "little").hex().upper(),
    }


def kohya_reference_hashes(path: Path) -> tuple[str, str]:
    """What kohya's train_util.precalculate_safetensors_hashes computes: the tensors re-serialized
    with only the ss_* metadata, sha256 after the header, and sha256 of bytes 0x100000..0x110000."""
    from loradex.converters import safetensors_io as sio

    meta = {k: v for k, v in sio.read_header(path).metadata.items() if k.startswith("ss_")}
    buf = save(load_file(path), meta)
    n = int.from_bytes(buf[:8], "little")
    return hashlib.sha256(buf[8 + n :]).hexdigest(), hashlib.sha256(buf[0x100000:0x110000]).hexdigest()[:8]


@pytest.mark.parametrize("which", ["kohya", "kohya_full", "loha"])
def test_hashes_equal_independent_computation(reg, refs, which):
    path = refs[which]
    v = reg.add(path, which.replace("_", "-"))
    want = independent_hashes(path)
    assert v.sha256 == want["sha256"] and v.size == path.stat().st_size
    for k in ("autov1", "autov2", "autov3", "crc32"):
        assert v.hashes[k] == want[k], k
    model, legacy = kohya_reference_hashes(path)
    assert v.hashes["sshs_model_hash"] == model and v.hashes["sshs_legacy_hash"] == legacy
    if which != "loha":  # loradex's kohya writer embeds kohya's hashes: they agree
        meta = v.metadata
        assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == (model, legacy)
    if which == "kohya_full":
        assert path.stat().st_size > 0x110000 and legacy != hashlib.sha256(b"").hexdigest()[:8]
    # the stored blob is the file, byte for byte
    assert reg.path(v).read_bytes() == path.read_bytes()


def test_kohya_legacy_hash_without_loading_tensors_on_reordered_file(tmp_path):
    """A file whose tensors are not in safetensors' order (written by hand): the header-only
    computation still equals kohya's re-serialization."""
    from loradex.converters import safetensors_io as sio

    g = torch.Generator().manual_seed(0)
    sd = {"b.w": torch.randn(300, 400, generator=g), "a.w": torch.randn(600, 500, generator=g).half(),
          "c.alpha": torch.tensor(3.0), "d": torch.arange(100000), "e": torch.randn(90, 90, generator=g).double()}
    meta = {"ss_network_dim": "4", "ss_tag_frequency": json.dumps({"10_sks": {"sks": 3}}), "title": "x"}
    header, data, off = {"__metadata__": meta}, b"", 0
    dt = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64", torch.float64: "F64"}
    for k in ("c.alpha", "a.w", "d", "b.w", "e"):
        raw = sd[k].reshape(-1).view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": dt[sd[k].dtype], "shape": list(sd[k].shape), "data_offsets": [off, off + len(raw)]}
        data, off = data + raw, off + len(raw)
    hb = json.dumps(header).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    p = tmp_path / "odd.safetensors"
    p.write_bytes(len(hb).to_bytes(8, "little") + hb + data)
    got = sio.kohya_hashes(p)
    assert (got["sshs_model_hash"], got["sshs_legacy_hash"]) == kohya_reference_hashes(p)


def test_metadata_only_edit_keeps_autov3(reg, refs, tmp_path, capsys):
    v1 = reg.add(refs["kohya"], "face")
    edited = tmp_path / "face_edited.safetensors"
    meta = dict(v1.metadata, **{"modelspec.title": "face, retitled", "ss_output_name": "face2"})
    save_file(load_file(refs["kohya"]), edited, metadata=meta)
    v2 = reg.add(edited, "face")
    assert v2.number == 2
    assert v2.hashes["autov3"] == v1.hashes["autov3"] and v2.hashes["autov2"] != v1.hashes["autov2"]
    assert v2.sha256 != v1.sha256
    note = f"same tensors as face@1 (AutoV3 {v1.hashes['autov3']}), metadata differs"
    assert reg.show("face@2")["identity_notes"] == [note]
    out = ok(cli(capsys, "show", "face")).out
    assert note in out and f"AutoV2 {v2.hashes['autov2']}" in out and f"AutoV3 {v2.hashes['autov3']}" in out
    assert f"AutoV1 {v2.hashes['autov1']}" in out and "sshs_legacy_hash" in out
    assert ok(cli(capsys, "show", "face@2", "--json")).json()["same_tensors"] == ["face@1"]


# ---- references, tags, search, removal ------------------------------------------------------------------
def test_refs_tags_and_versions(reg, refs):
    v1 = reg.add(refs["lora"], "face", tags=["prod"])
    v2 = reg.add(refs["loha"], "face", tags=["dev"])
    assert (v1.number, v2.number) == (1, 2)
    assert reg.get("face").ref == "face@2" == reg.get("face:latest").ref
    assert reg.get("face@1").sha256 == v1.sha256
    assert reg.get("face:prod").ref == "face@1" and reg.get("face:dev").ref == "face@2"
    assert reg.get(v1.sha256[:10]).ref == "face@1" == reg.get("sha256:" + v1.sha256[:8].upper()).ref
    assert [v.number for v in reg.versions("face")] == [1, 2]
    assert reg.tag("face@2", "prod").tags == ["dev", "prod"]  # tags move
    assert reg.get("face:prod").ref == "face@2"
    reg.untag("face:dev")
    assert reg.get("face@2").tags == ["prod"]
    for bad, msg in (("face@9", "no version 9"), ("face:nope", "no tag 'nope'"), ("nobody", "no adapter named"),
                     ("face@x", "version number"), ("deadbeef00", "no version whose sha256")):
        with pytest.raises(RegistryError, match=msg):
            reg.get(bad)
    with pytest.raises(RegistryError, match="reserved"):
        reg.tag("face", "latest")
    # the same bytes again: that version, not a new one; under another name: stored once
    assert reg.add(refs["lora"], "face").ref == "face@1"
    other = reg.add(refs["lora"], "face-copy")
    assert other.sha256 == v1.sha256 and sum(1 for _ in reg.store.iter_blobs()) == 2
    with pytest.raises(RegistryError, match="bad sha256 prefix"):
        reg.get("sha256:")
    common = os.path.commonprefix([v1.sha256, v2.sha256])
    with pytest.raises(RegistryError, match="ambiguous" if common else "bad sha256 prefix"):
        reg.get("sha256:" + common)


def test_names_are_validated(reg, refs, capsys):
    for bad in ("../x", "a/b", "a\\b", "..", "x" * 101, "", ".hidden", "a..b", "a b", "a@1", "a:b"):
        with pytest.raises(RegistryError):
            reg.add(refs["lora"], bad)
    r = cli(capsys, "add", refs["lora"], "--name", "../../etc")
    assert r.code == 2 and r.err.count("\n") == 1 and r.err.startswith("error: ") and "path separator" in r.err
    assert reg.list() == []
    assert reg.add(refs["lora"], "Face_v1.2-final").ref == "Face_v1.2-final@1"
    with pytest.raises(RegistryError, match="path separator"):
        reg.tag("Face_v1.2-final", "a/b")


def test_missing_or_read_only_home_is_a_clear_error(tmp_path, monkeypatch, capsys, refs):
    monkeypatch.setenv("LORADEX_HOME", str(tmp_path / "nope"))
    with pytest.raises(RegistryError, match=r"LORADEX_HOME .*nope does not exist"):
        Registry()
    r = cli(capsys, "ls")
    assert r.code == 2 and r.err.startswith("error: LORADEX_HOME") and r.err.count("\n") == 1
    assert Registry(tmp_path / "made", create=True).home.is_dir()
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setenv("LORADEX_HOME", str(ro))
    if os.geteuid() == 0:  # root writes through permission bits: make the folder immutable instead
        if subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode != 0:
            pytest.skip("running as root without chattr: cannot make a read-only folder")
    else:
        ro.chmod(0o555)
    try:
        with pytest.raises(RegistryError, match="not writable"):
            Registry()
        r = cli(capsys, "add", refs["lora"], "--name", "x")
        assert r.code == 2 and "not writable" in r.err and r.err.count("\n") == 1
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(ro)], capture_output=True)
        else:
            ro.chmod(0o755)


def test_search_by_words_arch_kind_and_base(reg, refs, tmp_path, monkeypatch):
    reg.add(refs["lora"], "anime-style", description="flat colours, thick outlines", labels=["style"])
    reg.add(refs["loha"], "portrait-face", trigger_words=["sks person"], base_model="runwayml/stable-diffusion-v1-5")
    reg.add(ti_file(tmp_path / "cat.safetensors", "<cat>", 1), "cat-token")
    names = lambda vs: sorted(v.name for v in vs)  # noqa: E731
    assert names(reg.search("anime")) == ["anime-style"]
    assert names(reg.search("outl")) == ["anime-style"]  # prefix match on the description
    assert names(reg.search("sks")) == ["portrait-face"]
    assert names(reg.search("", kind="loha")) == ["portrait-face"]
    assert names(reg.search("", kind="embedding")) == ["cat-token"]
    assert names(reg.search("", arch="tiny-sd1")) == ["anime-style", "cat-token", "portrait-face"]
    assert names(reg.search("", arch="sdxl")) == []
    assert names(reg.search("", base="stable-diffusion-v1-5")) == ["portrait-face"]
    assert names(reg.search("style", kind="lora")) == ["anime-style"]
    assert names(reg.search('"; drop table adapters; --')) == []  # quoted, not executed
    assert len(reg.list()) == 3
    ranked = [v.name for v in reg.search("lycoris")]
    monkeypatch.setattr(loradex.registry.db, "RANKED_MATCHES", 1)  # many matches: by name, up to limit
    assert [v.name for v in reg.search("lycoris")] == sorted(ranked) == ["anime-style", "portrait-face"]
    assert [v.name for v in reg.search("lycoris", limit=1)] == ["anime-style"]
    assert [v.name for v in reg.search("lycoris", kind="loha")] == ["portrait-face"]


def test_remove_gc_and_versions_not_reused(reg, refs):
    reg.add(refs["lora"], "face")
    v2 = reg.add(refs["loha"], "face", tags=["prod"])
    reg.add(refs["lora"], "child", parents=[v2], operation="convert", params={"to": "kohya"})
    assert [v.ref for v in reg.remove("face@2")] == ["face@2"]
    assert reg.get("face").ref == "face@1"
    with pytest.raises(RegistryError, match="no tag 'prod'"):
        reg.get("face:prod")
    parent = reg.show("child")["parents"][0]  # lineage keeps the removed parent by name
    assert parent["parent"] is None and parent["source"].startswith("face@2 (removed")
    assert reg.add(refs["full"], "face").number == 3  # numbers are never reused
    r = reg.gc()
    assert r["removed_blobs"] == [v2.sha256]
    assert not reg.store.path(v2.sha256).exists()
    assert reg.verify()["ok"]
    reg.remove("face", all_versions=True)
    assert [a["name"] for a in reg.list()] == ["child"]


# ---- load, export, lineage, CLI --------------------------------------------------------------------------
def test_load_export_and_convert_with_save_as(reg, refs, tmp_path, capsys):
    v = reg.add(refs["loha"], "style")
    a, b = reg.load("style"), loradex.load(refs["loha"])
    assert set(a.patches) == set(b.patches)
    for k in a.patches:
        assert torch.equal(a.patches[k].delta(), b.patches[k].delta())
    out = reg.export("style", tmp_path / "copy.safetensors")
    assert out.read_bytes() == refs["loha"].read_bytes()
    assert reg.export("style", tmp_path).name == refs["loha"].name  # a folder: the stored file name
    rep = reg.export("style@1", tmp_path / "d.safetensors", to="diffusers")
    assert rep.target == "diffusers" and loradex.load(tmp_path / "d.safetensors").source_format == "diffusers"
    # every command that takes a path takes a REF; --save-as stores the output with its lineage
    r = ok(cli(capsys, "convert", "style", "--to", "kohya", "--save-as", "style-kohya", "--json")).json()
    assert r["saved_as"]["ref"] == "style-kohya@1"
    ok(cli(capsys, "convert", "style-kohya", "-o", tmp_path / "k2.safetensors", "--to", "diffusers", "--save-as",
           "style-diffusers"))
    assert (tmp_path / "k2.safetensors").is_file()
    tree = ok(cli(capsys, "lineage", "style-diffusers", "--json")).json()
    p1 = tree["parents"][0]
    assert p1["operation"] == "convert" and p1["parent"] == "style-kohya@1" and p1["params"]["to"] == "diffusers"
    p2 = p1["node"]["parents"][0]
    assert p2["operation"] == "convert" and p2["parent"] == "style@1"
    assert p2["node"]["parents"][0]["operation"] == "import"
    assert p2["node"]["parents"][0]["source"] == str(refs["loha"].resolve())
    text = ok(cli(capsys, "lineage", "style")).out
    assert "-> convert -> style-kohya@1" in text
    info = ok(cli(capsys, "inspect", "style:latest", "--json")).json()
    assert info["ref"] == v.ref and info["hashes"]["sha256"] == v.sha256
    r = cli(capsys, "inspect", "no-such-thing")
    assert r.code == 2 and "not a registry reference" in r.err and r.err.count("\n") == 1
    r = cli(capsys, "convert", "style", "--to", "kohya")
    assert r.code == 2 and "--save-as" in r.err


def test_cli_commands_json(reg, refs, tmp_path, capsys):
    r = ok(cli(capsys, "add", refs["lora"], "--name", "face", "--tag", "prod", "--description", "my face",
               "--trigger", "sks person", "--label", "portrait", "--json")).json()
    assert r["ref"] == "face@1" and r["tags"] == ["prod"] and r["adapter"]["trigger_words"] == ["sks person"]
    assert ok(cli(capsys, "ls", "--json")).json()[0]["name"] == "face"
    assert ok(cli(capsys, "ls", "face", "--json")).json()[0]["ref"] == "face@1"
    assert ok(cli(capsys, "search", "portrait", "--json")).json()[0]["ref"] == "face@1"
    assert ok(cli(capsys, "tag", "face@1", "stable", "--json")).json()["tags"] == ["prod", "stable"]
    assert ok(cli(capsys, "untag", "face", "stable", "--json")).json() == {"removed": "face:stable"}
    assert ok(cli(capsys, "export", "face", "-o", tmp_path / "f.safetensors", "--json")).json()["ref"] == "face@1"
    assert ok(cli(capsys, "verify", "--json")).json()["ok"] is True
    assert ok(cli(capsys, "gc", "--json")).json()["removed_blobs"] == []
    assert ok(cli(capsys, "rm", "face", "--json")).json() == {"removed": ["face@1"]}
    assert ok(cli(capsys, "gc", "--json")).json()["freed_bytes"] == refs["lora"].stat().st_size
    for cmd in ("add", "ls", "show", "search", "tag", "untag", "rm", "export", "lineage", "verify", "gc", "push", "pull"):
        assert ok(cli(capsys, cmd, "--help")).out.startswith("Usage:")
    r = cli(capsys, "show", "face")
    assert r.code == 2 and r.err.startswith("error: no adapter named 'face'")


# ---- folders, checkpoints, streaming ------------------------------------------------------------------------
def test_folder_import_reports_skips_and_duplicates(reg, refs, tmp_path, capsys):
    lora_dir = tmp_path / "models" / "Lora"
    (lora_dir / "characters").mkdir(parents=True)
    shutil.copy(refs["kohya"], lora_dir / "face.safetensors")
    shutil.copy(refs["loha"], lora_dir / "characters" / "alice loha.safetensors")
    retitled = load_file(refs["kohya"])  # the same tensors with other metadata: same AutoV3
    save_file(retitled, lora_dir / "face-civitai.safetensors", metadata={"ss_output_name": "other"})
    ti_file(lora_dir / "sks.safetensors", "sks", 3)
    (lora_dir / "face.preview.png").write_bytes(b"\x89PNG\r\n")
    (lora_dir / "face.civitai.info").write_text("{}")
    (lora_dir / "broken.safetensors").write_bytes(b"\x00" * 5)
    (lora_dir / "unknown.safetensors").write_bytes(save({"some.counter": torch.zeros(5, 7, dtype=torch.int32)}))
    r = ok(cli(capsys, "add", lora_dir, "--json")).json()
    added = sorted(v["ref"] for v in r["added"])
    assert added == ["characters.alice_loha@1", "face-civitai@1", "face@1", "sks@1"]
    skipped = {s["path"]: s["reason"] for s in r["skipped"]}
    assert set(skipped) == {"face.preview.png", "face.civitai.info", "broken.safetensors", "unknown.safetensors"}
    assert "not a weights file" in skipped["face.preview.png"]
    assert "too short" in skipped["broken.safetensors"] and str(reg.tmp) not in skipped["broken.safetensors"]
    assert r["same_tensors"] == [["face-civitai@1", "face@1"]] or r["same_tensors"] == [["face@1", "face-civitai@1"]]
    assert reg.get("sks").artifact == "embedding" and reg.get("sks").embeddings == ["sks"]
    # again: nothing new, everything found already stored
    again = reg.add_many(lora_dir)
    assert not again.added and len(again.existing) == 4
    assert reg.verify()["ok"]
    # a prefix for the names
    assert {v.name for v in reg.add_many(lora_dir / "characters", prefix="pack").added} == {"pack-alice_loha"}


def test_checkpoints_single_file_and_diffusers_folder(reg, bench, tmp_path):
    # a single-file checkpoint (LDM names), and the tiny pipeline saved by diffusers itself
    ck = tmp_path / "dreambooth.safetensors"
    sd1_single_file(bench.pipe, bench.arch, ck)
    v = reg.add(ck, "db-single")
    # the arch is derived from the file's own shapes: the embedded tiny SD1 model
    assert (v.artifact, v.format, v.arch, v.layout) == ("checkpoint", "checkpoint", "tiny-sd1", "file")
    pipe_dir = tmp_path / "pipe"
    bench.pipe.save_pretrained(pipe_dir)
    pv = reg.add(pipe_dir, "db-pipe", tags=["prod"])
    assert (pv.artifact, pv.format, pv.layout) == ("checkpoint", "diffusers-pipeline", "folder")
    files = {f["path"]: f for f in pv.files}
    assert "model_index.json" in files and "unet/diffusion_pytorch_model.safetensors" in files
    for rel, f in files.items():
        assert f["sha256"] == hashlib.sha256((pipe_dir / rel).read_bytes()).hexdigest()
    assert pv.size == sum(f["size"] for f in files.values())
    out = reg.export("db-pipe:prod", tmp_path / "exported")
    for rel in files:
        assert (out / rel).read_bytes() == (pipe_dir / rel).read_bytes()
    from diffusers import StableDiffusionPipeline

    from loradex.log import quiet

    with quiet():
        StableDiffusionPipeline.from_pretrained(out)  # a working pipeline folder
    assert reg.add(pipe_dir, "db-pipe").ref == "db-pipe@1"  # same manifest: same version
    with pytest.raises(RegistryError, match="checkpoint"):
        reg.load("db-pipe")
    assert reg.verify()["ok"]
    assert reg.search("", kind="checkpoint")[0].name in ("db-pipe", "db-single")


@pytest.mark.parametrize("copy", ["buffered", "kernel"])
def test_hashing_streams_and_reports_progress(reg, tmp_path, monkeypatch, copy):
    """A 48 MB checkpoint is hashed and copied in chunks (through a buffer, or by the kernel and
    hashed from a memory map): Python memory stays far below its size, progress is reported per
    chunk, and the hashes still equal hashlib's over the whole file."""
    import loradex.registry.store as store

    monkeypatch.setattr(store, "CHUNK", 1 << 20)
    monkeypatch.setattr(store, "KERNEL_COPY_MIN_BYTES", 1 << 20 if copy == "kernel" else 1 << 62)
    big = tmp_path / "big.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.randn(12 << 20, generator=torch.Generator().manual_seed(0))}, big)
    size = big.stat().st_size
    seen: list[int] = []
    tracemalloc.start()
    v = reg.add(big, "big", progress=seen.append)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert sum(seen) == size and len(seen) >= size // (1 << 20)
    assert peak < size // 8, f"peak {peak} bytes for a {size}-byte file"
    assert v.hashes == {**v.hashes, **{k: val for k, val in independent_hashes(big).items() if k != "sha256"}}
    assert v.sha256 == independent_hashes(big)["sha256"]


# ---- integrity -----------------------------------------------------------------------------------------------
def test_flipped_byte_is_reported_naming_the_version(reg, refs, capsys):
    reg.add(refs["lora"], "face")
    v = reg.add(refs["loha"], "face")
    reg.add(refs["loha"], "style")  # the same blob under another name
    blob = reg.path(v)
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    r = reg.verify()
    assert not r["ok"] and len(r["problems"]) == 1
    assert r["problems"][0]["versions"] == ["face@2", "style@1"] and "content changed" in r["problems"][0]["problem"]
    res = cli(capsys, "verify")
    assert res.code == 1 and "face@2, style@1: content changed" in res.out
    assert reg.verify(quick=True)["ok"]  # sizes only: a flipped byte needs the re-hash
    blob.write_bytes(bytes(data[:-10]))
    assert "the catalogue says" in reg.verify(quick=True)["problems"][0]["problem"]


_CHILD = r"""
import sys, time
from pathlib import Path
from loradex import Registry
reg = Registry()
print("ready", flush=True)
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.005)
v = reg.add(sys.argv[2], "shared")
print(v.number, flush=True)
"""


@pytest.mark.slow
def test_four_processes_adding_at_once(home, tmp_path):
    """Four importers on a fresh home (schema creation races too), released together."""
    files = [ti_file(tmp_path / f"tok{i}.safetensors", f"tok{i}", seed=i) for i in range(4)]
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(go), str(f)], env=child_env(home),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for f in files]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    numbers = sorted(int(o[0].split()[-1]) for o in outs)
    assert numbers == [1, 2, 3, 4]
    with Registry() as reg:
        vs = reg.versions("shared")
        assert sorted(v.number for v in vs) == [1, 2, 3, 4]
        assert sorted(v.sha256 for v in vs) == sorted(hashlib.sha256(f.read_bytes()).hexdigest() for f in files)
        r = reg.verify()
        assert r["ok"] and not r["orphan_blobs"] and not r["stale_temp_files"]


@pytest.mark.slow
@pytest.mark.parametrize("point", ["temp-written", "blob-stored", "in-transaction"])
def test_sigkill_during_add_leaves_a_consistent_registry(home, tmp_path, point, capsys):
    f = ti_file(tmp_path / "victim.safetensors", "victim", seed=7)
    with Registry() as reg:  # an existing version to keep intact
        keep = reg.add(ti_file(tmp_path / "keep.safetensors", "keep", seed=8), "keep")
    proc = subprocess.Popen([sys.executable, "-c", "from loradex.cli import main; main()", "add", str(f), "--name",
                             "victim"], env=child_env(home, LORADEX_PAUSE_AT=point), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        line = ""
        while time.time() < deadline and not line.startswith("loradex-paused:"):
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
        assert line.strip() == f"loradex-paused:{point}", proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    with Registry() as reg:
        assert [a["name"] for a in reg.list()] == ["keep"]  # no row for the killed import
        r = reg.verify()
        assert r["ok"] and r["problems"] == []
        blob_there = reg.store.path(sha).exists()
        assert blob_there == (point != "temp-written")  # before the rename: only a temp file
        if point == "temp-written":
            assert len(r["stale_temp_files"]) == 1
        else:
            assert r["orphan_blobs"] == [sha]
    res = ok(cli(capsys, "verify"))
    assert res.out.startswith("ok:")
    g = ok(cli(capsys, "gc", "--json")).json()
    assert g["removed_blobs"] == ([sha] if point != "temp-written" else [])
    assert len(g["removed_temp_files"]) == (1 if point == "temp-written" else 0)
    with Registry() as reg:
        r = reg.verify()
        assert r["ok"] and not r["orphan_blobs"] and not r["stale_temp_files"]
        assert reg.get("keep").sha256 == keep.sha256 and reg.store.has(keep.sha256)
        assert reg.add(f, "victim").ref == "victim@1"  # and the import works again


def test_ref_commands_use_the_recorded_arch(tmp_path, monkeypatch, capsys):
    """A REF carries the arch recorded at import: convert/inspect/load of a custom-arch adapter
    (not detectable from the file) work without --arch."""
    from loradex.cli import main
    from loradex.demo import TinyBench, make_lycoris_reference

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("LORADEX_HOME", str(home))
    bench = TinyBench()
    ref = make_lycoris_reference(bench, "loha", tmp_path)
    reg = loradex.Registry()
    reg.add(ref.path, name="loha", arch="tiny-sd1")
    assert reg.load("loha").arch == "tiny-sd1"
    with pytest.raises(SystemExit) as e:
        main(["convert", "loha", "--to", "diffusers", "--save-as", "loha-d"])
    assert e.value.code == 0, capsys.readouterr().err
    assert reg.get("loha-d").arch == "tiny-sd1"


def test_descriptions_are_shared_by_structure_not_by_metadata(tmp_path):
    """Files of one structure (keys, shapes, dtypes, alphas) are read through the converters once;
    each keeps its own metadata, and a different alpha is a different structure."""
    from loradex.registry import registry as R

    tensors = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 4, 1, 1),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(2.0),
    }
    down = tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]
    save_file({**tensors, "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": down.reshape(4, 32, 1, 1)},
              str(tmp_path / "a.safetensors"), metadata={"ss_output_name": "a"})
    save_file({**tensors, "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": down.reshape(4, 32, 1, 1) * 2},
              str(tmp_path / "b.safetensors"), metadata={"ss_output_name": "b"})
    ka = R._structure_key(tmp_path / "a.safetensors", "kohya", "tiny-sd1")
    assert ka == R._structure_key(tmp_path / "b.safetensors", "kohya", "tiny-sd1")
    da = R.describe_path(tmp_path / "a.safetensors", arch="tiny-sd1")
    db = R.describe_path(tmp_path / "b.safetensors", arch="tiny-sd1")
    assert da["metadata"]["ss_output_name"] == "a" and db["metadata"]["ss_output_name"] == "b"
    assert da["kinds"] == db["kinds"] and da["ranks"] == db["ranks"] and da["modules"] == db["modules"] == 1
    save_file({**tensors, "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": down.reshape(4, 32, 1, 1),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(3.0)}, str(tmp_path / "c.safetensors"))
    assert R._structure_key(tmp_path / "c.safetensors", "kohya", "tiny-sd1") != ka
