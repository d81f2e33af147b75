"""Options several commands share with one spelling, one set of choices and one help text:
``--dtype`` on every command that writes tensors (convert's choices and help) and ``--device`` on
every command that runs a model (default ``auto``: CUDA when available, else the CPU, resolved by
:func:`loradex.devices.resolve_device`)."""

from __future__ import annotations

import click

#: the choices of every ``--dtype`` (``convert``'s)
DTYPE_CHOICES = ("fp16", "bf16", "fp32")
#: the help of every ``--dtype`` (``convert``'s); a command may add what its default is
DTYPE_HELP = "cast the output tensors"
DEVICE_HELP = "torch device: auto (CUDA when available, else the CPU), cpu, cuda, cuda:1, mps ..."


def dtype_option(default_note: str | None = None):
    """``--dtype fp16|bf16|fp32`` (default None: each command's own, which ``default_note`` names
    in the help, e.g. ``"the inputs'"``)."""
    help_text = DTYPE_HELP + (f" [default: {default_note}]" if default_note else "")
    return click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None, help=help_text)


def _device(ctx, param, value):
    from loradex.devices import resolve_device
    from loradex.errors import LoradexError

    try:
        return resolve_device(value)
    except LoradexError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None


def device_option(f):
    """``--device`` with the default ``auto``; the command receives the resolved device string
    (``cuda``/``cpu``/... , never ``auto``)."""
    return click.option("--device", default="auto", show_default=True, callback=_device, help=DEVICE_HELP)(f)
