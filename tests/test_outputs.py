"""Safe outputs: no command writes over one of its inputs, an existing output is replaced only with
--force, the file name's ending matches the format (or is added), and parent folders are created."""

from __future__ import annotations

import hashlib

import pytest
import torch

import loradex
from cli_util import bad, run
from loradex.core.adapter import Adapter
from loradex.core.kinds.lora import LoraPatch
from loradex.tiny import tiny_arch

MODULE = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture
def src(tmp_path):
    arch = tiny_arch("sd1")
    out, inn = arch.module(MODULE).shape
    p = tmp_path / "in.safetensors"
    loradex.save(Adapter({MODULE: LoraPatch(up=torch.randn(out, 2), down=torch.randn(2, inn), alpha=1.0)},
                         arch=arch.name), p, "kohya")
    return p


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_an_input_is_never_overwritten(src, tmp_path, capsys):
    before = _sha(src)
    bad(run(capsys, "convert", src, "-o", src, "--to", "kohya"), "is an input of this command")
    bad(run(capsys, "convert", src, "-o", src, "--to", "kohya", "--force"), "is an input")  # not even with --force
    bad(run(capsys, "resize", src, "-o", tmp_path / "x" / ".." / "in.safetensors", "--rank", 1, "--force"),
        "is an input")
    bad(run(capsys, "merge", src, f"{src}:0.5", "-o", src, "--force"), "is an input")
    link = tmp_path / "link.safetensors"
    link.hardlink_to(src)  # the same file under another name
    bad(run(capsys, "convert", src, "-o", link, "--to", "kohya", "--force"), "is an input")
    assert _sha(src) == before


def test_existing_outputs_need_force(src, tmp_path, capsys):
    dst = tmp_path / "out.safetensors"
    code, _, err = run(capsys, "convert", src, "-o", dst, "--to", "diffusers")
    assert code == 0, err
    first = _sha(dst)
    bad(run(capsys, "convert", src, "-o", dst, "--to", "kohya"), "exists: pass --force")
    assert _sha(dst) == first
    code, _, err = run(capsys, "convert", src, "-o", dst, "--to", "kohya", "--force")
    assert code == 0 and _sha(dst) != first, err


def test_endings_and_parent_folders(src, tmp_path, capsys):
    bad(run(capsys, "convert", src, "-o", tmp_path / "x.ckpt", "--to", "kohya"), "name it x.safetensors")
    assert not (tmp_path / "x.ckpt").exists()
    code, out, err = run(capsys, "convert", src, "-o", tmp_path / "new" / "dir" / "face", "--to", "kohya")
    made = tmp_path / "new" / "dir" / "face.safetensors"
    assert code == 0 and made.is_file() and str(made) in out, err
    assert loradex.load(made).patches[MODULE].rank == 2
    # an embedding format keeps its own endings (.pt for A1111)
    assert loradex.converters.converters()["a1111-ti"].suffixes[0] in (".pt", ".safetensors")
