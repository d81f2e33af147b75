"""The base model a run trains on: loading it, the arch it is written for, the device and dtype
policy, and the ``Context`` the loop shares with the methods (pipeline, config, device, arch).

Kept out of the loop so the methods and ``evaluate_loss`` can use a pipeline's arch and text
conditioning without importing the loop.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from loradex.errors import LoradexError, TrainingError
from loradex.training.config import TrainConfig


def load_base(base: str | None):
    """``None``/``tiny``: the embedded tiny SD pipeline (offline); ``tiny-<family>`` another
    embedded one; a diffusers folder or a single-file checkpoint otherwise (local files only).

    Loader errors become ``TrainingError`` so the CLI reports them in one line."""
    from loradex.converters.pipeline import load_pipeline

    if isinstance(base, str) and not Path(base).exists() and not base.startswith("tiny"):
        raise TrainingError(f"base {base!r}: no such folder or file (a diffusers folder or a single checkpoint file)")
    try:
        pipe = load_pipeline(base)
    except LoradexError as e:
        raise TrainingError(str(e)) from None
    if not hasattr(pipe, "vae"):
        raise TrainingError(f"base {base}: a pipeline without a VAE is not trained here")
    return pipe


def pipeline_arch(pipe):
    """The arch an adapter trained on ``pipe`` is written for, derived from the pipeline's own
    component configs (a built-in or embedded name when the modules are one's, else a derived arch
    that later commands resolve from the cache or the file's metadata). Call it before adapter
    layers are injected: injected layers change the module names the arch is derived from."""
    from loradex.converters.pipeline import pipeline_components
    from loradex.core.archs import arch_from_models
    from loradex.errors import ArchError

    try:
        return arch_from_models(pipeline_components(pipe), pipeline=type(pipe).__name__)
    except ArchError as e:
        raise TrainingError(f"{type(pipe).__name__}: {e}") from None


def precision(cfg: TrainConfig, device: str | None) -> tuple[torch.device, torch.dtype]:
    """The device (CUDA when available unless ``device`` names one) and the dtype of the frozen
    weights: fp16/bf16 only for mixed precision on CUDA. On any other device ``cfg.mixed_precision``
    is reset to ``no`` (recorded so in the metadata): CPU autocast is slower and inexact."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.mixed_precision != "no" and dev.type != "cuda":
        cfg.mixed_precision = "no"
    wdt = torch.float32
    if dev.type == "cuda" and cfg.mixed_precision != "no":
        wdt = torch.float16 if cfg.mixed_precision == "fp16" else torch.bfloat16
    return dev, wdt


@dataclass
class Context:
    """What the loop shares with a method: the pipeline, the config, the device, the frozen
    weights' dtype and the base's arch (derived on construction, before anything is injected)."""

    pipe: object
    cfg: TrainConfig
    device: torch.device
    weight_dtype: torch.dtype = torch.float32
    arch: object = None  # the base's Arch (pipeline_arch), set before anything is injected

    def __post_init__(self) -> None:
        if self.arch is None:
            self.arch = pipeline_arch(self.pipe)

    @property
    def family(self):
        """The arch's family: objective, latents, conditioning and prediction of the denoiser."""
        return self.arch.family

    @property
    def denoiser(self):
        """The UNet or transformer."""
        return getattr(self.pipe, self.arch.denoiser)

    def encoders(self) -> list[tuple[str, object, object]]:
        """(component, text encoder, tokenizer) of every text encoder the pipeline has."""
        return [(c, getattr(self.pipe, c), getattr(self.pipe, c.replace("text_encoder", "tokenizer"), None))
                for c in self.arch.text_encoders if getattr(self.pipe, c, None) is not None]

    def clip_encoders(self) -> list[tuple[str, object, object]]:
        """The CLIP text encoders (what textual inversion and text-encoder LoRAs train; T5 is left alone)."""
        return [e for e in self.encoders() if self.arch.component_kind(e[0]) == "clip"]

    def autocast(self):
        """Mixed precision's autocast on CUDA (fp16 or bf16), else a no-op context."""
        if self.device.type == "cuda" and self.cfg.mixed_precision != "no":
            dtype = torch.float16 if self.cfg.mixed_precision == "fp16" else torch.bfloat16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()


def encode_prompts(ctx: Context, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Text conditioning as the family's pipeline computes it (``Family.encode_prompts``), so a
    trained adapter sees at training time what the consumer pipeline feeds it."""
    return ctx.family.encode_prompts(ctx.pipe, prompts, ctx.device)
