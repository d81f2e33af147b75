"""Architecture tables and name maps (loradex.core.archs).

The facts checked here come from outside loradex: the published model configs (module shapes),
kohya sd-scripts' logs (module counts of a default LoRA), real kohya SDXL/FLUX key names, and the
conversion code shipped in diffusers (single-file SGM/BFL checkpoint converters, peft key names).
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from loradex import tiny
from loradex.core import archs as A
from loradex.core.archs import detect as D
from loradex.core.archs import tables as T
from loradex.errors import ArchError

BUILTINS = ("sd1", "sd2", "sdxl", "flux1")
TINY = ("tiny-sd1", "tiny-sdxl", "tiny-flux1")


@pytest.fixture(scope="module", autouse=True)
def tiny_archs():
    t0 = time.perf_counter()
    archs = {f"tiny-{k}": tiny.tiny_arch(k) for k in ("sd1", "sdxl", "flux1")}
    A.BUILD_TIMES.setdefault("tiny archs (3, live models)", time.perf_counter() - t0)
    return archs


def all_archs():
    return [A.get_arch(n) for n in BUILTINS + TINY]


# ---------------------------------------------------------------------------------------------
# the real tables against published facts
# ---------------------------------------------------------------------------------------------

SHAPES = {
    "sd1": {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": ("linear", (320, 768)),
        "unet.down_blocks.0.attentions.0.proj_in": ("conv", (320, 320, 1, 1)),  # SD1: 1x1 conv
        "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": ("linear", (10240, 1280)),
        "unet.conv_in": ("conv", (320, 4, 3, 3)),
        "unet.down_blocks.0.resnets.0.norm1": ("norm", (320,)),
        "unet.time_embedding.linear_1": ("linear", (1280, 320)),
        "text_encoder.text_model.encoder.layers.11.self_attn.q_proj": ("linear", (768, 768)),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1": ("linear", (3072, 768)),
        "text_encoder.text_model.embeddings.token_embedding": ("embedding", (49408, 768)),
        "text_encoder.text_model.embeddings.position_embedding": ("embedding", (77, 768)),
        "text_encoder.text_model.final_layer_norm": ("norm", (768,)),
    },
    "sd2": {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": ("linear", (320, 1024)),
        "unet.down_blocks.0.attentions.0.proj_in": ("linear", (320, 320)),  # SD2: linear projection
        "text_encoder.text_model.encoder.layers.22.self_attn.q_proj": ("linear", (1024, 1024)),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1": ("linear", (4096, 1024)),
        "text_encoder.text_model.embeddings.token_embedding": ("embedding", (49408, 1024)),
    },
    "sdxl": {
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k": ("linear", (640, 2048)),
        "unet.up_blocks.0.attentions.0.transformer_blocks.9.attn1.to_q": ("linear", (1280, 1280)),
        "unet.add_embedding.linear_1": ("linear", (1280, 2816)),
        "unet.up_blocks.0.upsamplers.0.conv": ("conv", (1280, 1280, 3, 3)),
        "unet.down_blocks.1.resnets.0.conv_shortcut": ("conv", (640, 320, 1, 1)),
        "text_encoder.text_model.encoder.layers.11.self_attn.q_proj": ("linear", (768, 768)),
        "text_encoder_2.text_model.encoder.layers.31.mlp.fc1": ("linear", (5120, 1280)),
        "text_encoder_2.text_projection": ("linear", (1280, 1280)),
        "text_encoder_2.text_model.embeddings.token_embedding": ("embedding", (49408, 1280)),
    },
    "flux1": {
        "transformer.transformer_blocks.0.attn.to_q": ("linear", (3072, 3072)),
        "transformer.transformer_blocks.18.attn.add_v_proj": ("linear", (3072, 3072)),
        "transformer.transformer_blocks.0.norm1.linear": ("linear", (18432, 3072)),
        "transformer.transformer_blocks.0.ff.net.0.proj": ("linear", (12288, 3072)),
        "transformer.transformer_blocks.0.attn.norm_q": ("norm", (128,)),
        "transformer.single_transformer_blocks.0.proj_mlp": ("linear", (12288, 3072)),
        "transformer.single_transformer_blocks.37.proj_out": ("linear", (3072, 15360)),
        "transformer.single_transformer_blocks.0.norm.linear": ("linear", (9216, 3072)),
        "transformer.x_embedder": ("linear", (3072, 64)),
        "transformer.context_embedder": ("linear", (3072, 4096)),
        "transformer.time_text_embed.guidance_embedder.linear_1": ("linear", (3072, 256)),
        "transformer.time_text_embed.text_embedder.linear_1": ("linear", (3072, 768)),
        "transformer.norm_out.linear": ("linear", (6144, 3072)),
        "transformer.proj_out": ("linear", (64, 3072)),
        "text_encoder.text_model.encoder.layers.11.mlp.fc2": ("linear", (768, 3072)),
        "text_encoder_2.encoder.block.23.layer.0.SelfAttention.q": ("linear", (4096, 4096)),
        "text_encoder_2.encoder.block.0.layer.0.SelfAttention.relative_attention_bias": (
            "embedding",
            (32, 64),
        ),
        "text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wi_0": ("linear", (10240, 4096)),
        "text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wo": ("linear", (4096, 10240)),
        "text_encoder_2.encoder.final_layer_norm": ("norm", (4096,)),
        "text_encoder_2.shared": ("embedding", (32128, 4096)),
    },
}


@pytest.mark.parametrize("name", BUILTINS)
def test_published_shapes(name):
    a = A.get_arch(name)
    for mod, (kind, shape) in SHAPES[name].items():
        info = a.module(mod)
        assert (info.type, info.shape) == (kind, shape), mod


def test_biases():
    sd1, sdxl, flux = A.get_arch("sd1"), A.get_arch("sdxl"), A.get_arch("flux1")
    assert not sd1.module("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").has_bias
    assert sd1.module("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0").has_bias
    assert sd1.module("text_encoder.text_model.encoder.layers.0.self_attn.q_proj").has_bias
    assert not sdxl.module("text_encoder_2.text_projection").has_bias
    assert flux.module("transformer.transformer_blocks.0.attn.to_q").has_bias
    assert not flux.module("transformer.transformer_blocks.0.attn.norm_q").has_bias
    assert not flux.module("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q").has_bias


def _count(a, comp, pred):
    return sum(1 for n, i in a.component_modules(comp).items() if pred(n, i))


def _indices(a, comp, prefix):
    """How many numbered children ``prefix<N>.`` the component has."""
    return len({n[len(prefix) :].split(".", 1)[0] for n in a.component_modules(comp) if n.startswith(prefix)})


def test_layer_and_block_counts():
    sd1, sd2, sdxl, flux = (A.get_arch(n) for n in BUILTINS)
    assert _indices(sd1, "text_encoder", "text_encoder.text_model.encoder.layers.") == 12
    # OpenCLIP-H minus its last layer, as diffusers ships it
    assert _indices(sd2, "text_encoder", "text_encoder.text_model.encoder.layers.") == 23
    assert _indices(sdxl, "text_encoder", "text_encoder.text_model.encoder.layers.") == 12
    assert _indices(sdxl, "text_encoder_2", "text_encoder_2.text_model.encoder.layers.") == 32
    assert _indices(sdxl, "unet", "unet.up_blocks.0.attentions.0.transformer_blocks.") == 10
    assert _indices(sdxl, "unet", "unet.down_blocks.2.attentions.1.transformer_blocks.") == 10
    assert _indices(sdxl, "unet", "unet.down_blocks.1.attentions.0.transformer_blocks.") == 2
    assert _indices(sdxl, "unet", "unet.mid_block.attentions.0.transformer_blocks.") == 10
    assert _indices(sd1, "unet", "unet.up_blocks.3.attentions.") == 3
    assert _indices(flux, "transformer", "transformer.transformer_blocks.") == 19
    assert _indices(flux, "transformer", "transformer.single_transformer_blocks.") == 38
    assert _indices(flux, "text_encoder_2", "text_encoder_2.encoder.block.") == 24
    fm = flux.component_modules("transformer")
    assert not any("to_out" in n for n in fm if "single_transformer_blocks" in n)  # pre-only attention


def test_kohya_default_module_counts():
    """What kohya sd-scripts logs for a default LoRA ("create LoRA for U-Net: 722 modules" for SDXL...)."""
    sd1, sd2, sdxl, flux = (A.get_arch(n) for n in BUILTINS)

    def unet_attn(n, i):  # Linear/Conv inside Transformer2DModel
        return ".attentions." in n and i.type in ("linear", "conv")

    def clip_attn_mlp(n, i):  # Linear inside CLIPAttention / CLIPMLP
        return i.type == "linear" and (".self_attn." in n or ".mlp." in n)

    assert _count(sd1, "unet", unet_attn) == 192
    assert _count(sd1, "text_encoder", clip_attn_mlp) == 72
    assert _count(sd2, "unet", unet_attn) == 192
    assert _count(sdxl, "unet", unet_attn) == 722
    assert _count(sdxl, "text_encoder", clip_attn_mlp) == 72
    assert _count(sdxl, "text_encoder_2", clip_attn_mlp) == 192
    flux_blocks = {
        flux.kohya_name(n)
        for n, i in flux.component_modules("transformer").items()
        if i.type == "linear" and ("transformer_blocks." in n)
    }
    # 19 double x 10 + 38 single x 3 (fused q/k/v counted once): the block names kohya's
    # networks/convert_flux_lora.py (and diffusers' port of it) convert
    assert len(flux_blocks) == 304
    assert len(flux.kohya_fusions()) == 19 * 2 + 38 + 1  # img/txt qkv, linear1, final adaLN (permuted)
    assert sd1.kohya_fusions() == {} and sdxl.kohya_fusions() == {}


def test_build_times_are_small(capsys):
    for n in BUILTINS:
        A.get_arch(n).modules  # noqa: B018 - builds every table
    tables = {k: v for k, v in A.BUILD_TIMES.items() if k.endswith(".json") and not k.startswith("tiny")}
    bundled = {f for fam in A.families().values() for files in fam.builtins.values() for f in files.values()}
    assert len(tables) <= len(bundled)  # each bundled config built at most once (the rest came from the disk cache)
    with capsys.disabled():
        print(
            "\narch table build times (s): "
            + ", ".join(f"{k}={v:.3f}" for k, v in sorted(A.BUILD_TIMES.items()))
        )
    assert all(v < 5.0 for v in tables.values()), tables


def test_lazy_per_component():
    # a fresh Arch over config loaders builds nothing until asked, then only what is asked
    calls = []

    def loader(c, f):
        inner = A.config_loader(c, T.load_config(f))

        def load():
            calls.append(c)
            return inner()

        return load

    a = A.Arch(
        "lazy-flux",
        "flux1",
        {
            "transformer": loader("transformer", "flux1_dev_transformer.json"),
            "text_encoder_2": loader("text_encoder_2", "t5_v1_1_xxl_encoder.json"),
        },
    )
    assert calls == []
    a.module("transformer.x_embedder")
    assert calls == ["transformer"]
    a.kohya_fusions()
    assert calls == ["transformer"]


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTINS + TINY)
def test_kohya_roundtrip_every_module(name):
    a = A.get_arch(name)
    fused_seen: dict[str, list] = {}
    for m in a.modules:
        assert a.canonical(m) == m
        flat = a.kohya_name(m)
        assert flat.startswith(a.kohya_prefixes[m.split(".", 1)[0]] + "_") and "." not in flat
        parts = a.from_kohya(flat)
        assert m in [p[0] for p in parts], (m, flat, parts)
        if parts[0][1] is None:
            assert parts == [(m, None)], (m, flat, parts)
        else:
            fused_seen[flat] = parts
        # alternates other tools write: the diffusers path flattened, any case
        comp, path = m.split(".", 1)
        assert a.resolve_flat(comp, path.replace(".", "_")) == [(m, None)] or parts == a.resolve_flat(
            comp, path.replace(".", "_")
        ), m
        assert m in [p[0] for p in a.from_kohya(flat.lower())]
    # fused names: the parts tile the stored weight's rows exactly
    assert fused_seen == a.kohya_fusions()
    for flat, parts in fused_seen.items():
        ranges = sorted(r for _, r in parts)
        assert ranges[0][0] == 0 and all(x[1] == y[0] for x, y in zip(ranges, ranges[1:])), flat
        for canon in {p[0] for p in parts}:
            assert sum(r[1] - r[0] for c, r in parts if c == canon) == a.module(canon).out_features


@pytest.mark.parametrize("name", BUILTINS + TINY)
def test_text_model_level_normalised(name):
    a = A.get_arch(name)
    for comp in a.text_encoders:
        if a.component_kind(comp) != "clip":
            continue
        m = f"{comp}.text_model.encoder.layers.0.self_attn.q_proj"
        assert a.canonical(f"{comp}.encoder.layers.0.self_attn.q_proj") == m
        assert a.canonical("encoder.layers.0.self_attn.q_proj", component=comp) == m
        assert a.canonical(f"{m}.base_layer") == m
        prefix = a.kohya_prefixes[comp]
        assert a.kohya_name(m) == f"{prefix}_text_model_encoder_layers_0_self_attn_q_proj"
        # lycoris-lora under transformers 5 drops text_model_
        assert a.from_kohya(f"{prefix}_encoder_layers_0_self_attn_q_proj") == [(m, None)]


@pytest.mark.parametrize("name", ("sd1", "sd2", "sdxl", "tiny-sd1", "tiny-sdxl"))
def test_sgm_roundtrip(name):
    a = A.get_arch(name)
    for m in a.component_modules("unet"):
        s = a.sgm_name(m)
        assert a.from_sgm(s) == [(m, None)]
        assert a.from_sgm("model.diffusion_model." + s) == [(m, None)]
        assert a.from_sgm("diffusion_model." + s) == [(m, None)]


@pytest.mark.parametrize("name", ("flux1", "tiny-flux1"))
def test_bfl_roundtrip_and_rows(name):
    a = A.get_arch(name)
    for m in a.component_modules("transformer"):
        parts = a.from_sgm(a.sgm_name(m))
        assert m in [p[0] for p in parts]
    for parts in a.kohya_fusions().values():
        total = max(r[1] for _, r in parts)
        x = torch.randn(total, 3)
        split = A.Arch.split_rows(parts, x)
        assert {k: v.shape[0] for k, v in split.items()} == {c: a.module(c).out_features for c, _ in parts}
        assert torch.equal(A.Arch.fuse_rows(parts, split), x)


KNOWN_SDXL_KOHYA = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "lora_unet_output_blocks_2_2_conv": "unet.up_blocks.0.upsamplers.0.conv",
    "lora_unet_input_blocks_1_0_in_layers_2": "unet.down_blocks.0.resnets.0.conv1",
    "lora_unet_input_blocks_3_0_op": "unet.down_blocks.0.downsamplers.0.conv",
    "lora_unet_input_blocks_7_1_transformer_blocks_9_ff_net_2": "unet.down_blocks.2.attentions.0.transformer_blocks.9.ff.net.2",
    "lora_unet_middle_block_1_proj_out": "unet.mid_block.attentions.0.proj_out",
    "lora_unet_middle_block_2_emb_layers_1": "unet.mid_block.resnets.1.time_emb_proj",
    "lora_unet_output_blocks_0_0_skip_connection": "unet.up_blocks.0.resnets.0.conv_shortcut",
    "lora_unet_output_blocks_1_0_in_layers_2": "unet.up_blocks.0.resnets.1.conv1",
    "lora_unet_output_blocks_5_0_out_layers_3": "unet.up_blocks.1.resnets.2.conv2",
    "lora_unet_output_blocks_5_2_conv": "unet.up_blocks.1.upsamplers.0.conv",
    "lora_unet_output_blocks_8_0_out_layers_3": "unet.up_blocks.2.resnets.2.conv2",
    "lora_unet_time_embed_0": "unet.time_embedding.linear_1",
    "lora_unet_label_emb_0_2": "unet.add_embedding.linear_2",
    "lora_unet_input_blocks_0_0": "unet.conv_in",
    "lora_unet_out_2": "unet.conv_out",
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    "lora_te2_text_model_encoder_layers_31_mlp_fc2": "text_encoder_2.text_model.encoder.layers.31.mlp.fc2",
}


def test_known_sdxl_kohya_names():
    a = A.get_arch("sdxl")
    for flat, canon in KNOWN_SDXL_KOHYA.items():
        assert a.from_kohya(flat) == [(canon, None)], flat
        assert a.kohya_name(canon) == flat
    # files from other trainers spell SDXL with diffusers paths: accepted on reading
    m = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    assert a.from_kohya("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k") == [(m, None)]


def test_known_sd1_names():
    a = A.get_arch("sd1")
    m = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert a.kohya_name(m) == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert a.kohya_name("text_encoder.text_model.encoder.layers.0.self_attn.q_proj") == (
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    )
    # SD1's SGM layout differs from SDXL's (4 levels, first up level without attention)
    assert a.sgm_name("unet.up_blocks.0.upsamplers.0.conv") == "output_blocks.2.1.conv"
    assert a.sgm_name("unet.up_blocks.1.upsamplers.0.conv") == "output_blocks.5.2.conv"
    assert a.sgm_name("unet.down_blocks.2.downsamplers.0.conv") == "input_blocks.9.0.op"
    assert a.sgm_name("unet.down_blocks.3.resnets.1.conv2") == "input_blocks.11.0.out_layers.3"
    # ComfyUI writes SD1 LoRAs with SGM names: readable as an alternate kohya spelling too
    assert a.from_kohya("lora_unet_input_blocks_1_1_proj_in") == [
        ("unet.down_blocks.0.attentions.0.proj_in", None)
    ]


KNOWN_FLUX_KOHYA = {
    "lora_unet_double_blocks_0_img_attn_proj": [("transformer.transformer_blocks.0.attn.to_out.0", None)],
    "lora_unet_double_blocks_5_txt_attn_proj": [("transformer.transformer_blocks.5.attn.to_add_out", None)],
    "lora_unet_double_blocks_0_img_mlp_0": [("transformer.transformer_blocks.0.ff.net.0.proj", None)],
    "lora_unet_double_blocks_0_txt_mlp_2": [("transformer.transformer_blocks.0.ff_context.net.2", None)],
    "lora_unet_double_blocks_0_img_mod_lin": [("transformer.transformer_blocks.0.norm1.linear", None)],
    "lora_unet_double_blocks_0_txt_mod_lin": [
        ("transformer.transformer_blocks.0.norm1_context.linear", None)
    ],
    "lora_unet_single_blocks_37_linear2": [("transformer.single_transformer_blocks.37.proj_out", None)],
    "lora_unet_single_blocks_0_modulation_lin": [
        ("transformer.single_transformer_blocks.0.norm.linear", None)
    ],
    "lora_unet_img_in": [("transformer.x_embedder", None)],
    "lora_unet_txt_in": [("transformer.context_embedder", None)],
    "lora_unet_time_in_in_layer": [("transformer.time_text_embed.timestep_embedder.linear_1", None)],
    "lora_unet_vector_in_out_layer": [("transformer.time_text_embed.text_embedder.linear_2", None)],
    "lora_unet_guidance_in_in_layer": [("transformer.time_text_embed.guidance_embedder.linear_1", None)],
    "lora_unet_final_layer_linear": [("transformer.proj_out", None)],
    "lora_unet_double_blocks_0_img_attn_qkv": [
        ("transformer.transformer_blocks.0.attn.to_q", (0, 3072)),
        ("transformer.transformer_blocks.0.attn.to_k", (3072, 6144)),
        ("transformer.transformer_blocks.0.attn.to_v", (6144, 9216)),
    ],
    "lora_unet_double_blocks_0_txt_attn_qkv": [
        ("transformer.transformer_blocks.0.attn.add_q_proj", (0, 3072)),
        ("transformer.transformer_blocks.0.attn.add_k_proj", (3072, 6144)),
        ("transformer.transformer_blocks.0.attn.add_v_proj", (6144, 9216)),
    ],
    "lora_unet_single_blocks_0_linear1": [
        ("transformer.single_transformer_blocks.0.attn.to_q", (0, 3072)),
        ("transformer.single_transformer_blocks.0.attn.to_k", (3072, 6144)),
        ("transformer.single_transformer_blocks.0.attn.to_v", (6144, 9216)),
        ("transformer.single_transformer_blocks.0.proj_mlp", (9216, 21504)),
    ],
    # BFL [shift | scale] vs diffusers [scale | shift]: a row permutation
    "lora_unet_final_layer_adaLN_modulation_1": [
        ("transformer.norm_out.linear", (3072, 6144)),
        ("transformer.norm_out.linear", (0, 3072)),
    ],
    "lora_te1_text_model_encoder_layers_11_mlp_fc2": [
        ("text_encoder.text_model.encoder.layers.11.mlp.fc2", None)
    ],
    "lora_te3_encoder_block_23_layer_1_DenseReluDense_wo": [
        ("text_encoder_2.encoder.block.23.layer.1.DenseReluDense.wo", None)
    ],
}


def test_known_flux_kohya_names():
    a = A.get_arch("flux1")
    for flat, parts in KNOWN_FLUX_KOHYA.items():
        assert a.from_kohya(flat) == parts, flat
        for canon, _ in parts:
            assert a.kohya_name(canon) == flat
    # diffusers-named FLUX files under the kohya prefix (and lora_transformer_) are read too
    assert a.from_kohya("lora_unet_transformer_blocks_0_attn_to_q") == [
        ("transformer.transformer_blocks.0.attn.to_q", None)
    ]
    assert a.from_kohya("lora_transformer_single_transformer_blocks_0_proj_mlp") == [
        ("transformer.single_transformer_blocks.0.proj_mlp", None)
    ]


def test_errors():
    a = A.get_arch("sd1")
    with pytest.raises(ArchError):
        a.module("unet.nope")
    with pytest.raises(ArchError):
        a.canonical("unet.down_blocks.9.resnets.0.conv1")
    with pytest.raises(ArchError):
        a.from_kohya("lora_unet_nope")
    with pytest.raises(ArchError):
        a.from_kohya("lora_te2_text_model_encoder_layers_0_self_attn_q_proj")  # no te2 in sd1
    with pytest.raises(ArchError):
        a.kohya_name("text_encoder_2.text_projection")
    with pytest.raises(ArchError):
        a.sgm_name("text_encoder.text_model.final_layer_norm")
    assert A.get_arch("sd3").family.name == "sd3"  # a built-in family now (core/archs/sd3.py)
    with pytest.raises(ArchError):
        A.get_arch("sd9")
    with pytest.raises(ArchError):
        A.register_arch(A.Arch("sdxl", "sdxl", {}))
    with pytest.raises(ArchError):
        A.arch_from_models({}, "nope")
    assert tiny.tiny_arch("sd3").name == "tiny-sd3"
    with pytest.raises(ArchError):
        tiny.tiny_arch("sd9")


# ---------------------------------------------------------------------------------------------
# cross-checks against the conversion code diffusers ships
# ---------------------------------------------------------------------------------------------


def _param_keys(info: A.ModuleInfo, base: str, weight: str = "weight") -> list[str]:
    return [f"{base}.{weight}"] + ([f"{base}.bias"] if info.has_bias else [])


@pytest.mark.parametrize("name", ("sd1", "sd2", "sdxl", "tiny-sdxl"))
def test_sgm_names_match_diffusers_single_file_converter(name):
    """diffusers' own LDM->diffusers checkpoint converter maps our SGM names back to the module paths."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    a = A.get_arch(name)
    if name.startswith("tiny"):
        config = dict(tiny.tiny_sdxl_unet().config)
    else:
        files = {"sd1": "sd15_unet.json", "sd2": "sd21_unet.json", "sdxl": "sdxl_base_unet.json"}
        config = {
            k: v
            for k, v in json.loads((T.CONFIG_DIR / files[name]).read_text()).items()
            if not k.startswith("_")
        }
    ckpt, expected = {}, set()
    for m, info in a.component_modules("unet").items():
        for sgm_key, key in zip(
            _param_keys(info, "model.diffusion_model." + a.sgm_name(m)), _param_keys(info, m[5:])
        ):
            shape = info.shape if sgm_key.endswith("weight") else (info.shape[0],)
            ckpt[sgm_key] = torch.empty(shape, device="meta")
            expected.add(key)
    out = convert_ldm_unet_checkpoint(ckpt, config)
    assert set(out) == expected


def test_bfl_names_match_diffusers_flux_converter():
    """diffusers' BFL->diffusers FLUX converter splits/permutes rows exactly as our parts say."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    a = A.get_arch("flux1")
    comp = a._comp("transformer")
    ckpt, sources = {}, {}
    for bfl, parts in comp.native_parts.items():
        info = a.module(parts[0][0])
        rows = max(r[1] for _, r in parts) if parts[0][1] is not None else info.out_features
        for key in _param_keys(info, bfl, "scale" if info.type == "norm" else "weight"):
            t = torch.arange(rows, dtype=torch.float32)  # row ids: where each row lands is checked below
            ckpt[key] = sources[key] = t if (info.type == "norm" or key.endswith("bias")) else t[:, None]
    out = convert_flux_transformer_checkpoint_to_diffusers(dict(ckpt))
    expected = set()
    for bfl, parts in comp.native_parts.items():
        info = a.module(parts[0][0])
        for key in _param_keys(info, bfl, "scale" if info.type == "norm" else "weight"):
            param = "bias" if key.endswith("bias") else "weight"
            for canon, rows in A.Arch.split_rows(parts, sources[key]).items():
                got = out[f"{canon[len('transformer.') :]}.{param}"]
                assert torch.equal(got.reshape(-1), rows.reshape(-1)), (key, canon)
                expected.add(f"{canon[len('transformer.') :]}.{param}")
    assert set(out) == expected


def test_kohya_flux_lora_matches_diffusers_converter():
    """diffusers' kohya-FLUX LoRA converter (kohya's convert_flux_lora facts) splits up/permutes like us."""
    conv = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    a = A.get_arch("flux1")
    flats = [
        "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_double_blocks_0_txt_mlp_0",
        "lora_unet_single_blocks_0_linear1",
        "lora_unet_single_blocks_0_linear2",
        "lora_unet_final_layer_adaLN_modulation_1",
    ]
    sd, ups = {}, {}
    for flat in flats:
        parts = a.from_kohya(flat)
        info = a.module(parts[0][0])
        rows = max(r[1] for _, r in parts) if parts[0][1] is not None else info.out_features
        ups[flat] = torch.arange(rows, dtype=torch.float32)[:, None]
        sd[f"{flat}.lora_up.weight"] = ups[flat]
        sd[f"{flat}.lora_down.weight"] = torch.ones(1, info.in_features)
        sd[f"{flat}.alpha"] = torch.tensor(1.0)
    out = conv._convert_kohya_flux_lora_to_diffusers(sd)
    for flat in flats:
        for canon, up in A.Arch.split_rows(a.from_kohya(flat), ups[flat]).items():
            path = canon[len("transformer.") :]
            # (diffusers leaves the final layer's keys without the "transformer." prefix)
            key = next(k for k in (f"{canon}.lora_B.weight", f"{path}.lora_B.weight") if k in out)
            assert torch.equal(out[key], up), (flat, canon)


# ---------------------------------------------------------------------------------------------
# live tiny models: the names diffusers/peft use for LoRA keys
# ---------------------------------------------------------------------------------------------

# (arch, component, model factory, what detect_arch says of a LoRA on that component alone)
TINY_MODELS = [
    ("tiny-sd1", "unet", lambda: tiny.tiny_unet(), "tiny-sd1"),
    # the same tiny CLIP is text_encoder of all three tiny archs: a LoRA on it alone is ambiguous
    ("tiny-sd1", "text_encoder", lambda: tiny.tiny_text_encoder(), None),
    ("tiny-sdxl", "unet", lambda: tiny.tiny_sdxl_unet(), "tiny-sdxl"),
    ("tiny-sdxl", "text_encoder_2", lambda: tiny.tiny_sdxl_text_encoders()[1], "tiny-sdxl"),
    ("tiny-flux1", "transformer", lambda: tiny.tiny_flux_transformer(), "tiny-flux1"),
    ("tiny-flux1", "text_encoder_2", lambda: tiny.tiny_t5(), "tiny-flux1"),
]


@pytest.mark.parametrize(
    "name,comp,factory,detected", TINY_MODELS, ids=[f"{n}-{c}" for n, c, _, _ in TINY_MODELS]
)
def test_peft_lora_keys_are_canonical(name, comp, factory, detected):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    model = factory()
    # every Linear/Conv2d, enumerated independently of loradex
    targets = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=targets), model)
    sd = get_peft_model_state_dict(model)
    paths = {k.rsplit(".", 2)[0] for k in sd if k.endswith((".lora_A.weight", ".lora_B.weight"))}
    a = A.get_arch(name)
    canon = {a.canonical(p, component=comp) for p in paths}
    expected = {n for n, i in a.component_modules(comp).items() if i.type in ("linear", "conv")}
    assert canon == expected
    # the diffusers file of that LoRA (component-prefixed keys) is detected as the tiny arch
    shapes = {f"{comp}.{k}": tuple(v.shape) for k, v in sd.items()}
    assert A.detect_arch(shapes) == detected


def test_lycoris_standalone_keys_resolve(monkeypatch):
    """A real lycoris-lora LoHa on the tiny unet (``lycoris_<diffusers path>`` keys)."""
    lycoris = pytest.importorskip("lycoris")
    from lycoris import LycorisNetwork

    # the class-level preset is global state in lycoris: set it for this test only
    monkeypatch.setattr(
        LycorisNetwork,
        "TARGET_REPLACE_MODULE",
        ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
    )
    net = lycoris.create_lycoris(tiny.tiny_unet(), 1.0, linear_dim=2, linear_alpha=1, algo="loha")
    net.apply_to()
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes and all(k.startswith("lycoris_") for k in shapes)
    a = A.get_arch("tiny-sd1")
    assert all(D._resolve_key(a, k) is not None for k in shapes)
    assert A.detect_arch(shapes) == "tiny-sd1"


# ---------------------------------------------------------------------------------------------
# detect_arch on synthetic files in every naming
# ---------------------------------------------------------------------------------------------


def _io(a, flat_or_parts):
    parts = flat_or_parts
    info = a.module(parts[0][0])
    out = max(r[1] for _, r in parts) if parts[0][1] is not None else info.out_features
    return out, info.in_features, info.kernel


def _lora(out, inn, kernel, r, down, up, key):
    d = {
        f"{key}.{down}": (r, inn, *kernel) if kernel else (r, inn),
        f"{key}.{up}": (out, r, 1, 1) if kernel else (out, r),
    }
    return d


def _targets(a):
    """What a typical LoRA patches: Linear/Conv in the denoiser's blocks + text encoder attention/MLP."""
    den = a.denoiser
    out = [
        n
        for n, i in a.component_modules(den).items()
        if i.type in ("linear", "conv") and ("attentions." in n or "transformer_blocks." in n)
    ]
    for te in a.text_encoders:
        out += [
            n
            for n, i in a.component_modules(te).items()
            if i.type == "linear" and (".self_attn." in n or ".mlp." in n or ".SelfAttention." in n)
        ]
    return out


def synth(a, naming, r=4, components=None):
    shapes: dict[str, tuple[int, ...]] = {}
    mods = [m for m in _targets(a) if components is None or m.split(".", 1)[0] in components]
    if naming in ("kohya", "kohya_tf5"):
        for flat in dict.fromkeys(a.kohya_name(m) for m in mods):
            if naming == "kohya_tf5":
                flat = flat.replace("_text_model_", "_", 1)
            out, inn, k = _io(a, a.from_kohya(flat))
            shapes.update(_lora(out, inn, k, r, "lora_down.weight", "lora_up.weight", flat))
            shapes[f"{flat}.alpha"] = ()
        return shapes
    for m in mods:
        comp, path = m.split(".", 1)
        out, inn, k = _io(a, [(m, None)])
        if naming == "diffusers":
            shapes.update(_lora(out, inn, k, r, "lora_A.weight", "lora_B.weight", m))
        elif naming == "diffusers_tf5":  # text encoder keys as transformers 5 names them
            shapes.update(
                _lora(out, inn, k, r, "lora_A.weight", "lora_B.weight", m.replace(".text_model.", ".", 1))
            )
        elif naming == "peft":
            if comp == a.denoiser:
                shapes.update(
                    _lora(out, inn, k, r, "lora_A.weight", "lora_B.weight", "base_model.model." + path)
                )
        elif naming == "lycoris":
            if comp == a.denoiser:
                key = "lycoris_" + path.replace(".", "_")
                shapes[f"{key}.hada_w1_a"] = shapes[f"{key}.hada_w2_a"] = (out, r)
                shapes[f"{key}.hada_w1_b"] = shapes[f"{key}.hada_w2_b"] = (r, inn * (k[0] * k[1] if k else 1))
        elif naming == "comfy":
            if comp == a.denoiser:
                key = "diffusion_model." + a.sgm_name(m)
                pout = _io(a, a.from_sgm(a.sgm_name(m)))[0]
                shapes.update(_lora(pout, inn, k, r, "lora_down.weight", "lora_up.weight", key))
            else:
                width = a.text_encoder_width(comp)
                enc = {768: "clip_l", 1024: "clip_h", 1280: "clip_g", 4096: "t5xxl"}.get(width)
                if enc is None:
                    enc = (
                        "clip_g"
                        if comp == "text_encoder_2" and a.component_kind(comp) == "clip"
                        else ("t5xxl" if a.component_kind(comp) == "t5" else "clip_l")
                    )
                shapes.update(
                    _lora(
                        out,
                        inn,
                        k,
                        r,
                        "lora_down.weight",
                        "lora_up.weight",
                        f"text_encoders.{enc}.transformer.{path}",
                    )
                )
        else:
            raise AssertionError(naming)
    return shapes


NAMINGS = ("kohya", "kohya_tf5", "diffusers", "diffusers_tf5", "peft", "lycoris", "comfy")


@pytest.mark.parametrize("name", BUILTINS + TINY)
@pytest.mark.parametrize("naming", NAMINGS)
def test_detect_every_naming(name, naming):
    a = A.get_arch(name)
    shapes = synth(a, naming)
    assert shapes
    assert A.detect_arch(shapes) == name


@pytest.mark.parametrize("name", ("sd1", "sd2"))
def test_detect_text_encoder_only(name):
    a = A.get_arch(name)
    assert A.detect_arch(synth(a, "kohya", components=("text_encoder",))) == name


def test_detect_unsure():
    assert A.detect_arch({}) is None
    assert A.detect_arch({"foo.bar": (3, 3), "baz": (1, 2, 3)}) is None
    # names alone cannot tell SD1 from SD2: self-attention of the first level has the same shapes
    sd1 = A.get_arch("sd1")
    keys = {
        k: v
        for k, v in synth(sd1, "kohya", components=("unet",)).items()
        if "down_blocks_0" in k and "attn1" in k
    }
    assert keys and A.detect_arch(keys) is None
    # CLIP-L alone under lora_te1 fits SDXL and FLUX.1 alike
    sdxl = A.get_arch("sdxl")
    assert A.detect_arch(synth(sdxl, "kohya", components=("text_encoder",))) is None
    # an SD3-style file: SD3 Medium and SD3.5 Medium have this module alike; the family's first size
    assert A.detect_arch({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": (4, 1536)}) == "sd3"


def test_detect_cross_attention_width_decides():
    # the same kohya name, told apart by the cross-attention context width (768 SD1 / 1024 SD2)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert A.detect_arch({f"{key}.lora_down.weight": (4, 768), f"{key}.lora_up.weight": (320, 4)}) == "sd1"
    assert A.detect_arch({f"{key}.lora_down.weight": (4, 1024), f"{key}.lora_up.weight": (320, 4)}) == "sd2"
    sgm = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    assert A.detect_arch({f"{sgm}.lora_down.weight": (4, 2048), f"{sgm}.lora_up.weight": (640, 4)}) == "sdxl"
    flux = "lora_unet_double_blocks_0_img_attn_qkv"
    assert (
        A.detect_arch({f"{flux}.lora_down.weight": (4, 3072), f"{flux}.lora_up.weight": (9216, 4)}) == "flux1"
    )


def test_detect_old_diffusers_layout():
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora"
    assert A.detect_arch({f"{key}.down.weight": (4, 768), f"{key}.up.weight": (320, 4)}) == "sd1"


def test_detect_textual_inversion():
    assert A.detect_arch({"emb_params": (2, 768)}) == "sd1"
    assert A.detect_arch({"emb_params": (2, 1024)}) == "sd2"
    assert A.detect_arch({"clip_l": (2, 768), "clip_g": (2, 1280)}) == "sdxl"
    assert A.detect_arch({"string_to_param.*": (3, 768)}) == "sd1"
    assert A.detect_arch({"<sks>": (768,)}) == "sd1"  # diffusers learned_embeds
    assert A.detect_arch({"<sks>": (1, 1024)}) == "sd2"
    assert A.detect_arch({"emb_params": (2, 4096)}) is None
    # tiny registered archs are matched by their widths
    assert A.detect_arch({"emb_params": (2, tiny.TINY_TE_DIM)}) == "tiny-sd1"
    assert A.detect_arch({"clip_l": (2, tiny.TINY_TE_DIM), "clip_g": (2, tiny.TINY_TE_DIM)}) == "tiny-sdxl"
    # a LoRA with a bundled embedding is decided by its modules
    shapes = synth(A.get_arch("sdxl"), "kohya")
    shapes["bundle_emb.sks.clip_l"] = (1, 768)
    assert A.detect_arch(shapes) == "sdxl"


def test_table_cache_round_trips_and_survives_damage(tmp_path, monkeypatch):
    """Tables are cached on disk between processes (building one costs the diffusers import);
    the cached table equals the built one, and a damaged cache file is rebuilt, not trusted."""
    monkeypatch.setenv("LORADEX_CACHE", str(tmp_path))
    cfg = T.load_config("clip_vit_l14_text.json")
    T.clear_memo()
    built = T.config_table(cfg)
    cache_file = T.table_cache_file(cfg)
    assert cache_file.is_file() and cache_file.parent.parent == tmp_path
    T.clear_memo()
    assert T.config_table(cfg) == built
    cache_file.write_text('{"modules": {"x": [1')
    T.clear_memo()
    assert T.config_table(cfg) == built
    T.clear_memo()


def test_a_new_family_is_one_class_and_one_registration(tmp_path):
    """Extension point: a family defined and registered here (an SD1-topology model whose kohya
    files use other prefixes) is usable by every layer without touching another file: derived
    archs, kohya names, ModelSpec, detection of a file written for it, block weights."""
    import loradex
    from loradex.core.adapter import Adapter
    from loradex.core.archs import family as F
    from loradex.core.archs.family import ComponentSpec, register_family
    from loradex.core.archs.sd1 import SD1
    from loradex.core.kinds.lora import LoraPatch

    class Toy(SD1):
        name, label, order = "toy", "Toy diffusion", 99
        components = (ComponentSpec("unet", "lora_toy", checkpoint=(("model.diffusion_model.", "native"),)),
                      ComponentSpec("text_encoder", "lora_toytext", comfy=("clip_l",)))
        builtins, tiny = {}, None
        modelspec_arch, kohya_version = "toy-diffusion", "toy_v1"

    register_family(Toy())
    try:
        a = A.arch_from_configs("toy", {"unet": T.load_config("tiny_sd1_unet.json"),
                                        "text_encoder": T.load_config("tiny_clip_text.json")})
        assert a.name.startswith("toy-") and a.family.name == "toy"
        m = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        assert a.kohya_name(m) == "lora_toy_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        shape = a.module(m).shape
        path = tmp_path / "toy.safetensors"
        loradex.save(Adapter(patches={m: LoraPatch(up=torch.randn(shape[0], 2), down=torch.randn(2, shape[1]))},
                             arch=a.name), path, "kohya")
        got = loradex.load(path)
        assert got.arch == a.name and got.metadata["modelspec.architecture"] == "toy-diffusion/lora"
        assert got.metadata["ss_base_model_version"] == "toy_v1"
        from loradex.merge.blocks import layouts

        assert max(layouts(a)) == 26  # the SD1 layouts it inherits
    finally:
        F._FAMILIES.pop("toy", None)
