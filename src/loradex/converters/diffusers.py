"""diffusers LoRA files (``pytorch_lora_weights.safetensors``), as ``pipe.load_lora_weights`` reads them.

Keys: ``<component>.<module path>.lora_A.weight`` (= kohya ``lora_down``, (r, in[, kh, kw])),
``.lora_B.weight`` (= ``lora_up``), optional ``.lora_B.bias``. Alpha is not a tensor: the header
key ``lora_adapter_metadata`` holds the PEFT ``LoraConfig`` of each component, flattened as
``"<component>.<field>"`` (``unet.r``, ``unet.lora_alpha``, ``unet.rank_pattern``,
``unet.alpha_pattern``, ``unet.target_modules`` ...). diffusers passes those fields straight to
``LoraConfig``, so an unknown field makes it fail: we write only LoraConfig fields.

The alpha trap (diffusers 0.42, FORMATS.md §3): without metadata, diffusers sets ``lora_alpha``
to the most common rank for every module (the scale of a module with another rank is then
``r_common / r``). We write ``rank_pattern``/``alpha_pattern`` for every module that differs from
the component's common rank/alpha, so mixed ranks and alphas load exactly without padding or
rescaling any tensor (the factors are written as they are: a kohya -> diffusers conversion only
renames tensors). Reading a file without metadata reproduces what diffusers does.

Older layouts are read too: attention-processor names (``attn1.processor.to_q_lora.down.weight``),
``lora_linear_layer.up.weight`` and ``.lora.down.weight`` (diffusers 0.14-0.20), unprefixed unet keys.
Keys of none of these, of modules the arch lacks, or of a module with no LoRA factors are named in
``Adapter.unexplained`` with the reason (diffusers itself warns about or ignores them).

Writing: a LoRA with LyCORIS' sparse weight residual (``bias_*``) has no ``lora_A``/``lora_B`` form
of the same rank -- ``lora_B.bias`` is a bias change, not a weight residual -- so ``fit_kinds`` folds
the residual into the factors exactly (more rank), or truncates at ``--rank``.
"""

from __future__ import annotations

import json
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
    dora_all_or_none,
    fit_kinds,
    peft_patterns,
    register_format,
    resolve_arch,
)
from loradex.converters.metadata import modelspec
from loradex.core.adapter import COMPONENTS, Adapter, component_of
from loradex.core.kinds.base import check_fits
from loradex.core.kinds.dora import dora_scale_from_magnitude, magnitude_from_dora_scale
from loradex.core.kinds.lora import LoraPatch
from loradex.core.tensorspec import scalar_tensor
from loradex.errors import ArchError, FormatError

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)

METADATA_KEY = "lora_adapter_metadata"

# old attention-processor spellings -> module names (CLIP attention uses q_proj/...)
_PROC = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj|to_add_out)_lora\.")
_CLIP_PROC = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_SUFFIXES = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_B.bias": "lora_B.bias",
    "lora_magnitude_vector": "dora_scale",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight",
    "lora_linear_layer.up.weight": "lora_up.weight",
    "down.weight": "lora_down.weight",
    "up.weight": "lora_up.weight",
    "alpha": "alpha",
}
_ORDER = sorted(_SUFFIXES, key=len, reverse=True)


def normalize_key(key: str) -> tuple[str, str] | None:
    """A diffusers-family key -> (module name with component, kohya/LyCORIS suffix), or None."""
    k = key
    if k.startswith("base_model.model."):
        k = k[len("base_model.model.") :]
    m = _PROC.search(k)
    if m:
        what = m.group(1)
        clip = ".self_attn" in k[: m.start()] + "."
        mod = _CLIP_PROC[what] if clip else ("to_out.0" if what == "to_out" else what)
        k = k[: m.start()] + "." + mod + "." + k[m.end() :]
    for s in _ORDER:
        if k.endswith("." + s):
            mod = k[: -len(s) - 1]
            if s in ("down.weight", "up.weight") and m is None:
                return None  # bare down/up only in processor keys
            if component_of(mod) not in COMPONENTS:
                mod = "unet." + mod  # attn-procs files saved from a UNet carry no prefix
            return mod, _SUFFIXES[s]
    return None


def clip_canonical(name: str) -> str:
    """Insert CLIP's ``text_model.`` level when a text-encoder name lacks it (T5 names untouched)."""
    comp, _, path = name.partition(".")
    if comp.startswith("text_encoder") and path.startswith(("encoder.layers.", "embeddings.", "final_layer_norm")):
        return f"{comp}.text_model.{path}"
    return name


def _pattern_value(patterns: dict, path: str, default):
    """PEFT's rule (peft.utils.other.get_pattern_key): a key matches when ``(.*\\.)?(key)$`` does."""
    for key, val in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return val
    return default


@register_format
class Diffusers(Converter):
    """diffusers LoRA files as ``pipe.load_lora_weights`` reads them: plain LoRA only (no Tucker
    core, no sparse residual), DoRA as PEFT's per-output-row ``lora_magnitude_vector``, alpha in
    the ``lora_adapter_metadata`` header (see the module docstring)."""

    name = "diffusers"
    priority = 80  # any safetensors of lora_A/lora_B keys: asked last
    tucker = False
    kinds = frozenset({"lora"})
    dora = "row"  # PEFT's lora_magnitude_vector: one magnitude per output row
    description = "diffusers pytorch_lora_weights.safetensors (lora_A/lora_B + lora_adapter_metadata)"
    options = frozenset({"uniform_alpha"})

    def detect(self, path: Path) -> bool:
        """True for a file with any key :func:`normalize_key` understands (``lora_A``/``lora_B``,
        the old processor and ``lora_linear_layer`` spellings) and no ``lora_``-prefixed key
        (kohya). ``base_model.model.*`` keys (PEFT's) are not counted."""
        if not path.is_file():
            return False
        h = pickle_io.read_tensor_header(path)
        ks = [k for k in h.tensors if not k.startswith("base_model.model.")]
        return bool(ks) and any(normalize_key(k) for k in ks) and not any(k.startswith("lora_") for k in ks)

    def read(self, path: Path, arch=None) -> Adapter:
        """LoRA patches from ``<component>.<module>.lora_A/lora_B`` (and the older spellings).
        Alpha: a stored ``alpha`` tensor, else the component's ``lora_adapter_metadata`` config
        (``alpha_pattern`` first, then ``lora_alpha``; rsLoRA folded in), else alpha = rank, as
        diffusers 0.42 does with neither. ``lora_B.bias`` becomes the patch's bias, a
        ``lora_magnitude_vector`` its DoRA scale. The arch is optional: without one the module
        names stay as the file spells them."""
        h = pickle_io.read_tensor_header(path)
        groups: dict[str, dict[str, str]] = {}
        unexplained: dict[str, str] = pickle_io.pickled_extras(path)  # a pickle's non-tensor entries
        for k in h.tensors:
            nk = normalize_key(k)
            if nk is None:
                unexplained[k] = "not a diffusers LoRA tensor (lora_A/lora_B/lora_B.bias/lora_magnitude_vector/alpha)"
            else:
                groups.setdefault(clip_canonical(nk[0]), {})[nk[1]] = k
        if not groups:
            raise FormatError(f"{path}: no diffusers LoRA keys found")
        meta_json = h.metadata.get(METADATA_KEY)
        try:
            config = json.loads(meta_json) if meta_json else None
        except json.JSONDecodeError:
            raise FormatError(f"{path}: {METADATA_KEY} is not valid JSON") from None
        # detect on the keys as normalize_key reads them: attn-procs files saved from a UNet carry no
        # ``unet.`` prefix
        shapes = {
            k if k.startswith("base_model.model.") or component_of(k) in COMPONENTS else "unet." + k: info.shape
            for k, info in h.tensors.items()
        }
        a = resolve_arch(arch, shapes, required=False, path=path, metadata=dict(h.metadata))
        tensors = pickle_io.load_tensors(path, header=h)
        patches, notes = {}, []
        known = 0  # modules the arch has
        by_comp: dict[str, list[str]] = {}
        for mod in groups:
            by_comp.setdefault(component_of(mod), []).append(mod)
        for comp, mods in by_comp.items():
            ranks = {m: tensors[groups[m]["lora_down.weight"]].shape[0] for m in mods if "lora_down.weight" in groups[m]}
            common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
            cfg = None
            if config is not None:
                cfg = {k[len(comp) + 1 :]: v for k, v in config.items() if k.startswith(comp + ".")} or None
            for mod in mods:
                g = groups[mod]
                if "lora_down.weight" not in g and "lora_up.weight" not in g:
                    why = f"no LoRA factors (lora_A/lora_B) for module {mod}"
                    unexplained.update({k: why for k in g.values()})
                    continue
                if "lora_down.weight" not in g or "lora_up.weight" not in g:
                    raise FormatError(f"{path}: {mod}: needs both lora_A and lora_B")
                sd = {s: tensors[k] for s, k in g.items()}
                r = sd["lora_down.weight"].shape[0]
                if "alpha" not in sd:
                    alpha = self._alpha_for(cfg, mod.partition(".")[2], r, common)
                    sd["alpha"] = scalar_tensor(alpha, like=sd["lora_down.weight"])
                bias = sd.pop("lora_B.bias", None)
                mag = sd.pop("dora_scale", None)
                patch = LoraPatch(up=sd["lora_up.weight"], down=sd["lora_down.weight"], alpha=sd["alpha"], bias=bias)
                if mag is not None:  # PEFT's magnitude: (out,) or (1, out, 1, 1) for a conv
                    patch.dora_scale = dora_scale_from_magnitude(mag, patch.shape)
                name = mod
                if a is not None:
                    try:
                        name = a.canonical(mod)
                    except ArchError:
                        why = f"no module {mod} in {a.name}"
                        unexplained.update({k: why for k in g.values()})
                        continue
                    else:
                        shape = a.module(name).shape
                        patch = conform(patch, shape)
                        try:
                            check_fits("lora", patch.shape, shape)
                        except FormatError as e:
                            raise FormatError(f"{path}: {mod}: {e}") from None
                        known += 1
                patches[name] = patch
        if a is not None and groups and not known:
            raise ArchError(f"{path}: none of its {len(groups)} modules is a module of {a.name}; wrong --arch?")
        if not patches:
            from loradex.converters.kohya import nothing_read

            raise nothing_read(path, unexplained)
        return Adapter(patches, {}, dict(h.metadata), a.name if a else None, self.name, notes, unexplained)

    @staticmethod
    def _alpha_for(cfg: dict | None, path: str, r: int, common: int) -> float:
        if cfg is None:
            # diffusers 0.42.1 (utils/peft_utils.get_peft_kwargs): no alphas and no metadata means
            # alpha = rank per module (scale 1.0), mixed ranks included.
            return float(r)
        rank_pattern = cfg.get("rank_pattern") or {}
        alpha_pattern = cfg.get("alpha_pattern") or {}
        base_r = cfg.get("r", r)
        alpha = _pattern_value(alpha_pattern, path, None)
        if alpha is None:
            alpha = cfg.get("lora_alpha", base_r)
        del rank_pattern  # the rank is in the tensors; PEFT's scale is alpha / r with r from the tensors
        if cfg.get("use_rslora"):
            return float(alpha) * r / (r**0.5)  # rsLoRA: scale alpha / sqrt(r)
        return float(alpha)

    def write(self, adapter: Adapter, path: Path, report: ConversionReport, dtype=None, rank=None, title=None, arch=None,
              uniform_alpha: bool = False):
        """Write :meth:`state_dict`'s tensors and metadata as one safetensors file: per module
        ``lora_A.weight``/``lora_B.weight`` (+ ``lora_B.bias`` on every module of a component where
        one has a bias, + ``lora_magnitude_vector`` for DoRA), and ``lora_adapter_metadata`` with
        each component's LoraConfig fields (``r``, ``lora_alpha``, ``rank_pattern``,
        ``alpha_pattern``...). Other kinds become LoRA (exact, else SVD at ``rank``).
        ``uniform_alpha``: every ``alpha / r`` folded into ``lora_B`` (``state_dict(fold_scale=True)``)
        for the readers that ignore ``lora_adapter_metadata`` and take scale 1 (OneTrainer 2026-07;
        ComfyUI 0.3.x): then the file is exact everywhere, at the cost of one rounding of ``lora_B``
        and of the rename-only byte copy."""
        out, meta = self.state_dict(adapter, report, dtype=dtype, rank=rank, title=title or Path(path).stem, arch=arch,
                                    fold_scale=uniform_alpha)
        sio.save(out, path, meta)

    def state_dict(self, adapter: Adapter, report: ConversionReport, dtype=None, rank=None, title: str = "adapter",
                   arch=None, fold_scale: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and header metadata of the file :meth:`write` writes (``loradex.to_diffusers``
        takes them in memory).

        ``fold_scale``: every module's ``alpha / r`` is folded into ``lora_B`` (and its bias: PEFT
        scales ``lora_B(lora_A(x))`` whole), so that the state dict is exact *without* metadata.
        diffusers 0.42 gets no ``lora_adapter_metadata`` for a state dict passed in memory
        (``lora_base._fetch_state_dict`` only reads it from a safetensors header) and then gives
        every module scale 1 (``utils/peft_utils.get_peft_kwargs``: alpha = rank, mixed ranks
        mirrored into ``alpha_pattern``); folded factors at scale 1 are the same update. The
        metadata returned then says scale 1 too, so a file saved from it loads the same."""
        adapter = fit_kinds(adapter, self.kinds, rank, report, dora_ok=self.dora, tucker_ok=False, residual_ok=False)
        if fold_scale:
            adapter = replace(adapter, patches={n: _fold_scale(p) for n, p in adapter.patches.items()})
        a = resolve_arch(arch or adapter.arch, {}, required=False, path=Path(title))
        out: dict[str, torch.Tensor] = {}
        config: dict[str, object] = {}
        by_comp: dict[str, list[str]] = {}
        for name in adapter.patches:
            by_comp.setdefault(component_of(name), []).append(name)
        loadable = a.family.diffusers_lora_components if a is not None else None
        for comp in by_comp:
            if loadable is not None and comp not in loadable:
                report.notes.append(f"{comp}: written, but diffusers' {a.family.label} pipeline does not load LoRAs "
                                   f"of this component ({len(by_comp[comp])} modules; only {', '.join(loadable)})")
        for comp, names in by_comp.items():
            pats = {n: adapter.patches[n] for n in names}
            if a is not None:  # 1x1 convs need 4-D factors in diffusers, Linears 2-D
                pats = {n: conform(p, a.modules[n].shape if n in a.modules else None) for n, p in pats.items()}
            # PEFT matches patterns as suffixes at a '.' boundary; CLIP's text_model level may or
            # may not exist in the live model, so match without it.
            pp = peft_patterns(pats, lambda n: n.partition(".")[2].removeprefix("text_model."), re.escape)
            has_bias = any(p.bias is not None for p in pats.values())
            use_dora = dora_all_or_none(pats, comp, self.name)
            for n, p in pats.items():
                pre = f"{n}."
                out[pre + "lora_A.weight"] = cast(p.down, dtype)
                out[pre + "lora_B.weight"] = cast(p.up, dtype)
                if has_bias:  # PEFT's lora_bias is per config: every module gets one (zeros = none)
                    b = p.bias if p.bias is not None else p.up.new_zeros(p.up.shape[0])
                    out[pre + "lora_B.bias"] = cast(b, dtype)
                if use_dora:
                    out[pre + "lora_magnitude_vector"] = cast(magnitude_from_dora_scale(p.dora_scale, p.shape), dtype)
            fields = {
                "r": pp.r,
                "lora_alpha": pp.alpha,
                "rank_pattern": pp.rank_pattern,
                "alpha_pattern": pp.alpha_pattern,
                "target_modules": pp.targets,
                "lora_bias": has_bias,
                "use_dora": use_dora,
                "use_rslora": False,
                "init_lora_weights": True,
                "bias": "none",
            }
            config.update({f"{comp}.{k}": v for k, v in fields.items()})
        if adapter.embeddings:
            report.notes.append(
                "diffusers LoRA files cannot hold textual-inversion embeddings; write them with --to diffusers-ti"
            )
        meta = modelspec(adapter, title)
        meta[METADATA_KEY] = json.dumps(config, sort_keys=True)
        meta["format"] = "pt"
        return out, meta


def _fold_scale(p: LoraPatch) -> LoraPatch:
    """The same LoRA at scale 1: ``alpha / r`` multiplied into ``up`` (and the PEFT bias), alpha = r
    (exact up to one rounding of each factor entry in its own dtype)."""
    s = p.scale
    if s == 1.0:
        return replace(p, alpha=torch.tensor(float(p.rank)))
    up = (p.up.double() * s).to(p.up.dtype)
    bias = None if p.bias is None else (p.bias.double() * s).to(p.bias.dtype)
    return replace(p, up=up, bias=bias, alpha=torch.tensor(float(p.rank)))
