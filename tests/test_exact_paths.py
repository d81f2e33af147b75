"""Every exact path open, and which app reads which ``--to``.

1. LoHa with Tucker convs -> PEFT: PEFT 0.21's LoHa tuner has the Tucker form
   (``use_effective_conv2d``, every kxk conv or none), so such a file stays LoHa there; a component
   that mixes Tucker and plain kxk convs takes the exact LoRA form. Both load in PEFT.
2. DoHa / DoKr / DoRA on Tucker LoCon -> diffusers / PEFT: the exact LoRA of ``dW`` with the same
   per-row magnitude (``V = W + dW`` unchanged), loaded by diffusers ``load_lora_weights`` and
   ``PeftModel``; a per-input-column ``dora_scale`` is refused with the reason.
3. The README's "Which app reads which --to" table, one test per row. Apps that are not pip
   dependencies are checked against their key maps, ported below from their sources (the version
   is named in each test's docstring); diffusers and kohya (through lycoris-lora's kohya entry
   point, which sd-scripts loads as ``--network_module lycoris.kohya``) are run for real.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loradex
from loradex.core.adapter import Adapter
from loradex.core.archs import get_arch
from loradex.core.kinds import LoraPatch
from loradex.demo import (
    LYCORIS_ALGOS,
    consume_diffusers,
    consume_lycoris_kohya,
    consume_peft,
    make_lycoris_reference,
)
from loradex.errors import ConversionError

pytestmark = pytest.mark.usefixtures("one_thread")

EXTRA_ALGOS = {
    "doha": dict(algo="loha", dora_wd=True),
    "dokr": dict(algo="lokr", factor=4, dora_wd=True),
    "loha-tucker": dict(algo="loha", use_tucker=True),
    "dora-tucker": dict(algo="lora", use_tucker=True, dora_wd=True),
}


@pytest.fixture(autouse=True)
def _extra_algos(monkeypatch):
    for k, v in EXTRA_ALGOS.items():
        monkeypatch.setitem(LYCORIS_ALGOS, k, v)


def fused_out(bench, adapter: Adapter) -> torch.Tensor:
    """UNet output with loradex's own exact ``delta(W)`` added to every weight (float64 sum)."""
    unet = bench.fresh_unet()
    with torch.no_grad():
        for n, p in adapter.patches.items():
            mod = unet.get_submodule(n.partition(".")[2])
            w = mod.weight
            w.copy_((w.double() + p.delta(w.float()).double().reshape(w.shape)).to(w.dtype))
    return bench.unet_out(unet)


# ---- 1. LoHa Tucker -> PEFT ------------------------------------------------------------------
def test_all_loha_with_tucker_convs_stays_loha_in_peft(bench, tmp_path):
    ref = make_lycoris_reference(bench, "loha-tucker", tmp_path)
    a = loradex.load(ref.path, arch=bench.arch)
    assert any(p.tucker for p in a.patches.values())
    out = tmp_path / "peft"
    rep = loradex.save(a, out, "peft", arch=bench.arch)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LOHA" and cfg["use_effective_conv2d"] is True
    assert any(k.endswith(".hada_t1") for k in load_file(out / "adapter_model.safetensors"))
    assert not rep.exact and not rep.approximated
    y = consume_peft(bench, out)
    # a Tucker LoHa's update is tiny next to W here: float32 rounding of W + dW, in any tool, is
    # ~2e-4 of the change (lycoris' own forward vs loradex's float64 sum: 1.9e-4)
    assert bench.rel(y, fused_out(bench, a)) < 5e-4
    assert bench.rel(y, ref.y_ref) < 5e-4


def test_loha_mixing_tucker_and_plain_kxk_convs_takes_the_exact_lora_form(bench, tmp_path):
    tucker = loradex.load(make_lycoris_reference(bench, "loha-tucker", tmp_path).path, arch=bench.arch)
    plain = loradex.load(make_lycoris_reference(bench, "loha", tmp_path, seed=1).path, arch=bench.arch)
    conv = next(n for n, p in tucker.patches.items() if p.tucker)
    mixed = Adapter({**tucker.patches, conv: plain.patches[conv]}, arch=bench.arch)
    out = tmp_path / "peft"
    rep = loradex.save(mixed, out, "peft", arch=bench.arch)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert len(rep.exact) == len(mixed.patches) and not rep.approximated
    assert any("mixes Tucker and plain" in n for n in rep.notes)
    assert bench.rel(consume_peft(bench, out), fused_out(bench, mixed)) < 5e-4  # float32 rounding, see above


# ---- 2. DoRA on LoHa / LoKr / Tucker LoCon -> diffusers, PEFT -----------------------------------
@pytest.mark.parametrize("label", ["doha", "dokr", "dora-tucker"])
@pytest.mark.parametrize("target", ["diffusers", "peft"])
def test_dora_on_other_kinds_becomes_exact_lora_plus_dora(bench, tmp_path, label, target):
    ref = make_lycoris_reference(bench, label, tmp_path)
    a = loradex.load(ref.path, arch=bench.arch)
    assert all(p.dora_scale is not None for p in a.patches.values())
    out = tmp_path / ("peft" if target == "peft" else "d.safetensors")
    rep = loradex.save(a, out, target, arch=bench.arch)
    # LoRA + DoRA without a Tucker core is kept as it is; everything else takes the exact form
    assert set(rep.exact) == {n for n, p in a.patches.items() if p.kind != "lora" or p.mid is not None}
    assert rep.exact and not rep.approximated and len(rep.exact) + len(rep.kept) == len(a.patches)
    assert all("+dora->lora+dora" in why for why in rep.exact.values())
    y = consume_peft(bench, out) if target == "peft" else consume_diffusers(bench, out)
    assert bench.rel(y, fused_out(bench, a)) < 1e-4  # loradex's delta(W): lycoris' DoRA math
    assert bench.rel(y, ref.y_ref) < 5e-4  # the real tool's forward (float32 Tucker rounding)


def test_per_input_column_dora_is_refused_with_the_reason(bench, tmp_path):
    a = loradex.load(make_lycoris_reference(bench, "doha", tmp_path).path, arch=bench.arch)
    name, p = next((n, p) for n, p in a.patches.items() if len(p.shape) == 2)
    col = replace(p, dora_scale=torch.rand(1, p.shape[1]) + 0.5)
    assert col.dora_on_output is False
    bad = Adapter({name: col}, arch=bench.arch)
    with pytest.raises(ConversionError, match="per input column"):
        loradex.save(bad, tmp_path / "x.safetensors", "diffusers", arch=bench.arch)
    loradex.save(bad, tmp_path / "k.safetensors", "kohya", arch=bench.arch)  # kohya/lycoris hold it


# ---- 3. which app reads which --to ----------------------------------------------------------------
KINDS_ALL = ["lora", "locon-tucker", "loha", "lokr", "full", "ia3", "glora", "diag-oft", "boft", "dora"]


def kohya_file_of(bench, label, tmp_path) -> dict[str, torch.Tensor]:
    ref = make_lycoris_reference(bench, label, tmp_path)
    out = tmp_path / f"{label}_kohya.safetensors"
    loradex.convert(ref.path, out, to="kohya", arch=bench.arch)
    return load_file(out)


def default_lora(arch_name: str) -> Adapter:
    """A rank-1 LoRA on kohya's default targets of a published arch (table only, no weights):
    every Linear/conv in the attentions (Transformer2DModel), the resnets' and samplers' convs
    (kohya's conv_dim), and every CLIPAttention/CLIPMLP Linear of each text encoder."""
    a = get_arch(arch_name)
    pat = re.compile(r"^unet\..*(\.attentions\.\d+\.(?!.*norm)|\.resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)$|"
                     r"samplers\.0\.conv$)|^text_encoder(_2)?\.text_model\.encoder\.layers\.\d+\.(self_attn\.\w+_proj|mlp\.fc\d)$")
    g = torch.Generator().manual_seed(0)
    patches = {}
    for n, info in a.modules.items():
        if info.type not in ("linear", "conv") or not pat.search(n):
            continue
        shp = info.shape
        up = torch.randn(shp[0], 1, *([1] * (len(shp) - 2)), generator=g)
        down = torch.randn(1, *shp[1:], generator=g)
        patches[n] = LoraPatch(up=up, down=down, alpha=torch.tensor(1.0))
    return Adapter(patches, arch=arch_name)


def written_keys(adapter: Adapter, to: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{to}.safetensors"
    loradex.save(adapter, out, to, arch=adapter.arch)
    return load_file(out)


def modules_of(keys) -> set[str]:
    return {k.partition(".")[0] for k in keys}


# -- ComfyUI ---------------------------------------------------------------------------------------
COMFY_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                  "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                  "self_attn.out_proj": "self_attn_out_proj"}


def comfy_key_map(arch_name: str) -> dict[str, str]:
    """ComfyUI ``comfy/lora.py`` ``model_lora_keys_unet`` + ``model_lora_keys_clip`` for an SD1/SDXL
    model: the model's LDM keys come from loradex's SGM names (checked against diffusers' single-file
    converter in test_arch.py), ``unet_to_diffusers``' keys are the diffusers UNet's own names, CLIP
    state dicts are ComfyUI's ``clip_l``/``clip_g`` ``transformer.text_model...`` names."""
    a = get_arch(arch_name)
    key_map: dict[str, str] = {}
    unet = [m for m in a.modules if m.startswith("unet.")]
    sdk = [f"diffusion_model.{a.sgm_name(m)}.weight" for m in unet]
    for k in sdk:
        key_lora = k[len("diffusion_model."):-len(".weight")].replace(".", "_")
        key_map[f"lora_unet_{key_lora}"] = k
        key_map[k[:-len(".weight")]] = k
    for m in unet:  # diffusers_keys = comfy.utils.unet_to_diffusers(unet_config)
        k = m[len("unet."):] + ".weight"
        unet_key = f"diffusion_model.{a.sgm_name(m)}.weight"
        key_lora = k[:-len(".weight")].replace(".", "_")
        key_map[f"lora_unet_{key_lora}"] = unet_key
        key_map[f"lycoris_{key_lora}"] = unet_key
        for p in ("", "unet."):
            dk = f"{p}{k[:-len('.weight')].replace('.to_', '.processor.to_')}"
            if dk.endswith(".to_out.0"):
                dk = dk[:-2]
            key_map[dk] = unet_key
    clips = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    csdk = {f"{clips[m.split('.')[0]]}.transformer.{m.partition('.')[2]}.weight" for m in a.modules if m.startswith("text_encoder")}
    for k in csdk:
        key_map[f"text_encoders.{k[:-len('.weight')]}"] = k
    clip_l_present = False
    for b in range(32):
        for c in COMFY_CLIP_MAP:
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in csdk:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{COMFY_CLIP_MAP[c]}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{COMFY_CLIP_MAP[c]}"] = k
                clip_l_present = True
                key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
            k = f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in csdk and clip_l_present:
                key_map[f"lora_te2_text_model_encoder_layers_{b}_{COMFY_CLIP_MAP[c]}"] = k
                key_map[f"text_encoder_2.text_model.encoder.layers.{b}.{c}"] = k
    return key_map


def comfy_load_lora(lora: dict[str, torch.Tensor], to_load: dict[str, str]) -> tuple[dict[str, str], set[str]]:
    """ComfyUI ``load_lora`` (with ``comfy/weight_adapter`` LoRA/LoHa/LoKr/GLoRA/OFT/BOFT ``load``):
    which patch each target gets, and the keys it reads (any other key: "lora key not loaded")."""
    patch: dict[str, str] = {}
    loaded: set[str] = set()
    for x in to_load:
        for s in ("alpha", "dora_scale"):
            if f"{x}.{s}" in lora:
                loaded.add(f"{x}.{s}")
        for up, down, mid in ((".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"),
                              ("_lora.up.weight", "_lora.down.weight", None), (".lora_B.weight", ".lora_A.weight", None),
                              (".lora.up.weight", ".lora.down.weight", None),
                              (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", None)):
            if x + up in lora:
                loaded |= {x + up, x + down} | ({x + mid} if mid and x + mid in lora else set())
                patch[to_load[x]] = "lora"
                break
        if f"{x}.hada_w1_a" in lora:
            loaded |= {f"{x}.{s}" for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
                       if f"{x}.{s}" in lora}
            patch[to_load[x]] = "loha"
        lokr = {f"{x}.{s}" for s in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
                if f"{x}.{s}" in lora}
        if lokr:
            loaded |= lokr
            patch[to_load[x]] = "lokr"
        if f"{x}.a1.weight" in lora:
            loaded |= {f"{x}.{s}.weight" for s in ("a1", "a2", "b1", "b2")}
            patch[to_load[x]] = "glora"
        if f"{x}.oft_blocks" in lora and lora[f"{x}.oft_blocks"].ndim in (3, 4):
            loaded |= {f"{x}.oft_blocks"} | ({f"{x}.rescale"} if f"{x}.rescale" in lora else set())
            patch[to_load[x]] = "oft" if lora[f"{x}.oft_blocks"].ndim == 3 else "boft"
        for s in ("w_norm", "b_norm", "diff", "diff_b", "set_weight"):
            if f"{x}.{s}" in lora:
                loaded.add(f"{x}.{s}")
                patch.setdefault(to_load[x], s)
    return patch, loaded


@pytest.mark.parametrize("arch_name", ["sd1", "sdxl"])
def test_comfyui_key_names(tmp_path, arch_name):
    """ComfyUI (comfy/lora.py of the weight_adapter era, ComfyUI 0.3.x; weight_adapter/lora.py at
    6fd406fb14ca663225b88c6f75d7a7f2b997e5a0): every key of ``--to kohya`` is mapped and read, for
    every target module; ``--to diffusers`` files lose their attention modules (ComfyUI maps only
    ``attn1.processor.to_q``-style attention keys) and their alphas (it reads no
    ``lora_adapter_metadata``); ``--to lycoris`` (UNet) maps through its ``lycoris_`` keys."""
    a = default_lora(arch_name)
    key_map = comfy_key_map(arch_name)
    kohya = written_keys(a, "kohya", tmp_path)
    patch, loaded = comfy_load_lora(kohya, key_map)
    assert set(kohya) == loaded
    assert len(set(patch)) == len(a.patches)
    unet_only = Adapter({n: p for n, p in a.patches.items() if n.startswith("unet.")}, arch=arch_name)
    lyco = written_keys(unet_only, "lycoris", tmp_path)  # lycoris_ + diffusers path: unet_to_diffusers' keys
    assert comfy_load_lora(lyco, key_map)[1] == set(lyco)
    diff = written_keys(a, "diffusers", tmp_path)
    _, loaded = comfy_load_lora(diff, key_map)
    missed = set(diff) - loaded
    assert missed and all(".attn" in k for k in missed)


def test_comfyui_reads_every_kind_but_ia3(bench, tmp_path):
    """ComfyUI's adapters (lora, loha, lokr, glora, oft, boft; w_norm/diff as diffs): each kind of a
    ``--to kohya`` file is read whole; (IA)^3 (``weight``/``on_input``) is not among them."""
    for label in KINDS_ALL:
        sd = kohya_file_of(bench, label, tmp_path)
        to_load = {m: m for m in modules_of(sd)}
        patch, loaded = comfy_load_lora(sd, to_load)
        if label == "ia3":
            assert not patch, label
        else:
            assert loaded == set(sd) and len(patch) == len(to_load), label


def test_comfyui_reads_every_ti_layout_but_png(tmp_path):
    """ComfyUI ``comfy/sd1_clip.py`` ``load_embed`` (0.3.x): ``.safetensors``/``.pt``/``.bin`` only,
    ``string_to_param`` first, then ``embed_key`` (``clip_l``/``clip_g``), then the first value."""
    v = torch.randn(2, 768, generator=torch.Generator().manual_seed(0))
    a = Adapter(embeddings={"tok": loradex.Embedding("tok", {"text_encoder": v})})
    for to, name in (("a1111-ti", "tok.pt"), ("kohya-ti", "tok.safetensors"), ("diffusers-ti", "tok.bin")):
        p = tmp_path / name
        loradex.save(a, p, format=to)
        embed = load_file(p) if p.suffix == ".safetensors" else torch.load(p, weights_only=True)
        got = next(iter(embed["string_to_param"].values())) if "string_to_param" in embed else next(iter(embed.values()))
        assert torch.equal(got, v), to
    assert ".png" not in (".safetensors", ".pt", ".bin")  # a1111-png: never looked at


# -- A1111 -----------------------------------------------------------------------------------------
A1111_SUFFIX = {"attentions": {}, "resnets": {"conv1": "in_layers_2", "conv2": "out_layers_3",
                                              "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}}


def a1111_compvis(key: str, is_sd2: bool = False) -> str:
    """A1111 ``extensions-builtin/Lora/networks.py`` ``convert_diffusers_name_to_compvis``."""
    def match(m, rx):
        r = re.match(rx, key)
        if not r:
            return False
        m[:] = [int(x) if re.match(r"\d+", x) else x for x in r.groups()]
        return True

    m: list = []
    if match(m, r"lora_unet_conv_in(.*)"):
        return f"diffusion_model_input_blocks_0_0{m[0]}"
    if match(m, r"lora_unet_conv_out(.*)"):
        return f"diffusion_model_out_2{m[0]}"
    if match(m, r"lora_unet_time_embedding_linear_(\d+)(.*)"):
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if match(m, r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = A1111_SUFFIX.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if match(m, r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"):
        suffix = A1111_SUFFIX.get(m[0], {}).get(m[2], m[2])
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if match(m, r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = A1111_SUFFIX.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if match(m, r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv"):
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"
    if match(m, r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv"):
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"
    if match(m, r"lora_te_text_model_encoder_layers_(\d+)_(.+)"):
        return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
    if match(m, r"lora_te2_text_model_encoder_layers_(\d+)_(.+)"):
        if "mlp_fc1" in m[1]:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc1', 'mlp_c_fc')}"
        if "mlp_fc2" in m[1]:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc2', 'mlp_c_proj')}"
        return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('self_attn', 'attn')}"
    return key


def a1111_layer_mapping(arch_name: str) -> set[str]:
    """``assign_network_names_to_compvis_modules``: the LDM model's module names with '_' (UNet:
    ``diffusion_model_...``; SD1 CLIP ``transformer_text_model_...``; SDXL ``0_transformer_...`` and
    OpenCLIP bigG ``1_model_transformer_resblocks_N_{attn,attn_out_proj,mlp_c_fc,mlp_c_proj}``)."""
    a = get_arch(arch_name)
    out = {"diffusion_model_" + a.sgm_name(m).replace(".", "_") for m in a.modules if m.startswith("unet.")}
    sdxl = "text_encoder_2" in a.components
    for m in a.modules:
        comp, _, path = m.partition(".")
        if comp == "text_encoder":
            out.add(("0_" if sdxl else "") + "transformer_" + path.replace(".", "_"))
        elif comp == "text_encoder_2":
            r = re.match(r"text_model\.encoder\.layers\.(\d+)\.", path)
            if r:
                b = r.group(1)
                out |= {f"1_model_transformer_resblocks_{b}_{s}" for s in ("attn", "attn_out_proj", "mlp_c_fc", "mlp_c_proj")}
    return out


def a1111_match(keys, mapping: set[str]) -> dict[str, str]:
    """``load_network``'s matching; returns the keys that failed (A1111 prints them)."""
    failed = {}
    for k in keys:
        net = k.split(".", 1)[0]
        key = a1111_compvis(net)
        ok = key in mapping
        if not ok and (mx := re.match(r"(.*)_([qkv]_proj)$", key)):
            ok = mx.group(1) in mapping
        if not ok and "lora_unet" in net:
            ok = net.replace("lora_unet", "diffusion_model") in mapping
        elif not ok and "lora_te1_text_model" in net:
            ok = net.replace("lora_te1_text_model", "0_transformer_text_model") in mapping
        if not ok:
            failed[k] = key
    return failed


#: A1111 network_*.py ``ModuleType.create_module``: the keys each module type needs
A1111_TYPES = {
    "lora": lambda w: all(x in w for x in ("lora_up.weight", "lora_down.weight")),
    "hada": lambda w: all(x in w for x in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")),
    "ia3": lambda w: "weight" in w,
    "lokr": lambda w: ("lokr_w1" in w or ("lokr_w1_a" in w and "lokr_w1_b" in w))
    and ("lokr_w2" in w or ("lokr_w2_a" in w and "lokr_w2_b" in w)),
    "full": lambda w: "diff" in w,
    "norm": lambda w: all(x in w for x in ("w_norm", "b_norm")),
    "glora": lambda w: all(x in w for x in ("a1.weight", "a2.weight", "b1.weight", "b2.weight")),
    "oft": lambda w: "oft_blocks" in w or "oft_diag" in w,
}


@pytest.mark.parametrize("arch_name", ["sd1", "sdxl"])
def test_a1111_key_names(tmp_path, arch_name):
    """A1111 / Forge's built-in Lora extension (stable-diffusion-webui ``extensions-builtin/Lora``,
    networks.py at 873edba44bedf0086d52343f282552b3601baeb8, v1.x): every module of a ``--to kohya``
    file finds its LDM layer; ``--to diffusers`` keys (``unet.``/``lora_A``) find none."""
    a = default_lora(arch_name)
    mapping = a1111_layer_mapping(arch_name)
    assert a1111_match(written_keys(a, "kohya", tmp_path), mapping) == {}
    diff = written_keys(a, "diffusers", tmp_path)
    assert len(a1111_match(diff, mapping)) == len(diff)


def test_a1111_module_types(bench, tmp_path):
    """Each kind of a ``--to kohya`` file is taken by one of A1111's module types (v1.x: lora,
    hada, ia3, lokr, full, norm, glora, oft); BOFT's 4-D ``oft_blocks`` would be taken by the OFT
    type and computed as Diag-OFT, so the table says no for BOFT."""
    for label in KINDS_ALL:
        sd = kohya_file_of(bench, label, tmp_path)
        for mod in modules_of(sd):
            w = {k.partition(".")[2] for k in sd if k.partition(".")[0] == mod}
            taken = [t for t, ok in A1111_TYPES.items() if ok(w)]
            assert taken, (label, mod, w)
            if label == "boft":
                assert taken == ["oft"] and sd[f"{mod}.oft_blocks"].ndim == 4


def test_a1111_reads_every_ti_layout(tmp_path):
    """A1111 ``EmbeddingDatabase.load_from_file`` (v1.x): ``.pt``/``.bin`` and ``.safetensors`` by
    ``string_to_param``, ``clip_g``+``clip_l``, or a one-tensor dict; PNG through its text chunk
    (see test_pickles_png.py for the image formats, checked with A1111's own decoder)."""
    v = torch.randn(2, 768, generator=torch.Generator().manual_seed(0))
    a = Adapter(embeddings={"tok": loradex.Embedding("tok", {"text_encoder": v})})
    for to, name in (("a1111-ti", "tok.pt"), ("kohya-ti", "tok.safetensors"), ("diffusers-ti", "tok.bin")):
        p = tmp_path / name
        loradex.save(a, p, format=to)
        data = load_file(p) if p.suffix == ".safetensors" else torch.load(p, weights_only=True)
        if "string_to_param" in data:
            assert len(data["string_to_param"]) == 1
            got = next(iter(data["string_to_param"].values()))
        else:
            assert len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor)
            got = next(iter(data.values()))
        assert torch.equal(got, v), to


# -- InvokeAI --------------------------------------------------------------------------------------
class _Tree:
    """A module tree from dotted paths, with ``get_submodule`` (what InvokeAI's key search uses)."""

    def __init__(self, paths):
        self.children: dict[str, _Tree] = {}
        for p in paths:
            node = self
            for part in p.split("."):
                node = node.children.setdefault(part, _Tree(()))

    def get_submodule(self, name):
        node = self
        for part in name.split("."):
            node = node.children[part]
        return node


def invoke_get_submodule(model: _Tree, layer_key: str) -> str:
    """InvokeAI ``LayerPatcher._get_submodule`` for flattened keys (backend/patches/layer_patcher.py)."""
    module, module_key = model, ""
    key_parts = layer_key.split("_")
    submodule_name = key_parts.pop(0)
    while key_parts:
        try:
            module = module.get_submodule(submodule_name)
            module_key += "." + submodule_name
            submodule_name = key_parts.pop(0)
        except KeyError:
            submodule_name += "_" + key_parts.pop(0)
    module.get_submodule(submodule_name)
    return (module_key + "." + submodule_name).lstrip(".")


def invoke_sdxl_keys_to_diffusers(keys) -> list[str]:
    """InvokeAI ``sdxl_lora_conversion_utils.convert_sdxl_keys_to_diffusers_format`` (from kohya's
    lora_diffusers.py map), keys only."""
    layer = []
    for i in range(3):
        for j in range(2):
            layer.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            layer.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            layer.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            layer.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        layer.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        layer.append((f"output_blocks.{3 * i + 2}.2.", f"up_blocks.{i}.upsamplers.0."))
    layer.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        layer.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    res = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."),
           ("emb_layers.1.", "time_emb_proj."), ("skip_connection.", "conv_shortcut.")]
    conv = []
    for sd, hf in layer:
        conv += [(sd + a, hf + b) for a, b in res] if "resnets" in hf else [(sd, hf)]
    for j in range(2):
        conv.append((f"time_embed.{j * 2}.", f"time_embedding.linear_{j + 1}."))
        conv.append((f"label_emb.0.{j * 2}.", f"add_embedding.linear_{j + 1}."))
    conv += [("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
    m = {sd.rstrip(".").replace(".", "_"): hf.rstrip(".").replace(".", "_") for sd, hf in conv}
    stab = sorted(m)
    import bisect

    out = []
    for k in keys:
        if k.startswith("lora_unet_"):
            search = k.replace("lora_unet_", "")
            mk = stab[bisect.bisect_right(stab, search) - 1]
            assert search.startswith(mk), k
            out.append(k.replace(mk, m[mk]))
        else:
            out.append(k)
    return out


INVOKE_LAYERS = ("dora_scale", "lora_up.weight", "hada_w1_a", "lokr_w1", "lokr_w1_a", "diff", "on_input", "w_norm")


@pytest.mark.parametrize("arch_name", ["sd1", "sdxl"])
def test_invokeai_key_names(tmp_path, arch_name):
    """InvokeAI 6.x: keys grouped at the first '.', SDXL UNet keys converted to diffusers names,
    then each flattened key searched in the live model under ``lora_unet_`` / ``lora_te_`` (SDXL
    ``lora_te1_``/``lora_te2_``) -- its diffusers UNet and transformers 4 CLIP (with ``text_model``)."""
    a = default_lora(arch_name)
    arch = get_arch(arch_name)
    trees = {c: _Tree(m.partition(".")[2] for m in arch.modules if m.startswith(c + ".")) for c in arch.components}
    prefixes = ({"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"} if arch_name == "sdxl"
                else {"lora_unet_": "unet", "lora_te_": "text_encoder"})
    keys = sorted(modules_of(written_keys(a, "kohya", tmp_path)))
    if arch_name == "sdxl":
        keys = invoke_sdxl_keys_to_diffusers(keys)
    found = set()
    for k in keys:
        pre = next(p for p in prefixes if k.startswith(p))
        found.add(prefixes[pre] + "." + invoke_get_submodule(trees[prefixes[pre]], k[len(pre):]))
    assert found == set(a.patches)


def test_invokeai_layer_types(bench, tmp_path):
    """InvokeAI ``any_lora_layer_from_state_dict``: DoRA (on LoRA), LoRA/LoCon, LoHa, LoKr, full,
    (IA)^3, norm; GLoRA, OFT and BOFT raise "Unsupported lora format"."""
    for label in KINDS_ALL:
        sd = kohya_file_of(bench, label, tmp_path)
        for mod in modules_of(sd):
            w = {k.partition(".")[2] for k in sd if k.partition(".")[0] == mod}
            ok = any(x in w for x in INVOKE_LAYERS)
            assert ok == (label not in ("glora", "diag-oft", "boft")), (label, w)


def test_invokeai_reads_every_ti_layout(tmp_path):
    """InvokeAI ``TextualInversionModelRaw.from_checkpoint``: string_to_param, emb_params,
    clip_g+clip_l, else the first value ("diffusers bin files"); no images."""
    v = torch.randn(2, 768, generator=torch.Generator().manual_seed(1))
    a = Adapter(embeddings={"tok": loradex.Embedding("tok", {"text_encoder": v})})
    for to, name in (("a1111-ti", "tok.pt"), ("kohya-ti", "tok.safetensors"), ("diffusers-ti", "tok.bin")):
        p = tmp_path / name
        loradex.save(a, p, format=to)
        sd = load_file(p) if p.suffix == ".safetensors" else torch.load(p, weights_only=True)
        if "string_to_param" in sd:
            got = next(iter(sd["string_to_param"].values()))
        elif "emb_params" in sd:
            got = sd["emb_params"]
        else:
            got = next(iter(sd.values()))
        assert torch.equal(got, v), to


# -- kohya sd-scripts -------------------------------------------------------------------------------
def test_kohya_reads_kohya_files_of_every_kind(bench, tmp_path):
    """kohya sd-scripts loads LyCORIS kinds through ``--network_module lycoris.kohya`` (lycoris-lora
    4.1.3, a pip dependency, run for real here; plain LoRA through its networks/lora.py, whose names
    ``lora_unet_<module path>`` / ``lora_te_text_model_...`` are the same keys)."""
    for label in ("lora", "loha", "lokr", "full", "dora"):
        ref = make_lycoris_reference(bench, label, tmp_path)
        out = tmp_path / f"{label}.safetensors"
        loradex.convert(ref.path, out, to="kohya", arch=bench.arch)
        assert bench.rel(consume_lycoris_kohya(bench, out), ref.y_ref) < 1e-4, label


def test_kohya_sd_scripts_lora_names(bench, tmp_path):
    """sd-scripts networks/lora.py ``LoRANetwork.create_modules``: ``lora_name = prefix + '.' + name
    + '.' + child_name`` with '.' -> '_', prefixes ``lora_unet``/``lora_te``, targets
    Transformer2DModel (+ ResnetBlock2D, Downsample2D, Upsample2D with conv_dim) and CLIPAttention /
    CLIPMLP (transformers 4: ``text_model.`` level). Run on the tiny pipeline's own modules."""
    pipe = bench.pipe
    names = set()
    for prefix, root, targets, level in (
        ("lora_unet", pipe.unet, ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"), ""),
        ("lora_te", pipe.text_encoder, ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"), "text_model."),
    ):
        for name, module in root.named_modules():
            if type(module).__name__ in targets:
                for child_name, child in module.named_modules():
                    if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)) and child_name:
                        names.add(f"{prefix}.{level}{name}.{child_name}".replace(".", "_"))
    ref = make_lycoris_reference(bench, "lora", tmp_path)
    a = loradex.load(ref.path, arch=bench.arch)
    written = modules_of(written_keys(Adapter(a.patches, arch=bench.arch), "kohya", tmp_path))
    covered = {n for n in written if not n.startswith(("lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time"))}
    assert covered and covered <= names


# -- diffusers (run for real) ------------------------------------------------------------------------
def test_diffusers_reads_diffusers_and_plain_kohya_not_kohya_lycoris(bench, tmp_path):
    """diffusers 0.42 ``load_lora_weights``: ``--to diffusers`` of every LoRA-expressible kind, kohya
    files of plain LoRA; kohya-named LoHa is refused (use ``--to diffusers``)."""
    ref = make_lycoris_reference(bench, "loha", tmp_path)
    d = tmp_path / "d.safetensors"
    loradex.convert(ref.path, d, to="diffusers", arch=bench.arch)
    assert bench.rel(consume_diffusers(bench, d), ref.y_ref) < 1e-4
    k = tmp_path / "k.safetensors"
    loradex.convert(ref.path, k, to="kohya", arch=bench.arch)
    with pytest.raises(Exception):  # noqa: B017 - diffusers' own error type varies by version
        consume_diffusers(bench, k)
    lora = make_lycoris_reference(bench, "lora", tmp_path)
    k2 = tmp_path / "k2.safetensors"
    loradex.convert(lora.path, k2, to="kohya", arch=bench.arch)
    assert bench.rel(consume_diffusers(bench, k2), lora.y_ref) < 1e-4


def test_diffusers_reads_ti_layouts(bench, tmp_path):
    """``load_textual_inversion``: diffusers-ti, a1111-ti (token = its name field), kohya-ti with
    ``token=``; an image is no file it reads."""
    from loradex.log import quiet

    v = torch.randn(2, 32, generator=torch.Generator().manual_seed(2))
    a = Adapter(embeddings={"tok": loradex.Embedding("tok", {"text_encoder": v})})
    for to, name, kw in (("diffusers-ti", "d.safetensors", {}), ("a1111-ti", "a.pt", {}),
                         ("kohya-ti", "k.safetensors", {"token": "tok"})):
        p = tmp_path / name
        loradex.save(a, p, format=to)
        pipe = bench.fresh_pipe()
        with quiet():
            pipe.load_textual_inversion(str(p), **kw)
        ids = pipe.tokenizer.convert_tokens_to_ids(["tok", "tok_1"])
        assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], v), to
    loradex.save(a, tmp_path / "tok.png", format="a1111-png")
    pipe = bench.fresh_pipe()
    with pytest.raises(Exception), quiet():  # noqa: B017
        pipe.load_textual_inversion(str(tmp_path / "tok.png"), token="tok")


# -- OneTrainer ------------------------------------------------------------------------------------
def test_onetrainer_embedding_keys(tmp_path):
    """OneTrainer (Nerogar/OneTrainer, EmbeddingLoaderMixin at 35805c517ae0f4f04581be8118953459aa91786c
    and the SD / SDXL model setups): an embedding file is ``torch.load(weights_only=True)`` or
    ``load_file``; SD1.5 reads its own key ``emp_params`` (sic; ``StableDiffusionEmbeddingSaver``
    writes it), SDXL ``clip_l``/``clip_g``. So no SD1 layout of loradex loads there (kohya's is
    ``emb_params``), and SDXL kohya-ti / a1111-ti (``{clip_l, clip_g}``) do."""
    v = torch.randn(2, 768)
    sd1 = Adapter(embeddings={"t": loradex.Embedding("t", {"text_encoder": v})})
    for to in ("a1111-ti", "kohya-ti", "diffusers-ti"):
        p = tmp_path / f"{to}.safetensors"
        loradex.save(sd1, p, format=to)
        st = load_file(p)
        assert st.get("emp_params_out", st.get("emp_params")) is None, to
    sdxl = Adapter(embeddings={"t": loradex.Embedding("t", {"text_encoder": v, "text_encoder_2": torch.randn(2, 1280)})})
    for to in ("kohya-ti", "a1111-ti"):
        p = tmp_path / f"xl-{to}.safetensors"
        loradex.save(sdxl, p, format=to)
        st = load_file(p)
        assert torch.equal(st.get("clip_l_out", st.get("clip_l")), v), to
