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

from __future__ import annotations

import importlib as _importlib
import sys as _sys
import types as _types
import warnings as _warnings
from typing import TYPE_CHECKING

from loradex.errors import (
    ArchError,
    ConversionError,
    FormatError,
    LoradexError,
    RegistryError,
    UnsafeFileError,
)

#: Public name -> the module that defines it. Imported on first use (PEP 562), so ``import loradex``
#: and the CLI's ``--help`` cost no torch import (measured by ``bench/startup.py``).
_LAZY = {
    **dict.fromkeys(("apply", "convert", "describe", "inspect", "load", "remove", "save", "to_diffusers"),
                    "loradex.api"),
    **dict.fromkeys(("Adapter", "Embedding"), "loradex.core.adapter"),
    **dict.fromkeys(("bake", "extract", "merge", "resize"), "loradex.merge"),
    "Registry": "loradex.registry",
}

if TYPE_CHECKING:  # what type checkers and IDEs see (the package is typed: py.typed)
    from loradex.api import apply, convert, describe, inspect, load, remove, save, to_diffusers
    from loradex.core.adapter import Adapter, Embedding
    from loradex.merge import bake, extract, merge, resize
    from loradex.registry import Registry


def __getattr__(name: str):
    """Import a public name's module on first access (``loradex.load`` imports torch then)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loradex' has no attribute {name!r}")
    # should a dependency warn at import (deprecations of its own dependencies), the warning is
    # silenced by a filter limited to this import -- never by redirecting stderr
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore")
        value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(_types.ModuleType):
    """``loradex.merge`` is both a function (the public API) and the subpackage defining it. The
    import system binds a subpackage on its parent once it is imported, which would hide the
    function behind the lazy ``__getattr__``; this property keeps ``loradex.merge`` the function,
    as the eager imports of earlier versions did (``sys.modules["loradex.merge"]`` is the package)."""

    @property
    def merge(self):
        from loradex.merge import merge

        return merge

    @merge.setter
    def merge(self, _module) -> None:  # the import system binding the subpackage: keep the function
        pass


_sys.modules[__name__].__class__ = _Package


__version__ = "0.1.0"

__all__ = [
    "Adapter", "ArchError", "ConversionError", "Embedding", "FormatError", "LoradexError", "Registry", "RegistryError",
    "UnsafeFileError", "apply", "bake", "convert", "describe", "extract", "inspect", "load", "merge", "remove",
    "resize", "save", "to_diffusers",
]
