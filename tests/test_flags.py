"""One vocabulary of flags (issue 13, item 6): ``--dtype fp16|bf16|fp32`` with convert's choices
and help on every command that writes tensors, and the output really has that dtype; one
``--device`` default (``auto``: CUDA when available, else the CPU) resolved by one helper; ``--json``
on every command that reports. The option tables are read from the click commands themselves."""

from __future__ import annotations

import copy
from pathlib import Path

import click
import pytest
import torch
from safetensors import safe_open

from cli_util import bad, run
from loradex.cli import cli
from loradex.cli.options import DTYPE_CHOICES, DTYPE_HELP
from loradex.demo import make_lycoris_reference
from loradex.devices import AUTO, resolve_device
from loradex.errors import LoradexError
from loradex.log import quiet

pytestmark = pytest.mark.usefixtures("one_thread")

#: every command that writes tensors
WRITING = ("convert", "export", "merge", "resize", "extract", "bake", "train")
#: the safetensors header name of each --dtype
ST = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}


def commands() -> dict[str, click.Command]:
    """Every leaf command by its full name (``dataset check``)."""
    out = {}

    def walk(group: click.Group, prefix: str = "") -> None:
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                walk(cmd, f"{prefix}{name} ")
            else:
                out[prefix + name] = cmd

    walk(cli)
    return out


def option(cmd: click.Command, flag: str) -> click.Option | None:
    return next((p for p in cmd.params if isinstance(p, click.Option) and flag in p.opts), None)


def tensor_dtypes(path: Path) -> set[str]:
    """The dtypes of every tensor in a safetensors file, or in every safetensors file of a folder."""
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    assert files, path
    out = set()
    for f in files:
        with safe_open(str(f), "pt") as st:
            out |= {st.get_slice(k).get_dtype() for k in st.keys()}
    return out


# ---- the option tables ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", WRITING)
def test_every_writing_command_takes_converts_dtype(name):
    opt = option(commands()[name], "--dtype")
    assert opt is not None, f"{name} has no --dtype"
    assert tuple(opt.type.choices) == DTYPE_CHOICES == ("fp16", "bf16", "fp32")
    assert opt.help.startswith(DTYPE_HELP)
    assert opt.help.split(" [")[0] == option(commands()["convert"], "--dtype").help  # convert's own words


def test_device_defaults_agree():
    """Every --device defaults to auto, which one helper resolves (CUDA when available, else CPU)."""
    devices = {name: opt for name, cmd in commands().items() if (opt := option(cmd, "--device")) is not None}
    assert {"generate", "serve", "train", "push"} <= set(devices)
    assert len({resolve_device(opt.default) for opt in devices.values()}) == 1
    for name, opt in devices.items():
        assert opt.default == AUTO and "auto" in opt.help, name
    assert resolve_device(AUTO) == resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu" and resolve_device(resolve_device(AUTO)) == resolve_device(AUTO)
    with pytest.raises(LoradexError, match="not a torch device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(LoradexError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_a_bad_device_is_one_line_before_anything_loads(capsys, tmp_path):
    bad(run(capsys, "train", "lora", "--data", tmp_path, "--device", "gpu0", "-o", tmp_path / "x.safetensors"),
        "not a torch device")
    bad(run(capsys, "serve", "--device", "gpu0"), "not a torch device")


def test_every_report_takes_json():
    missing = [name for name, cmd in commands().items() if option(cmd, "--json") is None]
    assert missing == ["serve"]  # a server, not a report


# ---- the outputs have the dtype asked for -------------------------------------------------------------


@pytest.fixture(scope="module")
def refs(bench, tmp_path_factory):
    d = tmp_path_factory.mktemp("flags")
    return [make_lycoris_reference(bench, "lora", d, seed=i).path for i in range(2)]


@pytest.fixture(scope="module")
def models(bench, tmp_path_factory):
    """A tiny base and a tuned copy (two layers changed) as diffusers folders."""
    d = tmp_path_factory.mktemp("flags_models")
    base = bench.fresh_pipe()
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                     "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"):
            w = tuned.unet.get_submodule(name).weight
            w += 0.05 * (torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g))
    with quiet():
        base.save_pretrained(d / "base")
        tuned.save_pretrained(d / "tuned")
    return d


def test_merge_resize_convert_export_write_the_dtype(refs, tmp_path, capsys, monkeypatch):
    a, b = refs
    assert tensor_dtypes(a) == {"F32"}
    for dtype in ("fp16", "bf16"):
        out = tmp_path / f"m_{dtype}.safetensors"
        code, _, err = run(capsys, "merge", a, f"{b}:0.5", "-o", out, "--dtype", dtype)
        assert code == 0, err
        assert tensor_dtypes(out) == {ST[dtype]}
    out = tmp_path / "r.safetensors"
    assert run(capsys, "resize", a, "-o", out, "--rank", 2, "--dtype", "bf16")[0] == 0
    assert tensor_dtypes(out) == {"BF16"}
    out = tmp_path / "r32.safetensors"  # without --dtype: the input's
    assert run(capsys, "resize", a, "-o", out, "--rank", 2)[0] == 0 and tensor_dtypes(out) == {"F32"}
    out = tmp_path / "c.safetensors"
    assert run(capsys, "convert", a, "-o", out, "--to", "diffusers", "--dtype", "fp16")[0] == 0
    assert tensor_dtypes(out) == {"F16"}
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("LORADEX_HOME", str(home))
    assert run(capsys, "add", a, "--name", "face")[0] == 0
    out = tmp_path / "e.safetensors"
    assert run(capsys, "export", "face", "-o", out, "--to", "kohya", "--dtype", "fp16")[0] == 0
    assert tensor_dtypes(out) == {"F16"}
    # the dtype is part of how a stored result was made
    import json

    code, stdout, _ = run(capsys, "merge", a, b, "--save-as", "both", "--dtype", "fp16", "--json")
    assert code == 0 and json.loads(stdout)["saved_as"]["ref"] == "both@1"
    code, stdout, _ = run(capsys, "lineage", "both", "--json")
    assert json.loads(stdout)["parents"][0]["params"]["dtype"] == "fp16"


def test_extract_writes_the_dtype(models, tmp_path, capsys):
    for dtype, want in ((None, "F32"), ("fp16", "F16"), ("bf16", "BF16")):
        out = tmp_path / f"x_{dtype}.safetensors"
        args = ["extract", "--base", models / "base", "--tuned", models / "tuned", "-o", out, "--rank", 2,
                "--arch", "tiny-sd1"] + (["--dtype", dtype] if dtype else [])
        code, _, err = run(capsys, *args)
        assert code == 0, err
        assert tensor_dtypes(out) == {want}


def test_bake_writes_the_dtype(models, refs, tmp_path, capsys):
    """Every floating tensor of the folder is cast, the untouched ones too, and the values are the
    default (base dtype, fp32 here) bake's cast: the sums are made in fp32 either way."""
    from safetensors.torch import load_file

    from loradex.errors import LoradexError
    from loradex.merge import bake

    out, ref = tmp_path / "baked", tmp_path / "baked32"
    code, _, err = run(capsys, "bake", "--base", models / "base", refs[0], "-o", out, "--dtype", "fp16")
    assert code == 0, err
    assert tensor_dtypes(out) == {"F16"}
    code, _, err = run(capsys, "bake", "--base", models / "base", refs[0], "-o", ref)
    assert code == 0, err
    assert tensor_dtypes(ref) == {"F32"}
    files = sorted(p.relative_to(ref) for p in ref.rglob("*.safetensors"))
    assert files == sorted(p.relative_to(out) for p in out.rglob("*.safetensors")) and len(files) >= 3
    for rel in files:
        a, b = load_file(out / rel), load_file(ref / rel)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k].half()), (rel, k)
    import loradex

    with pytest.raises(LoradexError, match="dtype 'fp8'"):
        bake(models / "base", [(loradex.load(refs[0]), 1.0)], tmp_path / "bad", dtype="fp8")
    assert not (tmp_path / "bad").exists()


def test_train_writes_the_dtype(tmp_path, capsys):
    import loradex
    from test_training import stripes

    data = stripes(tmp_path / "data")
    common = ["--data", data, "--steps", 1, "--resolution", 16, "--blur-threshold", 0, "--token", "sks",
              "--class-word", "person"]
    out = tmp_path / "lora.safetensors"
    code, _, err = run(capsys, "train", "lora", *common, "--dtype", "fp16", "-o", out)
    assert code == 0, err
    assert tensor_dtypes(out) == {"F16"}
    a = loradex.load(out)
    assert "ss_network_dim" in a.metadata and a.metadata["modelspec.trigger_phrase"] == "sks"  # metadata kept
    out = tmp_path / "piv.safetensors"  # two files: the LoRA and its embedding
    code, _, err = run(capsys, "train", "pivotal", *common, "--to", "diffusers", "--dtype", "bf16", "-o", out)
    assert code == 0, err
    assert tensor_dtypes(out) == tensor_dtypes(tmp_path / "piv_emb.safetensors") == {"BF16"}
    bad(run(capsys, "train", "dreambooth", *common, "--dtype", "fp16", "-o", tmp_path / "db"), "--dtype")
