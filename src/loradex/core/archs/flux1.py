"""FLUX.1 (dev, schnell, and any FluxTransformer2DModel: FLUX.1-lite, fine-tunes with fewer blocks).

BFL <-> diffusers FLUX layout (facts from diffusers ``scripts/convert_flux_to_diffusers.py``, kohya
``library/flux_utils.py`` ``BFL_TO_DIFFUSERS_MAP`` and ``networks/convert_flux_lora.py``; code not
copied): ``img_attn.qkv`` = rows [to_q | to_k | to_v], ``txt_attn.qkv`` = [add_q_proj | add_k_proj |
add_v_proj], ``single_blocks.N.linear1`` = [to_q | to_k | to_v | proj_mlp],
``final_layer.adaLN_modulation.1`` = diffusers ``norm_out.linear`` with its two row halves swapped
(BFL stores [shift | scale], diffusers [scale | shift]); BFL's RMSNorm ``scale`` is diffusers'
``weight``. kohya names the transformer with BFL paths (``lora_unet_double_blocks_0_img_attn_qkv``),
CLIP-L ``lora_te1_`` and T5 ``lora_te3_`` (OneTrainer and others: ``lora_transformer_`` + diffusers
paths). ModelSpec ``flux-1-dev``; kohya ``ss_base_model_version`` ``flux1``.

Block weights: ``CLIP, T5, IN, D00.., S00.., OUT`` (``IN``: img_in, txt_in, time_in, vector_in,
guidance_in; ``D``/``S``: double/single blocks; ``OUT``: final_layer), 61 entries for FLUX.1 and
``3 + doubles + singles + 1`` for other block counts.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from loradex.core.archs.family import (
    ComponentSpec,
    Family,
    count_indices,
    fused_native_names,
    register_family,
)
from loradex.core.archs.text import text_config_from_checkpoint
from loradex.errors import ArchError

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)

# diffusers sub-path inside transformer_blocks.N -> (BFL sub-path inside double_blocks.N, fused index)
_FLUX_DOUBLE = {
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.norm_q": ("img_attn.norm.query_norm", None),
    "attn.norm_k": ("img_attn.norm.key_norm", None),
    "attn.norm_added_q": ("txt_attn.norm.query_norm", None),
    "attn.norm_added_k": ("txt_attn.norm.key_norm", None),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
}
_FLUX_SINGLE = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation.lin", None),
    "attn.norm_q": ("norm.query_norm", None),
    "attn.norm_k": ("norm.key_norm", None),
}
_FLUX_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # rows [shift | scale] vs diffusers [scale | shift]
}
_FLUX_SWAPPED = {"norm_out.linear"}
_FLUX_BLOCK_RE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def _locate(path: str):
    m = _FLUX_BLOCK_RE.match(path)
    if m:
        mapping = _FLUX_DOUBLE if m.group(1) == "transformer_blocks" else _FLUX_SINGLE
        got = mapping.get(m.group(3))
        if got is None:
            return None
        head = "double_blocks" if m.group(1) == "transformer_blocks" else "single_blocks"
        return f"{head}.{m.group(2)}.{got[0]}", got[1]
    if path in _FLUX_TOP:
        return _FLUX_TOP[path], None
    return None


_BFL_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.")
#: single-file prefixes of a FLUX transformer: ComfyUI checkpoints, then BFL's own files (no prefix)
_PREFIXES = ("model.diffusion_model.", "")


class Flux1(Family):
    """FLUX.1: a ``FluxTransformer2DModel`` with fused BFL rows (``qkv``, ``linear1``), CLIP-L
    (``lora_te1``) and T5 (``lora_te3``, component ``text_encoder_2``), both optional in single
    files; kohya names BFL paths; flow matching at 1024 px with embedded guidance 3.5."""

    name = "flux1"
    label = "FLUX.1"
    order = 40
    denoiser = "transformer"
    denoiser_classes = ("FluxTransformer2DModel",)
    components = (
        ComponentSpec("transformer", "lora_unet", kohya_aliases=("lora_transformer",),
                      checkpoint=tuple((p, "native") for p in _PREFIXES)),
        ComponentSpec("text_encoder", "lora_te1", comfy=("clip_l",),
                      checkpoint=(("text_encoders.clip_l.transformer.", "clip"),), optional=True),
        ComponentSpec("text_encoder_2", "lora_te3", comfy=("t5xxl",),
                      checkpoint=(("text_encoders.t5xxl.transformer.", "t5"),), optional=True),
    )
    builtins = {"flux1": {"transformer": "flux1_dev_transformer.json", "text_encoder": "clip_vit_l14_text.json",
                          "text_encoder_2": "t5_v1_1_xxl_encoder.json"}}
    tiny = {"transformer": "tiny_flux_transformer.json", "text_encoder": "tiny_clip_text.json",
            "text_encoder_2": "tiny_t5_encoder.json"}
    pipelines = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
    kohya_native = True
    modelspec_arch = "flux-1-dev"
    modelspec_aliases = ("flux-1",)
    modelspec_implementation = "https://github.com/black-forest-labs/flux"
    kohya_version = "flux1"
    hub_repo = "black-forest-labs/FLUX.1-dev"
    hub_tags = ("flux",)
    license = "other"
    # (not "final_layer" alone: CLIP's final_layer_norm has it)
    key_hints = ("double_blocks", "single_blocks", "single_transformer_blocks", "final_layer.", "final_layer_linear",
                 "final_layer_adaLN", "img_in", "txt_in")
    checkpoint_hints = ("double_blocks.", "model.diffusion_model.double_blocks.")
    resolution = 1024
    objective = "flow"
    lycoris_modules = ("FluxAttention",)
    tiny_pipeline = ({"shift_factor": 0.0}, ("FlowMatchEulerDiscreteScheduler", {}))

    def native_names(self, component, table):
        if component != "transformer":
            return {}, {}
        return fused_native_names(table, component, _locate, lambda path: path in _FLUX_SWAPPED)

    # ---- training -----------------------------------------------------------------------------
    #: the embedded guidance FLUX.1-dev is trained with (diffusers' train_dreambooth_lora_flux.py default)
    train_guidance = 3.5

    def encode_prompts(self, pipe, prompts, device):
        """FluxPipeline.encode_prompt: the T5 sequence (``hidden``) and CLIP-L's pooled output, with
        the T5 length the tokenizer allows (512 for FLUX.1)."""
        length = min(512, int(getattr(pipe.tokenizer_2, "model_max_length", 512) or 512))
        hidden, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                               max_sequence_length=length)
        return {"hidden": hidden, "pooled": pooled}

    def predict(self, pipe, noisy, timesteps, cond):
        """The transformer on 2x2-packed latents with FLUX's position ids (zeros for the text, row
        and column for the image), timestep = sigma (the pipeline divides its 0..1000 steps by
        1000) and the embedded guidance where the model has a guidance embedder: ``cond["guidance"]``
        when given (kohya's ``--guidance_scale``), else ``train_guidance``."""
        b, c, h, w = noisy.shape
        cls = type(pipe)
        packed = cls._pack_latents(noisy, b, c, h, w)
        img_ids = cls._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        txt_ids = torch.zeros(cond["hidden"].shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = cond.get("guidance")
            guidance = (torch.full((b,), self.train_guidance, device=noisy.device, dtype=torch.float32)
                        if guidance is None else guidance.to(noisy.device, torch.float32))
        out = pipe.transformer(hidden_states=packed, timestep=timesteps.to(noisy.dtype), guidance=guidance,
                               pooled_projections=cond["pooled"], encoder_hidden_states=cond["hidden"],
                               txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        vsf = pipe.vae_scale_factor
        return cls._unpack_latents(out, h * vsf, w * vsf, vsf)

    # ---- LBW ------------------------------------------------------------------------------
    def lbw_layouts(self, arch):
        mods = arch.component_modules("transformer")
        d = count_indices(mods, "transformer.transformer_blocks.")
        s = count_indices(mods, "transformer.single_transformer_blocks.")
        ids = ("CLIP", "T5", "IN", *(f"D{i:02d}" for i in range(d)), *(f"S{i:02d}" for i in range(s)), "OUT")
        return {len(ids): ids}

    def lbw_block(self, arch, canonical):
        comp = canonical.split(".", 1)[0]
        if comp != "transformer":
            return "T5" if arch.component_kind(comp) == "t5" else "CLIP"
        try:
            native = arch.sgm_name(canonical)
        except ArchError:
            return None
        m = _BFL_BLOCK.match(native)
        if m:
            return f"{'D' if m.group(1) == 'double_blocks' else 'S'}{int(m.group(2)):02d}"
        if native.startswith("final_layer."):
            return "OUT"
        return "IN" if native.split(".", 1)[0].endswith("_in") else None

    # ---- single files -----------------------------------------------------------------------
    def infer_configs(self, shapes):
        out: dict[str, dict] = {}
        for pre in _PREFIXES:
            bfl = {k[len(pre):]: s for k, s in shapes.items() if k.startswith(pre) and
                   k[len(pre):].startswith(("double_blocks.", "single_blocks.", "img_in."))}
            if "img_in.weight" in bfl:
                bfl = {k[len(pre):]: s for k, s in shapes.items() if k.startswith(pre)}
                out["transformer"] = flux_config_from_bfl(bfl)
                break
        for spec in self.components[1:]:
            for prefix, layout in spec.checkpoint:
                sub = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
                if sub:
                    out[spec.name] = text_config_from_checkpoint(sub, layout)
        return out


def flux_config_from_bfl(shapes) -> dict:
    """A ``FluxTransformer2DModel`` config from BFL-named shapes: width and input channels from
    ``img_in``, the text widths from ``txt_in``/``vector_in``, block counts, head size from the
    query norm, guidance embedding when ``guidance_in`` is present. The rope axes (not in the
    weights) are FLUX.1's (16, 56, 56) for 128-wide heads, else a split of the head size."""

    def get(k):
        if k not in shapes:
            raise ArchError(f"a BFL FLUX checkpoint without {k}")
        return tuple(shapes[k])

    hidden, in_ch = get("img_in.weight")
    head = get("double_blocks.0.img_attn.norm.query_norm.scale")[0] if "double_blocks.0.img_attn.norm.query_norm.scale" \
        in shapes else 128
    axes = [16, 56, 56] if head == 128 else [head - 2 * (head * 7 // 16), head * 7 // 16, head * 7 // 16]
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": in_ch,
        "out_channels": get("final_layer.linear.weight")[0] if get("final_layer.linear.weight")[0] != in_ch else None,
        "num_layers": count_indices(shapes, "double_blocks."),
        "num_single_layers": count_indices(shapes, "single_blocks."),
        "attention_head_dim": head,
        "num_attention_heads": hidden // head,
        "joint_attention_dim": get("txt_in.weight")[1],
        "pooled_projection_dim": get("vector_in.in_layer.weight")[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
        "axes_dims_rope": axes,
    }


register_family(Flux1())
