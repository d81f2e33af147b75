"""The public Python API (re-exported by ``loradex``): load, save, convert, describe, inspect, and
for apps that already hold a diffusers pipeline: to_diffusers, apply, remove.

Nothing here imports torch, diffusers, transformers or peft at import time (``import loradex``
stays fast and prints nothing; torch comes with the first tensor, see ``core/lazy.py``, and
``inspect`` of a safetensors adapter needs none): the pipeline functions import them when called, inside
``loradex.log.quiet()`` so their import-time notices (transformers' torchvision warnings and the
like) are silenced through their own loggers and warning filters, never by redirecting stderr.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from loradex import converters as _conv
from loradex.converters import metadata as _metadata
from loradex.converters.common import ConversionReport
from loradex.core.adapter import Adapter
from loradex.core.kinds.base import Patch, scalar
from loradex.errors import ConversionError, FormatError

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)


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
        # keys, title, network module, base model, steps, trigger (ModelSpec's trigger phrase, else
        # the most used caption tags of ss_tag_frequency)
        "metadata": _metadata.summary(meta),
        "notes": list(adapter.notes),
        # modules with NaN/Inf values: the whole list (merge, bake and add refuse them by default)
        "nonfinite": adapter.nonfinite(),
        # every source key nothing explained, key -> reason: the whole list, never cut
        "unexplained": dict(adapter.unexplained),
    }


def inspect(path: str | os.PathLike, arch=None, strict: bool = False, raw: bool = False) -> dict:
    """``describe`` of the loaded file plus its identities (sha256, Civitai AutoV1/V2/V3) and every
    metadata field decoded (``metadata_decoded``: ``converters.metadata.decode``).

    A file that holds adapter modules but whose base model cannot be told (no ``arch`` given: SD3
    keys of another trainer, Wan's ``diffusion_model.blocks.*``, a custom model), or whose keys no
    format recognises, is still shown: ``raw`` true, ``arch`` None, ``base_model`` ``"unknown"``,
    and ``module_table`` (its keys grouped by module: kind, rank, alpha, each tensor's shape and
    dtype; ``other_keys``: keys of no module). ``raw=True`` shows any safetensors file or pickle of
    tensors that way; ``strict=True`` refuses what no arch explains instead. A PNG holding an
    embedding is read as one (plus ``generation`` when it also has A1111 generation parameters); a
    PNG with only generation parameters is described by ``loradex.pnginfo.describe_image``
    (``format`` ``png``); a PNG with neither is a FormatError. A safetensors adapter is described
    without torch where its shapes, dtypes and one-element tensors tell everything (the same report
    as a full read; see :func:`_describe_file`)."""
    from loradex.errors import ArchError
    from loradex.registry.hashes import file_hashes

    p = Path(path)
    params = None
    if p.is_file() and not raw:
        from loradex.converters.a1111_png import TEXT_KEY, is_png, read_png_data

        if is_png(p):
            from loradex import pnginfo

            params = pnginfo.read_parameters(p)
            if read_png_data(p) is None:
                if params is None:
                    raise FormatError(f"{p}: a PNG image with neither an embedding ({TEXT_KEY} text chunk or data in "
                                      f"its pixels) nor generation parameters ('{pnginfo.PARAMETERS_KEY}' text chunk)")
                return pnginfo.describe_image(p)
    why = None
    if raw:
        if not p.is_file():
            raise FormatError(f"{p}: --raw shows one file (a safetensors file or a pickle of tensors)"
                              + ("; name the one inside the folder" if p.is_dir() else ""))
        fmt = None
    else:
        try:
            fmt = _conv.detect(p).name
        except FormatError as e:
            if strict or not p.is_file():
                raise
            fmt, why = None, e
        if fmt is not None:
            try:
                desc, meta = _describe_file(p, arch, strict)
            except ArchError as e:
                if arch is not None or strict or not p.is_file():  # asked for an arch, or to refuse
                    raise
                why = e
            else:
                out = {"path": str(path), **desc, "metadata_decoded": _metadata.decode(meta)}
                if params is not None:
                    from loradex import pnginfo

                    out["generation"] = pnginfo.parse(params)
                if p.is_file():
                    out["hashes"] = file_hashes(p)
                    out["size"] = p.stat().st_size
                return out
    try:
        view = _metadata.structure(p)
    except FormatError:
        if why is not None:
            raise why from None  # neither an adapter nor a file of tensors: the reader's error
        raise
    if why is not None and not view["adapter_like"]:
        raise why  # tensors, but no adapter module (a model's state dict...): the reader's error
    meta = view.pop("metadata")
    extras = view.pop("pickle_extras")
    view.pop("adapter_like")
    if raw:
        first_note = "shown as the file holds it (--raw): not read against any architecture"
    elif fmt is None:
        first_note = f"base model unknown: no format loradex reads recognises these keys ({why})"
    else:
        first_note = (f"base model unknown: the {fmt} keys fit no architecture loradex knows; shown as the file "
                      f"holds them (--base or --arch names the base, when loradex has it)")
    out = {
        "path": str(path), "format": fmt or view["container"], "arch": None, "base_model": "unknown", "raw": True,
        **view, "embeddings": {}, "metadata": _metadata.summary(meta), "metadata_decoded": _metadata.decode(meta),
        "notes": [first_note, *view["notes"]], "unexplained": dict(extras),
    }
    out["hashes"] = file_hashes(p)
    out["size"] = p.stat().st_size
    return out


def _describe_file(p: Path, arch, strict: bool) -> tuple[dict, dict[str, str]]:
    """``(describe(adapter), adapter.metadata)`` of the adapter file ``p``. A safetensors file is
    first read as tensor descriptions (``converters.described``: the same readers, kinds and arch
    detection on shapes, dtypes and the one-element tensors, NaN/Inf from the bytes; no torch):
    what ``loradex inspect`` of a LoRA needs in well under a second. Anything that read cannot
    tell (math on a fused projection, the values of a larger tensor) or any error it meets sends
    the file through the full read, which then decides -- the report, or the error, is the same."""
    if p.is_file():
        from loradex.converters import described, pickle_io

        if not pickle_io.looks_like_pickle(p):
            try:
                with described.described():
                    adapter = load(p, arch=arch, strict=strict)
                    return describe(adapter), adapter.metadata
            except Exception:  # noqa: BLE001 - whatever it was, the full read below answers (or raises it)
                pass
    adapter = load(p, arch=arch, strict=strict)
    return describe(adapter), adapter.metadata


# ---- diffusers pipelines in memory ----------------------------------------------------------------
def _as_adapter(adapter: Adapter | str | os.PathLike, arch=None) -> Adapter:
    if isinstance(adapter, Adapter):
        return adapter
    if isinstance(adapter, (str, os.PathLike)):
        return load(adapter, arch=arch)
    raise FormatError(f"expected an Adapter or a path, got a {type(adapter).__name__}")


def to_diffusers(
    adapter: Adapter | str | os.PathLike, rank: int | None = None, dtype=None, arch=None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, metadata)`` of ``adapter`` in diffusers' LoRA layout, in memory: what
    ``pipe.load_lora_weights(state_dict, adapter_name=...)`` takes, no file involved.

    LoRA kinds go as they are; LoHa, LoKr, Tucker LoCon and LoRA with a sparse residual through
    their exact LoRA form; DoRA on any of these as LoRA + ``lora_magnitude_vector`` (one magnitude
    per output row, exact). Each module's ``alpha / r`` is folded into ``lora_B``, because diffusers
    (0.42) ignores metadata for an in-memory state dict and loads every module at scale 1. Kinds
    without an exact LoRA form raise ConversionError naming the module: full diffs need ``rank``
    (SVD), and (IA)^3, GLoRA, OFT, BOFT and norms need the base weights -- use :func:`apply`, which
    patches those in place, or ``loradex.bake``.

    ``metadata`` is the header a ``--to diffusers`` file would carry (``lora_adapter_metadata``,
    ModelSpec): ``safetensors.torch.save_file(state_dict, path, metadata)`` writes that file.
    ``adapter`` may be an :class:`Adapter` or a path (read with :func:`load`, ``arch`` as there)."""
    from loradex.converters.diffusers import Diffusers

    a = _as_adapter(adapter, arch)
    if not a.patches:
        raise ConversionError("the adapter has no modules for a LoRA state dict (embeddings load with "
                              "pipe.load_textual_inversion, or loradex.apply)")
    report = ConversionReport(target="diffusers")
    if isinstance(dtype, str):
        dtype = _conv.DTYPES.get(dtype) or _bad_dtype(dtype)
    return Diffusers().state_dict(a, report, dtype=dtype, rank=rank, arch=arch, fold_scale=True,
                                  title=a.metadata.get("modelspec.title") or "adapter")


def _bad_dtype(dtype: str):
    raise FormatError(f"unknown dtype {dtype!r}; choose fp16, bf16 or fp32")


@dataclass
class _InPlace:
    """One adapter's in-place change of one weight (and bias): the patch, its weight, and the
    tensors as they were before it, so that removing it (or one applied before it) is exact."""

    patch: Patch
    weight: float
    before_w: torch.Tensor
    before_b: torch.Tensor | None


@dataclass
class _Applied:
    name: str
    weight: float
    lora: bool = False  # a diffusers (PEFT) adapter of this name was loaded
    tokens: dict[str, list[str]] = field(default_factory=dict)  # component -> added token strings
    inplace: list[str] = field(default_factory=list)  # canonical module names changed in place


@dataclass
class _State:
    """What loradex applied to one pipeline (kept on it as ``pipe._loradex_applied``)."""

    applied: dict[str, _Applied] = field(default_factory=dict)
    #: canonical module -> the in-place changes on it, in the order applied
    stacks: dict[str, list[tuple[str, _InPlace]]] = field(default_factory=dict)
    counter: int = 0


def _state(pipe) -> _State:
    st = getattr(pipe, "_loradex_applied", None)
    if st is None:
        st = _State()
        pipe._loradex_applied = st
    return st


def _live_module(pipe, canonical: str) -> torch.nn.Module:
    """The module of ``pipe`` a canonical name denotes: ``<component>.<path>``; CLIP text encoders
    are tried with and without the ``text_model.`` level (transformers 5's ``CLIPTextModel`` has
    none), and a module PEFT wrapped is its ``base_layer`` (where the weights live)."""
    comp, _, path = canonical.partition(".")
    model = getattr(pipe, comp, None)
    if not isinstance(model, torch.nn.Module):
        raise ConversionError(f"{canonical}: the pipeline has no {comp}")
    candidates = [path]
    if path.startswith("text_model."):
        candidates.append(path[len("text_model."):])
    for cand in candidates:
        try:
            mod = model.get_submodule(cand)
        except AttributeError:
            continue
        return getattr(mod, "base_layer", mod)
    raise ConversionError(f"{canonical}: no such module in the pipeline's {comp} (wrong base model?)")


def _lora_weights(pipe, names: list[str]) -> list[float]:
    """The weights ``set_adapters`` gave the PEFT adapters ``names``: PEFT keeps ``scaling = weight *
    lora_alpha / r`` (rsLoRA: ``/ sqrt(r)``) per layer (peft 0.21 ``LoraLayer.set_scale``), so the
    weight is read back from the first layer holding each adapter (1.0 when none does)."""
    import math

    out = []
    for n in names:
        w = 1.0
        for comp in getattr(pipe, "_lora_loadable_modules", ()):
            model = getattr(pipe, comp, None)
            if not isinstance(model, torch.nn.Module):
                continue
            layer = next((m for m in model.modules() if n in getattr(m, "scaling", {}) and n in getattr(m, "r", {})), None)
            if layer is not None:
                r = layer.r[n]
                base = layer.lora_alpha[n] / (math.sqrt(r) if layer.use_rslora.get(n, False) else r)
                w = float(layer.scaling[n] / base) if base else 1.0
                break
        out.append(w)
    return out


def _patch_in_place(pipe, st: _State, name: str, canonical: str, patch: Patch, weight: float) -> None:
    mod = _live_module(pipe, canonical)
    w = mod.weight
    b = getattr(mod, "bias", None)
    rec = _InPlace(patch, weight, w.detach().clone(), None if b is None else b.detach().clone())
    with torch.no_grad():
        delta = patch.delta(w.detach().float(), multiplier=weight)
        w.copy_((w.float() + delta.reshape(w.shape)).to(w.dtype))
        db = patch.bias_delta(None if b is None else b.detach().float(), multiplier=weight)
        if db is not None:
            if b is None:
                raise ConversionError(f"{canonical}: the patch changes a bias the module does not have")
            b.copy_((b.float() + db.reshape(b.shape)).to(b.dtype))
    st.stacks.setdefault(canonical, []).append((name, rec))


def apply(pipe, adapter: Adapter | str | os.PathLike, weight: float = 1.0, name: str | None = None,
          arch=None) -> str:
    """Apply ``adapter`` to a diffusers pipeline the app already holds; returns the adapter's name
    (``name``, or ``loradex_<n>``) for :func:`remove`.

    * Modules with a LoRA form (LoRA/LoCon, and LoHa, LoKr, Tucker LoCon through their exact LoRA
      form) go through diffusers' own ``load_lora_weights(state_dict, adapter_name=name)`` (see
      :func:`to_diffusers`) and ``set_adapters``, at ``weight``, next to the adapters already
      active (their weights are kept).
    * Kinds whose update needs the base weight -- DoRA, (IA)^3, GLoRA, OFT, BOFT -- and full diffs
      and norms are added to the weights in place with loradex's exact ``delta(W, weight)`` (the
      multiplier as lycoris-lora applies it), and the weights they replace are kept, so
      :func:`remove` restores them bit for bit (also when other adapters were applied after).
      Their base is the current weight: adapters patched in place stack in the order applied, as
      ComfyUI stacks them; diffusers LoRA layers are added on top of that.
    * Textual-inversion embeddings are added with ``pipe.load_textual_inversion`` (per encoder for
      SDXL); ``weight`` does not apply to them.

    ``adapter``: an :class:`Adapter` or a path (:func:`load`). Bad input (a module the pipeline does
    not have, a name in use) raises ConversionError before anything is changed."""
    from loradex.log import quiet

    a = _as_adapter(adapter, arch)
    st = _state(pipe)
    if name is None:
        while f"loradex_{st.counter}" in st.applied:
            st.counter += 1
        name = f"loradex_{st.counter}"
        st.counter += 1
    if name in st.applied:
        raise ConversionError(f"an adapter named {name!r} is already applied; remove it first or pick another name")
    via_lora = {n: p for n, p in a.patches.items() if p.has_exact_lora}
    in_place = {n: p for n, p in a.patches.items() if n not in via_lora}
    for n in a.patches:  # every module must exist before anything changes
        _live_module(pipe, n)
    rec = _Applied(name, float(weight))
    with quiet():
        if via_lora:
            existing = {x for names in pipe.get_list_adapters().values() for x in names}
            if name in existing:
                raise ConversionError(f"the pipeline already has an adapter named {name!r}")
            active = [x for x in pipe.get_active_adapters() if x in existing]
            weights = _lora_weights(pipe, active)
            sd, _meta = to_diffusers(Adapter(via_lora, {}, dict(a.metadata), a.arch, a.source_format))
            pipe.load_lora_weights(sd, adapter_name=name)
            rec.lora = True
            pipe.set_adapters([*active, name], [*weights, float(weight)])
        for n, p in in_place.items():
            _patch_in_place(pipe, st, name, n, p, float(weight))
            rec.inplace.append(n)
        for tok, emb in a.embeddings.items():
            for comp, vec in emb.vectors.items():
                tk = "tokenizer" if comp == "text_encoder" else comp.replace("text_encoder", "tokenizer")
                te, tokenizer = getattr(pipe, comp, None), getattr(pipe, tk, None)
                if te is None or tokenizer is None:
                    raise ConversionError(f"embedding {tok!r}: the pipeline has no {comp}/{tk}")
                pipe.load_textual_inversion(vec.detach().clone(), token=tok, text_encoder=te, tokenizer=tokenizer)
                rec.tokens[comp] = [tok, *(f"{tok}_{i}" for i in range(1, vec.shape[0]))]
    st.applied[name] = rec
    return name


def remove(pipe, name: str | None = None) -> list[str]:
    """Undo :func:`apply`: the adapter ``name`` (every adapter loradex applied when None); returns
    the names removed. diffusers adapters are deleted with ``delete_adapters`` (and, once no
    adapter of any origin is left, ``unload_lora_weights`` takes PEFT's layers out again), tokens
    with ``unload_textual_inversion``, and weights patched in place get back the exact tensors they
    had -- adapters applied in place after this one are then re-applied on them, in order."""
    from loradex.log import quiet

    st = _state(pipe)
    if name is not None and name not in st.applied:
        raise ConversionError(f"no adapter named {name!r} was applied by loradex (applied: "
                              f"{', '.join(st.applied) or 'none'})")
    names = [name] if name is not None else list(st.applied)
    with quiet():
        for n in names:
            rec = st.applied.pop(n)
            if rec.lora:
                existing = {x for names_ in pipe.get_list_adapters().values() for x in names_}
                active = [x for x in pipe.get_active_adapters() if x in existing and x != n]
                weights = _lora_weights(pipe, active)
                pipe.delete_adapters(n)
                left = {x for names_ in pipe.get_list_adapters().values() for x in names_}
                if not left:
                    pipe.unload_lora_weights()
                elif active:
                    pipe.set_adapters(active, weights)
            for comp, toks in rec.tokens.items():
                tk = "tokenizer" if comp == "text_encoder" else comp.replace("text_encoder", "tokenizer")
                pipe.unload_textual_inversion(tokens=toks, tokenizer=getattr(pipe, tk),
                                              text_encoder=getattr(pipe, comp))
            for canonical in rec.inplace:
                _undo_in_place(pipe, st, n, canonical)
    return names


def _undo_in_place(pipe, st: _State, name: str, canonical: str) -> None:
    stack = st.stacks.get(canonical, [])
    i = next(k for k, (n, _) in enumerate(stack) if n == name)
    mod = _live_module(pipe, canonical)
    first = stack[i][1]
    with torch.no_grad():
        mod.weight.copy_(first.before_w)
        if first.before_b is not None:
            mod.bias.copy_(first.before_b)
    later = stack[i + 1 :]
    del stack[i:]
    for n, rec in later:  # re-apply what came after, on the restored weights
        _patch_in_place(pipe, st, n, canonical, rec.patch, rec.weight)
    if not stack:
        st.stacks.pop(canonical, None)
