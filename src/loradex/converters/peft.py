"""PEFT adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``).

Keys are ``base_model.model.<module path>.<suffix>`` with the module path of the live model that
``PeftModel.from_pretrained`` wraps — so a CLIPTextModel's paths carry no ``text_model`` level
under transformers 5. Supported tuners: LORA (``lora_A``/``lora_B``, ``lora_magnitude_vector``
for DoRA), LOHA (``hada_*``, same tensors as LyCORIS), LOKR (``lokr_*``). Scale is
``alpha / r`` per module, with ``rank_pattern``/``alpha_pattern`` overrides (PEFT matches a pattern
key as a suffix at a '.' boundary) and rsLoRA (``alpha / sqrt(r)``).

A folder holds one model. An adapter spanning several components is written as one PEFT folder
per component (``<out>/unet``, ``<out>/text_encoder`` ...), the layout diffusers' training
scripts use; reading accepts both layouts. Keys no tuner suffix, module or kind explains are named
in ``Adapter.unexplained`` (as ``<component>/<key>`` in per-component folders).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from loradex.converters import pickle_io
from loradex.converters import safetensors_io as sio
from loradex.converters.common import (
    PEFT_TO_LYCORIS,
    ConversionReport,
    Converter,
    cast,
    conform,
    dora_all_or_none,
    fit_kinds,
    live_path,
    peft_patterns,
    register_format,
    resolve_arch,
)
from loradex.converters.diffusers import _pattern_value, clip_canonical
from loradex.core.adapter import COMPONENTS, Adapter, component_of
from loradex.core.kinds import LohaPatch, LokrPatch, patch_from_tensors, split_kind
from loradex.core.kinds.base import Patch
from loradex.core.kinds.dora import dora_scale_from_magnitude, magnitude_from_dora_scale
from loradex.core.kinds.lora import LoraPatch
from loradex.errors import ArchError, FormatError

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
#: PEFT's LoRA tensor names -> the kind's suffix (PEFT files carry no per-module alpha tensors)
_PEFT_SUF = {k: v for k, v in PEFT_TO_LYCORIS.items() if k != "alpha"}
#: PEFT's LoHa/LoKr layers name their tensors as LyCORIS does (``hada_w1_a``, ``lokr_w1``...)
_ALL_SUF = tuple(sorted(set(_PEFT_SUF) | set(LohaPatch.MARKERS) | set(LokrPatch.MARKERS), key=len, reverse=True))


def _folders(path: Path) -> list[tuple[str | None, Path]]:
    """(component or None, folder) pairs of a PEFT adapter folder (flat or per component)."""
    if (path / CONFIG).is_file():
        return [(None, path)]
    return [(c, path / c) for c in COMPONENTS if (path / c / CONFIG).is_file()]


@register_format
class Peft(Converter):
    """PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``), flat or one
    sub-folder per component. Reads the LORA, LOHA and LOKR tuners; writes LORA, or LOHA for a
    component whose patches PEFT's LoHa tuner holds as they are."""

    name = "peft"
    priority = 10  # a folder with adapter_config.json: asked before anything else
    tucker = False
    kinds = frozenset({"lora", "loha", "lokr"})
    folder = True
    description = "PEFT adapter folder(s): adapter_config.json + adapter_model.safetensors (LoRA, LoHa, LoKr)"

    def detect(self, path: Path) -> bool:
        """True for a folder with ``adapter_config.json``, or with ``<component>/adapter_config.json``
        for some component (``unet``, ``text_encoder``...)."""
        return path.is_dir() and bool(_folders(path))

    def read(self, path: Path, arch=None) -> Adapter:
        """Patches from ``base_model.model.<module>.<suffix>`` keys of every (component) folder.
        A flat folder's component is guessed from its key names. Each patch gets PEFT's scale
        as a LyCORIS alpha: ``alpha / r`` per module from the config (``lora_alpha`` for LORA,
        ``alpha`` for LOHA/LOKR; ``alpha_pattern``/``rank_pattern`` overrides; rsLoRA
        ``alpha / sqrt(r)``) times the patch's rank; a LoKr with no rank (both halves full) is
        scaled instead. Other PEFT types are a FormatError."""
        folders = _folders(path)
        if not folders:
            raise FormatError(f"{path}: no {CONFIG} found (not a PEFT adapter folder)")
        raw: list[tuple[str | None, dict, dict[str, torch.Tensor], dict[str, str]]] = []
        shapes: dict[str, tuple[int, ...]] = {}
        for comp, folder in folders:
            cfg = sio.read_json(folder / CONFIG)
            wfile = next((folder / w for w in WEIGHTS if (folder / w).is_file()), None)
            if wfile is None:
                raise FormatError(f"{folder}: no adapter_model.safetensors")
            if wfile.suffix == ".bin":
                tensors = pickle_io.load_pickle(wfile)
                if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
                    raise FormatError(f"{wfile}: not a dict of tensors")
                meta: dict[str, str] = {}
            else:
                h = sio.read_header(wfile)
                tensors, meta = sio.load(wfile, header=h), dict(h.metadata)
            raw.append((comp, cfg, tensors, meta))
            # per-component folders: detect on "<component>.<module path>" keys (diffusers' naming)
            shapes.update({(f"{comp}.{k.removeprefix(PREFIX)}" if comp else k): tuple(v.shape) for k, v in tensors.items()})
        merged_meta = {k: v for _, _, _, m in raw for k, v in m.items()}
        a = resolve_arch(arch, shapes, required=False, path=path, metadata=merged_meta)
        patches: dict[str, Patch] = {}
        notes: list[str] = []
        unexplained: dict[str, str] = {}
        metadata: dict[str, str] = {}
        known = 0  # modules the arch has
        n_groups = 0
        for folder_comp, cfg, tensors, meta in raw:
            metadata.update(meta)
            comp = folder_comp or self._guess_component(tensors, a)
            ptype = str(cfg.get("peft_type", "LORA")).upper()
            if ptype not in ("LORA", "LOHA", "LOKR"):
                raise FormatError(f"{path}: PEFT type {ptype} is not supported (LORA, LOHA, LOKR)")

            def where(k: str, _c=folder_comp) -> str:  # per-component folders: name the folder too
                return f"{_c}/{k}" if _c else k

            groups: dict[str, dict[str, torch.Tensor]] = {}
            keys: dict[str, dict[str, str]] = {}
            for k, v in tensors.items():
                kk = k[len(PREFIX):] if k.startswith(PREFIX) else k
                for s in _ALL_SUF:
                    if kk.endswith("." + s):
                        mod, suf = kk[: -len(s) - 1], _PEFT_SUF.get(s, s)
                        groups.setdefault(mod, {})[suf] = v
                        keys.setdefault(mod, {})[suf] = where(k)
                        break
                else:
                    unexplained[where(k)] = f"not a PEFT {ptype} tensor (no lora_A/lora_B/hada_/lokr_ suffix)"
            n_groups += len(groups)
            for mod, sd in groups.items():
                name = clip_canonical(f"{comp}.{mod}")
                shape = None
                if a is not None:
                    try:
                        name = a.canonical(name)
                        shape = a.module(name).shape
                        known += 1
                    except ArchError:
                        why = f"no module {name} in {a.name}"
                        unexplained.update({k: why for k in keys[mod].values()})
                        continue
                bias = sd.pop("lora_B.bias", None)
                mag = sd.pop("dora_scale", None)
                kind, sd, rest = split_kind(sd)
                if kind is None:
                    why = f"no LoRA/LoHa/LoKr factors for module {mod}"
                    unexplained.update({k: why for k in keys[mod].values()})
                    continue
                for s_ in rest:  # e.g. lokr_t1, which no tool writes
                    unexplained[keys[mod][s_]] = f"'{s_}' is not part of a {kind} patch (module {mod})"
                if kind != "lora":  # PEFT's bias and DoRA magnitude belong to its LoRA tuner only
                    for s_, t in (("lora_B.bias", bias), ("dora_scale", mag)):
                        if t is not None:
                            unexplained[keys[mod][s_]] = f"a {kind} patch has no '{s_}' (module {mod})"
                p = patch_from_tensors(sd, shape)
                scale = self._scale(cfg, mod, self._rank(sd), ptype)
                if p.rank is not None:  # PEFT scale alpha/r as a LyCORIS alpha for this patch's rank
                    p.alpha = torch.tensor(scale * p.rank)
                else:  # LoKr with both halves full: LyCORIS' gamma is 1, PEFT still applies alpha/r
                    p = p.scaled(scale)
                if isinstance(p, LoraPatch):
                    p.bias = bias
                    if mag is not None:
                        p.dora_scale = dora_scale_from_magnitude(mag, p.shape)
                patches[name] = conform(p, shape)
        if a is not None and n_groups and not known:
            raise ArchError(f"{path}: none of its {n_groups} modules is a module of {a.name}; wrong --arch?")
        if not patches:
            from loradex.converters.kohya import nothing_read

            raise nothing_read(path, unexplained)
        return Adapter(patches, {}, metadata, a.name if a else None, self.name, notes, unexplained)

    @staticmethod
    def _guess_component(tensors: dict[str, torch.Tensor], a) -> str:
        keys = " ".join(list(tensors)[:50])
        if "transformer_blocks" in keys and "down_blocks" not in keys and "single_transformer_blocks" in keys:
            return "transformer"
        if (a is not None and "transformer" in a.components and "transformer_blocks" in keys
                and not any(s in keys for s in ("down_blocks", "up_blocks", "mid_block"))):
            return "transformer"  # an MMDiT (SD3) or a FLUX part without single blocks
        if ".self_attn." in keys or "encoder.layers." in keys:
            return "text_encoder"
        if ".SelfAttention." in keys:
            return "text_encoder_2"
        return "unet"

    @staticmethod
    def _rank(sd: dict[str, torch.Tensor]) -> int:
        if "lora_down.weight" in sd:
            return sd["lora_down.weight"].shape[0]
        if "hada_w1_b" in sd:
            return sd["hada_w1_b"].shape[0]
        for k in ("lokr_w2_a", "lokr_w1_a"):
            if k in sd:
                return sd[k].shape[1]
        return max(sd["lokr_w2"].shape[:2]) if "lokr_w2" in sd else 1

    @staticmethod
    def _scale(cfg: dict, mod: str, r: int, ptype: str) -> float:
        """PEFT's per-module scale: alpha / r (rsLoRA: alpha / sqrt(r)), with the config's
        alpha_pattern / rank_pattern overrides."""
        key = "lora_alpha" if ptype == "LORA" else "alpha"
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, mod, None)
        if alpha is None:
            alpha = cfg.get(key, r)
        cfg_r = _pattern_value(cfg.get("rank_pattern") or {}, mod, None) or cfg.get("r", r)
        return float(alpha) / (cfg_r**0.5 if cfg.get("use_rslora") else cfg_r)

    def write(self, adapter: Adapter, path: Path, report: ConversionReport, dtype=None, rank=None, arch=None, title=None):
        """Write a PEFT folder at ``path``: flat for one component, ``<path>/<component>/`` each
        otherwise, each with ``adapter_config.json`` and ``adapter_model.safetensors`` keyed
        ``base_model.model.<live module path>.<suffix>``. Per component: the LOHA tuner when its
        patches are all LoHa without DoRA and Tucker exactly on its kxk convs
        (``use_effective_conv2d``), else the LORA tuner (other kinds as exact LoRA, else SVD at
        ``rank``; DoRA as ``lora_magnitude_vector``). The folder is built next to ``path`` and
        swapped in; an existing non-PEFT folder is refused. ``title`` is ignored (no field)."""
        # one PEFT config holds one tuner type, and each component is its own folder (its own
        # config): a component whose patches PEFT's LoHa tuner holds as they are stays LoHa, any
        # other becomes exact LoRA (PEFT's LoRA tuner: per-row DoRA as lora_magnitude_vector)
        comps = sorted({component_of(n) for n in adapter.patches})
        tuners: dict[str, tuple[str, bool]] = {}
        fitted: dict[str, Patch] = {}
        for comp in comps:
            part = {n: p for n, p in adapter.patches.items() if component_of(n) == comp}
            effective = self._loha_tuner(part)
            sub = Adapter(part, {}, {}, adapter.arch, adapter.source_format)
            if effective is not None:
                tuners[comp] = ("LOHA", effective)
                sub = fit_kinds(sub, frozenset({"loha"}), rank, report, dora_ok=False, tucker_ok=True, residual_ok=False)
                if effective:
                    report.notes.append(f"{comp}: PEFT LoHa tuner with use_effective_conv2d (the Tucker cores of "
                                        "its kxk convs kept as they are)")
            else:
                tuners[comp] = ("LORA", False)
                if "loha" in set(adapter.kinds()):
                    report.notes.append(f"{comp}: written with PEFT's LoRA tuner (exact LoRA forms): "
                                        f"{self._why_not_loha(part)}")
                sub = fit_kinds(sub, frozenset({"lora"}), rank, report, dora_ok="row", tucker_ok=False,
                                residual_ok=False)
            fitted.update(sub.patches)
        adapter = Adapter(fitted, dict(adapter.embeddings), dict(adapter.metadata), adapter.arch,
                          adapter.source_format, list(adapter.notes), dict(adapter.unexplained))
        a = resolve_arch(arch or adapter.arch, {}, required=False, path=path)
        if path.exists() and not path.is_dir():
            raise FormatError(f"{path}: exists and is not a folder")
        if not path.parent.is_dir():  # like every file target: no surprise folder trees from a typo
            raise FormatError(f"{path.parent}: output folder does not exist")
        if path.is_dir() and any(path.iterdir()) and not _folders(path):
            raise FormatError(f"{path}: exists and is not a PEFT adapter folder; refusing to overwrite it")
        # the whole folder is written next to the target and swapped in, so that neither a failed
        # write nor the files of an older adapter (a flat config beside new per-component ones)
        # can leave a mixed folder behind
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            os.chmod(tmp, 0o777 & ~sio.umask())  # mkdtemp makes it 0700: a normal folder's mode
            for comp in comps:
                folder = tmp if len(comps) == 1 else tmp / comp
                folder.mkdir(exist_ok=True)
                pats = {n: p for n, p in adapter.patches.items() if component_of(n) == comp}
                if a is not None:
                    pats = {n: conform(p, a.modules[n].shape if n in a.modules else None) for n, p in pats.items()}
                self._write_one(pats, folder, tuners[comp][0], dtype, a, effective_conv2d=tuners[comp][1])
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old-{tmp.name.rsplit('.', 2)[-2]}")
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if adapter.embeddings:
            report.notes.append("PEFT folders cannot hold textual-inversion embeddings; write them with --to diffusers-ti")

    @staticmethod
    def _kxk_conv(p: Patch) -> bool:
        shape = p.shape
        return len(shape) == 4 and tuple(shape[2:]) != (1, 1)

    @classmethod
    def _loha_tuner(cls, patches: dict[str, Patch]) -> bool | None:
        """Whether PEFT's LoHa tuner holds these patches as they are: None when it does not, else
        its ``use_effective_conv2d`` flag.

        PEFT 0.21 (``tuners/loha/layer.py``) builds LyCORIS' Tucker form (``hada_t1``/``hada_t2``,
        ``hada_w*_a`` ``(r, out)``, ``hada_w*_b`` ``(r, in)``, the same ``make_weight_cp`` einsum) for
        *every* Conv2d whose kernel is not 1x1 when ``use_effective_conv2d`` is set, and for none
        otherwise; Linears and 1x1 convs are never Tucker (lycoris-lora 4.1.3 makes the same choice,
        ``use_tucker and k != 1``). So one config holds all-plain LoHa, or LoHa whose kxk convs are
        all Tucker and whose other modules are all plain. It has no DoRA."""
        if not patches or any(p.kind != "loha" or getattr(p, "dora_scale", None) is not None for p in patches.values()):
            return None
        tucker = {n for n, p in patches.items() if p.tucker}
        if not tucker:
            return False
        kxk = {n for n, p in patches.items() if cls._kxk_conv(p)}
        return True if tucker == kxk else None

    @classmethod
    def _why_not_loha(cls, patches: dict[str, Patch]) -> str:
        kinds = sorted({p.kind for p in patches.values()})
        if kinds != ["loha"]:
            return f"one PEFT config holds one tuner and this component has {', '.join(kinds)}"
        if any(getattr(p, "dora_scale", None) is not None for p in patches.values()):
            return "PEFT's LoHa tuner has no DoRA"
        return ("PEFT's LoHa tuner makes the Tucker form for every kxk conv or for none, and this component "
                "mixes Tucker and plain kxk convs")

    @staticmethod
    def _write_one(pats: dict[str, Patch], folder: Path, ptype: str, dtype, arch=None,
                   effective_conv2d: bool = False) -> None:
        out: dict[str, torch.Tensor] = {}
        pp = peft_patterns(pats, lambda n: live_path(n, arch), lambda t: "^" + re.escape(t))
        use_dora = dora_all_or_none(pats, component_of(next(iter(pats))), "peft")
        has_bias = any(getattr(p, "bias", None) is not None for p in pats.values())
        for n, p in pats.items():
            mpath = live_path(n, arch)
            pre = PREFIX + mpath + "."
            if ptype == "LORA":
                out[pre + "lora_A.weight"] = cast(p.down, dtype)
                out[pre + "lora_B.weight"] = cast(p.up, dtype)
                if has_bias:  # PEFT's lora_bias is per config: every module gets one (zeros = none)
                    b = p.bias if p.bias is not None else p.up.new_zeros(p.up.shape[0])
                    out[pre + "lora_B.bias"] = cast(b, dtype)
                if p.dora_scale is not None:
                    out[pre + "lora_magnitude_vector"] = cast(magnitude_from_dora_scale(p.dora_scale, p.shape), dtype)
            else:
                for s, t in p.tensors().items():
                    if s != "alpha":
                        out[pre + s] = cast(t, dtype)
        if ptype == "LORA":
            cfg = {
                "peft_type": "LORA", "r": pp.r, "lora_alpha": pp.alpha, "rank_pattern": pp.rank_pattern,
                "alpha_pattern": pp.alpha_pattern, "target_modules": pp.targets, "use_dora": use_dora,
                "lora_bias": has_bias,
                "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False, "use_rslora": False,
                "init_lora_weights": True, "inference_mode": True, "task_type": None,
                "base_model_name_or_path": None, "modules_to_save": None,
            }
        else:
            cfg = {
                "peft_type": "LOHA", "r": pp.r, "alpha": pp.alpha, "rank_pattern": pp.rank_pattern,
                "alpha_pattern": pp.alpha_pattern, "target_modules": pp.targets, "rank_dropout": 0.0,
                "module_dropout": 0.0, "use_effective_conv2d": effective_conv2d, "init_weights": True,
                "inference_mode": True, "task_type": None, "base_model_name_or_path": None, "modules_to_save": None,
            }
        sio.save(out, folder / WEIGHTS[0], {"format": "pt"})
        sio.write_text(json.dumps(cfg, indent=2, sort_keys=True), folder / CONFIG)
