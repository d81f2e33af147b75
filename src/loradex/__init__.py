"""loradex: personalization adapters for diffusion models — store, convert, merge, serve, train.

    import loradex
    a = loradex.load("x.safetensors")                 # any format; arch detected or arch="sdxl"
    a.patches["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].delta()
    loradex.save(a, "y.safetensors", format="kohya")
    loradex.convert("x.safetensors", "y.safetensors", to="diffusers")
"""

from loradex.api import convert, describe, inspect, load, save
from loradex.core.adapter import Adapter, Embedding
from loradex.errors import (
    ArchError,
    ConversionError,
    FormatError,
    LoradexError,
    RegistryError,
    UnsafeFileError,
)
from loradex.merge import bake, extract, merge, resize
from loradex.registry import Registry

__version__ = "0.1.0"

__all__ = [
    "Adapter", "ArchError", "ConversionError", "Embedding", "FormatError", "LoradexError", "Registry", "RegistryError",
    "UnsafeFileError", "bake", "convert", "describe", "extract", "inspect", "load", "merge", "resize", "save",
]
