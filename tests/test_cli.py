"""The CLI contract (DESIGN.md, Contracts): every command has ``--help``; reports take ``--json``;
success is exit 0; bad input is exit 2 with exactly ONE line ``error: ...`` on stderr, no
traceback, fast, and no file half-written or touched. Run in-process through
``loradex.cli.main`` (one subprocess test covers the installed console script itself)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loradex
import loradex.cli
from loradex.cli import main
from loradex.converters import safetensors_io as sio
from loradex.core.archs import get_arch
from loradex.demo import make_lycoris_reference

ARCH = "tiny-sd1"  # registered by the ``bench`` fixture (loradex.tiny.tiny_arch("sd1"))
FAST = 2.0  # seconds for a rejected input, in-process (the imports are already paid for)


@pytest.fixture(autouse=True)
def registry_home(tmp_path_factory, monkeypatch):
    """A name that is not a file may be read as a registry reference: keep every registry the CLI
    opens out of the user's home."""
    home = tmp_path_factory.mktemp("loradex_home")
    monkeypatch.setenv("LORADEX_HOME", str(home))
    return home


@dataclass
class Run:
    code: int
    out: str
    err: str
    seconds: float

    def json(self):
        return json.loads(self.out)


def cli(capsys, *args) -> Run:
    """``loradex ARGS`` in-process: exit status, stdout, stderr, wall time."""
    capsys.readouterr()
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    seconds = time.perf_counter() - t0
    out, err = capsys.readouterr()
    code = info.value.code
    return Run(0 if code is None else code, out, err, seconds)


def ok(r: Run) -> Run:
    assert r.code == 0, r.err
    return r


def bad(r: Run, *needles: str) -> str:
    """Exit 2, nothing on stdout, exactly one ``error:`` line on stderr, fast."""
    assert r.code == 2, (r.code, r.out, r.err)
    assert r.out == "", r.out
    assert r.err.startswith("error: ") and r.err.endswith("\n") and r.err.count("\n") == 1, repr(r.err)
    assert "Traceback" not in r.err and "internal error" not in r.err, r.err
    assert r.seconds < FAST, f"took {r.seconds:.2f}s"
    for n in needles:
        assert n in r.err, (n, r.err)
    return r.err


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- inputs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(bench, tmp_path_factory):
    """Adapters made by the real tools on the tiny SD model, plus a TI embedding and a file with
    mixed alphas. ``bench.arch`` registers ``tiny-sd1``."""
    d = tmp_path_factory.mktemp("cli_inputs")
    loha = make_lycoris_reference(bench, "loha", d).path
    full = make_lycoris_reference(bench, "full", d).path
    lora = make_lycoris_reference(bench, "lora", d).path
    sd = load_file(lora)
    alphas = [k for k in sorted(sd) if k.endswith(".alpha")]
    for i, k in enumerate(alphas):  # 1, 2, 3, 1, ...: the most common one is folded against
        sd[k] = torch.tensor(float(1 + i % 3))
    mixed = d / "mixed_alpha.safetensors"
    save_file(sd, str(mixed))
    emb = d / "sks.safetensors"
    save_file({"emb_params": torch.randn(3, 32, generator=torch.Generator().manual_seed(0))}, str(emb))
    # the built-in tables that --arch sdxl / flux1 name are built once here, not inside a timed rejection
    for name in ("sdxl", "flux1"):
        assert get_arch(name).modules
    return {"loha": loha, "full": full, "lora": lora, "mixed": mixed, "emb": emb}


def same_deltas(a: loradex.Adapter, b: loradex.Adapter, tol: float = 1e-6) -> None:
    assert set(a.patches) == set(b.patches)
    for n, p in a.patches.items():
        da, db = p.delta(), b.patches[n].delta()
        assert da.shape == db.shape, n
        assert float((da - db).norm()) <= tol * max(float(da.norm()), 1e-12), n


# ---- help --------------------------------------------------------------------------------------
COMMANDS = sorted(loradex.cli.cli.commands)


def test_commands_are_registered():
    assert {"inspect", "convert", "demo"} <= set(COMMANDS)


@pytest.mark.parametrize("command", [[]] + [[c] for c in COMMANDS])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_of_every_command(capsys, command, flag):
    r = ok(cli(capsys, *command, flag))
    assert r.out.startswith("Usage: loradex") and r.err == ""
    if not command:
        for c in COMMANDS:
            assert c in r.out
    if command == ["convert"]:
        for opt in ("--to", "--rank", "--dtype", "--arch", "--uniform-alpha", "--json"):
            assert opt in r.out


def test_console_script_entry_point(tmp_path):
    """The installed ``loradex`` script: its own process, real stderr, real exit status."""
    exe = shutil.which("loradex", path=os.path.dirname(sys.executable)) or shutil.which("loradex")
    if exe is None:
        pytest.skip("the loradex console script is not installed")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(random.Random(0).randbytes(1000).replace(b"\x80", b"\0").replace(b"PK", b"pk"))
    env = {k: v for k, v in os.environ.items() if k != "LORADEX_DEBUG"}
    p = subprocess.run([exe, "inspect", str(junk)], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stdout == ""
    # one line: no import-time notices from transformers/diffusers, no traceback
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
    assert "junk.safetensors" in p.stderr


# ---- inspect -------------------------------------------------------------------------------------
def test_inspect_lycoris_loha(capsys, files):
    path = files["loha"]
    text = ok(cli(capsys, "inspect", path)).out
    assert "format:      lycoris" in text and f"arch:        {ARCH}" in text and "loha x" in text
    info = ok(cli(capsys, "inspect", path, "--json")).json()
    n = info["modules"]
    assert n > 50
    assert info["format"] == "lycoris" and info["arch"] == ARCH  # detected from keys and shapes
    assert info["kinds"] == {"loha": n} and info["components"] == {"unet": n}
    assert info["ranks"] == {"4": n} and info["alphas"] == {"2.0": n}
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    h = info["hashes"]
    assert h["sha256"] == hashlib.sha256(data).hexdigest()
    assert h["autov2"] == h["sha256"][:10].upper()
    assert h["autov3"] == hashlib.sha256(data[8 + header_len :]).hexdigest()[:12].upper()
    assert info["size"] == len(data) and info["path"] == str(path)


def test_inspect_embedding(capsys, files):
    path = files["emb"]
    text = ok(cli(capsys, "inspect", path)).out
    assert "format:      kohya-ti" in text and "embedding:   'sks': 3 vectors" in text
    info = ok(cli(capsys, "inspect", path, "--json")).json()
    assert info["format"] == "kohya-ti" and info["modules"] == 0 and info["kinds"] == {}
    assert info["embeddings"] == {"sks": {"vectors": 3, "encoders": {"text_encoder": [3, 32]}}}
    assert info["hashes"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(info["hashes"]["autov3"]) == 12
    # --arch names what detection cannot (a 32-wide embedding is no built-in model's) ...
    assert ok(cli(capsys, "inspect", path, "--json", "--arch", ARCH)).json()["arch"] == ARCH
    # ... and is checked against the widths
    bad(cli(capsys, "inspect", path, "--arch", "sdxl"), "sdxl")


def test_inspect_arch_override(capsys, files):
    info = ok(cli(capsys, "inspect", files["loha"], "--json", "--arch", ARCH)).json()
    assert info["arch"] == ARCH and info["modules"] > 50
    bad(cli(capsys, "inspect", files["loha"], "--arch", "sdxl"))  # shapes do not fit SDXL
    bad(cli(capsys, "inspect", files["loha"], "--json", "--arch", "flux1"))  # no module of FLUX


# ---- convert -------------------------------------------------------------------------------------
@pytest.mark.parametrize("to", ["diffusers", "kohya", "peft", "lycoris"])
def test_convert_loha_to_every_format(capsys, files, tmp_path, to):
    dst = tmp_path / ("out" if to == "peft" else "out.safetensors")
    src = loradex.load(files["loha"], arch=ARCH)
    n = len(src.patches)
    text = ok(cli(capsys, "convert", files["loha"], "-o", dst, "--to", to, "--arch", ARCH)).out
    assert text.startswith(f"wrote {dst} ({to}): ")
    dst2 = tmp_path / ("out2" if to == "peft" else "out2.safetensors")
    rep = ok(cli(capsys, "convert", files["loha"], "-o", dst2, "--to", to, "--arch", ARCH, "--json")).json()
    assert rep["target"] == to and rep["src"] == str(files["loha"]) and rep["dst"] == str(dst2)
    assert rep["approximated"] == {} and rep["max_error"] == 0 and rep["dropped"] == {}
    if to == "diffusers":  # LoHa -> LoRA exactly at rank r1*r2, reported per module
        assert rep["kept"] == 0 and len(rep["exact"]) == n
        assert set(rep["exact"].values()) == {"loha->lora r=16"}
        assert "  exact   unet." in text and "loha->lora r=16" in text
    else:  # these hold LoHa as it is
        assert rep["kept"] == n and rep["exact"] == {}
    back = loradex.load(dst2, arch=ARCH)
    assert back.source_format == to
    same_deltas(src, back)


@pytest.mark.parametrize("to,name", [("a1111-ti", "sks.pt"), ("diffusers-ti", "sks.safetensors"),
                                     ("a1111", "sks.pt"), ("kohya-ti", "sks.safetensors")])
def test_convert_embedding(capsys, files, tmp_path, to, name):
    dst = tmp_path / name
    rep = ok(cli(capsys, "convert", files["emb"], "-o", dst, "--to", to, "--json")).json()
    assert rep["target"] == ("a1111-ti" if to == "a1111" else to) and rep["kept"] == 1
    want = load_file(files["emb"])["emb_params"]
    (e,) = loradex.load(dst).embeddings.values()
    assert torch.equal(e.vectors["text_encoder"], want)


def test_convert_full_needs_rank_for_diffusers(capsys, files, tmp_path):
    dst = tmp_path / "full.safetensors"
    err = bad(cli(capsys, "convert", files["full"], "-o", dst, "--to", "diffusers", "--arch", ARCH), "--rank")
    assert "full" in err
    assert listing(tmp_path) == []
    bad(cli(capsys, "convert", files["full"], "-o", tmp_path / "p", "--to", "peft", "--arch", ARCH), "--rank")
    assert listing(tmp_path) == []  # no PEFT folder either

    rep = ok(cli(capsys, "convert", files["full"], "-o", dst, "--to", "diffusers", "--arch", ARCH,
                 "--rank", "2", "--json")).json()
    n = len(loradex.load(files["full"], arch=ARCH).patches)
    assert rep["exact"] == {} and rep["kept"] == 0 and len(rep["approximated"]) == n
    errs = list(rep["approximated"].values())
    assert all(0 < e < 1 for e in errs) and rep["max_error"] == max(errs)
    back = loradex.load(dst, arch=ARCH)
    assert set(back.ranks()) == {2} and back.kinds() == {"lora": n}
    text = ok(cli(capsys, "convert", files["full"], "-o", dst, "--to", "diffusers", "--arch", ARCH,
                  "--rank", "2", "--force")).out
    assert f"{n} approximated by SVD" in text and "  svd     unet." in text and "rel. error" in text


def test_convert_dtype_fp16(capsys, files, tmp_path):
    src = load_file(files["loha"])
    for to in ("kohya", "lycoris"):
        dst = tmp_path / f"{to}.safetensors"
        ok(cli(capsys, "convert", files["loha"], "-o", dst, "--to", to, "--arch", ARCH, "--dtype", "fp16"))
        out = load_file(dst)
        assert len(out) == len(src) and {t.dtype for t in out.values()} == {torch.float16}
    out = load_file(tmp_path / "lycoris.safetensors")  # same keys: the values are the fp16 casts
    assert all(torch.equal(out[k], v.half()) for k, v in src.items())
    bad(cli(capsys, "convert", files["loha"], "-o", tmp_path / "x.safetensors", "--to", "kohya",
            "--dtype", "fp8"), "--dtype")


def test_convert_uniform_alpha(capsys, files, tmp_path):
    src = loradex.load(files["mixed"], arch=ARCH)
    rep = ok(cli(capsys, "convert", files["mixed"], "-o", tmp_path / "k.safetensors", "--to", "kohya",
                 "--arch", ARCH, "--json")).json()
    assert any("--uniform-alpha" in n for n in rep["notes"])
    alphas = {float(v) for k, v in load_file(tmp_path / "k.safetensors").items() if k.endswith(".alpha")}
    assert alphas == {1.0, 2.0, 3.0}  # kept as they are: exact for kohya/A1111/ComfyUI

    dst = tmp_path / "u.safetensors"
    rep = ok(cli(capsys, "convert", files["mixed"], "-o", dst, "--to", "kohya", "--arch", ARCH,
                 "--uniform-alpha", "--json")).json()
    out = load_file(dst)
    alphas = {float(v) for k, v in out.items() if k.endswith(".alpha")}
    assert len(alphas) == 1
    (common,) = alphas
    folded = {n for n, how in rep["exact"].items() if "folded into lora_up" in how}
    assert folded == {n for n, p in src.patches.items() if float(p.alpha) != common}
    assert not any("--uniform-alpha" in n for n in rep["notes"])
    same_deltas(src, loradex.load(dst, arch=ARCH))


# ---- bad input -----------------------------------------------------------------------------------
class Marker:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.fixture(scope="module")
def bad_inputs(files, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad_inputs")
    (d / "dir").mkdir()
    (d / "dir" / "notes.txt").write_text("not an adapter")
    (d / "empty.safetensors").write_bytes(b"")
    (d / "random.safetensors").write_bytes(random.Random(1).randbytes(4096))
    data = files["loha"].read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    from loradex.tiny import tiny_unet

    save_file({k: v.contiguous() for k, v in tiny_unet().state_dict().items()}, str(d / "unet.safetensors"))
    return {
        "missing": d / "missing.safetensors",
        "not_peft_dir": d / "dir",
        "empty": d / "empty.safetensors",
        "random": d / "random.safetensors",
        "truncated": d / "truncated.safetensors",
        "model_state_dict": d / "unet.safetensors",
    }


@pytest.mark.parametrize("command", ["inspect", "convert"])
@pytest.mark.parametrize(
    "case", ["missing", "not_peft_dir", "empty", "random", "truncated", "model_state_dict"]
)
def test_bad_files(capsys, bad_inputs, tmp_path, command, case):
    path = bad_inputs[case]
    out = tmp_path / "out"
    out.mkdir()
    args = ["inspect", path] if command == "inspect" else ["convert", path, "-o", out / "x.safetensors", "--to", "kohya"]
    err = bad(cli(capsys, *args))
    assert path.name in err
    assert listing(out) == []


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["raw_pickle", "torch_save"])
@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_malicious_pickle_never_runs(capsys, tmp_path, how, command):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if how == "raw_pickle":  # no tensor: pickle.dumps spells one with a global refused before ours
        path.write_bytes(pickle.dumps({"string_to_param": {"*": [0.0]}, "name": Marker(marker)}, protocol=2))
    else:  # torch's zip container, a real tensor next to the payload
        torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "name": Marker(marker)}, path)
    assert not marker.exists()
    args = ["inspect", path] if command == "inspect" else ["convert", path, "-o", tmp_path / "o.pt", "--to", "a1111-ti"]
    bad(cli(capsys, *args), "evil.pt")
    assert not marker.exists()
    assert listing(tmp_path) == ["evil.pt"]


def test_bad_options(capsys, files, tmp_path):
    loha = files["loha"]
    dst = tmp_path / "o.safetensors"
    bad(cli(capsys, "convert", loha, "-o", dst, "--to", "onnx", "--arch", ARCH), "unknown format 'onnx'")
    bad(cli(capsys, "convert", loha, "-o", dst, "--to", "kohya", "--arch", ARCH, "--rank", "0"), "--rank")
    bad(cli(capsys, "convert", loha, "-o", dst, "--to", "kohya", "--arch", ARCH, "--rank", "-3"), "--rank")
    bad(cli(capsys, "convert", loha, "-o", dst, "--to", "kohya", "--rank", "two"), "--rank")
    bad(cli(capsys, "convert", loha, "-o", dst, "--to", "kohya", "--arch", "sd9"), "unknown architecture 'sd9'")
    bad(cli(capsys, "inspect", loha, "--arch", "sd9"), "unknown architecture 'sd9'")
    bad(cli(capsys, "convert", loha, "--to", "kohya"), "-o")  # no output named: one line too
    bad(cli(capsys, "convert", loha, "-o", dst), "--to")
    bad(cli(capsys, "inspect", loha, "--frobnicate"), "--frobnicate")
    bad(cli(capsys, "frobnicate"), "frobnicate")
    bad(cli(capsys, "demo", "--only", "nope"), "nope")
    # a target that cannot hold what the file has
    bad(cli(capsys, "convert", loha, "-o", dst, "--to", "a1111-ti", "--arch", ARCH), "embedding")
    bad(cli(capsys, "convert", files["emb"], "-o", dst, "--to", "diffusers"), "embedding")
    bad(cli(capsys, "convert", files["emb"], "-o", tmp_path / "p", "--to", "peft"), "embedding")
    bad(cli(capsys, "convert", files["emb"], "-o", dst, "--to", "lycoris"), "embedding")
    assert listing(tmp_path) == []


@pytest.mark.parametrize("to", ["kohya", "diffusers", "lycoris", "peft", "a1111-ti"])
def test_output_folders_are_created(capsys, files, tmp_path, to):
    src = files["emb"] if to.endswith("-ti") else files["loha"]
    name = "out" if to == "peft" else "out.safetensors"
    ok(cli(capsys, "convert", src, "-o", tmp_path / "no" / "such" / name, "--to", to, "--arch", ARCH))
    assert (tmp_path / "no" / "such" / name).exists()


# ---- failed converts leave nothing behind ----------------------------------------------------------
@pytest.mark.parametrize("to", ["kohya", "diffusers", "lycoris"])
def test_failed_convert_keeps_existing_dst(capsys, files, tmp_path, monkeypatch, to):
    dst = tmp_path / "dst.safetensors"
    save_file({"old": torch.ones(3)}, str(dst))
    before = dst.read_bytes()
    # fails before writing: kohya gets a rank of zero, a full diff needs --rank for diffusers, and
    # an embedding-only file has no module for lycoris_
    args = {
        "kohya": [files["loha"], "--rank", "0"],
        "diffusers": [files["full"]],
        "lycoris": [files["emb"]],
    }[to]
    bad(cli(capsys, "convert", args[0], "-o", dst, "--to", to, "--arch", ARCH, "--force", *args[1:]))
    assert dst.read_bytes() == before and listing(tmp_path) == ["dst.safetensors"]

    # fails while writing: the serializer dies half-way
    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"half')
        raise OSError("disk full")

    monkeypatch.setattr(sio, "_serialize", half_then_fail)
    bad(cli(capsys, "convert", files["loha"], "-o", dst, "--to", to, "--arch", ARCH, "--force"), "disk full")
    assert dst.read_bytes() == before and listing(tmp_path) == ["dst.safetensors"]


# ---- demo ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_only_lora_json(capsys):
    r = ok(cli(capsys, "demo", "--only", "lora", "--json"))
    d = r.json()
    assert list(d["adapters"]) == ["lora"]
    row = d["adapters"]["lora"]
    assert set(row) == {"kohya", "lycoris", "diffusers", "peft"}
    for target, cell in row.items():
        assert cell["status"] == "ok" and cell["error"] <= 1e-4, (target, cell)
    assert d["embeddings"] and all(c["status"] == "ok" and c["error"] == 0 for c in d["embeddings"].values())
