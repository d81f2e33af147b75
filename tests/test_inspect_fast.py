"""``loradex inspect FILE.safetensors`` without torch (issue 13, item 9: under a second).

A safetensors adapter is described from its header, its one-element tensors and its bytes (NaN/Inf)
by the same readers, kinds and arch detection a full read runs, fed tensor descriptions instead of
tensors (``converters/described.py``, ``core/tensorspec.py``); what that cannot tell falls back to
the full read. Checked here on a broad set of files made in-process -- lycoris-lora's own files of
every algorithm, loradex's kohya/diffusers writers (fp32/fp16/bf16, LoRA, LoHa, LoKr, DoRA, Tucker,
full, (IA)^3, GLoRA, OFT, BOFT), peft's LoRA saved by diffusers, ComfyUI's spelling, TI embeddings
(SD1, SDXL, bundled), SDXL, a base of custom size, NaN/Inf, keys nothing explains, and the files that
must fall back (fused FLUX projections, a sparse residual, an unknown base): the described read's
``--json`` report equals the full read's exactly, a ``python -m loradex inspect`` process imports
neither torch nor diffusers nor transformers, and bad input is still exit 2 with one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loradex
from cli_util import bad, run
from loradex.converters import described
from loradex.core.adapter import Adapter, Embedding
from loradex.core.kinds.lora import LoraPatch
from loradex.core.tensorspec import NeedsTorch, TensorSpec
from loradex.demo import LYCORIS_ALGOS, make_lycoris_reference, make_peft_reference
from loradex.tiny import tiny_arch

pytestmark = pytest.mark.usefixtures("one_thread")

#: files the described read must handle itself (no fallback)
FAST = [
    *(f"lycoris-{label}" for label in LYCORIS_ALGOS),
    *(f"kohya-{label}" for label in LYCORIS_ALGOS),
    "kohya-fp16", "kohya-bf16-loha", "kohya-f64", "diffusers-lora", "diffusers-dora", "diffusers-loha",
    "peft-diffusers", "comfy-sd1", "ti-kohya", "ti-diffusers", "ti-sdxl", "kohya-bundle", "sdxl-kohya",
    "custom-base", "nan-f32", "inf-fp16", "nan-bf16", "unexplained", "kohya-metadata", "diffusers-no-arch",
    "kohya-conv-2d",
]
#: files it must leave to the full read (same report all the same)
FALLBACK = ["flux-fused", "sparse-residual", "unknown-base"]


def _loras(arch, prefix: str, seed: int = 0, dtype=torch.float32) -> dict[str, LoraPatch]:
    """A LoRA on every Linear/Conv of ``arch`` under ``prefix``: ranks 4 and 2, alphas 1..3."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (m, info) in enumerate(arch.modules.items()):
        if not m.startswith(prefix) or info.type not in ("linear", "conv"):
            continue
        shape, r = info.shape, (4, 2)[i % 2]
        up = torch.randn(shape[0], r, *([1] * (len(shape) - 2)), generator=g) * 0.1
        down = torch.randn(r, *shape[1:], generator=g) * 0.1
        alpha = torch.tensor(float(1 + i % 3), dtype=dtype)
        out[m] = LoraPatch(up=up.to(dtype), down=down.to(dtype), alpha=alpha)
    return out


def _edit(src: Path, dst: Path, change) -> Path:
    """``dst``: the tensors and metadata of ``src`` after ``change(tensors)`` (in place)."""
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    sd = load_file(src)
    change(sd)
    save_file(sd, str(dst), meta)
    return dst


def _poke(value, where: str = "lora_up.weight"):
    """``change`` for :func:`_edit`: ``value`` into the middle of the first tensor ending in ``where``."""
    def change(sd):
        k = next(k for k in sorted(sd) if k.endswith(where))
        t = sd[k].clone().reshape(-1)
        t[t.numel() // 2] = value
        sd[k] = t.reshape(sd[k].shape)
    return change


@pytest.fixture(scope="module")
def files(bench, tmp_path_factory) -> dict[str, Path]:
    from loradex.core.archs import arch_from_configs
    from loradex.core.archs.tables import load_config

    d = tmp_path_factory.mktemp("fast")
    a = bench.arch
    out: dict[str, Path] = {}
    for label in LYCORIS_ALGOS:  # lycoris-lora's own lycoris_ files, and loradex's kohya of each
        ref = make_lycoris_reference(bench, label, d)
        out[f"lycoris-{label}"] = ref.path
        out[f"kohya-{label}"] = d / f"kohya_{label}.safetensors"
        loradex.save(loradex.load(ref.path, arch=a), out[f"kohya-{label}"], "kohya", arch=a)
        if label in ("lora", "dora", "loha"):
            out[f"diffusers-{label}"] = d / f"diffusers_{label}.safetensors"
            loradex.save(loradex.load(ref.path, arch=a), out[f"diffusers-{label}"], "diffusers", arch=a)
    out["kohya-fp16"] = d / "kohya_fp16.safetensors"
    loradex.convert(out["kohya-lora"], out["kohya-fp16"], to="kohya", dtype="fp16")
    out["kohya-bf16-loha"] = d / "kohya_bf16_loha.safetensors"
    loradex.convert(out["kohya-loha"], out["kohya-bf16-loha"], to="kohya", dtype="bf16")
    def to_f64(sd):
        sd.update({k: v.double() for k, v in sd.items() if v.is_floating_point()})
    out["kohya-f64"] = _edit(out["kohya-lokr"], d / "kohya_f64.safetensors", to_f64)
    out["peft-diffusers"] = make_peft_reference(bench, d).path
    # ComfyUI's spelling: diffusion_model.<ldm path> (alphas 0.1: float32 rounding shows)
    comfy = {}
    for m, p in _loras(a, "unet.", seed=3).items():
        key = "diffusion_model." + a.sgm_name(m)
        comfy.update({f"{key}.lora_up.weight": p.up, f"{key}.lora_down.weight": p.down,
                      f"{key}.alpha": torch.tensor(0.1, dtype=torch.float64)})
    out["comfy-sd1"] = d / "comfy.safetensors"
    save_file(comfy, str(out["comfy-sd1"]))
    # textual inversion: SD1 kohya / diffusers files, SDXL clip_l + clip_g, and one bundled in a LoRA
    g = torch.Generator().manual_seed(5)
    emb = Embedding("<sks>", {"text_encoder": torch.randn(3, 32, generator=g)})
    for fmt in ("kohya-ti", "diffusers-ti"):
        out[f"ti-{fmt.split('-')[0]}"] = d / f"sks_{fmt}.safetensors"
        loradex.save(Adapter(embeddings={"<sks>": emb}, arch=a.name), out[f"ti-{fmt.split('-')[0]}"], fmt)
    xl = tiny_arch("sdxl")
    vec = {c: torch.randn(2, xl.text_encoder_width(c), generator=g) for c in xl.text_encoders}
    out["ti-sdxl"] = d / "sks_sdxl.safetensors"
    loradex.save(Adapter(embeddings={"sks": Embedding("sks", vec)}, arch=xl.name), out["ti-sdxl"], "kohya-ti")
    out["kohya-bundle"] = d / "bundle.safetensors"
    bundle = Adapter(_loras(a, "text_encoder.", seed=4), {"<sks>": emb}, arch=a.name)
    loradex.save(bundle, out["kohya-bundle"], "kohya")
    out["sdxl-kohya"] = d / "sdxl.safetensors"
    loradex.save(Adapter({**_loras(xl, "unet.", seed=6, dtype=torch.float16),
                          **_loras(xl, "text_encoder_2.", seed=7, dtype=torch.float16)}, arch=xl.name),
                 out["sdxl-kohya"], "kohya")
    # a base of custom size, derived in-process from its configs (sd1-<hash>)
    unet = {**load_config("tiny_sd1_unet.json"), "block_out_channels": [16, 48], "cross_attention_dim": 24}
    te = {**load_config("tiny_clip_text.json"), "hidden_size": 24, "intermediate_size": 48}
    custom = arch_from_configs("sd1", {"unet": unet, "text_encoder": te})
    assert custom.name.startswith("sd1-")
    out["custom-base"] = d / "custom.safetensors"
    loradex.save(Adapter({**_loras(custom, "unet.", seed=8), **_loras(custom, "text_encoder.", seed=9)},
                         arch=custom.name), out["custom-base"], "kohya")
    # NaN / Inf in float32, fp16, bf16 tensors
    out["nan-f32"] = _edit(out["kohya-lora"], d / "nan_f32.safetensors", _poke(math.nan))
    out["inf-fp16"] = _edit(out["kohya-fp16"], d / "inf_fp16.safetensors", _poke(-math.inf, "lora_down.weight"))
    out["nan-bf16"] = _edit(out["kohya-bf16-loha"], d / "nan_bf16.safetensors", _poke(math.nan, "hada_w2_b"))
    # keys nothing explains: an unknown tensor next to a LoRA, a module the arch lacks, a stray key
    def extra(sd):
        k = next(k for k in sorted(sd) if k.endswith(".lora_up.weight"))
        sd[k.replace(".lora_up.weight", ".foo")] = torch.zeros(2)
        sd["lora_unet_no_such_module.lora_up.weight"] = torch.zeros(4, 2)
        sd["lora_unet_no_such_module.lora_down.weight"] = torch.zeros(2, 4)
        sd["stray"] = torch.zeros(1)
    out["unexplained"] = _edit(out["kohya-lora"], d / "unexplained.safetensors", extra)
    # 2-D factors (+ DoRA, bf16 alphas) on 1x1 convs: the reader re-shapes them to the module's 4-D weight
    g = torch.Generator().manual_seed(11)
    sd = {}
    for m, i in a.modules.items():
        if i.type == "conv" and tuple(i.shape[2:]) == (1, 1):
            k = a.kohya_name(m)
            sd.update({f"{k}.lora_up.weight": torch.randn(i.shape[0], 2, generator=g),
                       f"{k}.lora_down.weight": torch.randn(2, i.shape[1], generator=g),
                       f"{k}.alpha": torch.tensor(1.5, dtype=torch.bfloat16),
                       f"{k}.dora_scale": torch.rand(i.shape[0], 1, generator=g)})
    out["kohya-conv-2d"] = d / "conv_2d.safetensors"
    save_file(sd, str(out["kohya-conv-2d"]))
    # kohya training metadata (decoded by --metadata / --json)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2",
            "ss_base_model_version": "sd_v1", "ss_steps": "1200", "ss_output_name": "sks_dog",
            "ss_tag_frequency": json.dumps({"3_sks dog": {"sks dog": 3, "red": 2, "blue": 1}}),
            "modelspec.trigger_phrase": "sks dog"}
    out["kohya-metadata"] = d / "kohya_meta.safetensors"
    save_file(load_file(out["kohya-lora"]), str(out["kohya-metadata"]), meta)
    # ---- files the described read leaves to the full read
    fx = tiny_arch("flux1")
    qkv = {m: p for m, p in _loras(fx, "transformer.transformer_blocks.0.attn.", seed=10).items()
           if m.endswith(("to_q", "to_k", "to_v"))}
    out["flux-fused"] = d / "flux.safetensors"
    loradex.save(Adapter(qkv, arch=fx.name), out["flux-fused"], "kohya")
    def sparse(sd):
        k = next(k for k in sorted(sd) if k.endswith(".lora_up.weight") and sd[k].ndim == 2)
        mod = k[: -len(".lora_up.weight")]
        out_f, inn = sd[k].shape[0], sd[f"{mod}.lora_down.weight"].shape[1]
        sd[f"{mod}.bias_indices"] = torch.tensor([[0, 1], [1, 0]], dtype=torch.int16)
        sd[f"{mod}.bias_values"] = torch.tensor([0.5, -0.5])
        sd[f"{mod}.bias_size"] = torch.tensor([out_f, inn], dtype=torch.int16)
    out["sparse-residual"] = _edit(out["kohya-lora"], d / "sparse.safetensors", sparse)
    # diffusers keys of a model loradex does not know: read without an arch (names as the file spells them)
    out["diffusers-no-arch"] = d / "no_arch.safetensors"
    save_file({f"blocks.{i}.attn.q.lora_A.weight": torch.randn(4, 24) for i in range(3)}
              | {f"blocks.{i}.attn.q.lora_B.weight": torch.randn(24, 4) for i in range(3)},
              str(out["diffusers-no-arch"]))
    # kohya keys of a model loradex does not know: no arch, the raw view
    out["unknown-base"] = d / "unknown.safetensors"
    save_file({f"lora_unet_blocks_{i}_attn_q.lora_down.weight": torch.randn(4, 24) for i in range(3)}
              | {f"lora_unet_blocks_{i}_attn_q.lora_up.weight": torch.randn(24, 4) for i in range(3)}
              | {f"lora_unet_blocks_{i}_attn_q.alpha": torch.tensor(2.0) for i in range(3)},
              str(out["unknown-base"]))
    assert set(out) == set(FAST) | set(FALLBACK), set(out) ^ (set(FAST) | set(FALLBACK))
    return out


def _full_read(monkeypatch):
    """Make every read a full one (the converters never hand out descriptions)."""
    monkeypatch.setattr(described, "active", lambda: False)


def _report(capsys, *args) -> dict:
    code, out, err = run(capsys, "inspect", *args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("name", FAST)
def test_described_read_is_the_full_read(capsys, monkeypatch, files, name):
    """The described read handles the file itself (no fallback), its ``describe`` equals the full
    read's, and so does the whole ``--json`` report (hashes, decoded metadata, NaN/Inf...)."""
    p = files[name]
    with described.described():
        a = loradex.load(p)
        fast = loradex.describe(a)
    held = [t for q in a.patches.values() for t in q.tensors().values()]
    held += [v for e in a.embeddings.values() for v in e.vectors.values()]
    assert held and all(isinstance(t, TensorSpec) for t in held)  # described, never loaded
    assert fast == loradex.describe(loradex.load(p))
    got = _report(capsys, p)
    _full_read(monkeypatch)
    assert got == _report(capsys, p)


def test_the_files_cover_what_they_claim(files):
    """The fixtures hold what their names say (so the comparison above means something)."""
    names = ("nan-f32", "inf-fp16", "nan-bf16", "unexplained", "custom-base", "ti-sdxl", "kohya-bundle",
             "kohya-bf16-loha", "comfy-sd1")
    info = {n: loradex.inspect(files[n]) for n in names}
    assert len(info["nan-f32"]["nonfinite"]) == 1 and len(info["inf-fp16"]["nonfinite"]) == 1
    assert len(info["nan-bf16"]["nonfinite"]) == 1 and info["kohya-bf16-loha"]["dtype"] == "bfloat16"
    assert len(info["unexplained"]["unexplained"]) == 4
    assert info["custom-base"]["arch"].startswith("sd1-") and info["ti-sdxl"]["arch"] == "tiny-sdxl"
    assert info["kohya-bundle"]["embeddings"] and info["kohya-bundle"]["modules"]
    assert info["comfy-sd1"]["format"] == "comfy"
    assert list(info["comfy-sd1"]["alphas"]) == [str(float(torch.tensor(0.1)))]  # 0.1 as float32 holds it


@pytest.mark.parametrize("name", FALLBACK)
def test_what_descriptions_cannot_tell_falls_back(capsys, monkeypatch, files, name):
    """Fused FLUX projections (split by math), a sparse residual (its indices checked by value) and a
    file of no known base (the raw view) are not described from shapes: the described read raises
    and the report comes from the full read, the same as ever."""
    p = files[name]
    with pytest.raises(Exception), described.described():  # noqa: B017 - any error means "fall back"
        loradex.describe(loradex.load(p))
    got = _report(capsys, p)
    _full_read(monkeypatch)
    assert got == _report(capsys, p)


def test_arch_and_strict_options(capsys, monkeypatch, files):
    """``--arch`` and ``--strict`` give the same answers on both reads (a report; exit 2)."""
    got = _report(capsys, files["kohya-loha"], "--arch", "tiny-sd1")
    assert got["arch"] == "tiny-sd1"
    fast_err = run(capsys, "inspect", files["unexplained"], "--strict")
    bad(fast_err, "strict")
    _full_read(monkeypatch)
    assert got == _report(capsys, files["kohya-loha"], "--arch", "tiny-sd1")
    assert run(capsys, "inspect", files["unexplained"], "--strict") == fast_err


def test_descriptions_fit_modules_like_meta_tensors(files):
    """Architecture detection judges a module by building its patch from tensor descriptions; the
    verdict (+1 fits, -1 contradicts, 0 unknown) is the one torch meta tensors give, for every
    module signature of the files against the right module and against wrong ones."""
    from loradex.converters import pickle_io
    from loradex.core.archs.detect import _patch_fits
    from loradex.core.kinds import INTEGER_SUFFIXES

    shapes = {(4, 32), (32, 4), (64, 32), (32, 32, 3, 3), (64, 32, 1, 1), (32,), (96, 32), (32, 64)}
    modules: set[tuple] = set()
    for name in FAST:
        h = pickle_io.read_tensor_header(files[name])
        groups: dict[str, dict] = {}
        for k, i in h.tensors.items():
            mod, _, suffix = k.partition(".") if "." in k else (k, "", "")
            groups.setdefault(mod, {})[suffix] = i.shape
        modules |= {tuple(sorted(g.items())) for g in groups.values()}
    assert len(modules) > 20
    checked = 0
    for mod in modules:
        for shape in shapes:
            ints = {s for s, _ in mod if s in INTEGER_SUFFIXES}
            spec = {s: TensorSpec(t, "int64" if s in ints else "float32", meta=True) for s, t in mod}
            meta = {s: torch.empty(t, device="meta", dtype=torch.int64 if s in ints else torch.float32)
                    for s, t in mod}
            try:
                want = _patch_fits(meta, shape)
            except Exception as e:  # noqa: BLE001
                want = type(e)
            try:
                got = _patch_fits(spec, shape)
            except NeedsTorch:
                continue  # detection then asks meta tensors (see _kind_fits)
            except Exception as e:  # noqa: BLE001
                got = type(e)
            assert got == want, (mod, shape)
            checked += 1
    assert checked > 100


def test_views_are_the_views_of_meta_tensors():
    for shape in [(3, 4), (6, 2, 1, 1), (5,), (2, 3, 3, 3)]:
        t, s = torch.empty(shape, device="meta"), TensorSpec(shape, "float32", meta=True)
        assert tuple(t.reshape(-1).shape) == s.reshape(-1).shape
        assert tuple(t.reshape(shape[0], -1).shape) == s.reshape(shape[0], -1).shape
        assert tuple(t.flatten(1).shape) == s.flatten(1).shape if len(shape) > 1 else True
        assert tuple(t.unsqueeze(0).shape) == s.unsqueeze(0).shape
        assert tuple(t[:, None].shape) == s[:, None].shape
        assert tuple(t[..., None, None].shape) == s[..., None, None].shape
        assert t.numel() == s.numel() and t.dim() == s.dim() and t.is_floating_point() == s.is_floating_point()
    with pytest.raises(RuntimeError):
        float(TensorSpec((), "float32", meta=True))  # as float() of a meta tensor
    with pytest.raises(NeedsTorch):
        TensorSpec((2, 2), "float32") @ TensorSpec((2, 2), "float32")
    with pytest.raises(NeedsTorch):
        TensorSpec((2, 2), "float32").float()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_nan_inf_from_the_bytes_is_torch_isfinite(dtype):
    """``described.finite_bytes`` (no numpy, no torch) agrees with ``torch.isfinite`` on every bit
    pattern of 16-bit floats and on edge values of the wider ones, at every position."""
    from loradex.converters.described import finite_bytes

    name = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}[dtype]
    if dtype.itemsize == 2:  # all 65536 bit patterns, one at a time next to ordinary values
        allbits = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)
        finite = torch.isfinite(allbits.float())
        for v, ok in zip(allbits[::97].tolist(), finite[::97].tolist()):
            buf = torch.tensor([0.5, v, -2.0], dtype=dtype)
            assert finite_bytes(buf.view(torch.uint8).numpy().tobytes(), name) == ok, v
        nonfinite = allbits[~finite]
        assert not finite_bytes(nonfinite.view(torch.uint8).numpy().tobytes(), name)
    edge = [0.0, -0.0, 1.0, torch.finfo(dtype).max, -torch.finfo(dtype).max, torch.finfo(dtype).tiny,
            torch.finfo(dtype).tiny / 4, math.inf, -math.inf, math.nan]
    for v in edge:
        for pos in range(3):
            vals = [1.5, -3.25, 7.0]
            vals[pos] = v
            t = torch.tensor(vals, dtype=dtype)
            raw = t.view(torch.uint8).numpy().tobytes()
            assert finite_bytes(raw, name) == bool(torch.isfinite(t).all()), (v, pos)


_RUNNER = """
import sys, runpy
sys.argv = ["loradex", "inspect", *sys.argv[1:]]
try:
    runpy.run_module("loradex", run_name="__main__")
except SystemExit as e:
    code = e.code
HEAVY = ("torch", "diffusers", "transformers", "safetensors.torch", "peft")
heavy = sorted(m for m in HEAVY if m in sys.modules)
print(f"exit={code} heavy={','.join(heavy) or '-'}", file=sys.stderr)
"""


def _subprocess(*args) -> tuple[str, str]:
    env = dict(os.environ)  # the same LORADEX_CACHE: the arch tables these tests built
    r = subprocess.run([sys.executable, "-c", _RUNNER, *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=120)
    return r.stdout, r.stderr


@pytest.mark.parametrize("name", ["kohya-lora", "lycoris-lokr", "lycoris-ia3", "diffusers-dora", "ti-sdxl",
                                  "custom-base", "nan-bf16"])
def test_a_process_inspecting_a_lora_imports_no_torch(capsys, monkeypatch, files, name):
    """``python -m loradex inspect FILE --json``: no torch, diffusers, transformers or peft imported,
    and the report is the one the full read gives. (The full read goes first: it leaves the arch
    tables detection needs in the cache, as any first use does -- building one needs diffusers.)"""
    _full_read(monkeypatch)
    want = _report(capsys, files[name])
    out, err = _subprocess(files[name], "--json")
    assert err.strip().splitlines()[-1] == "exit=0 heavy=-", err
    assert json.loads(out) == want


def test_bad_input_is_still_one_line_and_exit_2(capsys, files, tmp_path):
    """What no format reads is refused as before: exit 2, one ``error:`` line, in-process and in a
    fresh process."""
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    short = tmp_path / "short.safetensors"
    short.write_bytes(files["kohya-lora"].read_bytes()[:200])
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    for p in (junk, short, empty, tmp_path / "missing.safetensors"):
        bad(run(capsys, "inspect", p))
    out, err = _subprocess(junk)
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 2, err
    assert lines[0].startswith("error: ") and lines[1].startswith("exit=2"), err
