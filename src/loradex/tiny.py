"""Tiny, randomly initialised diffusion models built in-process with the real diffusers and
transformers classes. They are the embedded default of ``loradex demo`` and the fixtures of the
tests: no download, a few hundred thousand parameters, a 2-step 64x64 image in ~60 ms on 2 cores.

Shapes follow the SD-style layout (see DESIGN.md, testing notes): UNet2DConditionModel with
block_out_channels (32, 64), one CrossAttn down/up block, cross_attention_dim 32, 8 norm groups;
AutoencoderKL of the same widths; a 2-layer CLIP text encoder of width 32. The CLIP tokenizer is
built from memory (no vocab files ship with transformers): the byte-level alphabet, each symbol
with a ``</w>`` twin, plus the start/end tokens, and no merges.
"""

from __future__ import annotations

from functools import lru_cache

import torch

TINY_TE_DIM = 32
TINY_VOCAB_EXTRA = ("<|startoftext|>", "<|endoftext|>")


def quiet():
    """Silence the config warnings diffusers/transformers/peft/lycoris print for toy-sized models."""
    from loradex.core.arch import _quiet

    return _quiet(("peft", "lycoris", "LyCORIS"))


@lru_cache(maxsize=1)
def _vocab() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    toks = chars + [c + "</w>" for c in chars] + list(TINY_VOCAB_EXTRA)
    return {t: i for i, t in enumerate(toks)}


def tiny_tokenizer():
    """A working CLIPTokenizer without files: byte-level vocab, no merges, 77 positions."""
    import json
    import os
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        vocab = os.path.join(d, "vocab.json")
        merges = os.path.join(d, "merges.txt")
        with open(vocab, "w") as f:
            json.dump(_vocab(), f)
        with open(merges, "w") as f:
            f.write("#version: 0.2\n")
        with quiet():
            tok = CLIPTokenizer(vocab, merges, model_max_length=77)
    return tok


def tiny_clip_config(hidden: int = TINY_TE_DIM, layers: int = 2, projection: bool = False):
    from transformers import CLIPTextConfig

    n = len(_vocab())
    return CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_attention_heads=4,
        num_hidden_layers=layers,
        vocab_size=n,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=n - 2,
        eos_token_id=n - 1,
        pad_token_id=n - 1,
    )


def tiny_text_encoder(seed: int = 0, hidden: int = TINY_TE_DIM, projection: bool = False):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    with quiet():
        return cls(tiny_clip_config(hidden, projection=projection)).eval()


def tiny_unet(seed: int = 0, cross_attention_dim: int = TINY_TE_DIM, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    cfg = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
        attention_head_dim=8,
    )
    cfg.update(overrides)
    with quiet():
        return UNet2DConditionModel(**cfg).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    with quiet():
        return AutoencoderKL(
            block_out_channels=(32, 64),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
        ).eval()


def tiny_sd_pipeline(seed: int = 0):
    """A complete StableDiffusionPipeline (SD1-style) with random weights, on the CPU."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    with quiet():
        pipe = StableDiffusionPipeline(
            vae=tiny_vae(seed),
            text_encoder=tiny_text_encoder(seed),
            tokenizer=tiny_tokenizer(),
            unet=tiny_unet(seed),
            scheduler=DDIMScheduler(num_train_timesteps=1000),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- SDXL- and FLUX-shaped tiny models (same classes and layout as the real ones, toy widths) ----

TINY_SDXL_TIME_EMBED = 8  # addition_time_embed_dim; SDXL's text_time embedding takes 6 time ids


def tiny_sdxl_unet(seed: int = 0, **overrides):
    """An SDXL-structured UNet2DConditionModel in miniature (about 0.5 M parameters).

    Like SDXL: ``addition_embed_type="text_time"`` (pooled text of text_encoder_2 + 6 time ids),
    linear proj_in/proj_out, a first level without attention, more transformer blocks deeper down
    (1, 2), 2 resnets per level (so the SGM indices are those of SDXL: ``input_blocks.4.1`` is
    ``down_blocks.1.attentions.0``, ``output_blocks.2.2.conv`` the first upsampler), and
    cross_attention_dim 64 = 32 + 32 (the hidden states of both tiny text encoders, concatenated).
    Widths (16, 32) differ per level so a wrong block index shows up as a wrong shape.
    """
    cfg = dict(
        block_out_channels=(16, 32),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=TINY_TE_DIM + 6 * TINY_SDXL_TIME_EMBED,
    )
    cfg.update(overrides)
    return tiny_unet(seed, cross_attention_dim=2 * TINY_TE_DIM, **cfg)


def tiny_sdxl_text_encoders(seed: int = 0):
    """(CLIPTextModel, CLIPTextModelWithProjection), both 32 wide: SDXL's CLIP-L and bigG in miniature."""
    return tiny_text_encoder(seed), tiny_text_encoder(seed + 1, projection=True)


def tiny_flux_transformer(seed: int = 0, **overrides):
    """A FluxTransformer2DModel in miniature: 2 double + 2 single blocks, 4 heads of 8 (width 32).

    in_channels 16 = a 4-channel latent packed 2x2 (as FLUX packs its 16-channel latent to 64);
    joint_attention_dim 32 = the tiny T5 width, pooled_projection_dim 32 = the tiny CLIP width;
    guidance embedding on, like FLUX.1-dev. The rope axes (2, 2, 4) sum to the head dim.
    """
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    cfg = dict(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=TINY_TE_DIM,
        pooled_projection_dim=TINY_TE_DIM,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )
    cfg.update(overrides)
    with quiet():
        return FluxTransformer2DModel(**cfg).eval()


def tiny_t5(seed: int = 0, d_model: int = TINY_TE_DIM):
    """A T5EncoderModel in miniature (T5 v1.1 layout: gated-gelu FF, no biases, relative attention).

    Its vocabulary is the size of the tiny CLIP vocabulary, so the tiny tokenizer's ids fit.
    """
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    n = len(_vocab())
    cfg = T5Config(
        vocab_size=n,
        d_model=d_model,
        d_kv=8,
        d_ff=d_model * 2,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=n - 1,
        eos_token_id=n - 1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
    with quiet():
        return T5EncoderModel(cfg).eval()


_TINY_ARCH_KINDS = ("sd1", "sdxl", "flux1")


@lru_cache(maxsize=8)
def tiny_arch(kind: str = "sd1"):
    """Build and register the custom arch of the tiny models (``tiny-sd1``, ``tiny-sdxl``, ``tiny-flux1``).

    Each uses the kohya naming of its big brother (diffusers paths / SGM paths + te1,te2 / BFL names
    + te1,te3), so converters can be tested on it exactly as on the real models.
    """
    from loradex.core.arch import arch_from_models, register_arch

    if kind == "sd1":
        models, style = {"unet": tiny_unet(), "text_encoder": tiny_text_encoder()}, "sd"
    elif kind == "sdxl":
        te1, te2 = tiny_sdxl_text_encoders()
        models, style = {"unet": tiny_sdxl_unet(), "text_encoder": te1, "text_encoder_2": te2}, "sdxl"
    elif kind == "flux1":
        models = {
            "transformer": tiny_flux_transformer(),
            "text_encoder": tiny_text_encoder(),
            "text_encoder_2": tiny_t5(),
        }
        style = "flux"
    else:
        from loradex.errors import ArchError

        raise ArchError(f"unknown tiny arch kind {kind!r} (expected one of {', '.join(_TINY_ARCH_KINDS)})")
    arch = arch_from_models(f"tiny-{kind}", models, style)
    register_arch(arch)
    return arch


def tiny_sdxl_pipeline(seed: int = 0):
    """A complete StableDiffusionXLPipeline from the tiny SDXL parts (two tokenizers, two encoders)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    te1, te2 = tiny_sdxl_text_encoders(seed)
    with quiet():
        pipe = StableDiffusionXLPipeline(
            vae=tiny_vae(seed),
            text_encoder=te1,
            text_encoder_2=te2,
            tokenizer=tiny_tokenizer(),
            tokenizer_2=tiny_tokenizer(),
            unet=tiny_sdxl_unet(seed),
            scheduler=EulerDiscreteScheduler(num_train_timesteps=1000),
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe
