"""The device a command or a library call runs on, decided in one place.

``auto`` (the default of every ``--device`` of the CLI) is CUDA when torch sees a GPU, else the
CPU. Any other value is a torch device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``...), checked
here so that a typo or a missing GPU is one clear error before a model is loaded.
"""

from __future__ import annotations

from loradex.errors import LoradexError

#: the default of every ``--device``
AUTO = "auto"


def resolve_device(spec: str | None = None) -> str:
    """``spec`` as a torch device string: ``None``, ``""`` and ``"auto"`` give ``"cuda"`` when
    CUDA is available, else ``"cpu"``; an explicit device is validated (LoradexError when torch
    does not know it, or names a CUDA device this machine does not have). Idempotent: a resolved
    string resolves to itself."""
    import torch

    text = str(spec).strip() if spec is not None else ""
    if not text or text.lower() == AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise LoradexError(f"device {text!r}: not a torch device (auto, cpu, cuda, cuda:1, mps, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LoradexError(f"device {text}: CUDA is not available on this machine (use auto or cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LoradexError(f"device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(dev)
