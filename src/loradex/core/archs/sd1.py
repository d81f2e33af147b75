"""Stable Diffusion 1.x (and any UNet with one CLIP-L-style text encoder: SD1.5 fine-tunes,
distilled BK-SDM models, a user's own config).

Facts: kohya sd-scripts names the UNet with diffusers paths (``lora_unet_down_blocks_0_...``) and
the text encoder ``lora_te_``; ModelSpec ``stable-diffusion-v1``; kohya ``ss_base_model_version``
``sd_v1``; single files hold the UNet under ``model.diffusion_model.`` (SGM names) and the text
encoder under ``cond_stage_model.transformer.`` (transformers names). LBW presets: the
sd-webui-lora-block-weight extension's built-in 17-entry table (``DEF_WEIGHT_PRESET``).
"""

from __future__ import annotations

from loradex.core.archs.family import ComponentSpec, register_family
from loradex.core.archs.unet import UNetFamily

#: The extension's SD1/SD2 layouts: 26 entries (every block) and 17 (the blocks holding attention).
SD26 = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
SD17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(3, 12)))
#: The extension's built-in 17-entry presets (BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03..OUT11).
SD_PRESETS: dict[str, tuple[float, ...]] = {
    name: tuple(float(c) for c in bits)
    for name, bits in {
        "INS": "11110000000000000",
        "IND": "10001110000000000",
        "INALL": "11111110000000000",
        "MIDD": "10001111111100000",
        "OUTD": "10000000111100000",
        "OUTS": "10000000000011111",
        "OUTALL": "10000000111111111",
    }.items()
}


class SD1(UNetFamily):
    """SD 1.x: a UNet plus one CLIP text encoder (``lora_te``); kohya names diffusers paths;
    epsilon objective at 512 px; the extension's 17/26-entry LBW layouts. Any single-CLIP UNet
    pipeline scores as SD1 unless SD2 claims it (OpenCLIP-H width)."""

    name = "sd1"
    label = "Stable Diffusion 1.x"
    order = 10
    components = (
        ComponentSpec("unet", "lora_unet", checkpoint=(("model.diffusion_model.", "native"),)),
        ComponentSpec("text_encoder", "lora_te", comfy=("clip_l",), checkpoint=(("cond_stage_model.transformer.", "clip"),)),
    )
    builtins = {"sd1": {"unet": "sd15_unet.json", "text_encoder": "clip_vit_l14_text.json"}}
    tiny = {"unet": "tiny_sd1_unet.json", "text_encoder": "tiny_clip_text.json"}
    pipelines = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
    modelspec_arch = "stable-diffusion-v1"
    kohya_version = "sd_v1"
    hub_repo = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    hub_tags = ("stable-diffusion",)
    license = "creativeml-openrail-m"
    key_hints = (*UNetFamily.key_hints, "lora_te_")
    checkpoint_hints = ("cond_stage_model.transformer.",)
    resolution = 512
    lbw_presets = SD_PRESETS
    lbw_fixed = {17: SD17, 26: SD26}

    def pipeline_score(self, pipeline, configs):
        """The UNet default, and 0 when a second text encoder is present (that is SDXL)."""
        score = super().pipeline_score(pipeline, configs)
        if not score or "text_encoder_2" in configs:
            return 0
        return score


register_family(SD1())
