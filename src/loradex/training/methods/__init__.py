"""Training methods: each decides what learns, and what the result is written as.

A method implements the ``Method`` interface (``methods.common``); the one loop
(``loradex.training.loop``) does the rest. ``get_method(name)`` builds one: ``lora``, ``ti``,
``loha``, ``lokr``, ``pivotal``, ``dreambooth``.
"""

from __future__ import annotations

from loradex.errors import TrainingError
from loradex.training.methods.common import Method, cast_frozen, te_canonical, training_metadata

__all__ = ["Method", "cast_frozen", "get_method", "te_canonical", "training_metadata"]


def get_method(name: str) -> Method:
    """A new ``Method`` for ``name``. Each method's module is imported here, on demand: lycoris-lora
    and peft are only loaded by the runs that use them."""
    if name == "lora":
        from loradex.training.methods.lora import LoraMethod

        return LoraMethod()
    if name in ("loha", "lokr"):
        from loradex.training.methods.lycoris import LycorisMethod

        return LycorisMethod(name)
    if name == "ti":
        from loradex.training.methods.ti import TextualInversion

        return TextualInversion()
    if name == "pivotal":
        from loradex.training.methods.pivotal import Pivotal

        return Pivotal()
    if name == "dreambooth":
        from loradex.training.methods.dreambooth import DreamBooth

        return DreamBooth()
    raise TrainingError(f"unknown method {name!r}")
