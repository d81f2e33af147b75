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

from loradex.log import quiet

TINY_TE_DIM = 32
TINY_VOCAB_EXTRA = ("<|startoftext|>", "<|endoftext|>")


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


def _config(filename: str, **overrides) -> dict:
    """A bundled tiny config (``core/configs``) as constructor arguments, with ``overrides``."""
    from loradex.core.archs.tables import load_config

    cfg = {k: v for k, v in load_config(filename).items() if not k.startswith("_") and k != "architectures"}
    cfg.update(overrides)
    return cfg


def tiny_clip_config(hidden: int = TINY_TE_DIM, layers: int = 2, projection: bool = False):
    """The tiny CLIP text config (``core/configs/tiny_clip_text*.json``), ``hidden`` wide."""
    from transformers import CLIPTextConfig

    over = {"num_hidden_layers": layers}
    if hidden != TINY_TE_DIM:
        over.update(hidden_size=hidden, intermediate_size=hidden * 2, projection_dim=hidden)
    return CLIPTextConfig(**_config("tiny_clip_text_proj.json" if projection else "tiny_clip_text.json", **over))


def tiny_text_encoder(seed: int = 0, hidden: int = TINY_TE_DIM, projection: bool = False):
    """A 2-layer CLIPTextModel ``hidden`` wide (:func:`tiny_clip_config`), seeded, in eval mode;
    with ``projection`` a CLIPTextModelWithProjection (SDXL's second encoder in miniature). Its
    vocabulary fits :func:`tiny_tokenizer`."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    with quiet():
        return cls(tiny_clip_config(hidden, projection=projection)).eval()


def tiny_unet(seed: int = 0, cross_attention_dim: int = TINY_TE_DIM, **overrides):
    """The tiny SD1-style UNet (``core/configs/tiny_sd1_unet.json``): block_out_channels (32, 64),
    one CrossAttn level, cross-attention 32, 8 norm groups; ``overrides`` change any argument."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with quiet():
        return UNet2DConditionModel(**_config("tiny_sd1_unet.json", cross_attention_dim=cross_attention_dim,
                                              **overrides)).eval()


def tiny_vae(seed: int = 0, **overrides):
    """The tiny AutoencoderKL (widths 32, 64; 4 latent channels); ``overrides`` change any argument
    (flow-matching pipelines read a ``shift_factor``)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    cfg = dict(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    cfg.update(overrides)
    with quiet():
        return AutoencoderKL(**cfg).eval()


def tiny_model(cfg: dict, seed: int = 0):
    """A model from a bundled config (diffusers ``_class_name`` / transformers ``architectures``),
    randomly initialised after ``torch.manual_seed(seed)``, in eval mode."""
    import diffusers
    import transformers

    from loradex.core.archs.tables import class_name

    kw = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"}
    torch.manual_seed(seed)
    with quiet():
        if cfg.get("_class_name"):
            return getattr(diffusers, class_name(cfg))(**kw).eval()
        cls = getattr(transformers, class_name(cfg))
        return cls(cls.config_class(**kw)).eval()


def tiny_pipeline(name: str = "tiny-sd1", seed: int = 0):
    """A complete pipeline of an embedded tiny arch (``tiny-sd1``, ``tiny-sdxl``, ``tiny-flux1``,
    ``tiny-sd3``) with random weights, on the CPU: the family's text-to-image pipeline class, its
    components from the bundled configs (the i-th text encoder seeded ``seed + i``), a tiny
    tokenizer per text encoder (the byte-level CLIP one also serves T5), the tiny VAE and the
    family's tiny scheduler (``Family.tiny_pipeline``)."""
    import inspect

    import diffusers

    from loradex.core.archs import get_arch

    arch = get_arch(name)
    fam = arch.family
    if arch.configs is None or not fam.pipelines:
        from loradex.errors import ArchError

        raise ArchError(f"{name}: no tiny pipeline for {fam.label}")
    vae_overrides, (sched, sched_cfg) = fam.tiny_pipeline
    parts: dict = {}
    for i, comp in enumerate(arch.text_encoders):
        parts[comp] = tiny_model(arch.configs[comp], seed + i)
        parts[comp.replace("text_encoder", "tokenizer")] = tiny_tokenizer()
    parts[arch.denoiser] = tiny_model(arch.configs[arch.denoiser], seed)
    parts["vae"] = tiny_vae(seed, **vae_overrides)
    parts["scheduler"] = getattr(diffusers, sched)(**sched_cfg)
    cls = getattr(diffusers, fam.pipelines[0])
    for pname, prm in inspect.signature(cls.__init__).parameters.items():
        if pname == "requires_safety_checker":
            parts[pname] = False
        elif pname not in parts and pname != "self" and prm.default is inspect.Parameter.empty:
            parts[pname] = None  # safety checker, feature extractor...
    with quiet():
        pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd_pipeline(seed: int = 0):
    """A complete StableDiffusionPipeline (SD1-style) with random weights, on the CPU."""
    return tiny_pipeline("tiny-sd1", seed)


# ---- SDXL- and FLUX-shaped tiny models (same classes and layout as the real ones, toy widths) ----

TINY_SDXL_TIME_EMBED = 8  # addition_time_embed_dim; SDXL's text_time embedding takes 6 time ids


def tiny_sdxl_unet(seed: int = 0, **overrides):
    """An SDXL-structured UNet2DConditionModel in miniature (``core/configs/tiny_sdxl_unet.json``,
    about 0.5 M parameters).

    Like SDXL: ``addition_embed_type="text_time"`` (pooled text of text_encoder_2 + 6 time ids),
    linear proj_in/proj_out, a first level without attention, more transformer blocks deeper down
    (1, 2), 2 resnets per level (so the SGM indices are those of SDXL: ``input_blocks.4.1`` is
    ``down_blocks.1.attentions.0``, ``output_blocks.2.2.conv`` the first upsampler), and
    cross_attention_dim 64 = 32 + 32 (the hidden states of both tiny text encoders, concatenated).
    Widths (16, 32) differ per level so a wrong block index shows up as a wrong shape.
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with quiet():
        return UNet2DConditionModel(**_config("tiny_sdxl_unet.json", **overrides)).eval()


def tiny_sdxl_text_encoders(seed: int = 0):
    """(CLIPTextModel, CLIPTextModelWithProjection), both 32 wide: SDXL's CLIP-L and bigG in miniature."""
    return tiny_text_encoder(seed), tiny_text_encoder(seed + 1, projection=True)


def tiny_flux_transformer(seed: int = 0, **overrides):
    """A FluxTransformer2DModel in miniature (``core/configs/tiny_flux_transformer.json``): 2 double
    + 2 single blocks, 4 heads of 8 (width 32).

    in_channels 16 = a 4-channel latent packed 2x2 (as FLUX packs its 16-channel latent to 64);
    joint_attention_dim 32 = the tiny T5 width, pooled_projection_dim 32 = the tiny CLIP width;
    guidance embedding on, like FLUX.1-dev. The rope axes (2, 2, 4) sum to the head dim.
    """
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    with quiet():
        return FluxTransformer2DModel(**_config("tiny_flux_transformer.json", **overrides)).eval()


def tiny_t5(seed: int = 0, d_model: int = TINY_TE_DIM):
    """A T5EncoderModel in miniature (``core/configs/tiny_t5_encoder.json``; T5 v1.1 layout:
    gated-gelu FF, no biases, relative attention). Its vocabulary is the size of the tiny CLIP
    vocabulary, so the tiny tokenizer's ids fit."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    over = {} if d_model == TINY_TE_DIM else {"d_model": d_model, "d_ff": 2 * d_model}
    with quiet():
        return T5EncoderModel(T5Config(**_config("tiny_t5_encoder.json", **over))).eval()


def tiny_arch(kind: str = "sd1"):
    """The arch of an embedded tiny model (``tiny-sd1``, ``tiny-sdxl``, ``tiny-flux1``...): built
    from the same bundled configs as the models, named like its family's (SD1: diffusers paths;
    SDXL: SGM paths + te1/te2; FLUX: BFL names + te1/te3), so converters are tested on it exactly
    as on the real models."""
    from loradex.core.archs import get_arch

    return get_arch(f"tiny-{kind}")


def tiny_sdxl_pipeline(seed: int = 0):
    """A complete StableDiffusionXLPipeline from the tiny SDXL parts (two tokenizers, two encoders)."""
    return tiny_pipeline("tiny-sdxl", seed)


def tiny_flux_pipeline(seed: int = 0):
    """A complete FluxPipeline from the tiny FLUX parts (CLIP + T5, flow-matching scheduler)."""
    return tiny_pipeline("tiny-flux1", seed)
