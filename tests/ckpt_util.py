"""Single-file checkpoints written from tiny in-process pipelines, the way Stability's and BFL's
code name them (LDM/SGM UNet under ``model.diffusion_model.``, CLIP under
``cond_stage_model.transformer.`` / ``conditioner.embedders.0.transformer.``, OpenCLIP under
``conditioner.embedders.1.model.``, FLUX in BFL names with fused rows), for the checkpoint reader,
extract, bake and base-resolution tests."""

from __future__ import annotations

import torch
from safetensors.torch import save_file


def sd1_single_file(pipe, arch, path) -> None:
    """An LDM single file of a tiny SD1 pipeline: UNet under ``model.diffusion_model.`` + its SGM
    name (the arch's map), CLIP under ``cond_stage_model.transformer.text_model.``, VAE under
    ``first_stage_model.`` (carried through untouched)."""
    sd = {}
    for k, v in pipe.unet.state_dict().items():
        mod, _, param = k.rpartition(".")
        sd[f"model.diffusion_model.{arch.sgm_name('unet.' + mod)}.{param}"] = v.contiguous()
    for k, v in pipe.text_encoder.state_dict().items():
        sd["cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k] = v
    for k, v in pipe.vae.state_dict().items():
        sd["first_stage_model." + k] = v
    save_file(sd, str(path))


def openclip_state_dict(te) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection in OpenCLIP's names (SGM ``conditioner.embedders.1.model``),
    written out by hand from the published layout: fused in_proj [q|k|v], ln_1/ln_2, c_fc/c_proj,
    text_projection transposed."""
    sd = te.state_dict()
    out = {"token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           "text_projection": sd["text_projection.weight"].T.contiguous()}
    i = 0
    while f"text_model.encoder.layers.{i}.self_attn.q_proj.weight" in sd:
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[dst + f"attn.in_proj_{p}"] = torch.cat([sd[src + f"self_attn.{x}_proj.{p}"] for x in "qkv"])
            out[dst + f"attn.out_proj.{p}"] = sd[src + f"self_attn.out_proj.{p}"]
            out[dst + f"ln_1.{p}"] = sd[src + f"layer_norm1.{p}"]
            out[dst + f"ln_2.{p}"] = sd[src + f"layer_norm2.{p}"]
            out[dst + f"mlp.c_fc.{p}"] = sd[src + f"mlp.fc1.{p}"]
            out[dst + f"mlp.c_proj.{p}"] = sd[src + f"mlp.fc2.{p}"]
        i += 1
    return out


def sdxl_single_file(pipe, arch, path) -> None:
    sd = {}
    for k, v in pipe.unet.state_dict().items():
        mod, _, param = k.rpartition(".")
        sd[f"model.diffusion_model.{arch.sgm_name('unet.' + mod)}.{param}"] = v.contiguous()
    for k, v in pipe.text_encoder.state_dict().items():
        sd["conditioner.embedders.0.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k] = v
    for k, v in openclip_state_dict(pipe.text_encoder_2).items():
        sd["conditioner.embedders.1.model." + k] = v
    save_file(sd, str(path))


def flux_bfl_state_dict(model, arch) -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel's weights in BFL names (fused qkv / linear1 rows, RMSNorm ``scale``,
    the adaLN [shift | scale] swap), assembled with the arch's BFL parts."""
    from loradex.core.archs import Arch
    from loradex.errors import ArchError

    sd = {f"transformer.{k}": v for k, v in model.state_dict().items()}
    groups: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, v in sd.items():
        mod, _, param = key.rpartition(".")
        try:
            bfl = arch.sgm_name(mod)
        except ArchError:
            continue
        groups.setdefault(bfl, {}).setdefault(param, {})[mod] = v
    out = {}
    for bfl, params in groups.items():
        parts = arch.from_sgm(bfl)
        for param, tensors in params.items():
            name = "scale" if bfl.endswith(("query_norm", "key_norm")) else param
            out[f"{bfl}.{name}"] = Arch.fuse_rows(parts, tensors).contiguous()
    return out


def sd3_single_file(pipe, arch, path, text_encoders: bool = True) -> None:
    """A single file of a tiny SD3 pipeline as Stability's and ComfyUI's files lay it out: the MMDiT
    under ``model.diffusion_model.`` in MMDiT names (fused ``attn.qkv`` rows, the [shift | scale]
    swap of the pre-only context modulation and the final layer: the same fusing rules as BFL, so
    ``flux_bfl_state_dict`` assembles it) with its ``pos_embed`` buffer, the encoders under
    ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.`` (transformers names, ``text_model.`` kept),
    the VAE under ``first_stage_model.`` (carried through untouched)."""
    sd = {f"model.diffusion_model.{k}": v for k, v in flux_bfl_state_dict(pipe.transformer, arch).items()}
    sd["model.diffusion_model.pos_embed"] = pipe.transformer.pos_embed.pos_embed.contiguous()
    if text_encoders:
        for comp, enc in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5xxl")):
            model = getattr(pipe, comp, None)
            if model is not None:
                for k, v in model.state_dict().items():
                    sd[f"text_encoders.{enc}.transformer.{k}"] = v.clone()  # T5 ties shared/embed_tokens
    for k, v in pipe.vae.state_dict().items():
        sd["first_stage_model." + k] = v.contiguous()
    save_file(sd, str(path))
