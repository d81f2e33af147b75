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

import contextlib
import io
import logging
import warnings
from functools import lru_cache

import torch

TINY_TE_DIM = 32
TINY_VOCAB_EXTRA = ("<|startoftext|>", "<|endoftext|>")


@contextlib.contextmanager
def quiet():
    """Silence the config warnings diffusers/transformers print for toy-sized models."""
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft", "lycoris")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as tlog

        tlevel = tlog.get_verbosity()
        tlog.set_verbosity_error()
    except Exception:  # pragma: no cover - transformers always has it
        tlog = None
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        if tlog is not None:
            tlog.set_verbosity(tlevel)


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
