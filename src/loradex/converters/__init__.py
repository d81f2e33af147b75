"""Every on-disk format, by name: ``detect`` asks each converter, ``read``/``write`` dispatch.

Write targets (``--to``): kohya (= a1111, comfy: both load kohya keys for every kind), lycoris,
diffusers, peft, and for textual inversion a1111-ti, kohya-ti, diffusers-ti. ``a1111`` on an
adapter that only holds embeddings means A1111's ``.pt`` embedding.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from loradex.converters.common import ConversionReport, Converter, check_strict
from loradex.core.adapter import Adapter
from loradex.errors import ConversionError, FormatError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _table() -> dict[str, Converter]:
    from loradex.converters.comfy import Comfy
    from loradex.converters.diffusers import Diffusers
    from loradex.converters.embeddings import A1111Embedding, DiffusersEmbedding, KohyaEmbedding
    from loradex.converters.kohya import Kohya
    from loradex.converters.lycoris import Lycoris
    from loradex.converters.peft import Peft

    convs: list[Converter] = [
        Peft(), Kohya(), Lycoris(), Comfy(), A1111Embedding(), KohyaEmbedding(), DiffusersEmbedding(), Diffusers(),
    ]
    return {c.name: c for c in convs}


_TABLE: dict[str, Converter] | None = None


def converters() -> dict[str, Converter]:
    """name -> converter, in detection order."""
    global _TABLE
    if _TABLE is None:
        _TABLE = _table()
    return _TABLE


ALIASES = {"a1111": "kohya", "comfy": "kohya", "comfyui": "kohya", "sd-scripts": "kohya", "ti": "diffusers-ti"}
#: Formats that hold only adapter modules (no embeddings): nothing to write without patches.
MODULE_ONLY = ("diffusers", "peft", "lycoris")
WRITE_TARGETS = ("kohya", "a1111", "comfy", "lycoris", "diffusers", "peft", "a1111-ti", "kohya-ti", "diffusers-ti")


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
                from loradex.converters import safetensors_io as sio

                if not sio.looks_like_pickle(p):
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
    n = name.lower()
    if n == "a1111" and adapter is not None and not adapter.patches and adapter.embeddings:
        return "a1111-ti"
    n = ALIASES.get(n, n)
    if n not in converters():
        raise FormatError(f"unknown format {name!r}; choose one of: {', '.join(WRITE_TARGETS)}")
    return n


def write(
    adapter: Adapter, path: str | os.PathLike, to: str, rank: int | None = None, dtype: str | torch.dtype | None = None, **options
) -> ConversionReport:
    """Write ``adapter`` in format ``to``; returns what happened to each module."""
    name = resolve_name(to, adapter)
    conv = converters()[name]
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise FormatError(f"unknown dtype {dtype!r}; choose fp16, bf16 or fp32")
        dtype = DTYPES[dtype]
    if rank is not None and rank < 1:
        raise FormatError("--rank must be a positive integer")
    if not adapter.patches and name in MODULE_ONLY:
        # an empty LoRA file or PEFT folder would "succeed" and load as nothing
        held = "only textual-inversion embeddings" if adapter.embeddings else "nothing"
        raise ConversionError(
            f"{name} holds adapter modules and this adapter has none ({held}); "
            "write embeddings with --to diffusers-ti, a1111-ti or kohya-ti"
        )
    report = ConversionReport(target=name)
    conv.write(adapter, Path(path), report, dtype=dtype, rank=rank, **options)
    return report
