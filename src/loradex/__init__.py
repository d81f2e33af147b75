"""loradex: personalization adapters for diffusion models — store, convert, merge, serve, train.

    import loradex
    a = loradex.load("x.safetensors")                 # any format; arch detected or arch="sdxl"
    a.patches["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].delta()
    loradex.save(a, "y.safetensors", format="kohya")
    loradex.convert("x.safetensors", "y.safetensors", to="diffusers")

    # an app that already holds a diffusers pipeline
    sd, meta = loradex.to_diffusers(a)                # what pipe.load_lora_weights(sd) takes, in memory
    name = loradex.apply(pipe, a, weight=0.8)         # LoRA-expressible modules through diffusers,
    loradex.remove(pipe, name)                        # the others patched in place, undone exactly

Importing loradex prints nothing and imports neither diffusers, transformers nor peft (the
functions that need them import them when called, inside ``loradex.log.quiet()``). The package is
typed (``py.typed``).
"""

import warnings as _warnings

# The imports below pull in torch, numpy and sqlite-utils only; should a dependency warn at import
# (deprecations of its own dependencies), the warning is silenced here by a filter limited to
# these imports -- never by redirecting stderr, which would hide other threads' output.
with _warnings.catch_warnings():
    _warnings.simplefilter("ignore")
    from loradex.api import apply, convert, describe, inspect, load, remove, save, to_diffusers
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
    "UnsafeFileError", "apply", "bake", "convert", "describe", "extract", "inspect", "load", "merge", "remove",
    "resize", "save", "to_diffusers",
]
