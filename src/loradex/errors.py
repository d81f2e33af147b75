"""Errors raised by loradex.

Every failure caused by bad input is a ``LoradexError`` subclass with a one-line message; the CLI
prints ``error: <message>`` and exits with status 2. Anything else escaping is a bug in loradex.
"""

from __future__ import annotations


class LoradexError(Exception):
    """Base class of every error loradex raises on purpose."""

    def __init__(self, message: str) -> None:
        # One line only: the CLI prints the message as is.
        super().__init__(" ".join(str(message).split()))


class FormatError(LoradexError):
    """A file is not in the expected format, is malformed, or holds something loradex cannot map."""


class UnsafeFileError(LoradexError):
    """A file would need code execution (a pickle that is not plain tensors) or is hostile."""


class ArchError(LoradexError):
    """The architecture cannot be detected, or a module does not exist in it."""


class ConversionError(LoradexError):
    """A conversion cannot be done as asked (e.g. a kind the target cannot hold and no rank given)."""


class RegistryError(LoradexError):
    """A registry operation failed (unknown reference, bad name, unwritable home, ...)."""


class TrainingError(LoradexError):
    """A training run cannot start or go on as configured (bad options, dataset, base or checkpoint)."""


class DiskFullError(LoradexError):
    """The disk (or the quota) ran out while writing an output; nothing half-written was left."""
