"""Every on-disk format, by name: ``detect`` asks each converter, ``read``/``write`` dispatch.

Each format is one module (``BUILTIN`` below) whose converter class registers itself with
``@register_format`` (``converters/common.py``); the lists here -- detection order, ``--to`` names,
which formats hold modules or embeddings -- are derived from the registered classes' attributes.
Write targets today: kohya (= a1111, comfy: both load kohya keys for every kind), lycoris,
diffusers, peft, and for textual inversion a1111-ti, kohya-ti, diffusers-ti and a1111-png (an
embedding image). ``a1111`` on an adapter that only holds embeddings means A1111's ``.pt`` embedding.

Every reader of adapter weights (kohya, lycoris, comfy, diffusers) reads safetensors files and
pickles (``.pt``/``.ckpt``/``.bin``, opened with ``torch.load(weights_only=True)`` only) alike:
``safetensors_io.read_tensor_header`` describes a pickle's flat ``{key: tensor}`` dict like a
safetensors header, so detection goes by the keys whatever the container.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from loradex.converters.common import (
    COMMON_OPTIONS,
    FORMATS,
    ConversionReport,
    Converter,
    check_strict,
    register_format,
    unregister_format,
)
from loradex.core.adapter import Adapter
from loradex.core.lazy import LazyMapping
from loradex.errors import ConversionError, FormatError

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)

#: ``--dtype`` name -> torch dtype (torch is imported when it is first read)
DTYPES = LazyMapping(lambda: {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32})

#: The format modules shipped with loradex (each registers its converters when imported). A new
#: format is one module plus its name here.
BUILTIN = ("peft", "kohya", "lycoris", "comfy", "embeddings", "a1111_png", "diffusers")
_loaded = False


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        for m in BUILTIN:
            importlib.import_module(f"loradex.converters.{m}")
        _loaded = True


def converters() -> dict[str, Converter]:
    """name -> converter, in detection order (each format's ``priority``, lowest first)."""
    _load_builtin()
    return dict(sorted(FORMATS.items(), key=lambda kv: (kv[1].priority, kv[0])))


def aliases() -> dict[str, str]:
    """Every other name a writer answers to (listed and hidden aliases) -> its format name."""
    return {a: c.name for c in converters().values() for a in (*c.aliases, *c.hidden_aliases)}


def write_targets() -> tuple[str, ...]:
    """The ``--to`` names to offer: each writable format, then its listed aliases, in detection
    order (module formats first, then the embedding-only ones)."""
    convs = sorted(converters().values(), key=lambda c: (not c.modules, c.priority))
    return tuple(n for c in convs if c.writes for n in (c.name, *c.aliases))


def targets_help() -> str:
    """``--to`` help text: the targets separated by ``|``."""
    return " | ".join(write_targets())


def lora_targets() -> tuple[str, ...]:
    """Write targets that hold plain LoRA modules (what merge, resize and extract produce)."""
    table = converters()
    names = aliases()
    return tuple(t for t in write_targets()
                 if (c := table[names.get(t, t)]).modules and (c.kinds is None or "lora" in c.kinds))


def detect(path: str | os.PathLike) -> Converter:
    """The converter that recognises ``path``; FormatError when none does."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p}: no such file or folder")
    for conv in converters().values():
        if p.is_dir() and not conv.folder:
            continue
        try:
            if conv.detect(p):
                return conv
        except FormatError:
            if p.is_file():
                from loradex.converters import pickle_io

                if not pickle_io.looks_like_pickle(p):
                    raise
    raise FormatError(f"{p}: not an adapter or embedding file loradex recognises")


def read(path: str | os.PathLike, format: str | None = None, arch=None, strict: bool = False) -> Adapter:
    """Read ``path`` with the converter ``format`` names (detected when None). Keys nothing
    explains are listed in ``Adapter.unexplained``; ``strict=True`` refuses the file instead
    (FormatError naming the count and the first keys with their reasons)."""
    conv = converters()[resolve_name(format)] if format else detect(path)
    adapter = conv.read(Path(path), arch=arch)
    return check_strict(adapter, path) if strict else adapter


def resolve_name(name: str, adapter: Adapter | None = None) -> str:
    """The registered format a ``--to`` name means: its own name, an alias, or -- for an adapter
    holding only embeddings -- a format's embedding alias (``a1111`` -> ``a1111-ti``)."""
    n = name.lower()
    table = converters()
    if adapter is not None and not adapter.patches and adapter.embeddings:
        for c in table.values():
            if n in c.embedding_aliases:
                return c.name
    n = aliases().get(n, n)
    if n not in table:
        raise FormatError(f"unknown format {name!r}; choose one of: {', '.join(write_targets())}")
    return n


def write(
    adapter: Adapter, path: str | os.PathLike, to: str, rank: int | None = None, dtype: str | torch.dtype | None = None, **options
) -> ConversionReport:
    """Write ``adapter`` in format ``to``; returns what happened to each module."""
    name = resolve_name(to, adapter)
    conv = converters()[name]
    if not conv.writes:
        raise FormatError(f"loradex reads {name} files but does not write them; choose one of: "
                          f"{', '.join(write_targets())}")
    unknown = sorted(set(options) - COMMON_OPTIONS - conv.options)
    if unknown:
        takes = sorted(conv.options)
        raise ConversionError(f"the {name} writer has no option {', '.join(unknown)}"
                              + (f" (its own options: {', '.join(takes)})" if takes else ""))
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise FormatError(f"unknown dtype {dtype!r}; choose fp16, bf16 or fp32")
        dtype = DTYPES[dtype]
    if rank is not None and rank < 1:
        raise FormatError("--rank must be a positive integer")
    if not adapter.patches and conv.modules and not conv.embeddings:
        # an empty LoRA file or PEFT folder would "succeed" and load as nothing
        held = "only textual-inversion embeddings" if adapter.embeddings else "nothing"
        raise ConversionError(
            f"{name} holds adapter modules and this adapter has none ({held}); "
            "write embeddings with --to diffusers-ti, a1111-ti or kohya-ti"
        )
    report = ConversionReport(target=name)
    conv.write(adapter, Path(path), report, dtype=dtype, rank=rank, **options)
    return report


__all__ = [
    "BUILTIN", "DTYPES", "FORMATS", "ConversionReport", "Converter", "aliases", "converters", "detect",
    "lora_targets", "read", "register_format", "resolve_name", "targets_help", "unregister_format", "write",
    "write_targets",
]
