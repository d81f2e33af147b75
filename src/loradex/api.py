"""The public Python API (re-exported by ``loradex``): load, save, convert, inspect."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from loradex import converters as _conv
from loradex.converters.common import ConversionReport
from loradex.core.adapter import Adapter
from loradex.core.kinds.base import scalar


def load(path: str | os.PathLike, format: str | None = None, arch=None, strict: bool = False) -> Adapter:
    """Read any supported adapter/embedding file or PEFT folder. ``arch``: name (sd1, sd2, sdxl,
    flux1, or a registered custom arch) or an Arch; detected from keys and shapes when omitted.

    Keys of the file that no patch kind, module or embedding explains are not dropped silently:
    they are listed, key -> reason, in ``Adapter.unexplained`` (ComfyUI only logs "lora key not
    loaded"); ``strict=True`` raises FormatError instead, naming the count and the first keys."""
    return _conv.read(path, format=format, arch=arch, strict=strict)


def save(
    adapter: Adapter, path: str | os.PathLike, format: str = "kohya", rank: int | None = None, dtype=None, **options
) -> ConversionReport:
    """Write ``adapter`` as ``format``. Kinds the format cannot hold are converted to LoRA exactly
    where possible, else by SVD at ``rank``; the returned report says which."""
    return _conv.write(adapter, path, format, rank=rank, dtype=dtype, **options)


def convert(
    src: str | os.PathLike, dst: str | os.PathLike, to: str, rank: int | None = None, dtype=None, arch=None,
    strict: bool = False, **options
) -> ConversionReport:
    """``load`` then ``save``. The report carries the reader's notes and, in ``unexplained``, every
    source key that was not read (key -> reason), so a conversion never loses tensors unreported;
    ``strict=True`` refuses such a source before anything is written."""
    adapter = load(src, arch=arch, strict=strict)
    report = save(adapter, dst, to, rank=rank, dtype=dtype, **options)
    report.notes[:0] = adapter.notes
    report.unexplained.update(adapter.unexplained)
    return report


def describe(adapter: Adapter) -> dict:
    """A JSON-able summary: kinds, modules per component, ranks, alphas, embeddings, metadata,
    the reader's notes and ``unexplained`` (every key of the source nothing explained -> why)."""
    alphas = Counter()
    for p in adapter.patches.values():
        a = scalar(getattr(p, "alpha", None))
        if a is not None:
            alphas[a] += 1
    meta = adapter.metadata
    return {
        "format": adapter.source_format,
        "arch": adapter.arch,
        "modules": len(adapter.patches),
        "kinds": dict(adapter.kinds()),
        "components": adapter.components(),
        "ranks": {str(k): v for k, v in sorted(adapter.ranks().items())},
        "alphas": {str(k): v for k, v in sorted(alphas.items())},
        "dora": sum(getattr(p, "dora_scale", None) is not None for p in adapter.patches.values()),
        "dtype": str(adapter.dtype()).replace("torch.", "") if adapter.dtype() else None,
        "embeddings": {
            t: {"vectors": e.num_vectors, "encoders": {c: list(v.shape) for c, v in e.vectors.items()}}
            for t, e in adapter.embeddings.items()
        },
        "metadata": {
            "keys": len(meta),
            "title": meta.get("modelspec.title") or meta.get("ss_output_name"),
            "network_module": meta.get("ss_network_module"),
            "base_model": meta.get("ss_base_model_version") or meta.get("modelspec.architecture"),
            "training_steps": meta.get("ss_steps"),
            "trigger": meta.get("modelspec.trigger_phrase") or meta.get("ss_tag_frequency", "")[:0] or None,
        },
        "notes": list(adapter.notes),
        # modules with NaN/Inf values: the whole list (merge, bake and add refuse them by default)
        "nonfinite": adapter.nonfinite(),
        # every source key nothing explained, key -> reason: the whole list, never cut
        "unexplained": dict(adapter.unexplained),
    }


def inspect(path: str | os.PathLike, arch=None, strict: bool = False) -> dict:
    """``describe`` of the loaded file plus its identities (sha256, Civitai AutoV1/V2/V3)."""
    from loradex.registry.hashes import file_hashes

    adapter = load(path, arch=arch, strict=strict)
    out = {"path": str(path), **describe(adapter)}
    p = Path(path)
    if p.is_file():
        out["hashes"] = file_hashes(p)
        out["size"] = p.stat().st_size
    return out
