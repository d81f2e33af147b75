"""Nothing is dropped silently (issue 10, item 6), and LyCORIS' sparse residual is read, applied
and written (``bias_indices`` / ``bias_values`` / ``bias_size``).

* every reader (kohya, lycoris_, ComfyUI, diffusers, PEFT, bundled embeddings) names each key no
  kind, module or embedding explains, with the reason, in ``Adapter.unexplained``; a module with a
  known kind and extra tensors keeps its kind; ``loradex.convert`` carries the list into its
  report, ``describe`` shows it whole, and ``strict=True`` refuses such a file;
* the sparse residual, as lycoris-lora 4.1.3's own extractor (``lycoris.utils.extract_diff`` with
  ``use_bias=True``) writes it, is a residual of the *weight*: applied as the LyCORIS author's
  A1111 extension does, the file reproduces the fine-tuned weights; kohya/lycoris_ writers keep it
  bit-identical, diffusers gets it folded exactly into the factors (checked with
  ``pipe.load_lora_weights``), fused FLUX projections fold it before splitting.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import loradex
import loradex.core.archs as A
from loradex.api import describe
from loradex.converters.common import ConversionReport, fit_kinds
from loradex.core.adapter import Adapter
from loradex.core.kinds import patch_from_tensors
from loradex.core.kinds.lora import LoraPatch
from loradex.errors import FormatError
from loradex.log import quiet

SD1 = "tiny-sd1"
Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
V = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"


def _lora(out: int, inn: int, r: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"lora_down.weight": torch.randn(r, inn, generator=g), "lora_up.weight": torch.randn(out, r, generator=g),
            "alpha": torch.tensor(1.0)}


def _kohya(name: str) -> str:
    return A.get_arch(SD1).kohya_name(name)


# ---------------------------------------------------------------------------------------------
# every reader names what it did not read
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def kohya_file(tmp_path):
    q, k, v = _kohya(Q), _kohya(K), _kohya(V)
    sd = {f"{q}.{s}": t for s, t in _lora(32, 32).items()}
    sd[f"{q}.foo"] = torch.ones(3)  # unknown tensor next to a LoRA: the LoRA is kept
    sd.update({f"{k}.{s}": t for s, t in _lora(32, 32, seed=1).items()})
    sd[f"{v}.alpha"] = torch.tensor(2.0)  # alpha + a suffix no kind has (A1111's "scale")
    sd[f"{v}.scale"] = torch.tensor(0.5)
    sd.update({f"lora_unet_no_such_block_proj.{s}": t for s, t in _lora(32, 32).items()})
    sd["junk"] = torch.ones(2)
    sd["bundle_emb.sks.string_to_param.*"] = torch.randn(2, 32)
    sd["bundle_emb.sks.string_to_token.*"] = torch.tensor(265)  # A1111's informational token id
    sd["bundle_emb.sks.extra"] = torch.ones(1)
    path = tmp_path / "mixed.safetensors"
    save_file(sd, str(path))
    return path, sd


def test_kohya_reader_names_every_key_it_did_not_read(kohya_file):
    path, sd = kohya_file
    a = loradex.load(path)
    q, v = _kohya(Q), _kohya(V)
    assert a.arch == SD1 and set(a.patches) == {Q, K} and "sks" in a.embeddings
    assert set(a.patches[Q].tensors()) == {"lora_down.weight", "lora_up.weight", "alpha"}
    u = a.unexplained
    assert set(u) == {f"{q}.foo", f"{v}.alpha", f"{v}.scale", "lora_unet_no_such_block_proj.lora_down.weight",
                      "lora_unet_no_such_block_proj.lora_up.weight", "lora_unet_no_such_block_proj.alpha",
                      "junk", "bundle_emb.sks.extra"}
    assert "'foo'" in u[f"{q}.foo"] and "lora" in u[f"{q}.foo"]
    assert "no patch kind" in u[f"{v}.scale"] and "alpha, scale" in u[f"{v}.alpha"]
    assert "no module lora_unet_no_such_block_proj in tiny-sd1" == u["lora_unet_no_such_block_proj.alpha"]
    assert "not a kohya key" in u["junk"] and "not part of the embedding" in u["bundle_emb.sks.extra"]
    assert "loradex.unread_keys" not in a.metadata  # replaced by Adapter.unexplained
    # describe: the whole list, never cut
    d = describe(a)
    assert d["unexplained"] == u and len(d["unexplained"]) == 8


def test_strict_and_the_conversion_report(kohya_file, tmp_path):
    path, _ = kohya_file
    with pytest.raises(FormatError, match=r"8 keys: .*\.\.\. and 5 more.*strict"):
        loradex.load(path, strict=True)
    dst = tmp_path / "out.safetensors"
    with pytest.raises(FormatError, match="8 keys"):
        loradex.convert(path, dst, to="kohya", strict=True)
    assert not dst.exists()
    report = loradex.convert(path, dst, to="kohya")
    assert report.unexplained == loradex.load(path).unexplained
    assert report.to_dict()["unexplained"] == report.unexplained
    assert "8 source keys not understood" in report.summary()
    out = load_file(str(dst))
    assert not any(k.endswith((".foo", ".scale", ".extra")) or k == "junk" for k in out)
    assert loradex.load(dst, strict=True).unexplained == {}  # what was written reads back whole


def test_nothing_read_is_an_error_not_an_empty_adapter(tmp_path):
    path = tmp_path / "alpha_only.safetensors"
    save_file({f"{_kohya(Q)}.alpha": torch.tensor(1.0), f"{_kohya(Q)}.scale": torch.tensor(1.0)}, str(path))
    with pytest.raises(FormatError, match=r"none of its keys.*2 keys: .*alpha, scale"):
        loradex.load(path, arch=SD1)


def test_lycoris_comfy_diffusers_peft_readers_name_unknown_keys(tmp_path):
    a = A.get_arch(SD1)
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    # lycoris_: a key without the prefix, an unknown suffix, a module of another component
    flat = Q.partition(".")[2].replace(".", "_")
    sd = {f"lycoris_{flat}.{s}": t for s, t in _lora(32, 32).items()}
    sd[f"lycoris_{flat}.foo"] = torch.ones(1)
    sd["other.weight"] = torch.ones(1)
    sd["lycoris_nowhere_proj.lora_up.weight"] = torch.ones(32, 2)
    p = tmp_path / "lyco.safetensors"
    save_file(sd, str(p))
    got = loradex.load(p, arch=SD1).unexplained
    assert set(got) == {f"lycoris_{flat}.foo", "other.weight", "lycoris_nowhere_proj.lora_up.weight"}
    assert "unet" in got["lycoris_nowhere_proj.lora_up.weight"] and "not a lycoris_ key" in got["other.weight"]
    # ComfyUI: SGM path with kohya suffixes; an unknown suffix and a foreign key
    sgm = "diffusion_model." + a.sgm_name(Q)
    sd = {f"{sgm}.{s}": t for s, t in _lora(32, 32).items()}
    sd[f"{sgm}.foo"] = torch.ones(1)
    sd["diffusion_model.input_blocks.99.1.proj_in.lora_up.weight"] = torch.ones(32, 2)
    p = tmp_path / "comfy.safetensors"
    save_file(sd, str(p))
    c = loradex.load(p, arch=SD1)
    assert set(c.patches) == {Q}
    assert set(c.unexplained) == {f"{sgm}.foo", "diffusion_model.input_blocks.99.1.proj_in.lora_up.weight"}
    # diffusers: a non-LoRA tensor, a module the arch lacks (dropped, not kept under its raw name),
    # a module with an alpha but no factors
    lo = _lora(32, 32)
    sd = {f"{Q}.lora_A.weight": lo["lora_down.weight"], f"{Q}.lora_B.weight": lo["lora_up.weight"],
          f"{Q}.lora_A.foo": torch.ones(1), "unet.nowhere.lora_A.weight": torch.ones(2, 32),
          "unet.nowhere.lora_B.weight": torch.ones(32, 2), f"{K}.alpha": torch.tensor(1.0)}
    p = tmp_path / "diffusers.safetensors"
    save_file(sd, str(p))
    d = loradex.load(p, arch=SD1)
    assert set(d.patches) == {Q}
    assert set(d.unexplained) == {f"{Q}.lora_A.foo", "unet.nowhere.lora_A.weight", "unet.nowhere.lora_B.weight",
                                  f"{K}.alpha"}
    assert "no module unet.nowhere in tiny-sd1" == d.unexplained["unet.nowhere.lora_A.weight"]
    # PEFT folder per component: keys named <component>/<key>
    folder = tmp_path / "peft"
    (folder / "text_encoder").mkdir(parents=True)
    tpath = te.partition(".")[2].removeprefix("text_model.")
    sd = {f"base_model.model.{tpath}.lora_A.weight": lo["lora_down.weight"],
          f"base_model.model.{tpath}.lora_B.weight": lo["lora_up.weight"],
          f"base_model.model.{tpath}.lora_A.foo": torch.ones(1)}
    save_file(sd, str(folder / "text_encoder" / "adapter_model.safetensors"))
    (folder / "text_encoder" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}))
    pf = loradex.load(folder, arch=SD1)
    assert set(pf.patches) == {te}
    assert pf.unexplained.keys() == {f"text_encoder/base_model.model.{tpath}.lora_A.foo"}


def test_adapter_stays_backwards_compatible():
    p = LoraPatch(torch.ones(4, 2), torch.ones(2, 3))
    a = Adapter({"unet.x": p}, {}, {"m": "1"}, "sd1", "kohya", ["note"])  # the old positional form
    assert a.notes == ["note"] and a.unexplained == {}
    a.unexplained["k"] = "why"
    assert a.to(torch.float16).unexplained == {"k": "why"}
    assert fit_kinds(a, frozenset({"lora"}), None, ConversionReport("diffusers")).unexplained == {"k": "why"}


# ---------------------------------------------------------------------------------------------
# LyCORIS' sparse residual
# ---------------------------------------------------------------------------------------------
def _sparse_lora(out=6, inn=5, r=2, alpha=3.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    idx = torch.tensor([[0, 2, 5, 2], [1, 4, 0, 4]], dtype=torch.int16)  # (2, 4) entries repeat once
    return {"lora_down.weight": torch.randn(r, inn, generator=g, dtype=dtype),
            "lora_up.weight": torch.randn(out, r, generator=g, dtype=dtype),
            "alpha": torch.tensor(alpha), "bias_indices": idx,
            "bias_values": torch.randn(4, generator=g, dtype=dtype),
            "bias_size": torch.tensor([out, inn], dtype=torch.int16)}


def test_sparse_residual_math():
    t = _sparse_lora()
    p = patch_from_tensors(t, (6, 5))
    assert p.kind == "lora" and p.has_residual and set(p.tensors()) == set(t)
    s = torch.sparse_coo_tensor(t["bias_indices"].long(), t["bias_values"], (6, 5),
                                check_invariants=True).to_dense()
    gamma = 3.0 / 2
    expect = gamma * (t["lora_up.weight"] @ t["lora_down.weight"] + s)  # the A1111 extension's order
    assert torch.allclose(p.delta(multiplier=0.7).double(), 0.7 * expect.float().double(), atol=1e-6)
    up, down = p.factors(torch.float64)  # exact factors, residual included
    assert torch.allclose(gamma * up @ down, expect, atol=1e-12)
    lora, err = p.to_lora()
    assert err == 0.0 and not lora.has_residual and torch.allclose(lora.delta(), p.delta(), atol=1e-6)
    assert lora.rank == p.exact_lora_rank == 2 + 3  # the residual's 3 non-zero rows
    small, err2 = p.to_lora(2)
    assert small.rank == 2 and 0 < err2 < 1
    assert torch.allclose(p.scaled(-0.5).delta(), -0.5 * p.delta(), atol=1e-5)
    assert torch.allclose(p.fold_alpha().delta(), p.delta(), atol=1e-5)
    h = p.to(torch.float16)
    assert h.residual_indices.dtype == torch.int16 and h.residual_values.dtype == torch.float16
    # LyCORIS stores int16: sizes and indices >= 32768 wrap; they are read as unsigned
    wide = {"lora_down.weight": torch.zeros(1, 40000), "lora_up.weight": torch.zeros(2, 1),
            "bias_indices": torch.tensor([[1], [39999]], dtype=torch.int32).to(torch.int16),
            "bias_values": torch.tensor([2.0]), "bias_size": torch.tensor([2, 40000]).to(torch.int16)}
    w = patch_from_tensors(wide, (2, 40000))
    assert w.delta()[1, 39999] == 2.0 and w.delta().abs().sum() == 2.0


def test_resize_counts_the_sparse_residual_in_the_rank():
    """A rank-2 LoRA whose residual makes its exact rank 5 is resized at rank 3, not kept as is."""
    from loradex.merge.resize import resize_patch

    p = patch_from_tensors(_sparse_lora(), (6, 5))
    new, info = resize_patch(p, rank=3)
    assert info["old_rank"] == 5 and info["new_rank"] == 3 and new is not None and new.rank == 3
    assert 0 < info["error"] < 1 and info["energy"] < 1
    kept, info = resize_patch(p, rank=5)
    assert kept is None and info["old_rank"] == 5


@pytest.mark.parametrize("bad,match", [
    ({"bias_size": torch.tensor([5, 6], dtype=torch.int16)}, "not the .out, in.kh.kw. layout"),
    ({"bias_indices": torch.tensor([[0], [7]], dtype=torch.int16), "bias_values": torch.ones(1, dtype=torch.float64)},
     "outside"),
    ({"bias_indices": torch.zeros(2, 4)}, "integer"),
    ({"bias_values": torch.ones(3, dtype=torch.float64)}, "do not agree"),
])
def test_sparse_residual_malformed(bad, match):
    t = {**_sparse_lora(), **bad}
    with pytest.raises(FormatError, match=match):
        patch_from_tensors(t, (6, 5))
    t = _sparse_lora()
    del t["bias_size"]
    with pytest.raises(FormatError, match="come together"):
        patch_from_tensors(t, (6, 5))


def test_lycoris_itself_never_applies_the_sparse_keys():
    """Why loradex follows the A1111 extension: lycoris-lora 4.1.3 writes the keys (extract_diff)
    but its modules do not list them among the weights they load."""
    from lycoris.modules.locon import LoConModule

    assert not any(k.startswith("bias_") for k in LoConModule.weight_list)


def _extracted(base: torch.nn.Module, seed: int = 3):
    """A fine-tuned copy of ``base`` and lycoris-lora's own extraction of the difference as a
    rank-2 LoCon with its sparse residual (sparsity 0: every residual entry kept)."""
    from lycoris.utils import extract_diff

    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.ndim >= 2:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        sd = extract_diff([], [], base, tuned, mode="fixed", linear_mode_param=2, conv_mode_param=2,
                          use_bias=True, sparsity=0.0, small_conv=False)
    # modules lycoris keeps whole ("full": rank >= out/2) are not what this is about
    full = {k.partition(".")[0] for k in sd if k.endswith(".diff")}
    return tuned, {k: v.contiguous() for k, v in sd.items() if k.partition(".")[0] not in full}


@pytest.fixture(scope="module")
def extracted(bench, tmp_path_factory):
    tuned, sd = _extracted(bench.pipe.unet)
    path = tmp_path_factory.mktemp("sparse") / "extracted.safetensors"
    save_file(sd, str(path))
    return tuned, sd, path


def test_sparse_residual_reproduces_the_extracted_weights(bench, extracted):
    tuned, sd, path = extracted
    assert any(k.endswith(".bias_indices") for k in sd)
    a = loradex.load(path, arch=SD1, strict=True)
    base = dict(bench.pipe.unet.named_modules())
    mods = dict(tuned.named_modules())
    assert a.patches and all(p.has_residual for p in a.patches.values())
    for name, p in a.patches.items():
        path_ = name.partition(".")[2]
        d = (mods[path_].weight - base[path_].weight).detach().double()
        rel = float((p.delta().double().reshape(d.shape) - d).norm() / d.norm())
        assert rel < 2e-3, (name, rel)  # fp16 storage; without the residual the error is ~1
        plain = dataclasses.replace(p, residual_indices=None, residual_values=None, residual_size=None)
        assert float((plain.delta().double().reshape(d.shape) - d).norm() / d.norm()) > 0.3


def test_sparse_residual_kept_by_kohya_and_lycoris_writers(extracted, tmp_path):
    _, sd, path = extracted
    for to, kw in (("kohya", {}), ("lycoris", {"component": "unet"})):
        dst = tmp_path / f"{to}.safetensors"
        report = loradex.convert(path, dst, to=to, arch=SD1, **kw)
        assert not report.dropped and report.max_error == 0.0 and not report.exact
        assert len([k for k in load_file(str(dst)) if ".bias_" in k]) == len([k for k in sd if ".bias_" in k]) > 0
        back = loradex.load(dst, arch=SD1)
        for name, p in loradex.load(path, arch=SD1).patches.items():
            q = back.patches[name]
            for f in ("residual_indices", "residual_values", "residual_size"):
                assert torch.equal(getattr(p, f), getattr(q, f)) and getattr(p, f).dtype == getattr(q, f).dtype


def test_sparse_residual_to_diffusers_loads_in_diffusers(bench, extracted, tmp_path):
    _, _, path = extracted
    dst = tmp_path / "pytorch_lora_weights.safetensors"
    report = loradex.convert(path, dst, to="diffusers", arch=SD1)
    assert report.exact and all("sparse residual" in how for how in report.exact.values())
    assert not report.approximated and not report.dropped
    pipe = bench.fresh_pipe()
    with quiet():
        pipe.load_lora_weights(str(dst), adapter_name="sparse")
    y = bench.unet_out(pipe.unet)
    assert float((y - bench.y_base).norm() / bench.y_base.norm()) > 0.05  # the adapter does change the output
    # diffusers' load of the folded file is loradex's own application of the lycoris file (whose
    # deltas reproduce the fine-tune: test above)
    unet = bench.fresh_unet()
    mods = dict(unet.named_modules())
    with torch.no_grad():
        for name, p in loradex.load(path, arch=SD1).patches.items():
            w = mods[name.partition(".")[2]].weight
            w.add_(p.delta().reshape(w.shape).to(w.dtype))
    assert bench.rel(y, bench.unet_out(unet)) < 1e-4
    # with --rank the folded factors are truncated, and the error is reported
    report = loradex.convert(path, tmp_path / "r2.safetensors", to="diffusers", arch=SD1, rank=2)
    assert report.approximated and 0 < report.max_error < 1


def test_sparse_residual_on_a_fused_flux_projection(tmp_path):
    """kohya stores FLUX's to_q/to_k/to_v as one ``img_attn_qkv``: the residual is folded into the
    factors before the rows are split (exact), and the parts fuse back with the same update."""
    f = A.get_arch("tiny-flux1")
    flat = "lora_unet_double_blocks_0_img_attn_qkv"
    parts = f.from_kohya(flat)
    rows = max(r[1] for _, r in parts)
    inn = f.module(parts[0][0]).shape[1]
    t = _sparse_lora(out=rows, inn=inn, dtype=torch.float32)
    t["bias_indices"] = torch.tensor([[0, 40, 95], [1, 7, 31]], dtype=torch.int16)
    t["bias_values"] = torch.tensor([1.0, -2.0, 3.0])
    t["bias_size"] = torch.tensor([rows, inn], dtype=torch.int16)
    path = tmp_path / "flux.safetensors"
    save_file({f"{flat}.{s}": v for s, v in t.items()}, str(path))
    fused = patch_from_tensors(t, (rows, inn)).delta()
    a = loradex.load(path, arch="tiny-flux1", strict=True)
    assert any("sparse residual folded" in n for n in a.notes)
    for name, (lo, hi) in parts:
        assert torch.allclose(a.patches[name].delta(), fused[lo:hi], atol=1e-5)
    loradex.save(a, tmp_path / "back.safetensors", "kohya")
    back = patch_from_tensors({k.partition(".")[2]: v for k, v in load_file(str(tmp_path / "back.safetensors")).items()
                               if k.startswith(flat + ".")}, (rows, inn))
    assert torch.allclose(back.delta(), fused, atol=1e-5)


def test_cli_lists_unexplained_keys_and_strict_refuses(tmp_path, capsys, monkeypatch):
    """The CLI shows every key nothing explains by name (inspect, convert's report, add's notes),
    ``--json`` carries them all, and ``--strict`` makes them an input error (exit 2, one line)."""
    from cli_util import bad, run

    a = A.get_arch("tiny-sd1")
    flat = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    info = a.module("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    path = tmp_path / "x.safetensors"
    save_file({f"{flat}.lora_down.weight": torch.randn(2, info.shape[1]),
               f"{flat}.lora_up.weight": torch.randn(info.shape[0], 2), f"{flat}.alpha": torch.tensor(2.0),
               f"{flat}.weird_suffix": torch.randn(3), "lora_unet_nope_module.lora_down.weight": torch.randn(2, 4)},
              str(path))
    want = {f"{flat}.weird_suffix", "lora_unet_nope_module.lora_down.weight"}
    code, out, _ = run(capsys, "inspect", path, "--arch", "tiny")
    assert code == 0 and all(f"not understood: {k}" in out for k in want)
    assert set(json.loads(run(capsys, "inspect", path, "--arch", "tiny", "--json")[1])["unexplained"]) == want
    r = run(capsys, "convert", path, "--arch", "tiny", "--to", "diffusers", "-o", tmp_path / "y.safetensors", "--json")
    assert r[0] == 0 and set(json.loads(r[1])["unexplained"]) == want
    bad(run(capsys, "convert", path, "--arch", "tiny", "--to", "diffusers", "-o", tmp_path / "z.safetensors",
            "--strict"), "2 keys")
    assert not (tmp_path / "z.safetensors").exists()
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("LORADEX_HOME", str(home))
    bad(run(capsys, "add", path, "--name", "x", "--arch", "tiny", "--strict"), "strict")
    code, out, _ = run(capsys, "add", path, "--name", "x", "--arch", "tiny")
    assert code == 0 and "key not understood" in out
