"""Stable Diffusion XL (and any UNet with two CLIP text encoders: SDXL fine-tunes, SSD-1B, Segmind
Vega and other distilled models with fewer blocks).

Facts: kohya sd-scripts trains SDXL on its own SGM-layout UNet (``library/sdxl_original_unet.py``),
so its LoRA names are SGM paths (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k``)
with ``lora_te1_`` (CLIP-L) and ``lora_te2_`` (OpenCLIP bigG); ModelSpec
``stable-diffusion-xl-v1-base`` with the generative-models implementation; kohya
``ss_base_model_version`` ``sdxl_base_v1-0``; single files: ``conditioner.embedders.0.transformer.``
(CLIP-L, transformers names) and ``conditioner.embedders.1.model.`` (bigG, OpenCLIP layout).
Textual-inversion files hold ``clip_l`` and ``clip_g``. Trained at 1024 px.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loradex.core.archs.family import ComponentSpec, register_family
from loradex.core.archs.unet import UNetFamily

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)

#: The extension's SDXL layouts: 20 entries (every block) and 12 (the blocks holding attention).
SDXL20 = ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)))
SDXL12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6)))


class SDXL(UNetFamily):
    """SDXL: a UNet with added text/time conditioning plus CLIP-L (``lora_te1``, TI ``clip_l``)
    and OpenCLIP bigG (``lora_te2``, ``clip_g``); kohya names SGM paths (``kohya_native``);
    epsilon objective at 1024 px; the extension's 12/20-entry LBW layouts."""

    name = "sdxl"
    label = "Stable Diffusion XL"
    order = 30
    components = (
        ComponentSpec("unet", "lora_unet", checkpoint=(("model.diffusion_model.", "native"),)),
        ComponentSpec("text_encoder", "lora_te1", comfy=("clip_l",), ti_key="clip_l",
                      checkpoint=(("conditioner.embedders.0.transformer.", "clip"),)),
        ComponentSpec("text_encoder_2", "lora_te2", comfy=("clip_g",), ti_key="clip_g",
                      checkpoint=(("conditioner.embedders.1.model.", "openclip"),)),
    )
    builtins = {"sdxl": {"unet": "sdxl_base_unet.json", "text_encoder": "clip_vit_l14_text.json",
                         "text_encoder_2": "openclip_vit_bigg14_text.json"}}
    tiny = {"unet": "tiny_sdxl_unet.json", "text_encoder": "tiny_clip_text.json",
            "text_encoder_2": "tiny_clip_text_proj.json"}
    pipelines = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
    kohya_native = True
    modelspec_arch = "stable-diffusion-xl-v1-base"
    modelspec_aliases = ("stable-diffusion-xl",)
    modelspec_implementation = "https://github.com/Stability-AI/generative-models"
    kohya_version = "sdxl_base_v1-0"
    hub_repo = "stabilityai/stable-diffusion-xl-base-1.0"
    hub_tags = ("stable-diffusion-xl",)
    license = "openrail++"
    checkpoint_hints = ("conditioner.embedders.",)
    resolution = 1024
    lbw_fixed = {12: SDXL12, 20: SDXL20}
    tiny_pipeline = ({}, ("EulerDiscreteScheduler", {"num_train_timesteps": 1000}))

    def pipeline_score(self, pipeline, configs):
        """The UNet default, and 0 without a second text encoder."""
        score = super().pipeline_score(pipeline, configs)
        return score if score and "text_encoder_2" in configs else 0

    def encode_prompts(self, pipe, prompts, device):
        """StableDiffusionXLPipeline.encode_prompt: the penultimate hidden states of both encoders
        concatenated, and the pooled (projected) output of the second."""
        hidden, pooled = [], None
        for comp, tname in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            enc, tok = getattr(pipe, comp), getattr(pipe, tname)
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]
        return {"hidden": torch.cat(hidden, dim=-1), "pooled": pooled}

    def predict(self, pipe, noisy, timesteps, cond):
        """The UNet with SDXL's added conditioning: pooled text and the 6 time ids
        (original size, crop top-left, target size) of an uncropped square image."""
        h, w = noisy.shape[-2] * pipe.vae_scale_factor, noisy.shape[-1] * pipe.vae_scale_factor
        ids = torch.tensor([[h, w, 0, 0, h, w]], device=noisy.device, dtype=cond["hidden"].dtype)
        added = {"text_embeds": cond["pooled"], "time_ids": ids.repeat(noisy.shape[0], 1)}
        return pipe.unet(noisy, timesteps, cond["hidden"], added_cond_kwargs=added).sample


register_family(SDXL())
