"""kohya sd-scripts format (also what A1111, ComfyUI and LyCORIS' kohya entry point write/read).

Keys are ``<prefix>_<module path with '.' -> '_'>.<suffix>`` (FORMATS.md §1): prefixes
``lora_unet`` / ``lora_te`` (SD1/2), ``lora_te1`` / ``lora_te2`` (SDXL), ``lora_unet`` /
``lora_te1`` / ``lora_te3`` (FLUX). The flattened names cannot be split back at ``_`` in
general, so they are un-flattened against the architecture's module table (core/arch.py); SDXL
unet names are SGM paths, FLUX names BFL ones with fused qkv/linear1 projections. All LyCORIS kinds
are written with their own suffixes under these prefixes (the LyCORIS kohya convention), which
A1111 and ComfyUI load. Pivotal-tuning embeddings ride along as ``bundle_emb.*``.

kohya stores alpha as a 0-dim tensor; a missing alpha means alpha = rank.

Reading never drops a key silently: keys of modules the arch lacks, modules whose tensors name no
kind, tensors a module's kind does not own, and bundle keys that hold no embedding are named in
``Adapter.unexplained`` with the reason (``read_patches``). LyCORIS' sparse weight residual
(``bias_indices``/``bias_values``/``bias_size``, ``core/kinds/sparse.py``) is part of the LoRA
patch and written back bit-identically; on a fused FLUX/SD3 projection ``core.fusion.split_rows``
folds it into the factors before the rows are split.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from loradex.converters import pickle_io
from loradex.converters import safetensors_io as sio
from loradex.converters.common import (
    ConversionReport,
    Converter,
    cast,
    conform,
    describe_unexplained,
    fit_kinds,
    register_format,
    resolve_arch,
)
from loradex.converters.metadata import kohya_ss, modelspec
from loradex.core.adapter import Adapter
from loradex.core.fusion import fuse_rows, split_rows
from loradex.core.kinds import patch_from_tensors, split_kind
from loradex.core.kinds.base import Patch
from loradex.core.kinds.lora import LoraPatch
from loradex.errors import ArchError, ConversionError, FormatError

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)


def kohya_key():
    """A key under any kohya prefix a registered family writes (``lora_unet_``, ``lora_te_``,
    ``lora_te1_``...) followed by ``<module>.`` (other trainers' aliases such as OneTrainer's
    ``lora_transformer_`` are the ComfyUI/OneTrainer reader's)."""
    from loradex.core.archs import families

    prefixes = {c.kohya_prefix for fam in families().values() for c in fam.components}
    return _kohya_key(frozenset(prefixes))


@functools.cache
def _kohya_key(prefixes: frozenset[str]) -> re.Pattern:
    alt = "|".join(re.escape(p) for p in sorted(prefixes, key=len, reverse=True))
    return re.compile(rf"^(?:{alt})_[^.]+\.")


BUNDLE_PREFIX = "bundle_emb."


def read_patches(
    tensors_of: dict[str, dict[str, str]], load: dict[str, torch.Tensor], arch, unflatten, path: Path,
    missing: str = "",
) -> tuple[dict[str, Patch], list[str], dict[str, str]]:
    """Build canonical patches from groups of flat-named keys (``{module: {suffix: file key}}``).
    ``unflatten(flat)`` returns the canonical targets (with row ranges for fused weights) or raises
    ArchError. Returns ``(patches, notes, unexplained)``; ``missing`` is added to the reason given
    for the keys of a module ``unflatten`` does not know.

    Nothing is dropped silently: the keys of a module the arch does not have, of a module whose
    tensors name no patch kind (``alpha`` next to an unknown suffix), and tensors a module's kind
    does not own (an unknown suffix next to a LoRA: the LoRA is kept) go to ``unexplained`` with
    the reason, file key -> reason. Tensors of several kinds mixed in one module, or a kind's own
    tensors that do not fit together or the module, are a malformed file: FormatError."""
    patches: dict[str, Patch] = {}
    notes: list[str] = []
    unexplained: dict[str, str] = {}
    resolved = 0
    for flat, sufmap in tensors_of.items():
        try:
            targets = unflatten(flat)
        except ArchError:
            for k in sufmap.values():
                unexplained[k] = f"no module {flat} in {arch.name}{missing}"
            continue
        resolved += 1
        sd = {s: load[k] for s, k in sufmap.items()}
        try:
            kind, own, rest = split_kind(sd)
        except FormatError as e:
            raise FormatError(f"{path}: {flat}: {e}") from None
        if kind is None:
            why = f"no patch kind has the tensors {', '.join(sorted(sd))} (module {flat})"
            unexplained.update({k: why for k in sufmap.values()})
            continue
        for s_ in rest:
            unexplained[sufmap[s_]] = (f"no patch kind has a tensor '{s_}' (module {flat} holds a {kind} patch; "
                                       f"the {kind} was read without it)")
        if len(targets) == 1 and targets[0][1] is None:
            name = targets[0][0]
            shape = arch.module(name).shape
            try:
                patches[name] = conform(patch_from_tensors(own, shape), shape)
            except FormatError as e:
                raise FormatError(f"{path}: {flat}: {e}") from None
            continue
        # fused projection (FLUX qkv / linear1 / permuted adaLN): split rows exactly; a canonical
        # module's rows are the concatenation of its ranges in list order (see core/arch.py)
        rows = max(r[1] for _, r in targets)
        in_shape = arch.module(targets[0][0]).shape[1:]
        try:
            fused = patch_from_tensors(own, (rows, *in_shape))
        except FormatError as e:
            raise FormatError(f"{path}: {flat}: {e}") from None
        if getattr(fused, "has_residual", False):
            notes.append(f"{flat}: sparse residual folded into the factors to split it")
        order: dict[str, list[tuple[int, int]]] = {}
        for name, r in targets:
            order.setdefault(name, []).append(r)
        parts, err = split_rows(fused, list(order.values()))
        for name, part in zip(order, parts):
            patches[name] = part
        if err:
            notes.append(f"{flat}: split with rel. error {err:.3g}")
    if tensors_of and not resolved:  # an empty adapter would pass for a success
        raise ArchError(f"{path}: none of its {len(tensors_of)} modules is a module of {arch.name}; wrong --arch?")
    return patches, notes, unexplained


def nothing_read(path: Path, unexplained: dict[str, str]) -> FormatError:
    """The error for a file none of whose keys was understood (an empty adapter would pass for a
    success): the count and the first keys with their reasons."""
    return FormatError(f"{path}: none of its keys holds a patch or embedding loradex understands: "
                       + describe_unexplained(unexplained))


@register_format
class Kohya(Converter):
    """kohya sd-scripts keys (``lora_unet_*``, ``lora_te*_*``), the format A1111 and ComfyUI load
    for every LyCORIS kind; ``--to a1111`` and ``--to comfy`` write it. Holds every kind, DoRA,
    Tucker cores and bundled pivotal-tuning embeddings (``bundle_emb.*``)."""

    name = "kohya"
    priority = 20
    aliases = ("a1111", "comfy")  # both load kohya keys for every kind
    hidden_aliases = ("comfyui", "sd-scripts")
    embeddings = True  # bundle_emb.<token>.<key> (kohya's pivotal-tuning bundle)
    options = frozenset({"uniform_alpha"})
    description = "kohya sd-scripts / A1111 / ComfyUI keys (lora_unet_*, lora_te*_*), every LyCORIS kind"

    def detect(self, path: Path) -> bool:
        """True for a file (safetensors or ``weights_only`` pickle) with any key matching
        :func:`kohya_key`: a prefix some registered family writes (``lora_unet_``, ``lora_te_``,
        ``lora_te1_``...), a flattened module name, then ``.``. A file of ``bundle_emb.*`` keys
        only is not detected as kohya."""
        if not path.is_file():
            return False
        h = pickle_io.read_tensor_header(path)
        key = kohya_key()
        return any(key.match(k) for k in h.tensors)

    def read(self, path: Path, arch=None) -> Adapter:
        """Every key is read or named in ``Adapter.unexplained``: module keys are grouped at their
        first ``.`` (kohya module names hold none), ``bundle_emb.*`` keys are the bundled
        embeddings (``bundles.read_bundle``), and a key with no ``.`` at all is no kohya key."""
        from loradex.converters.bundles import read_bundle

        h = pickle_io.read_tensor_header(path)
        unexplained: dict[str, str] = pickle_io.pickled_extras(path)  # a pickle's non-tensor entries
        groups: dict[str, dict[str, str]] = {}
        for k in h.tensors:
            if k.startswith(BUNDLE_PREFIX):
                continue
            flat, dot, suffix = k.partition(".")
            if not dot or not suffix:
                unexplained[k] = "not a kohya key (<lora_unet_/lora_te*_ module>.<tensor>)"
                continue
            groups.setdefault(flat, {})[suffix] = k
        has_bundle = any(k.startswith(BUNDLE_PREFIX) for k in h.tensors)
        if not any(kohya_key().match(k) for k in h.tensors) and not has_bundle:
            raise FormatError(f"{path}: no kohya LoRA keys found")
        a = resolve_arch(arch, h.shapes(), required=bool(groups), path=path, metadata=dict(h.metadata))
        tensors = pickle_io.load_tensors(path, header=h)
        patches, notes = {}, []
        if groups:
            patches, notes, more = read_patches(groups, tensors, a, a.from_kohya, path)
            unexplained.update(more)
        embeddings = {}
        if has_bundle:
            embeddings, more = read_bundle({k: v for k, v in tensors.items() if k.startswith(BUNDLE_PREFIX)})
            unexplained.update(more)
        if not patches and not embeddings:
            raise nothing_read(path, unexplained)
        return Adapter(patches, embeddings, dict(h.metadata), a.name if a else None, self.name, notes, unexplained)

    def write(
        self, adapter: Adapter, path: Path, report: ConversionReport, dtype=None, rank=None, arch=None, title=None,
        uniform_alpha: bool = False,
    ):
        """Write ``<kohya name>.<suffix>`` for every tensor of every patch (each kind under its own
        LyCORIS suffixes), with ``.alpha`` always present for LoRA (kohya reads a missing alpha as
        the rank, lycoris-lora's loaders need it). Modules the family stores fused (FLUX's BFL
        ``qkv``/``linear1``) are fused back into one LoRA (``core.fusion.fuse_rows``: at the same rank
        when the parts share one ``down``, else block-diagonal ups over stacked downs); a non-LoRA
        patch there is first made a LoRA (exact, else SVD at ``rank``). Embeddings go in as
        ``bundle_emb.<token>.*``. Metadata: kohya ``ss_*`` + ModelSpec, and the
        ``sshs_model_hash``/``sshs_legacy_hash`` kohya computes. ``uniform_alpha``: give every LoRA
        the most common alpha, folding the ratio into ``lora_up`` (exact), for diffusers' kohya
        loader, which keeps only one alpha for the UNet."""
        from loradex.converters.bundles import bundle_tensors

        a = resolve_arch(arch or adapter.arch, {}, required=bool(adapter.patches), path=path)
        adapter = fit_kinds(adapter, self.kinds, rank, report)
        adapter = self._alphas(adapter, report, uniform_alpha)
        out: dict[str, torch.Tensor] = {}
        fusions = a.kohya_fusions() if a is not None else {}
        fused_members = {name: flat for flat, parts in fusions.items() for name, _ in parts}
        pending: dict[str, dict[str, Patch]] = {}
        for name, p in adapter.patches.items():
            if name in fused_members:
                pending.setdefault(fused_members[name], {})[name] = p
                continue
            self._emit(out, a.kohya_name(name), p, dtype)
        for flat, members in pending.items():
            parts = fusions[flat]
            loras: list[tuple[LoraPatch | None, tuple[int, int]]] = []
            offset: dict[str, int] = {}  # rows of a canonical already placed (permuted parts)
            for name, rows in parts:
                p = members.get(name)
                if p is not None and (not isinstance(p, LoraPatch) or p.has_residual):
                    # (a sparse residual cannot be sliced by rows with up: fold it exactly first)
                    try:
                        members[name], err = p.to_lora(rank)
                    except ValueError:
                        raise ConversionError(
                            f"{name}: kohya stores it fused in {flat}; a {p.kind} patch needs --rank N to fuse"
                        ) from None
                    if err:
                        report.approximated[name] = err
                    else:
                        report.exact[name] = f"{p.kind}->lora (fused into {flat})"
                    p = members[name]
                if p is not None:
                    o = offset.get(name, 0)
                    n = rows[1] - rows[0]
                    p = LoraPatch(up=p.up[o : o + n], down=p.down, alpha=p.alpha, mid=p.mid,
                                  bias=None if p.bias is None else p.bias[o : o + n], dora_scale=p.dora_scale)
                    offset[name] = o + n
                loras.append((p, rows))
            self._emit(out, flat, fuse_rows(loras, max(r[1] for _, r in parts)), dtype)
        if adapter.embeddings:
            out.update({k: cast(v, dtype) for k, v in bundle_tensors(adapter.embeddings).items()})
        t = title or Path(path).stem
        meta = {**kohya_ss(adapter, t), **modelspec(adapter, t)}
        sio.save_with_kohya_hashes(out, path, meta)

    @staticmethod
    def _alphas(adapter: Adapter, report: ConversionReport, uniform: bool) -> Adapter:
        """Mixed alphas are exact for kohya, A1111 and ComfyUI, but diffusers' kohya loader
        (0.42: utils/peft_utils.get_peft_kwargs) keeps only the most common alpha for the UNet.
        ``uniform``: give every LoRA the most common alpha and fold its own ratio into
        ``lora_up`` (exact: ``up * a_i / A`` at scale ``A / r`` equals ``up`` at ``a_i / r``)."""
        loras = {n: p for n, p in adapter.patches.items() if isinstance(p, LoraPatch)}
        alphas = {n: float(p.scale * p.rank) for n, p in loras.items()}
        if len(set(alphas.values())) <= 1:
            return adapter
        common = Counter(alphas.values()).most_common(1)[0][0]
        if not uniform:
            report.notes.append(
                f"alphas differ between modules ({len(set(alphas.values()))} values): exact for kohya/A1111/ComfyUI; "
                "diffusers' kohya loader keeps only the most common one, use --uniform-alpha for a file it loads exactly"
            )
            return adapter
        patches = dict(adapter.patches)
        for n, p in loras.items():
            if alphas[n] != common:
                ratio = alphas[n] / common
                up = (p.up.float() * ratio).to(p.up.dtype)
                bias = None if p.bias is None else (p.bias.float() * ratio).to(p.bias.dtype)
                # the sparse residual is scaled by gamma too (LoraPatch._dense): fold the ratio into it
                patches[n] = replace(p, up=up, bias=bias, alpha=torch.tensor(common, dtype=p.down.dtype),
                                     **p.scaled_residual_fields(ratio))
                report.exact[n] = f"alpha {alphas[n]:g} folded into lora_up (alpha {common:g})"
        return replace(adapter, patches=patches)

    @staticmethod
    def _emit(out: dict[str, torch.Tensor], flat: str, p: Patch, dtype) -> None:
        for suffix, t in p.tensors().items():
            out[f"{flat}.{suffix}"] = cast(t, dtype)
        if isinstance(p, LoraPatch) and p.alpha is None:
            # kohya reads a missing alpha as alpha = rank, but lycoris-lora's loaders cannot
            # read a LoRA without one: write it out (same scale, 1)
            out[f"{flat}.alpha"] = torch.tensor(float(p.rank), dtype=dtype or p.down.dtype)
