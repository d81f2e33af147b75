"""Stable Diffusion 2.x: an SD1-topology UNet with linear projections, cross-attention 1024, and
OpenCLIP ViT-H as its text encoder (diffusers ships it without its last layer: SD2 is conditioned
on the penultimate one).

Facts: kohya names as SD1 (``lora_unet_`` diffusers paths, ``lora_te_``); ModelSpec
``stable-diffusion-v2-768-v`` (``-512`` for the base 512 model, recognised on reading); kohya
``ss_base_model_version`` ``sd_v2`` (``sd_v2_v`` for v-prediction files); single files hold the text
encoder in OpenCLIP's layout under ``cond_stage_model.model.``. SD2-768 predicts ``v``.
"""

from __future__ import annotations

from loradex.core.archs.family import ComponentSpec, register_family
from loradex.core.archs.sd1 import SD1, SD17, SD26, SD_PRESETS
from loradex.core.archs.tables import class_name
from loradex.core.archs.unet import UNetFamily


class SD2(UNetFamily):
    """SD 2.x: the SD1 layout with an OpenCLIP-H text encoder (width 1024; single files keep it
    in OpenCLIP's fused layout), kohya ``--v2``, v-prediction at 768 px. Shares SD1's kohya names
    and LBW layouts."""

    name = "sd2"
    label = "Stable Diffusion 2.x"
    order = 20
    components = (
        ComponentSpec("unet", "lora_unet", checkpoint=(("model.diffusion_model.", "native"),)),
        ComponentSpec("text_encoder", "lora_te", comfy=("clip_h",), checkpoint=(("cond_stage_model.model.", "openclip"),)),
    )
    builtins = {"sd2": {"unet": "sd21_unet.json", "text_encoder": "openclip_vit_h14_text.json"}}
    pipelines = SD1.pipelines
    modelspec_arch = "stable-diffusion-v2-768-v"
    modelspec_aliases = ("stable-diffusion-v2",)
    kohya_version = "sd_v2"
    kohya_versions = ("sd_v2_v", "sd_v2_512")
    kohya_v2 = True
    hub_repo = "stabilityai/stable-diffusion-2-1"
    hub_tags = ("stable-diffusion",)
    license = "openrail++"
    key_hints = SD1.key_hints
    checkpoint_hints = ("cond_stage_model.model.",)
    resolution = 768
    objective = "v_prediction"
    lbw_presets = SD_PRESETS
    lbw_fixed = {17: SD17, 26: SD26}
    openclip_drop_last = True

    def pipeline_score(self, pipeline, configs):
        """SD1 and SD2 share the pipeline class: an OpenCLIP-H text encoder (width 1024) tells SD2."""
        score = super().pipeline_score(pipeline, configs)
        te = configs.get("text_encoder")
        if not score or "text_encoder_2" in configs or te is None or class_name(te) != "CLIPTextModel":
            return 0
        return score + 1 if te.get("hidden_size") == 1024 else 0

    def infer_text_configs(self, shapes):
        """As for any UNet family, with the text encoder forced to ``CLIPTextModel`` (diffusers'
        SD2 encoder has no projection, even where the OpenCLIP file holds one)."""
        out = super().infer_text_configs(shapes)
        if "text_encoder" in out:  # diffusers' SD2 text encoder has no projection
            out["text_encoder"]["architectures"] = ["CLIPTextModel"]
        return out


register_family(SD2())
