"""Reading the spellings other tools write: ComfyUI, OneTrainer, old diffusers layouts, lycoris
wrapping a text encoder, PEFT folders made by peft itself. Each file is built with the same tensors
as a file in kohya/diffusers naming (or by the real tool) and checked numerically: ``delta()`` per
canonical module against the other spelling and against ``alpha / r * up @ down`` computed here,
and, where a real consumer exists, the model output after loading it there."""

from __future__ import annotations

import copy
import hashlib
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import loradex
from loradex.demo import make_lycoris_reference, make_peft_reference
from loradex.tiny import quiet, tiny_arch

COMFY_CLIP = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
COMFY_EXAMPLES = {
    "sd1": [
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight",
        "diffusion_model.output_blocks.2.1.proj_in.alpha",
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_up.weight",
    ],
    "sdxl": [
        "diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.alpha",
        "diffusion_model.middle_block.1.proj_out.lora_up.weight",
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_up.weight",
        "text_encoders.clip_g.transformer.text_model.encoder.layers.1.mlp.fc2.lora_down.weight",
    ],
}


def lora_factors(shape, rank: int, g: torch.Generator, scale: float = 0.1):
    """(up, down) of a LoRA on a module whose weight is ``shape`` (kohya/diffusers layout: a conv's
    down is a conv of the module's kernel, its up a 1x1 conv)."""
    out, inn, *k = shape
    if k:
        return (torch.randn(out, rank, 1, 1, generator=g) * scale,
                torch.randn(rank, inn, *k, generator=g) * scale)
    return torch.randn(out, rank, generator=g) * scale, torch.randn(rank, inn, generator=g) * scale


def hand_delta(up, down, alpha: float, shape) -> torch.Tensor:
    r = down.shape[0]
    return ((alpha / r) * (up.flatten(1).double() @ down.flatten(1).double())).reshape(shape)


def assert_deltas(adapter: loradex.Adapter, want: dict[str, torch.Tensor], other: loradex.Adapter | None = None):
    """Every canonical module's delta equals ``want`` (float64, by hand) and, bit for bit, the
    other spelling's."""
    assert set(adapter.patches) == set(want), sorted(set(adapter.patches) ^ set(want))[:5]
    for name, w in want.items():
        d = adapter.patches[name].delta()
        assert d.shape == w.shape, name
        assert torch.allclose(d.double(), w, rtol=1e-5, atol=1e-7), name
        if other is not None:
            assert torch.equal(d, other.patches[name].delta()), name


def linear_and_conv(arch, prefix: str = "") -> list[str]:
    return [m for m, i in arch.modules.items() if i.type in ("linear", "conv") and m.startswith(prefix)]


# ---- ComfyUI ------------------------------------------------------------------------------------
def comfy_and_kohya(arch, path_comfy, path_kohya, seed=0):
    """The same LoRA (every Linear/Conv of the UNet and text encoders, mixed ranks and alphas) in
    ComfyUI's spelling and in kohya's; returns the ComfyUI tensors and the deltas computed by hand."""
    g = torch.Generator().manual_seed(seed)
    comfy, kohya, want = {}, {}, {}
    for i, m in enumerate(linear_and_conv(arch)):
        shape = arch.module(m).shape
        rank, alpha = (4, 2, 8)[i % 3], float(1 + i % 4)
        up, down = lora_factors(shape, rank, g)
        comp, _, path = m.partition(".")
        name = "diffusion_model." + arch.sgm_name(m) if comp == "unet" else f"text_encoders.{COMFY_CLIP[comp]}.transformer.{path}"
        for sd, key in ((comfy, name), (kohya, arch.kohya_name(m))):
            sd[f"{key}.lora_up.weight"], sd[f"{key}.lora_down.weight"] = up, down
            sd[f"{key}.alpha"] = torch.tensor(alpha)
        want[m] = hand_delta(up, down, alpha, shape)
    save_file(comfy, str(path_comfy))
    save_file(kohya, str(path_kohya))
    return comfy, want


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_comfyui_spelling(tmp_path, kind):
    a = tiny_arch(kind)
    comfy, want = comfy_and_kohya(a, tmp_path / "comfy.safetensors", tmp_path / "kohya.safetensors")
    # the spellings ComfyUI writes (ldm paths under diffusion_model., transformers paths per CLIP)
    for key in COMFY_EXAMPLES[kind]:
        assert key in comfy, key
    c = loradex.load(tmp_path / "comfy.safetensors")
    k = loradex.load(tmp_path / "kohya.safetensors")
    assert c.source_format == "comfy" and k.source_format == "kohya"
    assert c.arch == k.arch == a.name and not c.notes
    assert_deltas(c, want, other=k)
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in c.patches
    # and ComfyUI's file writes back as the kohya one (same tensors, same keys)
    loradex.save(c, tmp_path / "back.safetensors", "kohya")
    back, ref = load_file(tmp_path / "back.safetensors"), load_file(tmp_path / "kohya.safetensors")
    assert set(back) == set(ref) and all(torch.equal(back[x], ref[x]) for x in ref)


# ---- OneTrainer (FLUX) --------------------------------------------------------------------------
@pytest.mark.parametrize("with_te", [False, True])
def test_onetrainer_flux_spelling(tmp_path, with_te):
    """OneTrainer: ``lora_transformer_<flattened diffusers path>`` for the FLUX transformer (every
    projection separate, no fused qkv), kohya ``lora_te1_`` for CLIP-L; against the diffusers file
    of the same tensors (``lora_adapter_metadata`` with the alphas)."""
    a = tiny_arch("flux1")
    g = torch.Generator().manual_seed(1)
    mods = linear_and_conv(a, "transformer.") + (linear_and_conv(a, "text_encoder.") if with_te else [])
    ot, dif, want, alphas = {}, {}, {}, {}
    for i, m in enumerate(mods):
        shape = a.module(m).shape
        alpha = float(1 + i % 3)
        up, down = lora_factors(shape, 4, g)
        comp, _, path = m.partition(".")
        key = "lora_transformer_" + path.replace(".", "_") if comp == "transformer" else a.kohya_name(m)
        ot[f"{key}.lora_up.weight"], ot[f"{key}.lora_down.weight"] = up, down
        ot[f"{key}.alpha"] = torch.tensor(alpha)
        dif[f"{m}.lora_B.weight"], dif[f"{m}.lora_A.weight"] = up, down
        alphas.setdefault(comp, {})[re.escape(path.removeprefix("text_model."))] = alpha
        want[m] = hand_delta(up, down, alpha, shape)
    assert "lora_transformer_single_transformer_blocks_0_proj_mlp.lora_up.weight" in ot
    assert "lora_transformer_transformer_blocks_1_attn_to_add_out.alpha" in ot
    meta = {}
    for comp, pattern in alphas.items():
        meta.update({f"{comp}.r": 4, f"{comp}.lora_alpha": 4.0, f"{comp}.alpha_pattern": pattern,
                     f"{comp}.target_modules": sorted(pattern)})
    save_file(ot, str(tmp_path / "onetrainer.safetensors"))
    save_file(dif, str(tmp_path / "diffusers.safetensors"), metadata={"lora_adapter_metadata": json.dumps(meta)})
    o = loradex.load(tmp_path / "onetrainer.safetensors")
    d = loradex.load(tmp_path / "diffusers.safetensors")
    assert o.arch == d.arch == "tiny-flux1" and not o.notes
    assert_deltas(o, want, other=d)
    # written as kohya, q/k/v are fused into BFL names and split back exactly
    loradex.save(o, tmp_path / "k.safetensors", "kohya")
    k = loradex.load(tmp_path / "k.safetensors")
    assert any(key.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for key in load_file(tmp_path / "k.safetensors"))
    assert set(k.patches) == set(want)
    for name, w in want.items():
        assert torch.allclose(k.patches[name].delta().double(), w, rtol=1e-5, atol=1e-7), name


# ---- old diffusers layouts ----------------------------------------------------------------------
_PROC = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_PROC_RANK = {"to_q": 4, "to_k": 2, "to_v": 4, "to_out": 8}
_CLIP = ("q_proj", "k_proj", "v_proj", "out_proj")


def old_layout(arch, g):
    """diffusers 0.14-0.20 attention-processor LoRA (UNet) + ``lora_linear_layer`` (text encoder),
    and the same tensors in today's layout. No alphas (scale 1); mixed ranks."""
    old, new, want = {}, {}, {}
    for m in linear_and_conv(arch):
        comp, _, path = m.partition(".")
        proc = next((p for p, real in _PROC.items() if comp == "unet" and re.search(rf"\.attn[12]\.{re.escape(real)}$", path)), None)
        clip = comp == "text_encoder" and path.endswith(_CLIP)
        if proc is None and not clip:
            continue
        shape = arch.module(m).shape
        up, down = lora_factors(shape, _PROC_RANK[proc] if proc else 2, g, scale=0.3)
        if proc:
            key = f"unet.{path[: -len(_PROC[proc])]}processor.{proc}_lora"
            old[f"{key}.down.weight"], old[f"{key}.up.weight"] = down, up
        else:
            old[f"{m}.lora_linear_layer.down.weight"], old[f"{m}.lora_linear_layer.up.weight"] = down, up
        new[f"{m}.lora_A.weight"], new[f"{m}.lora_B.weight"] = down, up
        want[m] = hand_delta(up, down, float(down.shape[0]), shape)
    return old, new, want


@pytest.mark.slow
def test_old_diffusers_layouts(bench, tmp_path):
    old, new, want = old_layout(bench.arch, torch.Generator().manual_seed(2))
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight" in old
    assert "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight" in old
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight" in old
    unprefixed = {k.removeprefix("unet."): v for k, v in old.items() if k.startswith("unet.")}
    for name, sd in (("old", old), ("new", new), ("unprefixed", unprefixed)):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    o, n = loradex.load(tmp_path / "old.safetensors"), loradex.load(tmp_path / "new.safetensors")
    assert o.arch == n.arch == bench.arch.name and not o.notes
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" in o.patches
    assert_deltas(o, want, other=n)
    u = loradex.load(tmp_path / "unprefixed.safetensors")  # attn-procs files saved from a UNet
    assert u.arch == bench.arch.name and not u.notes
    assert_deltas(u, {m: w for m, w in want.items() if m.startswith("unet.")}, other=n)

    # diffusers still loads the prefixed old layout: its outputs must equal those of loradex's
    # files. (diffusers 0.42 loads nothing, silently, from the unprefixed one; loradex's
    # conversion of it loads.)
    loradex.save(o, tmp_path / "ours.safetensors", "diffusers")
    loradex.save(u, tmp_path / "ours_unprefixed.safetensors", "diffusers")
    ids = bench.pipe.tokenizer(["a photo of a cat"], return_tensors="pt").input_ids
    outs = {}
    for name in ("old", "new", "ours", "ours_unprefixed"):
        pipe = bench.fresh_pipe()
        with quiet():
            pipe.load_lora_weights(str(tmp_path / f"{name}.safetensors"), adapter_name="old_layout")
        with torch.no_grad():
            outs[name] = bench.unet_out(pipe.unet), pipe.text_encoder(ids)[0].double()
    with torch.no_grad():
        te0 = bench.pipe.text_encoder(ids)[0].double()
    y_new, te_new = outs["new"]
    assert bench.rel(outs["old"][0], y_new) < 1e-6 and bench.rel(outs["ours"][0], y_new) < 1e-6
    assert bench.rel(outs["ours_unprefixed"][0], y_new) < 1e-6
    for name in ("old", "ours"):
        assert float((outs[name][1] - te_new).norm() / (te_new - te0).norm()) < 1e-6, name


# ---- lycoris wrapping a text encoder ------------------------------------------------------------
@pytest.mark.parametrize("algo", ["lora", "loha"])
def test_lycoris_text_encoder_prefix(bench, tmp_path, algo):
    """``create_lycoris(pipe.text_encoder)``: keys ``lycoris_encoder_layers_...`` (transformers 5:
    no ``text_model_``). Read, written back bit-identically, and loaded by lycoris-lora's
    ``create_lycoris_from_weights`` on a fresh text encoder with the same output."""
    from lycoris import create_lycoris, create_lycoris_from_weights

    from loradex.demo import lycoris_preset, randomize_

    ids = bench.pipe.tokenizer(["a photo of a cat"], return_tensors="pt").input_ids

    @torch.no_grad()
    def out(te):
        return te(ids)[0].double()

    te = copy.deepcopy(bench.pipe.text_encoder)
    y0 = out(te)
    with quiet(), lycoris_preset({"target_module": ["Linear"], "target_name": []}):
        net = create_lycoris(te, 1.0, linear_dim=4, linear_alpha=2.0, algo=algo)
        net.apply_to()
    randomize_(net, 3, scale=0.3)  # a change well above float32 noise
    y_ref = out(te)
    src = tmp_path / "te.safetensors"
    net.save_weights(str(src), torch.float32, {})
    keys = load_file(src)
    assert any(k.startswith("lycoris_encoder_layers_0_self_attn_q_proj.") for k in keys)
    assert not any("text_model" in k for k in keys)

    a = loradex.load(src, arch=bench.arch)  # the tiny CLIP is shared by several tiny archs
    assert a.source_format == "lycoris" and a.components() == {"text_encoder": 12}
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in a.patches
    loradex.save(a, tmp_path / "back.safetensors", "lycoris")
    back = load_file(tmp_path / "back.safetensors")
    assert set(back) == set(keys)
    for k, v in keys.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k

    te2 = copy.deepcopy(bench.pipe.text_encoder)
    with quiet():
        net2, _ = create_lycoris_from_weights(1.0, str(tmp_path / "back.safetensors"), te2)
        net2.apply_to()
    assert float((out(te2) - y_ref).norm() / (y_ref - y0).norm()) < 1e-6

    # the canonical names are right: patched by hand, the plain text encoder gives the same output
    te3 = copy.deepcopy(bench.pipe.text_encoder).double()
    mods = dict(te3.named_modules())
    with torch.no_grad():
        for name, p in a.patches.items():
            mods[name.partition(".")[2].removeprefix("text_model.")].weight += p.delta().double()
    assert float((out(te3) - y_ref).norm() / (y_ref - y0).norm()) < 1e-5


# ---- PEFT folders made by peft ------------------------------------------------------------------
_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"]


def _peft_config(kind: str):
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if kind == "lora":
        return LoraConfig(r=4, lora_alpha=8, target_modules=_TARGETS, rank_pattern={"conv1": 2},
                          alpha_pattern={"to_k": 3}, init_lora_weights=False)
    if kind == "loha":
        return LoHaConfig(r=4, alpha=8, target_modules=_TARGETS, rank_pattern={"conv1": 2},
                          alpha_pattern={"to_k": 3}, init_weights=False)
    if kind == "lokr":
        return LoKrConfig(r=4, alpha=8, target_modules=_TARGETS, decompose_both=True, decompose_factor=4,
                          alpha_pattern={"to_k": 3}, init_weights=False)
    # both halves full (peft: r >= half the larger factor side, no decompose_both); peft still
    # scales by alpha / r where LyCORIS' gamma would be 1
    return LoKrConfig(r=64, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"],
                      init_weights=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "lokr-full"])
def test_peft_folder_made_by_peft(bench, tmp_path, kind):
    from peft import PeftModel, get_peft_model

    lat, ctx = bench.latents.double(), bench.ctx.double()

    @torch.no_grad()
    def out(unet):
        return unet(lat, bench.t, encoder_hidden_states=ctx).sample

    def rel(y, y_ref):
        return float((y - y_ref).norm() / (y_ref - y_base).norm())

    y_base = out(bench.fresh_unet().double())
    with quiet():
        model = get_peft_model(bench.fresh_unet(), _peft_config(kind))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # init_*=False is random already; make the change large against fp noise
        for n, p in model.named_parameters():
            if any(s in n for s in ("lora_", "hada_", "lokr_")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    src = tmp_path / "peft"
    with quiet():
        model.save_pretrained(str(src))
    y_ref = out(model.double().base_model.model)
    file_keys = load_file(src / "adapter_model.safetensors")
    if kind == "lokr-full":
        assert {k.rsplit(".", 1)[1] for k in file_keys} == {"lokr_w1", "lokr_w2"}

    a = loradex.load(src)
    assert a.source_format == "peft" and a.arch == bench.arch.name and not a.notes
    assert set(a.kinds()) == {kind.split("-")[0]}
    assert len(a.patches) == len({re.sub(r"\.(lora_[AB]\.weight|hada_\w+|lokr_\w+)$", "", k) for k in file_keys})

    # by hand: every delta added to a fresh UNet's weights
    unet = bench.fresh_unet().double()
    mods = dict(unet.named_modules())
    with torch.no_grad():
        for name, p in a.patches.items():
            w = mods[name.partition(".")[2]].weight
            w += p.delta().double().reshape(w.shape)
    assert rel(out(unet), y_ref) < 1e-5
    if kind == "lokr-full":  # PEFT's alpha / r on kron(w1, w2), written out
        mod = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        w1, w2 = file_keys[f"base_model.model.{mod}.lokr_w1"], file_keys[f"base_model.model.{mod}.lokr_w2"]
        assert torch.allclose(a.patches[f"unet.{mod}"].delta().double(), (8 / 64) * torch.kron(w1, w2).double(),
                              rtol=1e-5, atol=1e-8)

    # diffusers loads loradex's diffusers file (exact LoRA forms of LoHa/LoKr) into a fresh UNet
    report = loradex.save(a, tmp_path / "d.safetensors", "diffusers")
    assert not report.approximated
    pipe = bench.fresh_pipe()
    with quiet():
        pipe.load_lora_weights(str(tmp_path / "d.safetensors"), adapter_name="from_peft")
    assert rel(out(pipe.unet.double()), y_ref) < 1e-5

    # PEFT -> PEFT: LoRA and LoHa folders keep every tensor bit for bit; LoKr becomes its exact
    # LoRA form (see the README's support matrix). All load back in peft with the same output.
    report = loradex.save(a, tmp_path / "again", "peft")
    assert not report.approximated
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    if kind in ("lora", "loha"):
        assert set(again) == set(file_keys)
        for k, v in file_keys.items():
            assert again[k].dtype == v.dtype and torch.equal(again[k], v), k
    with quiet():
        reloaded = PeftModel.from_pretrained(bench.fresh_unet(), str(tmp_path / "again"))
    assert rel(out(reloaded.double().base_model.model), y_ref) < 1e-5


# ---- same-format round trips --------------------------------------------------------------------
def test_diffusers_round_trip_is_bit_identical(bench, tmp_path):
    ref = make_peft_reference(bench, tmp_path)  # diffusers' save_lora_weights, mixed ranks/alphas, convs
    loradex.convert(ref.path, tmp_path / "again.safetensors", to="diffusers")
    src, out = load_file(ref.path), load_file(tmp_path / "again.safetensors")
    assert set(src) == set(out)
    for k, v in src.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k
    a, b = loradex.load(ref.path), loradex.load(tmp_path / "again.safetensors")
    assert {n: p.scale for n, p in a.patches.items()} == {n: p.scale for n, p in b.patches.items()}
    assert len({p.scale for p in a.patches.values()}) > 1  # the alpha/rank patterns survived


def test_kohya_round_trip_keeps_ss_metadata_and_hashes(bench, tmp_path):
    comfy_and_kohya(bench.arch, tmp_path / "c.safetensors", tmp_path / "k.safetensors")
    ss = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2",
          "ss_base_model_version": "sd_v1", "ss_steps": "1234", "ss_output_name": "my_lora",
          "ss_tag_frequency": json.dumps({"10_sks": {"sks": 10, "photo": 3}}),
          "ss_network_args": json.dumps({"conv_dim": "4"})}
    stale = {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "00000000"}
    save_file(load_file(tmp_path / "k.safetensors"), str(tmp_path / "src.safetensors"), metadata={**ss, **stale})
    loradex.convert(tmp_path / "src.safetensors", tmp_path / "out.safetensors", to="kohya")
    data = (tmp_path / "out.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    for k, v in ss.items():
        assert meta[k] == v, k
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n :]).hexdigest()
    assert meta["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    src, out = load_file(tmp_path / "src.safetensors"), load_file(tmp_path / "out.safetensors")
    assert set(src) == set(out) and all(torch.equal(src[k], out[k]) for k in src)


# ---- --arch that does not fit the file ----------------------------------------------------------
@pytest.fixture(scope="module")
def sd1_files(bench, tmp_path_factory):
    """One tiny-SD1 LoRA in every spelling loradex reads (the PEFT one as per-component folders)."""
    d = tmp_path_factory.mktemp("sd1_files")
    comfy_and_kohya(bench.arch, d / "comfy.safetensors", d / "kohya.safetensors")
    a = loradex.load(d / "kohya.safetensors", arch=bench.arch)
    loradex.save(a, d / "diffusers.safetensors", "diffusers")
    loradex.save(a, d / "peft", "peft")
    loradex.save(a, d / "lycoris.safetensors", "lycoris", component="unet")
    old, _, _ = old_layout(bench.arch, torch.Generator().manual_seed(3))
    save_file(old, str(d / "old_diffusers.safetensors"))
    names = ["kohya.safetensors", "comfy.safetensors", "diffusers.safetensors", "peft", "lycoris.safetensors",
             "old_diffusers.safetensors"]
    return d, names


@pytest.mark.parametrize("arch", ["sdxl", "flux1", "tiny-sdxl"])
def test_wrong_arch_is_a_clean_error(sd1_files, arch):
    d, names = sd1_files
    if arch == "tiny-sdxl":
        tiny_arch("sdxl")
    for name in names:
        assert loradex.load(d / name).arch == "tiny-sd1", name  # detected right without --arch
        with pytest.raises(loradex.LoradexError) as info:
            loradex.load(d / name, arch=arch)
        msg = str(info.value)
        assert msg and "\n" not in msg, (name, msg)


def test_peft_folder_rewrite_replaces_the_old_adapter_whole(bench, tmp_path):
    """Writing a UNet+TE adapter (per-component folders) over a flat PEFT folder must not leave the
    old flat adapter_config.json behind (the reader would pick it and lose the text encoder), and a
    folder that is not a PEFT folder is never overwritten."""
    from loradex.core.adapter import Adapter
    from loradex.core.kinds.lora import LoraPatch

    a = loradex.load(make_lycoris_reference(bench, "lora", tmp_path).path, arch=bench.arch)
    out = tmp_path / "peft"
    loradex.save(a, out, "peft")
    assert (out / "adapter_config.json").is_file()
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    both = Adapter({**a.patches, te: LoraPatch(up=torch.randn(32, 2), down=torch.randn(2, 32))}, arch=a.arch)
    loradex.save(both, out, "peft")
    assert not (out / "adapter_config.json").exists()
    back = loradex.load(out)
    assert te in back.patches and set(back.patches) == set(both.patches)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(loradex.FormatError):
        loradex.save(a, other, "peft")
    assert (other / "todo.txt").read_text() == "mine"
