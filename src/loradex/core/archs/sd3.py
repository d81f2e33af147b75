"""Stable Diffusion 3 / 3.5 (Medium, Large, Large Turbo, and any ``SD3Transformer2DModel``: fine-tunes,
pruned or custom-width MMDiTs).

Components (diffusers ``StableDiffusion3Pipeline``): the MMDiT ``transformer``, CLIP-L with its
projection (``text_encoder``; SD3 uses the projection as an identity), OpenCLIP bigG with its
projection (``text_encoder_2``), and T5 v1.1 XXL (``text_encoder_3``, optional: the pipeline feeds
zeros without it).

MMDiT (Stability's ``mmditx.py`` / ComfyUI ``comfy/ldm/modules/diffusionmodules/mmdit.py``) <->
diffusers layout (facts from diffusers ``loaders/single_file_utils.py``
``convert_sd3_transformer_checkpoint_to_diffusers``, ``scripts/convert_sd3_to_diffusers.py``,
kohya ``library/sd3_models.py`` and ComfyUI ``comfy/utils.py`` ``mmdit_to_diffusers``; code not
copied). In ``joint_blocks.N`` (diffusers ``transformer_blocks.N``):

* ``x_block.attn.qkv`` = rows [``attn.to_q`` | ``attn.to_k`` | ``attn.to_v``], ``context_block.attn.qkv``
  = [``add_q_proj`` | ``add_k_proj`` | ``add_v_proj``] (in every block, the last one too),
  ``x_block.attn2.qkv`` = [``attn2.to_q`` | ``to_k`` | ``to_v``] (SD3.5's dual-attention blocks);
* ``x_block.attn.proj`` = ``attn.to_out.0``, ``context_block.attn.proj`` = ``attn.to_add_out`` (not in
  the last block), ``x_block.attn2.proj`` = ``attn2.to_out.0``;
* qk-norms (SD3.5): ``x_block.attn.ln_q/ln_k`` = ``attn.norm_q/norm_k``, ``context_block.attn.ln_q/ln_k``
  = ``attn.norm_added_q/norm_added_k``, ``x_block.attn2.ln_q/ln_k`` = ``attn2.norm_q/norm_k``;
* ``x_block.mlp.fc1/fc2`` = ``ff.net.0.proj`` / ``ff.net.2``, ``context_block.mlp.*`` = ``ff_context.*``;
* ``x_block.adaLN_modulation.1`` = ``norm1.linear`` (6 or, with dual attention, 9 chunks in the same
  order on both sides), ``context_block.adaLN_modulation.1`` = ``norm1_context.linear``; in the last
  block the context stream is "pre-only": its modulation has 2 chunks stored [shift | scale] where
  diffusers' ``AdaLayerNormContinuous`` has [scale | shift] (a row swap), as has
  ``final_layer.adaLN_modulation.1`` = ``norm_out.linear``.

Top level: ``x_embedder.proj`` = ``pos_embed.proj`` (a p x p conv), ``t_embedder.mlp.0/2`` =
``time_text_embed.timestep_embedder.linear_1/2``, ``y_embedder.mlp.0/2`` =
``time_text_embed.text_embedder.linear_1/2``, ``context_embedder``, ``final_layer.linear`` =
``proj_out``; ``pos_embed`` (a buffer no adapter patches) is copied through.

kohya sd-scripts (``networks/lora_sd3.py``) names the MMDiT with these paths flattened
(``lora_unet_joint_blocks_0_x_block_attn_qkv``, stored fused: q/k/v LoRAs are written as one
module), CLIP-L ``lora_te1_``, CLIP-G ``lora_te2_``, T5 ``lora_te3_``; its ``ss_base_model_version``
is the MMDiT model type, ``medium`` / ``5-medium`` / ``5-large``, and its ModelSpec architecture
``stable-diffusion-3-<type>`` (``library/sai_model_spec.py``: ``stable-diffusion-3-5-large``; the
dotted spelling ``stable-diffusion-3.5-large`` is read too). Single files
(Stability's ``sd3_medium_incl_clips*.safetensors`` and ComfyUI's): the MMDiT under
``model.diffusion_model.``, the encoders under ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.``
with transformers names. Textual-inversion files hold ``clip_l`` and ``clip_g`` as for SDXL.

Block weights: no tool defines an SD3 layout (the sd-webui-lora-block-weight extension and the
ComfyUI Inspire pack have none); loradex uses its own, the natural one by analogy with their FLUX
layout: ``CLIP, T5, IN, J00..J<n-1>, OUT`` (``CLIP``: both CLIP encoders; ``IN``: the embedders;
``J``: one id per joint block; ``OUT``: final_layer), 28 entries for SD3/SD3.5 Medium, 42 for Large.

Training (diffusers ``examples/dreambooth/train_dreambooth_lora_sd3.py``): rectified flow on
sigmas in [0, 1], the transformer called with ``timestep = sigma * 1000`` (what the pipeline passes:
the scheduler's ``t``), prompts encoded by the pipeline's own ``encode_prompt`` with 77 T5 tokens,
default LoRA targets the joint attention's eight projections.
"""

from __future__ import annotations

import math
import re
from functools import cache

from loradex.core.archs.family import (
    TINY_PREFIX,
    ComponentSpec,
    Family,
    count_indices,
    fused_native_names,
    register_family,
)
from loradex.core.archs.text import text_config_from_checkpoint
from loradex.errors import ArchError

# diffusers sub-path inside transformer_blocks.N -> (MMDiT sub-path inside joint_blocks.N, fused index)
_SD3_BLOCK = {
    "norm1.linear": ("x_block.adaLN_modulation.1", None),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", None),  # swapped in the pre-only block
    "attn.to_q": ("x_block.attn.qkv", 0),
    "attn.to_k": ("x_block.attn.qkv", 1),
    "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0),
    "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn.to_out.0": ("x_block.attn.proj", None),
    "attn.to_add_out": ("context_block.attn.proj", None),
    "attn.norm_q": ("x_block.attn.ln_q", None),
    "attn.norm_k": ("x_block.attn.ln_k", None),
    "attn.norm_added_q": ("context_block.attn.ln_q", None),
    "attn.norm_added_k": ("context_block.attn.ln_k", None),
    "attn2.to_q": ("x_block.attn2.qkv", 0),
    "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2),
    "attn2.to_out.0": ("x_block.attn2.proj", None),
    "attn2.norm_q": ("x_block.attn2.ln_q", None),
    "attn2.norm_k": ("x_block.attn2.ln_k", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None),
    "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None),
    "ff_context.net.2": ("context_block.mlp.fc2", None),
}
_SD3_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # rows [shift | scale] vs diffusers [scale | shift]
}
_BLOCK_RE = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_JOINT_RE = re.compile(r"^joint_blocks\.(\d+)\.")
_EMBEDDERS = ("x_embedder.", "t_embedder.", "y_embedder.", "context_embedder")
#: single-file prefixes of the MMDiT: Stability's and ComfyUI's files, then bare keys (diffusers'
#: converter strips the prefix and accepts both)
_PREFIXES = ("model.diffusion_model.", "")


def _locate(path: str):
    m = _BLOCK_RE.match(path)
    if m:
        got = _SD3_BLOCK.get(m.group(2))
        return None if got is None else (f"joint_blocks.{m.group(1)}.{got[0]}", got[1])
    if path in _SD3_TOP:
        return _SD3_TOP[path], None
    return None


def _sd3_size(arch) -> tuple[int, int, int, bool]:
    """(depth, width, dual-attention blocks, qk-norm) of an arch's transformer: from its config when
    the arch has one, else from its module table (archs of live models)."""
    cfg = (arch.configs or {}).get("transformer")
    if cfg is not None:
        width = int(cfg.get("num_attention_heads", 18)) * int(cfg.get("attention_head_dim", 64))
        return (int(cfg.get("num_layers", 18)), width, len(cfg.get("dual_attention_layers") or ()),
                bool(cfg.get("qk_norm")))
    mods = arch.component_modules("transformer")
    depth = count_indices(mods, "transformer.transformer_blocks.")
    width = mods["transformer.context_embedder"].out_features if "transformer.context_embedder" in mods else 0
    dual = sum(1 for n in mods if n.endswith(".attn2.to_q"))
    return depth, width, dual, any(n.endswith(".attn.norm_q") for n in mods)


@cache
def _builtin_size(filename: str) -> tuple[int, int, int, bool]:
    """(depth, width, dual-attention blocks, qk-norm) of a bundled transformer config."""
    from loradex.core.archs.tables import load_config

    cfg = load_config(filename)
    return (cfg["num_layers"], cfg["num_attention_heads"] * cfg["attention_head_dim"],
            len(cfg.get("dual_attention_layers") or ()), bool(cfg.get("qk_norm")))


#: the text encoders of every published size: CLIP-L with its projection, OpenCLIP bigG (the same
#: config as SDXL's text_encoder_2), T5 v1.1 XXL (the same as FLUX.1's)
_ENCODERS = {"text_encoder": "clip_vit_l14_text_proj.json", "text_encoder_2": "openclip_vit_bigg14_text.json",
             "text_encoder_3": "t5_v1_1_xxl_encoder.json"}

#: ModelSpec architecture id (kohya's ``stable-diffusion-3-<model type>``) and kohya
#: ``ss_base_model_version`` (the model type) of each published size
_IDS = {"sd3": ("stable-diffusion-3-medium", "medium"),
        "sd3.5-medium": ("stable-diffusion-3-5-medium", "5-medium"),
        "sd3.5-large": ("stable-diffusion-3-5-large", "5-large")}


class SD3(Family):
    """SD3 / SD3.5: an ``SD3Transformer2DModel`` (MMDiT, fused ``qkv``), CLIP-L, CLIP-G and an
    optional T5; kohya names MMDiT paths; flow matching at 1024 px. ModelSpec id and kohya
    version are those of the published size an arch is closest to (:meth:`closest_builtin`)."""

    name = "sd3"
    label = "Stable Diffusion 3"
    order = 50
    denoiser = "transformer"
    denoiser_classes = ("SD3Transformer2DModel",)
    components = (
        ComponentSpec("transformer", "lora_unet", kohya_aliases=("lora_transformer",),
                      checkpoint=tuple((p, "native") for p in _PREFIXES)),
        ComponentSpec("text_encoder", "lora_te1", comfy=("clip_l",), ti_key="clip_l",
                      checkpoint=(("text_encoders.clip_l.transformer.", "clip"),), optional=True),
        ComponentSpec("text_encoder_2", "lora_te2", comfy=("clip_g",), ti_key="clip_g",
                      checkpoint=(("text_encoders.clip_g.transformer.", "clip"),), optional=True),
        ComponentSpec("text_encoder_3", "lora_te3", comfy=("t5xxl",),
                      checkpoint=(("text_encoders.t5xxl.transformer.", "t5"),), optional=True),
    )
    builtins = {
        "sd3": {"transformer": "sd3_medium_transformer.json", **_ENCODERS},
        "sd3.5-medium": {"transformer": "sd35_medium_transformer.json", **_ENCODERS},
        "sd3.5-large": {"transformer": "sd35_large_transformer.json", **_ENCODERS},
    }
    tiny = {"transformer": "tiny_sd3_transformer.json", "text_encoder": "tiny_clip_text_proj.json",
            "text_encoder_2": "tiny_clip_g_text_proj.json", "text_encoder_3": "tiny_t5_64_encoder.json"}
    pipelines = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")
    kohya_native = True
    modelspec_arch = "stable-diffusion-3-medium"
    modelspec_aliases = ("stable-diffusion-3",)  # every size: -medium, -5-medium, -5-large, -3.5-...
    # the reference code whose variable names the MMDiT keys are (kohya writes "diffusers" for
    # LoRAs only because its determine_implementation has no SD3 branch)
    modelspec_implementation = "https://github.com/Stability-AI/sd3.5"
    kohya_version = "medium"
    kohya_versions = ("5-medium", "5-large")
    hub_repo = "stabilityai/stable-diffusion-3-medium-diffusers"
    #: the diffusers base repo of each published size (``hub_repo`` is the family default)
    hub_repos = {"sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
                 "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
                 "sd3.5-large": "stabilityai/stable-diffusion-3.5-large"}
    # train_dreambooth_lora_sd3.py's card tags (SD3.5 Large adds sd3.5-large, sd3.5, sd3.5-diffusers)
    hub_tags = ("sd3", "sd3-diffusers")
    license = "other"  # stabilityai-ai-community (formerly stabilityai-nc-research-community)
    key_hints = ("joint_blocks", "x_block", "context_block")
    checkpoint_hints = ("model.diffusion_model.joint_blocks.", "joint_blocks.")
    resolution = 1024
    objective = "flow"
    #: train_dreambooth_lora_sd3.py's default ``--lora_layers``: the joint attention (no attn2, no
    #: MLP, no adaLN; peft matches ".attn.to_q" suffixes, so SD3.5's attn2 is not hit either)
    lora_targets = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")
    #: StableDiffusion3Pipeline's ``_lora_loadable_modules``: T5 LoRAs are written but never loaded
    diffusers_lora_components = ("transformer", "text_encoder", "text_encoder_2")
    #: JointTransformerBlock's attention (``attn`` and ``attn2``) is diffusers' ``Attention``
    lycoris_modules = ("Attention",)
    #: SD3's VAE: 16 latent channels scaled by 1.5305 after shifting by 0.0609, no quant convs; the
    #: published scheduler (FlowMatchEulerDiscreteScheduler, shift 3.0)
    tiny_pipeline = ({"shift_factor": 0.0609, "scaling_factor": 1.5305, "use_quant_conv": False,
                      "use_post_quant_conv": False},
                     ("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 3.0}))
    #: T5 tokens the training conditioning uses (train_dreambooth_lora_sd3.py's default; the
    #: pipeline's own default at inference is 256)
    max_sequence_length = 77

    # ---- naming -------------------------------------------------------------------------
    def native_names(self, component, table):
        if component != "transformer":
            return {}, {}
        pre = component + "."

        def swapped(path: str) -> bool:
            # final_layer, and the pre-only context modulation of the last block (2 chunks where
            # the other blocks have 6): both AdaLayerNormContinuous, [scale | shift] in diffusers
            if path == "norm_out.linear":
                return True
            if path.endswith(".norm1_context.linear"):
                info = table[pre + path]
                return info.out_features == 2 * info.in_features
            return False

        return fused_native_names(table, component, _locate, swapped)

    # ---- what the ecosystem writes -----------------------------------------------------------
    def closest_builtin(self, arch) -> str:
        """The published size an arch is closest to: the same dual-attention use and qk-norm
        first (they tell SD3 Medium, 3.5 Medium and 3.5 Large apart), then depth and width."""
        if arch.name in self.builtins:
            return arch.name
        depth, width, dual, qk = _sd3_size(arch)

        def distance(name: str):
            bdepth, bwidth, bdual, bqk = _builtin_size(self.builtins[name]["transformer"])
            return (bdual > 0) != (dual > 0), bqk != qk, abs(bdepth - depth) + abs(bwidth - width) / 64

        return min(self.builtins, key=distance)

    def modelspec_id(self, arch) -> str:
        """kohya's ``stable-diffusion-3-<model type>`` of the size the arch is closest to."""
        if arch.name.startswith(TINY_PREFIX):
            return arch.name
        return _IDS[self.closest_builtin(arch)][0]

    def kohya_base_version(self, arch) -> str | None:
        """kohya's MMDiT model type (``medium`` / ``5-medium`` / ``5-large``) of the closest size."""
        if arch.name.startswith(TINY_PREFIX):
            return None
        return _IDS[self.closest_builtin(arch)][1]

    # ---- LBW ------------------------------------------------------------------------------
    def lbw_layouts(self, arch):
        """loradex's own layout (no tool defines one): ``CLIP, T5, IN, J00.., OUT``."""
        n = count_indices(arch.component_modules("transformer"), "transformer.transformer_blocks.")
        ids = ("CLIP", "T5", "IN", *(f"J{i:02d}" for i in range(n)), "OUT")
        return {len(ids): ids}

    def lbw_block(self, arch, canonical):
        comp = canonical.split(".", 1)[0]
        if comp != "transformer":
            return "T5" if arch.component_kind(comp) == "t5" else "CLIP"
        try:
            native = arch.sgm_name(canonical)
        except ArchError:
            return None
        m = _JOINT_RE.match(native)
        if m:
            return f"J{int(m.group(1)):02d}"
        if native.startswith("final_layer."):
            return "OUT"
        return "IN" if native.startswith(_EMBEDDERS) else None

    # ---- single files -----------------------------------------------------------------------
    def infer_configs(self, shapes):
        out: dict[str, dict] = {}
        for pre in _PREFIXES:
            if f"{pre}x_embedder.proj.weight" in shapes and f"{pre}joint_blocks.0.x_block.attn.qkv.weight" in shapes:
                out["transformer"] = sd3_config_from_mmdit({k[len(pre):]: s for k, s in shapes.items()
                                                           if k.startswith(pre)})
                break
        for spec in self.components[1:]:
            for prefix, layout in spec.checkpoint:
                sub = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
                if sub:
                    # SD3's CLIP-L files carry no projection (diffusers' single-file loader sets it
                    # to the identity): both CLIPs are CLIPTextModelWithProjection
                    out[spec.name] = text_config_from_checkpoint(sub, layout, projection=True if layout == "clip" else None)
        return out

    # ---- training -------------------------------------------------------------------------
    def encode_prompts(self, pipe, prompts, device):
        """``StableDiffusion3Pipeline.encode_prompt`` without guidance: CLIP-L and CLIP-G penultimate
        hidden states concatenated and zero-padded to the T5 width, then T5's tokens appended along
        the sequence (``hidden``); the projected pooled outputs of both CLIPs concatenated (``pooled``)."""
        hidden, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return {"hidden": hidden, "pooled": pooled}

    def predict(self, pipe, noisy, timesteps, cond):
        """The velocity the MMDiT predicts at sigmas ``timesteps``: SD3's transformer takes the
        scheduler's timestep ``t = sigma * 1000`` (FlowMatchEulerDiscreteScheduler.timesteps)."""
        t = (timesteps.float() * 1000).expand(noisy.shape[0]).to(noisy.device)
        dtype = noisy.dtype
        return pipe.transformer(hidden_states=noisy, timestep=t, encoder_hidden_states=cond["hidden"].to(dtype),
                                pooled_projections=cond["pooled"].to(dtype), return_dict=False)[0]


def sd3_config_from_mmdit(shapes) -> dict:
    """An ``SD3Transformer2DModel`` config from MMDiT-named shapes (no prefix), the rules diffusers'
    single-file loader and kohya's ``sd3_utils`` use: patch size, latent channels and width from
    ``x_embedder.proj`` (a p x p conv), depth from the ``joint_blocks`` count, head size from the
    qk-norm weight (else 64, as in every published size), the text widths from
    ``context_embedder``/``y_embedder``, ``pos_embed_max_size`` = sqrt(rows of ``pos_embed``), dual
    attention in the blocks that have ``x_block.attn2``, RMS qk-norm when ``ln_q`` is present."""

    def get(k):
        if k not in shapes:
            raise ArchError(f"an MMDiT checkpoint without {k}")
        return tuple(shapes[k])

    inner, in_ch, p, _ = get("x_embedder.proj.weight")
    depth = count_indices(shapes, "joint_blocks.")
    ln_q = "joint_blocks.0.x_block.attn.ln_q.weight"
    if ln_q in shapes:
        head = get(ln_q)[0]
    else:  # head size leaves no trace without qk-norm; any divisor builds the same modules
        head = next(h for h in (64, 32, 16, 8, 4, 2, 1) if inner % h == 0)
    caption, joint = get("context_embedder.weight")
    cfg = {
        "_class_name": "SD3Transformer2DModel",
        "sample_size": 128,
        "patch_size": p,
        "in_channels": in_ch,
        "num_layers": depth,
        "attention_head_dim": head,
        "num_attention_heads": inner // head,
        "joint_attention_dim": joint,
        "caption_projection_dim": caption,
        "pooled_projection_dim": get("y_embedder.mlp.0.weight")[1],
        "out_channels": get("final_layer.linear.weight")[0] // (p * p),
        "dual_attention_layers": sorted(i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes),
        "qk_norm": "rms_norm" if any(".ln_q." in k for k in shapes) else None,
    }
    if "pos_embed" in shapes:
        cfg["pos_embed_max_size"] = math.isqrt(get("pos_embed")[1])
    return cfg


register_family(SD3())
