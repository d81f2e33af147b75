"""Stable Diffusion 3 / 3.5 (core/archs/sd3.py) against facts from outside loradex.

* the published configs' tables (module counts and shapes of SD3 Medium, SD3.5 Medium, SD3.5 Large
  built on the meta device);
* the MMDiT names against diffusers' own single-file converter
  (``convert_sd3_transformer_checkpoint_to_diffusers``), fed row ids for the published sizes and real
  tensors for tiny SD3 and SD3.5-like transformers;
* real tools on the embedded tiny SD3 pipeline: a PEFT LoRA saved by
  ``StableDiffusion3Pipeline.save_lora_weights`` and loaded by ``load_lora_weights``, lycoris-lora's
  LoHa/LoKr forward, diffusers' ``fuse_lora`` for bakes, the pipeline itself for the engine and the
  trainer.

Errors are relative to what the adapter changes: ``||y - y_ref|| / ||y_ref - y_base||``.
"""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import loradex
from ckpt_util import flux_bfl_state_dict, sd3_single_file
from cli_util import run
from loradex import tiny
from loradex.core import archs as A
from loradex.demo import LYCORIS_ALGOS, lycoris_preset, randomize_
from loradex.log import quiet
from test_arch import synth

BUILTINS = ("sd3", "sd3.5-medium", "sd3.5-large")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    """The embedded tiny SD3 pipeline (never modified: tests work on copies)."""
    return tiny.tiny_pipeline("tiny-sd3")


def tiny35(seed: int = 0):
    """A second in-process tiny transformer with SD3.5's extras: RMS qk-norm and dual attention
    (``attn2``) in blocks 0 and 1 of 3, as SD3.5 Medium has them in blocks 0-12 of 24. 40 wide:
    its derived arch is registered in this process and detection tries such archs first, so it
    must not explain tiny-sd3's (48 wide) files."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    with quiet():
        return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
                                     attention_head_dim=8, num_attention_heads=5, joint_attention_dim=64,
                                     caption_projection_dim=40, pooled_projection_dim=64, pos_embed_max_size=32,
                                     qk_norm="rms_norm", dual_attention_layers=(0, 1)).eval()


@pytest.fixture(scope="module")
def t35():
    model = tiny35()
    return model, A.arch_from_models({"transformer": model}, family="sd3")


G = torch.Generator().manual_seed(2)
X, H, POOLED = torch.randn(1, 4, 8, 8, generator=G), torch.randn(1, 20, 64, generator=G), torch.randn(1, 64, generator=G)
IDS = torch.randint(0, 500, (1, 12), generator=G)


@torch.no_grad()
def tr_out(transformer) -> torch.Tensor:
    return transformer(hidden_states=X, encoder_hidden_states=H, pooled_projections=POOLED,
                       timestep=torch.tensor([500.0]), return_dict=False)[0].double()


@torch.no_grad()
def outputs(p) -> tuple[torch.Tensor, ...]:
    """The transformer's output on fixed inputs and both CLIPs' penultimate hidden states."""
    return (tr_out(p.transformer), *(getattr(p, c)(IDS, output_hidden_states=True).hidden_states[-2].double()
                                     for c in ("text_encoder", "text_encoder_2")))


def rel(y, y_ref, y_base) -> float:
    return float((y - y_ref).norm() / (y_ref - y_base).norm())


def loaded(pipe, path):
    """A copy of the pipeline with a LoRA file loaded by diffusers' ``load_lora_weights``."""
    p = copy.deepcopy(pipe)
    with quiet():
        p.load_lora_weights(str(path), adapter_name="sd3test")
    return p


# ---------------------------------------------------------------------------------------------
# the published configs' tables
# ---------------------------------------------------------------------------------------------

SHAPES = {
    "sd3": {
        "transformer.pos_embed.proj": ("conv", (1536, 16, 2, 2)),
        "transformer.time_text_embed.timestep_embedder.linear_1": ("linear", (1536, 256)),
        "transformer.time_text_embed.text_embedder.linear_1": ("linear", (1536, 2048)),
        "transformer.context_embedder": ("linear", (1536, 4096)),
        "transformer.transformer_blocks.0.norm1.linear": ("linear", (9216, 1536)),
        "transformer.transformer_blocks.0.attn.to_q": ("linear", (1536, 1536)),
        "transformer.transformer_blocks.0.ff.net.0.proj": ("linear", (6144, 1536)),
        "transformer.transformer_blocks.23.norm1_context.linear": ("linear", (3072, 1536)),
        "transformer.transformer_blocks.23.attn.add_q_proj": ("linear", (1536, 1536)),
        "transformer.norm_out.linear": ("linear", (3072, 1536)),
        "transformer.proj_out": ("linear", (64, 1536)),
        "text_encoder.text_projection": ("linear", (768, 768)),
        "text_encoder.text_model.encoder.layers.11.mlp.fc1": ("linear", (3072, 768)),
        "text_encoder_2.text_projection": ("linear", (1280, 1280)),
        "text_encoder_2.text_model.encoder.layers.31.self_attn.q_proj": ("linear", (1280, 1280)),
        "text_encoder_3.encoder.block.23.layer.0.SelfAttention.q": ("linear", (4096, 4096)),
        "text_encoder_3.encoder.block.0.layer.1.DenseReluDense.wi_0": ("linear", (10240, 4096)),
    },
    "sd3.5-medium": {
        "transformer.transformer_blocks.0.norm1.linear": ("linear", (13824, 1536)),  # 9 chunks: dual attention
        "transformer.transformer_blocks.13.norm1.linear": ("linear", (9216, 1536)),
        "transformer.transformer_blocks.12.attn2.to_q": ("linear", (1536, 1536)),
        "transformer.transformer_blocks.12.attn2.to_out.0": ("linear", (1536, 1536)),
        "transformer.transformer_blocks.0.attn2.norm_q": ("norm", (64,)),
        "transformer.transformer_blocks.0.attn.norm_added_k": ("norm", (64,)),
        "transformer.transformer_blocks.23.norm1_context.linear": ("linear", (3072, 1536)),
    },
    "sd3.5-large": {
        "transformer.transformer_blocks.0.norm1.linear": ("linear", (14592, 2432)),
        "transformer.transformer_blocks.37.norm1_context.linear": ("linear", (4864, 2432)),
        "transformer.transformer_blocks.37.attn.norm_added_q": ("norm", (64,)),
        "transformer.context_embedder": ("linear", (2432, 4096)),
        "transformer.proj_out": ("linear", (64, 2432)),
    },
}
#: (Linear, RMSNorm) in the transformer (facts: real_counts.py on the published configs)
COUNTS = {"sd3": (340, 0), "sd3.5-medium": (392, 122), "sd3.5-large": (536, 152)}


@pytest.mark.parametrize("name", BUILTINS)
def test_published_tables(name):
    a = A.get_arch(name)
    for mod, (kind, shape) in SHAPES[name].items():
        info = a.module(mod)
        assert (info.type, info.shape) == (kind, shape), mod
    tm = a.component_modules("transformer")
    assert (sum(i.type == "linear" for i in tm.values()), sum(i.type == "norm" for i in tm.values())) == COUNTS[name]
    depth = tm["transformer.proj_out"].in_features // 64
    last = f"transformer.transformer_blocks.{depth - 1}."

    def linears(prefix):
        return sum(1 for n, i in tm.items() if n.startswith(prefix) and i.type == "linear" and ".attn2." not in n)

    # 14 Linears per block, 11 in the last ("pre-only" context: no to_add_out, no ff_context), 7 outside
    assert all(linears(f"transformer.transformer_blocks.{b}.") == 14 for b in range(depth - 1))
    assert linears(last) == 11 and f"{last}attn.add_q_proj" in tm and f"{last}attn.to_add_out" not in tm
    assert sum(1 for n, i in tm.items() if i.type == "linear" and ".transformer_blocks." not in n) == 7
    assert a.module("transformer.transformer_blocks.0.attn.to_q").has_bias
    assert a.text_encoders == ("text_encoder", "text_encoder_2", "text_encoder_3")
    assert a.component_kind("text_encoder_3") == "t5" and a.text_encoder_width("text_encoder_3") == 4096


def test_kohya_default_module_counts():
    """A default kohya SD3 LoRA (networks/lora_sd3.py: every Linear of each x_block and context_block,
    q/k/v fused) has 10 modules per block, 7 in the last one, 2 more per dual-attention block."""
    for name, n in {"sd3": 237, "sd3.5-medium": 263, "sd3.5-large": 377}.items():
        a = A.get_arch(name)
        names = {a.kohya_name(m) for m, i in a.component_modules("transformer").items()
                 if i.type == "linear" and ".transformer_blocks." in m}
        assert len(names) == n, name
        assert all(f.startswith("lora_unet_joint_blocks_") for f in names)


# ---------------------------------------------------------------------------------------------
# naming: kohya and MMDiT round trips, diffusers' converter
# ---------------------------------------------------------------------------------------------


def _arch(name, t35):
    return t35[1] if name == "tiny35" else A.get_arch(name)


@pytest.mark.parametrize("name", (*BUILTINS, "tiny-sd3", "tiny35"))
def test_every_module_round_trips(name, t35):
    a = _arch(name, t35)
    native = a._comp("transformer").native
    assert set(native) == set(a.component_modules("transformer"))  # every module has an MMDiT name
    for m in a.modules:
        assert a.canonical(m) == m
        flat = a.kohya_name(m)
        assert flat.startswith(a.kohya_prefixes[m.split(".", 1)[0]] + "_") and "." not in flat
        assert m in [p[0] for p in a.from_kohya(flat)]
        assert m in [p[0] for p in a.from_kohya(flat.lower())]
        if m.startswith("transformer."):
            mm = a.sgm_name(m)
            assert flat == "lora_unet_" + mm.replace(".", "_")  # kohya flattens the MMDiT names
            for pre in ("", "model.diffusion_model.", "diffusion_model."):
                assert m in [p[0] for p in a.from_sgm(pre + mm)]
    fusions = a.kohya_fusions()
    assert fusions
    for flat, parts in fusions.items():
        ranges = sorted(r for _, r in parts)
        assert ranges[0][0] == 0 and all(x[1] == y[0] for x, y in zip(ranges, ranges[1:])), flat
        x = torch.randn(ranges[-1][1], 2)
        split = A.Arch.split_rows(parts, x)
        assert {k: v.shape[0] for k, v in split.items()} == {c: a.module(c).out_features for c, _ in parts}
        assert torch.equal(A.Arch.fuse_rows(parts, split), x)


def test_known_mmdit_names():
    a = A.get_arch("sd3.5-medium")
    b = "transformer.transformer_blocks"
    known = {
        "lora_unet_joint_blocks_0_x_block_attn_qkv": [(f"{b}.0.attn.to_q", (0, 1536)), (f"{b}.0.attn.to_k", (1536, 3072)),
                                                      (f"{b}.0.attn.to_v", (3072, 4608))],
        "lora_unet_joint_blocks_23_context_block_attn_qkv": [(f"{b}.23.attn.add_q_proj", (0, 1536)),
                                                             (f"{b}.23.attn.add_k_proj", (1536, 3072)),
                                                             (f"{b}.23.attn.add_v_proj", (3072, 4608))],
        "lora_unet_joint_blocks_12_x_block_attn2_qkv": [(f"{b}.12.attn2.to_q", (0, 1536)),
                                                        (f"{b}.12.attn2.to_k", (1536, 3072)),
                                                        (f"{b}.12.attn2.to_v", (3072, 4608))],
        "lora_unet_joint_blocks_12_x_block_attn2_proj": [(f"{b}.12.attn2.to_out.0", None)],
        "lora_unet_joint_blocks_0_x_block_attn_proj": [(f"{b}.0.attn.to_out.0", None)],
        "lora_unet_joint_blocks_0_context_block_attn_proj": [(f"{b}.0.attn.to_add_out", None)],
        "lora_unet_joint_blocks_0_x_block_attn_ln_q": [(f"{b}.0.attn.norm_q", None)],
        "lora_unet_joint_blocks_0_context_block_attn_ln_k": [(f"{b}.0.attn.norm_added_k", None)],
        "lora_unet_joint_blocks_5_x_block_attn2_ln_k": [(f"{b}.5.attn2.norm_k", None)],
        "lora_unet_joint_blocks_0_x_block_mlp_fc1": [(f"{b}.0.ff.net.0.proj", None)],
        "lora_unet_joint_blocks_22_context_block_mlp_fc2": [(f"{b}.22.ff_context.net.2", None)],
        "lora_unet_joint_blocks_0_x_block_adaLN_modulation_1": [(f"{b}.0.norm1.linear", None)],
        "lora_unet_joint_blocks_22_context_block_adaLN_modulation_1": [(f"{b}.22.norm1_context.linear", None)],
        # the pre-only context modulation and the final layer: [shift | scale] vs [scale | shift]
        "lora_unet_joint_blocks_23_context_block_adaLN_modulation_1": [(f"{b}.23.norm1_context.linear", (1536, 3072)),
                                                                       (f"{b}.23.norm1_context.linear", (0, 1536))],
        "lora_unet_final_layer_adaLN_modulation_1": [("transformer.norm_out.linear", (1536, 3072)),
                                                     ("transformer.norm_out.linear", (0, 1536))],
        "lora_unet_final_layer_linear": [("transformer.proj_out", None)],
        "lora_unet_x_embedder_proj": [("transformer.pos_embed.proj", None)],
        "lora_unet_t_embedder_mlp_0": [("transformer.time_text_embed.timestep_embedder.linear_1", None)],
        "lora_unet_y_embedder_mlp_2": [("transformer.time_text_embed.text_embedder.linear_2", None)],
        "lora_unet_context_embedder": [("transformer.context_embedder", None)],
        "lora_te1_text_model_encoder_layers_11_self_attn_q_proj": [("text_encoder.text_model.encoder.layers.11.self_attn.q_proj", None)],
        "lora_te2_text_model_encoder_layers_31_mlp_fc2": [("text_encoder_2.text_model.encoder.layers.31.mlp.fc2", None)],
        "lora_te3_encoder_block_23_layer_1_DenseReluDense_wo": [("text_encoder_3.encoder.block.23.layer.1.DenseReluDense.wo", None)],
    }
    for flat, parts in known.items():
        assert a.from_kohya(flat) == parts, flat
        for canon, _ in parts:
            assert a.kohya_name(canon) == flat
    # other trainers' spellings of the transformer: diffusers paths under lora_unet_ / lora_transformer_
    assert a.from_kohya("lora_transformer_transformer_blocks_0_attn2_to_q") == [(f"{b}.0.attn2.to_q", None)]
    assert a.from_kohya("lora_unet_transformer_blocks_0_attn_add_k_proj") == [(f"{b}.0.attn.add_k_proj", None)]


def _param_keys(info, base):
    return [f"{base}.weight"] + ([f"{base}.bias"] if info.has_bias else [])


@pytest.mark.parametrize("name", BUILTINS)
def test_mmdit_names_match_diffusers_converter(name):
    """diffusers' MMDiT->diffusers converter splits and swaps rows exactly as our parts say (row ids
    as tensors: where each row lands is checked)."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    a = A.get_arch(name)
    comp = a._comp("transformer")
    ckpt, sources = {"model.diffusion_model.pos_embed": torch.zeros(1, 4, 1)}, {}
    for mm, parts in comp.native_parts.items():
        info = a.module(parts[0][0])
        rows = max(r[1] for _, r in parts) if parts[0][1] is not None else info.out_features
        for key in _param_keys(info, mm):
            t = torch.arange(rows, dtype=torch.float32)
            ckpt["model.diffusion_model." + key] = sources[key] = t if (info.type == "norm" or key.endswith("bias")) else t[:, None]
    out = convert_sd3_transformer_checkpoint_to_diffusers(dict(ckpt))
    expected = {"pos_embed.pos_embed"}
    for mm, parts in comp.native_parts.items():
        info = a.module(parts[0][0])
        for key in _param_keys(info, mm):
            param = key.rsplit(".", 1)[1]
            for canon, rows in A.Arch.split_rows(parts, sources[key]).items():
                got = out[f"{canon[len('transformer.'):]}.{param}"]
                assert torch.equal(got.reshape(-1), rows.reshape(-1)), (key, canon)
                expected.add(f"{canon[len('transformer.'):]}.{param}")
    assert set(out) == expected


@pytest.mark.parametrize("which", ("tiny-sd3", "tiny35"))
def test_mmdit_state_dict_converts_back_exactly(which, pipe, t35):
    """Real weights: a transformer written in MMDiT names with our parts (tests/ckpt_util.py) is turned
    back into every diffusers tensor, bit for bit, by diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    model, a = (pipe.transformer, tiny.tiny_arch("sd3")) if which == "tiny-sd3" else t35
    sd = flux_bfl_state_dict(model, a)
    sd["pos_embed"] = model.pos_embed.pos_embed
    out = convert_sd3_transformer_checkpoint_to_diffusers({f"model.diffusion_model.{k}": v for k, v in sd.items()})
    ref = model.state_dict()
    assert set(out) == set(ref)
    assert all(torch.equal(out[k], v) for k, v in ref.items())


@pytest.mark.parametrize("name", BUILTINS)
def test_config_inferred_from_single_file_shapes(name):
    """A single file's MMDiT shapes (plus the pos_embed buffer) give back the published config's
    arch (the same modules), the family found by its keys alone."""
    from loradex.converters.checkpoint import single_file_arch
    from loradex.core.archs.sd3 import sd3_config_from_mmdit
    from loradex.core.archs.tables import load_config

    a = A.get_arch(name)
    cfg = load_config(a.family.builtins[name]["transformer"])
    shapes = {"model.diffusion_model.pos_embed": (1, cfg["pos_embed_max_size"] ** 2, 64 * cfg["num_layers"])}
    for mm, parts in a._comp("transformer").native_parts.items():
        info = a.module(parts[0][0])
        rows = max(r[1] for _, r in parts) if parts[0][1] is not None else info.out_features
        shapes[f"model.diffusion_model.{mm}.weight"] = (rows, *info.shape[1:])
        if info.has_bias:
            shapes[f"model.diffusion_model.{mm}.bias"] = (rows,)
    assert single_file_arch(shapes, {}).name == name
    got = sd3_config_from_mmdit({k[len("model.diffusion_model."):]: s for k, s in shapes.items()})
    for k in ("num_layers", "attention_head_dim", "num_attention_heads", "pos_embed_max_size", "patch_size",
              "in_channels", "joint_attention_dim", "pooled_projection_dim", "caption_projection_dim"):
        assert got[k] == cfg[k], k
    assert got["dual_attention_layers"] == cfg.get("dual_attention_layers", [])
    assert got["qk_norm"] == cfg.get("qk_norm")


# ---------------------------------------------------------------------------------------------
# detection and what is written
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", (*BUILTINS, "tiny-sd3"))
@pytest.mark.parametrize("naming", ("kohya", "diffusers", "peft", "lycoris", "comfy"))
def test_detect_every_naming(name, naming):
    shapes = synth(A.get_arch(name), naming)
    assert shapes and A.detect_arch(shapes) == name


def test_detect_ties_and_metadata(t35):
    # one module both SD3 Medium and SD3.5 Medium have, alike: the family's first size
    key = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    assert A.detect_arch({f"{key}.lora_down.weight": (4, 1536), f"{key}.lora_up.weight": (4608, 4)}) == "sd3"
    assert A.detect_arch({f"{key}.lora_down.weight": (4, 2432), f"{key}.lora_up.weight": (7296, 4)}) == "sd3.5-large"
    dual = "lora_unet_joint_blocks_3_x_block_attn2_qkv"
    assert A.detect_arch({f"{dual}.lora_down.weight": (4, 1536), f"{dual}.lora_up.weight": (4608, 4)}) == "sd3.5-medium"
    # ComfyUI / ModelSpec / kohya names of the sizes, dotted or not
    fam = A.get_family("sd3")
    for meta in ({"modelspec.architecture": "stable-diffusion-3-5-large/lora"},
                 {"modelspec.architecture": "stable-diffusion-3.5-medium/lora"},
                 {"ss_base_model_version": "5-large"}, {"ss_base_model_version": "medium"}):
        assert fam.matches_metadata(meta), meta
    assert not fam.matches_metadata({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})
    big = {f"{key}.lora_down.weight": (4, 2432), f"{key}.lora_up.weight": (7296, 4)}
    assert A.detect_arch(big, {"ss_base_model_version": "5-large"}) == "sd3.5-large"
    # the derived SD3.5-like tiny transformer explains its own files
    assert A.detect_arch(synth(t35[1], "kohya")) == t35[1].name


def test_written_metadata_names_the_size(t35):
    from loradex.converters.metadata import kohya_ss, modelspec
    from loradex.core.adapter import Adapter
    from loradex.registry.hub import _family_facts

    want = {"sd3": ("stable-diffusion-3-medium", "medium"), "sd3.5-medium": ("stable-diffusion-3-5-medium", "5-medium"),
            "sd3.5-large": ("stable-diffusion-3-5-large", "5-large")}
    for name, (spec, ver) in want.items():
        ad = Adapter(arch=name)
        assert modelspec(ad, "t")["modelspec.architecture"] == f"{spec}/textual-inversion"
        assert kohya_ss(ad, "t")["ss_base_model_version"] == ver
    fam = A.get_family("sd3")
    # a derived size gets the id of the published one it is closest to
    assert fam.modelspec_id(t35[1]) == "stable-diffusion-3-5-medium"
    # (an Arch object of its own: registering it would let it explain SD3.5 Large files in later tests)
    cfg = {**json.loads((A.CONFIG_DIR / "sd35_large_transformer.json").read_text()), "num_layers": 30}
    large30 = A.Arch("large30", "sd3", {"transformer": A.config_loader("transformer", cfg)}, configs={"transformer": cfg})
    assert fam.kohya_base_version(large30) == "5-large" and fam.modelspec_id(large30) == "stable-diffusion-3-5-large"
    # an arch known only by its tables (live models): the size is read from the modules
    tm = A.get_arch("sd3.5-medium").component_modules("transformer")
    assert fam.modelspec_id(A.Arch("live35", "sd3", {"transformer": lambda: ("other", tm)})) == "stable-diffusion-3-5-medium"
    tiny_arch = tiny.tiny_arch("sd3")
    assert fam.modelspec_id(tiny_arch) == "tiny-sd3" and fam.kohya_base_version(tiny_arch) is None
    repo, tags, lic = _family_facts("sd3")
    assert repo == "stabilityai/stable-diffusion-3-medium-diffusers" and "sd3" in tags and lic == "other"


def test_block_weight_layout():
    from loradex.merge import blocks as B

    lay = B.layouts("sd3")
    assert list(lay) == [28] and lay[28][:4] == ("CLIP", "T5", "IN", "J00") and lay[28][-2:] == ("J23", "OUT")
    assert list(B.layouts("sd3.5-large")) == [42]
    assert B.block_of("sd3", "transformer.transformer_blocks.7.attn.to_q") == "J07"
    assert B.block_of("sd3", "transformer.pos_embed.proj") == "IN"
    assert B.block_of("sd3", "transformer.context_embedder") == "IN"
    assert B.block_of("sd3", "transformer.norm_out.linear") == "OUT"
    assert B.block_of("sd3", "text_encoder_2.text_model.encoder.layers.0.mlp.fc1") == "CLIP"
    assert B.block_of("sd3", "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q") == "T5"


# ---------------------------------------------------------------------------------------------
# the tiny pipeline and the real tools
# ---------------------------------------------------------------------------------------------


def test_tiny_pipeline(pipe):
    from loradex.core.archs import select_family
    from loradex.core.archs.tables import live_config

    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert select_family({c: live_config(getattr(pipe, c)) for c in ("transformer", "text_encoder")},
                         "StableDiffusion3Pipeline").name == "sd3"
    best = 1e9
    for _ in range(3):
        t0 = time.perf_counter()
        img = pipe("a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
        best = min(best, time.perf_counter() - t0)
    assert img.shape == (1, 32, 32, 3) and img.std() > 0
    assert best < 0.5, best


@pytest.fixture(scope="module")
def peft_ref(pipe, tmp_path_factory):
    """A PEFT LoRA on the tiny SD3 transformer (attention, the last block's context modulation, the
    final modulation; mixed ranks/alphas) and both CLIPs, saved by diffusers' save_lora_weights;
    the outputs of the PEFT-wrapped models."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    p = copy.deepcopy(pipe)
    tcfg = LoraConfig(r=4, lora_alpha=8, rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 3},
                      target_modules=["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0",
                                      "to_add_out", "norm1_context.linear", "norm_out.linear", "ff.net.2"])
    ccfg = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"])
    with quiet():
        inject_adapter_in_model(tcfg, p.transformer)
        inject_adapter_in_model(ccfg, p.text_encoder)
        inject_adapter_in_model(ccfg, p.text_encoder_2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in (p.transformer, p.text_encoder, p.text_encoder_2):
            for n, prm in m.named_parameters():
                if "lora_" in n:
                    prm.copy_(torch.randn(prm.shape, generator=g) * 0.2)
    d = tmp_path_factory.mktemp("sd3_peft")
    with quiet():
        StableDiffusion3Pipeline.save_lora_weights(
            d, transformer_lora_layers=get_peft_model_state_dict(p.transformer),
            text_encoder_lora_layers=get_peft_model_state_dict(p.text_encoder),
            text_encoder_2_lora_layers=get_peft_model_state_dict(p.text_encoder_2),
            transformer_lora_adapter_metadata=tcfg.to_dict(), text_encoder_lora_adapter_metadata=ccfg.to_dict(),
            text_encoder_2_lora_adapter_metadata=ccfg.to_dict(), safe_serialization=True)
    return d / "pytorch_lora_weights.safetensors", outputs(p), outputs(pipe)


def test_peft_lora_through_kohya_and_back(peft_ref, pipe, tmp_path):
    """diffusers file -> loradex -> kohya (MMDiT names, fused q/k/v) -> loradex -> diffusers file ->
    load_lora_weights: the transformer and both CLIPs give what the PEFT-wrapped models gave."""
    src, y_ref, y_base = peft_ref
    a = loradex.load(src)
    assert a.arch == "tiny-sd3" and len(a.patches) == 20 + 2 * 2 * 5
    loradex.save(a, tmp_path / "k.safetensors", "kohya")
    k = loradex.load(tmp_path / "k.safetensors")
    assert k.arch == "tiny-sd3" and set(k.patches) == set(a.patches)
    loradex.save(k, tmp_path / "d.safetensors", "diffusers")
    for f in (src, tmp_path / "d.safetensors"):
        got = outputs(loaded(pipe, f))
        for y, r, b in zip(got, y_ref, y_base):
            assert rel(y, r, b) < 1e-5, f


def test_kohya_file_layout_is_the_facts(peft_ref, tmp_path):
    """kohya's SD3 layout (networks/lora_sd3.py; diffusers' own converter facts): q/k/v in one
    ``attn_qkv`` module, ``lora_down`` = the three downs stacked, ``lora_up`` block-diagonal (the
    same dense update: alpha and scales folded so that up * alpha/rank = blockdiag(B_q s_q, ...)),
    the pre-only context modulation and the final layer with their row halves swapped."""
    src, _, _ = peft_ref
    d = load_file(src)
    meta = json.loads(loradex.load(src).metadata["lora_adapter_metadata"])
    a = loradex.load(src)
    loradex.save(a, tmp_path / "k.safetensors", "kohya")
    k = load_file(tmp_path / "k.safetensors")
    assert not any(n.startswith("lora_unet_transformer_blocks") for n in k)
    pre, flat = "transformer.transformer_blocks.0.attn.", "lora_unet_joint_blocks_0_x_block_attn_qkv"
    downs = [d[f"{pre}{x}.lora_A.weight"] for x in ("to_q", "to_k", "to_v")]
    ranks = [t.shape[0] for t in downs]
    assert ranks == [4, 2, 4] and meta["transformer.alpha_pattern"] == {"to_v": 3}
    scales = [8 / 4, 8 / 2, 3 / 4]
    assert torch.equal(k[f"{flat}.lora_down.weight"], torch.cat(downs))
    up = k[f"{flat}.lora_up.weight"] * (float(k[f"{flat}.alpha"]) / sum(ranks))
    want = torch.block_diag(*(d[f"{pre}{x}.lora_B.weight"] * s for x, s in zip(("to_q", "to_k", "to_v"), scales)))
    assert torch.allclose(up, want, rtol=1e-6, atol=0) and torch.count_nonzero(up) == torch.count_nonzero(want)
    for flat, canon in (("lora_unet_joint_blocks_1_context_block_adaLN_modulation_1", "transformer_blocks.1.norm1_context.linear"),
                        ("lora_unet_final_layer_adaLN_modulation_1", "norm_out.linear")):
        up_d = d[f"transformer.{canon}.lora_B.weight"]
        half = up_d.shape[0] // 2
        assert torch.equal(k[f"{flat}.lora_up.weight"], torch.cat([up_d[half:], up_d[:half]]))  # [shift | scale]
        assert torch.equal(k[f"{flat}.lora_down.weight"], d[f"transformer.{canon}.lora_A.weight"])
        assert float(k[f"{flat}.alpha"]) == 8.0
    # a block that is not the last one keeps diffusers' order (6 chunks, no swap); CLIP names are kohya's
    flat = "lora_unet_joint_blocks_0_context_block_adaLN_modulation_1"
    assert torch.equal(k[f"{flat}.lora_up.weight"], d["transformer.transformer_blocks.0.norm1_context.linear.lora_B.weight"])
    te = "lora_te2_text_model_encoder_layers_1_mlp_fc1"
    assert torch.equal(k[f"{te}.lora_up.weight"], d["text_encoder_2.text_model.encoder.layers.1.mlp.fc1.lora_B.weight"])


def test_sd35_lora_through_kohya_loads_in_diffusers(t35, tmp_path):
    """SD3.5 naming with a real model: a LoRA on attn2, the qk-norm'd attention and the 9-chunk
    modulation of the in-process SD3.5-like transformer, written kohya (attn2_qkv fused) and read
    back, loads in diffusers (load_lora_adapter) with the PEFT-wrapped model's output."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    model, arch = t35
    y0 = tr_out(model)
    wrapped = copy.deepcopy(model)
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["to_q", "to_k", "to_v", "to_out.0", "norm1.linear", "proj_out"])
    with quiet():
        inject_adapter_in_model(cfg, wrapped)
    randomize_(wrapped, 4, scale=0.2)
    with torch.no_grad():  # randomize_ touched every parameter: put the base weights back
        base = model.state_dict()
        for n, prm in wrapped.named_parameters():
            if "lora_" not in n:
                prm.copy_(base[n.replace(".base_layer", "")])
    y_ref = tr_out(wrapped)
    sd = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(wrapped).items()}
    assert any(".attn2.to_q." in k for k in sd)
    save_file(sd, str(tmp_path / "src.safetensors"), {"lora_adapter_metadata": json.dumps(
        {f"transformer.{k}": v for k, v in {"r": 3, "lora_alpha": 6}.items()})})
    a = loradex.load(tmp_path / "src.safetensors", arch=arch)
    loradex.save(a, tmp_path / "k.safetensors", "kohya")
    k = load_file(tmp_path / "k.safetensors")
    assert "lora_unet_joint_blocks_1_x_block_attn2_qkv.lora_up.weight" in k
    assert "lora_unet_joint_blocks_2_x_block_adaLN_modulation_1.lora_up.weight" in k
    assert loradex.load(tmp_path / "k.safetensors").arch == arch.name  # detected: the derived arch
    loradex.save(loradex.load(tmp_path / "k.safetensors"), tmp_path / "d.safetensors", "diffusers")
    ours = copy.deepcopy(model)
    with quiet():
        ours.load_lora_adapter(str(tmp_path / "d.safetensors"), prefix="transformer", adapter_name="t",
                               use_safetensors=True)
    assert rel(tr_out(ours), y_ref, y0) < 1e-5


@pytest.mark.parametrize("label", ("loha", "lokr"))
def test_lycoris_kinds(label, pipe, tmp_path):
    """lycoris-lora's LoHa/LoKr on the tiny SD3 transformer's attention (the family's
    ``lycoris_modules``): read from lycoris' own file, converted exactly to diffusers (directly and
    through kohya's fused names), loaded by load_lora_weights: lycoris' forward pass."""
    from lycoris import create_lycoris

    tr = copy.deepcopy(pipe.transformer)
    with quiet(), lycoris_preset({"target_module": list(A.get_family("sd3").lycoris_modules), "target_name": []}):
        net = create_lycoris(tr, 1.0, linear_dim=4, linear_alpha=2.0, **LYCORIS_ALGOS[label])
        net.apply_to()
    randomize_(net, 3, scale=0.5)
    y_ref, y0 = tr_out(tr), tr_out(pipe.transformer)
    src = tmp_path / "lyco.safetensors"
    net.save_weights(str(src), torch.float32, {})
    a = loradex.load(src)
    assert a.arch == "tiny-sd3" and a.kinds() == {label: 15}
    loradex.save(a, tmp_path / "d.safetensors", "diffusers")
    loradex.save(a, tmp_path / "k.safetensors", "kohya")
    k = loradex.load(tmp_path / "k.safetensors")
    assert k.kinds() == {"lora": 12, label: 3}  # fused q/k/v went through their exact LoRA form
    loradex.save(k, tmp_path / "kd.safetensors", "diffusers")
    for f in ("d.safetensors", "kd.safetensors"):
        assert rel(tr_out(loaded(pipe, tmp_path / f).transformer), y_ref, y0) < 1e-5, f


def test_bake_folder_and_single_file(peft_ref, pipe, tmp_path):
    """Baking into a diffusers folder and into an MMDiT single file equals diffusers' fuse_lora."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    src = peft_ref[0]
    with quiet():
        pipe.save_pretrained(tmp_path / "folder")
    sd3_single_file(pipe, tiny.tiny_arch("sd3"), tmp_path / "single.safetensors")
    a = loradex.load(src)
    loradex.bake(tmp_path / "folder", [(a, 1.0)], tmp_path / "baked")
    loradex.bake(tmp_path / "single.safetensors", [(a, 1.0)], tmp_path / "baked.safetensors")
    ref = copy.deepcopy(pipe)
    with quiet():
        ref.load_lora_weights(str(src), adapter_name="sd3test")
        ref.fuse_lora(components=["transformer", "text_encoder", "text_encoder_2"])
        ref.unload_lora_weights()
    want = {c: getattr(ref, c).state_dict() for c in ("transformer", "text_encoder", "text_encoder_2")}
    assert sum(not torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in want["transformer"].items()) == 20

    def close(got, ref_sd):
        assert set(ref_sd) <= set(got)
        for key, v in ref_sd.items():
            assert torch.allclose(got[key], v, rtol=0, atol=1e-6), key

    with quiet():
        close(SD3Transformer2DModel.from_pretrained(tmp_path / "baked" / "transformer").state_dict(), want["transformer"])
    close(load_file(tmp_path / "baked" / "text_encoder_2" / "model.safetensors"), want["text_encoder_2"])
    sf = load_file(tmp_path / "baked.safetensors")
    close(convert_sd3_transformer_checkpoint_to_diffusers({k: v for k, v in sf.items() if k.startswith("model.")}),
          want["transformer"])
    for comp, enc in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        pre = f"text_encoders.{enc}.transformer."
        close({k[len(pre):]: v for k, v in sf.items() if k.startswith(pre)}, want[comp])
    assert set(sf) == set(load_file(tmp_path / "single.safetensors"))  # same layout, VAE and T5 carried


def test_extract_from_single_file(pipe, tmp_path):
    """Known low-rank deltas on fused (q, k of one qkv), row-swapped (last context modulation, final
    layer) and plain modules of a tuned MMDiT single file (and one on CLIP-G) come back exactly."""
    arch = tiny.tiny_arch("sd3")
    sd3_single_file(pipe, arch, tmp_path / "base.safetensors")
    tuned = copy.deepcopy(pipe)
    g = torch.Generator().manual_seed(0)
    deltas = {}
    for name in ("transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_k",
                 "transformer.transformer_blocks.1.attn.add_v_proj", "transformer.transformer_blocks.1.norm1_context.linear",
                 "transformer.norm_out.linear", "transformer.transformer_blocks.0.ff.net.0.proj",
                 "text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj"):
        comp, path = name.split(".", 1)
        w = getattr(tuned, comp).get_submodule(path).weight
        dl = torch.randn(w.shape[0], 3, generator=g) @ torch.randn(3, w.shape[1], generator=g) * 0.05
        with torch.no_grad():
            w += dl
        deltas[name] = dl
    sd3_single_file(tuned, arch, tmp_path / "tuned.safetensors")
    a, _ = loradex.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", rank=4)
    assert a.arch == "tiny-sd3" and set(a.patches) == set(deltas)
    for name, dl in deltas.items():
        assert float((a.patches[name].delta() - dl).norm() / dl.norm()) < 1e-5, name


def test_engine_serves_a_lora_like_diffusers(peft_ref, pipe):
    from loradex.inference import GenerateRequest
    from loradex.inference.engine import Engine

    src = str(peft_ref[0])

    def lat(p):
        with torch.no_grad():
            return p("a photo of a cat", num_inference_steps=2, width=64, height=64, output_type="latent",
                     generator=torch.Generator().manual_seed(3), guidance_scale=1.0).images[0]

    y0, y_ref = lat(pipe), lat(loaded(pipe, src))
    eng = Engine(copy.deepcopy(pipe), max_rank=16, slots=2, ti_tokens=0)
    assert eng.arch.name == "tiny-sd3"
    y = eng.run([GenerateRequest("a photo of a cat", adapters=[(src, 1.0)], steps=2, width=64, height=64, seed=3,
                                 guidance_scale=1.0)], output_type="latent")[0]
    assert eng.ready(src).mode == "slots" and rel(y, y_ref, y0) < 1e-4


def test_train_lora_flow_matching(pipe, tmp_path):
    """The trainer's flow-matching path on the tiny SD3 pipeline: a LoRA that lowers the denoising
    loss on its data in diffusers (the diffusers file directly; the kohya file, which diffusers
    cannot read for SD3, converted by loradex first)."""
    from loradex.training.loop import TrainConfig, evaluate_loss, save_trained, train
    from test_training import stripes

    data = stripes(tmp_path / "data", n=2)
    cfg = TrainConfig(method="lora", steps=40, resolution=16, rank=4, seed=0, blur_threshold=0.0, lr=1e-2)
    res = train(data, cfg, pipe=copy.deepcopy(pipe))
    assert res.ctx.arch.name == "tiny-sd3" and res.ctx.family.objective == "flow"
    base_loss = evaluate_loss(pipe, res.examples)
    for fmt in ("kohya", "diffusers"):
        out = tmp_path / f"{fmt}.safetensors"
        save_trained(res, out, format=fmt)
        a = loradex.load(out)
        assert a.arch == "tiny-sd3" and a.kinds() == {"lora": 15}  # the 8 joint-attention targets, 2 blocks
        if fmt == "kohya":
            assert any(k.startswith("lora_unet_joint_blocks_0_context_block_attn_qkv") for k in load_file(out))
            loradex.save(a, tmp_path / "k2d.safetensors", "diffusers")
            out = tmp_path / "k2d.safetensors"
        assert evaluate_loss(loaded(pipe, out), res.examples) < base_loss * 0.97, fmt


def test_cli_inspect_and_convert(tmp_path, capsys):
    """``loradex inspect`` / ``convert --arch sd3`` on an SD3 Medium-sized kohya file (MMDiT names,
    every text encoder)."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for flat, out, inn in (("lora_unet_joint_blocks_0_x_block_attn_qkv", 4608, 1536),
                           ("lora_unet_joint_blocks_23_context_block_adaLN_modulation_1", 3072, 1536),
                           ("lora_unet_final_layer_adaLN_modulation_1", 3072, 1536),
                           ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768),
                           ("lora_te2_text_model_encoder_layers_31_mlp_fc1", 5120, 1280),
                           ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", 4096, 4096)):
        sd[f"{flat}.lora_down.weight"] = torch.randn(2, inn, generator=g)
        sd[f"{flat}.lora_up.weight"] = torch.randn(out, 2, generator=g)
        sd[f"{flat}.alpha"] = torch.tensor(1.0)
    src = tmp_path / "sd3_kohya.safetensors"
    save_file(sd, str(src), {"ss_base_model_version": "medium", "ss_network_module": "networks.lora_sd3"})
    code, out, err = run(capsys, "inspect", src, "--json")
    info = json.loads(out)
    assert code == 0 and info["arch"] == "sd3" and info["format"] == "kohya" and info["modules"] == 8
    assert info["components"] == {"transformer": 5, "text_encoder": 1, "text_encoder_2": 1, "text_encoder_3": 1}
    code, out, err = run(capsys, "convert", src, "-o", tmp_path / "d.safetensors", "--to", "diffusers", "--arch", "sd3")
    assert code == 0, err
    d = loradex.load(tmp_path / "d.safetensors")
    assert d.arch == "sd3" and d.metadata["modelspec.architecture"] == "stable-diffusion-3-medium/lora"
    assert "transformer.transformer_blocks.0.attn.to_v" in d.patches
    code, out, err = run(capsys, "convert", tmp_path / "d.safetensors", "-o", tmp_path / "k.safetensors", "--to", "kohya")
    assert code == 0, err
    back = load_file(tmp_path / "k.safetensors")
    for key, t in sd.items():  # the q/k/v parts share one down again: fused back bit for bit
        assert torch.equal(back[key], t), key
