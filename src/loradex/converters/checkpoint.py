"""Full models (DreamBooth / fine-tuned checkpoints): detection, lazy reading, streaming rewrite.

Detection (``describe_checkpoint``) reads nothing but a safetensors header or a diffusers
``model_index.json``; a pickled ``.ckpt`` is recognised by its container magic without being
unpickled.

* single-file safetensors: LDM/SGM names (``model.diffusion_model.*``, ``first_stage_model.*``,
  ``cond_stage_model.*``, ``conditioner.embedders.*``) or BFL FLUX names (``double_blocks.N.*``
  weights without adapter suffixes);
* single-file pickle (``.ckpt``/``.pt``/``.bin`` with the torch zip or pickle magic): format
  ``ckpt``, never opened;
* diffusers folder: a ``model_index.json`` naming the pipeline class.

Reading (``CheckpointReader``) maps every stored tensor to the canonical module it belongs to,
``<component>.<diffusers/transformers module path>`` plus the parameter (``weight``/``bias``),
without loading anything, and loads tensors one at a time on request. The name maps (facts from
diffusers' ``loaders/single_file_utils.py`` and ComfyUI's ``comfy/utils.py``; code not copied):

* ``model.diffusion_model.<SGM name>``: the UNet through ``Arch.from_sgm``; FLUX BFL names (with or
  without that prefix) likewise, with the fused ``qkv``/``linear1`` rows split by the arch's parts,
  the ``final_layer.adaLN_modulation.1`` half swap, and BFL's RMSNorm ``scale`` = diffusers ``weight``;
* ``cond_stage_model.transformer.*`` (SD1) and ``conditioner.embedders.0.transformer.*`` (SDXL
  CLIP-L): transformers CLIP names, ``text_model.`` level included;
* OpenCLIP (``cond_stage_model.model.*`` SD2, ``conditioner.embedders.1.model.*`` SDXL bigG):
  ``transformer.resblocks.N`` = ``text_model.encoder.layers.N`` with ``attn.in_proj_weight/bias``
  rows [q | k | v], ``attn.out_proj`` = ``self_attn.out_proj``, ``ln_1/ln_2`` = ``layer_norm1/2``,
  ``mlp.c_fc/c_proj`` = ``mlp.fc1/fc2``, ``token_embedding``, ``positional_embedding``, ``ln_final``
  = ``final_layer_norm``, and ``text_projection`` stored transposed (``x @ P`` vs ``Linear``);
* diffusers folders: ``<component>/<name>.safetensors`` (sharded through its ``.index.json``),
  or a pickled ``.bin`` opened only with ``weights_only``; CLIP keys are given the ``text_model.``
  level that transformers 5's ``CLIPTextModel`` no longer writes.

Writing (``CheckpointReader.rewrite``) produces a model in the SAME layout as the source with some
canonical tensors replaced: tensors nobody changes are copied file-to-file (the kernel's
``copy_file_range``, as ``safetensors_io`` does), changed ones are computed one at a time while the
output is written, so memory holds one tensor (plus the output's header). Single files are written
atomically; a diffusers folder is assembled in a temporary folder next to the output (unchanged
files copied, only changed component files rewritten) and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loradex.converters import pickle_io
from loradex.converters import safetensors_io as sio
from loradex.converters.streaming import FLOAT_NAMES, cast_copy, casting, dtype_name, stream_safetensors
from loradex.core.archs import Part
from loradex.errors import ArchError, FormatError

#: diffusers pipeline folders: the components whose weights adapters patch
COMPONENT_DIRS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
CKPT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
#: below this a pickle is an embedding or an adapter, not a full model
MIN_CKPT_BYTES = 50 * 1024 * 1024
#: the VAE's single-file prefixes (not patched by adapters; copied through)
_VAE_PREFIXES = ("first_stage_model.", "vae.")


def _adapter_suffixes() -> tuple[str, ...]:
    """Key endings no full model has: every kind's marker suffix, ``alpha`` and PEFT's factor names
    (derived from the kind registry, so a new kind is recognised here too)."""
    from loradex.core.kinds import marker_suffixes

    return tuple(f".{s}" for s in sorted({*marker_suffixes(), "alpha", "lora_A.weight", "lora_B.weight"}))


def _checkpoint_prefixes() -> tuple[str, ...]:
    """Every non-empty single-file prefix a family's component uses, and the VAE's."""
    from loradex.core.archs import families

    out = set(_VAE_PREFIXES)
    for fam in families().values():
        out.update(fam.checkpoint_hints)
        for spec in fam.components:
            out.update(p for p, _ in spec.checkpoint if p)
    return tuple(sorted(out))


def folder_configs(p: Path) -> tuple[str | None, dict[str, dict]]:
    """A diffusers folder's pipeline class and component configs (``<component>/config.json`` of
    every component its ``model_index.json`` lists with a class)."""
    info = sio.read_json(p / "model_index.json")
    configs: dict[str, dict] = {}
    for comp in COMPONENT_DIRS:
        entry = info.get(comp)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]) or not (p / comp / "config.json").is_file():
            continue
        cfg = sio.read_json(p / comp / "config.json")
        if not isinstance(cfg, dict):
            raise FormatError(f"{p / comp / 'config.json'}: not a JSON object")
        if not cfg.get("_class_name") and not cfg.get("architectures"):
            cfg = {**cfg, ("_class_name" if entry[0] == "diffusers" else "architectures"):
                   entry[1] if entry[0] == "diffusers" else [entry[1]]}
        configs[comp] = cfg
    cls = info.get("_class_name")
    return (str(cls) if cls else None), configs


def _with_defaults(family, configs: dict[str, dict]) -> dict[str, dict]:
    """Components a single file does not hold (FLUX/SD3 files without text encoders) get the
    family's published ones, so adapters on them still resolve."""
    from loradex.core.archs.tables import load_config

    if not family.builtins:
        return configs
    files = next(iter(family.builtins.values()))
    out = {c: load_config(files[c]) for c in family.component_names if c not in configs and c in files}
    out.update(configs)
    return out


def single_file_arch(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]):
    """The arch of a single-file checkpoint from its header: the family its metadata or keys name
    (every family's key hints, or the one whose layout explains the file best), and component
    configs rebuilt from the shapes (custom widths and depths included)."""
    from loradex.core.archs import arch_from_configs, families
    from loradex.errors import LoradexError

    fams = list(families().values())
    named = [f for f in fams if f.matches_metadata(metadata)]
    hinted = [f for f in fams if any(k.startswith(f.checkpoint_hints) for k in shapes)] if not named else []
    best = None
    for fam in named or hinted or fams:
        try:
            configs = fam.infer_configs(shapes)
        except LoradexError:
            continue
        score = fam.pipeline_score(None, configs) if fam.denoiser in configs else 0
        if score > 0 and (best is None or score > best[0]):
            best = (score, fam, configs)
    if best is None:
        raise ArchError("cannot tell which model family this checkpoint is (no layout loradex knows fits it)")
    return arch_from_configs(best[1], _with_defaults(best[1], best[2]))


def model_arch(path: str | Path):
    """The arch of a full model — a diffusers folder (its configs) or a single-file checkpoint (its
    header) — derived from its own configs and sizes: a built-in name when its modules are a
    published size's, else a derived arch (``<family>-<hash>``) that works for any width and depth."""
    from loradex.core.archs import arch_from_configs, select_family

    p = Path(path)
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise FormatError(f"{p}: not a diffusers pipeline folder (no model_index.json)")
        pipeline, configs = folder_configs(p)
        return arch_from_configs(select_family(configs, pipeline), configs)
    info = describe_checkpoint(p, derive=False)
    if info is None or info["format"] != "checkpoint":
        raise FormatError(f"{p}: not a full model (a diffusers pipeline folder or a single-file safetensors checkpoint)")
    h = sio.read_header(p)
    return single_file_arch(h.shapes(), dict(h.metadata))


def describe_checkpoint(path: str | Path, derive: bool = True) -> dict | None:
    """``{"format", "arch", "metadata", "layout"}`` when ``path`` is a full model, else None.

    ``layout`` is ``"file"`` or ``"folder"``; ``format`` is ``checkpoint`` (single-file
    safetensors), ``ckpt`` (a pickle, never opened) or ``diffusers-pipeline``; ``arch`` is the
    arch derived from the model's configs or header (None when no family fits; ``arch_error``
    then says why; not derived when ``derive`` is false)."""
    from loradex.errors import LoradexError

    p = Path(path)
    if p.is_dir():
        index = p / "model_index.json"
        if not index.is_file():
            return None
        try:
            info = sio.read_json(index)
        except FormatError:
            return None
        cls = str(info.get("_class_name", ""))
        meta = {"diffusers.pipeline": cls, "diffusers.version": str(info.get("_diffusers_version", ""))}
        out = {"format": "diffusers-pipeline", "arch": None, "metadata": meta, "layout": "folder"}
        try:
            out["arch"] = model_arch(p).name if derive else None
        except LoradexError as e:
            out["arch_error"] = str(e)
        return out
    if not p.is_file():
        return None
    if pickle_io.looks_like_pickle(p):
        if p.suffix.lower() in CKPT_SUFFIXES and p.stat().st_size >= MIN_CKPT_BYTES:
            return {"format": "ckpt", "arch": None, "metadata": {}, "layout": "file"}
        return None
    try:
        h = sio.read_header(p)
    except FormatError:
        return None
    keys = list(h.tensors)
    if not keys or any(k.endswith(_adapter_suffixes()) for k in keys):
        return None
    if not any(k.startswith(_checkpoint_prefixes()) for k in keys):
        return None
    out = {"format": "checkpoint", "arch": None, "metadata": dict(h.metadata), "layout": "file"}
    try:
        out["arch"] = single_file_arch(h.shapes(), dict(h.metadata)).name if derive else None
    except LoradexError as e:
        out["arch_error"] = str(e)
    return out


# ----------------------------------------------------------------------------------------------
# lazy reading
# ----------------------------------------------------------------------------------------------

#: weight file names diffusers / transformers write (no variants such as ``.fp16``)
_WEIGHT_NAMES = ("diffusion_pytorch_model", "model")
_PICKLE_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
@dataclass
class Stored:
    """One tensor as stored: its file and key, and the canonical module parameters it holds.

    ``parts`` are ``(canonical module, rows)`` as ``Arch.split_rows`` takes them (several for a
    fused projection), ``param`` is ``weight`` or ``bias``, ``transpose`` is True where the file
    stores the matrix transposed (OpenCLIP's ``text_projection``). ``parts`` is empty for tensors
    no adapter patches (VAE, buffers...): they are copied through untouched."""

    file: Path
    key: str
    dtype: str
    shape: tuple[int, ...]
    parts: list[Part] = field(default_factory=list)
    param: str = "weight"
    transpose: bool = False


@dataclass
class _File:
    path: Path
    kind: str  # "safetensors" | "pickle"
    header: sio.Header | None
    keys: list[str]
    component: str | None  # folder layout: the component directory


class CheckpointReader:
    """A full model opened lazily: a diffusers pipeline folder or a single-file checkpoint.

    ``arch`` (name or Arch; detected from ``model_index.json`` / the keys when omitted) gives the
    SGM/BFL name maps and the module table; with it, only modules the arch lists are yielded (the
    extra 24th OpenCLIP layer of SD2 files, say, is copied through). Nothing is loaded until
    ``weight`` / ``modules`` ask for it."""

    def __init__(self, path: str | os.PathLike, arch=None) -> None:
        self.path = Path(path)
        self._new_shapes: dict[tuple[str, str], tuple[int, ...]] = {}
        self._out_dtype: str | None = None  # rewrite(dtype=...): the safetensors name written
        info = describe_checkpoint(self.path, derive=arch is None)
        if info is None:
            if not self.path.exists():
                raise FormatError(f"{self.path}: no such file or folder")
            raise FormatError(f"{self.path}: not a full model (a diffusers pipeline folder or a single-file checkpoint)")
        if info["format"] == "ckpt":
            raise FormatError(f"{self.path}: a pickled .ckpt checkpoint; convert it to safetensors first "
                              "(loradex opens pickles only for small files, with weights_only)")
        self.layout: str = info["layout"]
        self.metadata: dict[str, str] = dict(info["metadata"])
        from loradex.converters.common import resolve_arch

        name = arch if arch is not None else info["arch"]
        if name is None:
            why = info.get("arch_error") or "no model family loradex knows fits it"
            raise ArchError(f"{self.path}: cannot tell which base model this is ({why}); pass --arch")
        self.arch = resolve_arch(name, {}, required=True, path=self.path)
        self.files: list[_File] = []
        self.stored: list[Stored] = []
        self.notes: list[str] = []
        self._index: dict[tuple[str, str], Stored] = {}
        self._cache: tuple[tuple[Path, str], torch.Tensor] | None = None
        self._pickles: dict[Path, dict] = {}
        self._new_shapes: dict[tuple[str, str], tuple[int, ...]] = {}
        if self.layout == "folder":
            self._open_folder()
        else:
            self._open_file()
        table = self._table()
        for st in self.stored:
            if table is not None and st.parts:
                if any(n not in table for n, _ in st.parts):
                    st.parts = []
                    continue
                self._check_rows(st, table)
            for n, _ in st.parts:
                self._index.setdefault((n, st.param), st)
        if not any(st.parts for st in self.stored):
            raise ArchError(f"{self.path}: none of its tensors is a module of {self.arch.name}; wrong --arch?")

    # ---- opening ------------------------------------------------------------------------
    def _table(self):
        try:
            return self.arch.modules
        except ArchError:
            return None

    def _check_rows(self, st: Stored, table) -> None:
        rows = st.shape[1] if st.transpose and len(st.shape) == 2 else (st.shape[0] if st.shape else 0)
        need = sum((r[1] - r[0]) if r else table[n].shape[0] for n, r in st.parts)
        if st.parts[0][1] is not None and rows != need:
            raise ArchError(f"{self.path}: {st.key} has {rows} rows, {self.arch.name} splits it into {need}; wrong --arch?")
        if st.parts[0][1] is None and st.param == "weight" and st.shape and table[st.parts[0][0]].shape[0] != rows:
            raise ArchError(f"{self.path}: {st.key} has shape {list(st.shape)}, {self.arch.name}'s "
                            f"{st.parts[0][0]} has {list(table[st.parts[0][0]].shape)}; wrong --arch?")

    def _add_file(self, path: Path, component: str | None) -> _File:
        if path.suffix == ".safetensors":
            h = sio.read_header(path)
            f = _File(path, "safetensors", h, list(h.tensors), component)
            for k, t in h.tensors.items():
                self.stored.append(Stored(path, k, t.dtype, t.shape))
        else:
            sd = self._load_pickle(path)
            f = _File(path, "pickle", None, list(sd), component)
            for k, t in sd.items():
                self.stored.append(Stored(path, k, dtype_name(t.dtype), tuple(t.shape)))
        self.files.append(f)
        return f

    def _load_pickle(self, path: Path) -> dict:
        if path not in self._pickles:
            sd = pickle_io.load_pickle(path)
            if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                sd = sd["state_dict"]
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise FormatError(f"{path}: not a state dict of tensors")
            self._pickles = {path: sd}  # one pickle in memory at a time
        return self._pickles[path]

    def _component_files(self, d: Path) -> list[Path]:
        for stem in _WEIGHT_NAMES:
            idx = d / f"{stem}.safetensors.index.json"
            if idx.is_file():
                wm = sio.read_json(idx).get("weight_map")
                if not isinstance(wm, dict):
                    raise FormatError(f"{idx}: no weight_map")
                files = []
                for v in wm.values():
                    f = (d / str(v)).resolve()
                    if f.parent != d.resolve() or not f.is_file():
                        raise FormatError(f"{idx}: shard {v!r} is missing or outside the folder")
                    if f not in files:
                        files.append(f)
                return files
            single = d / f"{stem}.safetensors"
            if single.is_file():
                return [single]
        for name in _PICKLE_NAMES:
            if (d / name).is_file():
                return [d / name]
        return []

    def _open_folder(self) -> None:
        for comp in COMPONENT_DIRS:
            d = self.path / comp
            if not d.is_dir():
                continue
            files = self._component_files(d)
            if not files:
                raise FormatError(f"{d}: no weights (diffusion_pytorch_model / model .safetensors or .bin)")
            clip = False
            if (d / "config.json").is_file():
                cfg = sio.read_json(d / "config.json")
                archs = cfg.get("architectures") or []
                clip = any(str(a).startswith("CLIPTextModel") for a in archs) or cfg.get("model_type") == "clip_text_model"
            for fp in files:
                n0 = len(self.stored)
                self._add_file(fp, comp)
                for st in self.stored[n0:]:
                    mod, _, param = st.key.rpartition(".")
                    if param not in ("weight", "bias") or not mod:
                        continue
                    if clip and not mod.startswith(("text_model.", "text_projection")):
                        mod = "text_model." + mod
                    st.parts, st.param = [(f"{comp}.{mod}", None)], param
        if not self.files:
            raise FormatError(f"{self.path}: a diffusers folder without unet/transformer/text_encoder weights")

    def _open_file(self) -> None:
        """Map a single file's keys through the family's layout: each component's prefixes
        (longest first, so a denoiser stored without a prefix, as BFL FLUX files are, comes last),
        native names through ``Arch.from_sgm``, CLIP/T5 by transformers names, OpenCLIP by its own."""
        from loradex.core.archs.text import openclip_parts

        self._add_file(self.path, None)
        prefixes = sorted(((p, spec.name, layout) for spec in self.arch.family.components if spec.name in self.arch.components
                           for p, layout in spec.checkpoint), key=lambda t: -len(t[0]))
        for st in self.stored:
            k = st.key
            if k.startswith(_VAE_PREFIXES):
                continue
            for pre, comp, layout in prefixes:
                if not k.startswith(pre):
                    continue
                rest = k[len(pre):]
                if layout == "openclip":
                    got = openclip_parts(rest, st.shape)
                    if got is not None:
                        parts, st.param, st.transpose = got
                        st.parts = [(f"{comp}.{m}", r) for m, r in parts]
                    break
                mod, _, param = rest.rpartition(".")
                if layout == "native":
                    if param == "scale":  # BFL RMSNorm
                        param = "weight"
                    if param in ("weight", "bias"):
                        try:
                            st.parts, st.param = self.arch.from_sgm(mod), param
                        except ArchError:
                            continue  # another prefix (or none) may fit
                    break
                if param in ("weight", "bias"):
                    if layout == "clip" and not mod.startswith(("text_model.", "text_projection")):
                        mod = "text_model." + mod
                    st.parts, st.param = [(f"{comp}.{mod}", None)], param
                break

    # ---- access -------------------------------------------------------------------------
    def modules(self) -> list[str]:
        """Canonical names of the modules with a weight, in storage order (fused parts together)."""
        seen: dict[str, None] = {}
        for st in self.stored:
            if st.param == "weight":
                for n, _ in st.parts:
                    if self._index.get((n, "weight")) is st:
                        seen.setdefault(n, None)
        return list(seen)

    def has(self, module: str, param: str = "weight") -> bool:
        """Whether the model stores ``param`` (``weight``/``bias``) of canonical ``module``."""
        return (module, param) in self._index

    def shape(self, module: str, param: str = "weight") -> tuple[int, ...]:
        """The canonical shape of ``module``'s ``param`` from the header, nothing loaded: a
        transposed tensor un-transposed, and for a fused tensor (FLUX ``qkv``, OpenCLIP
        ``in_proj_weight``) only this module's rows. ArchError when the model has no such parameter."""
        st = self._stored(module, param)
        shape = st.shape[::-1] if st.transpose else st.shape
        if st.parts[0][1] is None:
            return tuple(shape)
        rows = sum(r[1] - r[0] for n, r in st.parts if n == module)
        return (rows, *shape[1:])

    def _stored(self, module: str, param: str) -> Stored:
        st = self._index.get((module, param))
        if st is None:
            raise ArchError(f"{self.path}: has no {param} for {module}")
        return st

    def _load(self, st: Stored) -> torch.Tensor:
        key = (st.file, st.key)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        if st.file.suffix == ".safetensors":
            t = sio.load(st.file, keys=[st.key], header=sio.read_header(st.file))[st.key]
        else:
            t = self._load_pickle(st.file)[st.key]
        self._cache = (key, t)
        return t

    def _canonical_view(self, st: Stored) -> dict[str, torch.Tensor]:
        t = self._load(st)
        if st.transpose:
            t = t.T
        from loradex.core.archs import Arch

        return Arch.split_rows(st.parts, t)

    def weight(self, module: str, param: str = "weight") -> torch.Tensor:
        """One canonical parameter as stored (dtype of the file), loaded now."""
        return self._canonical_view(self._stored(module, param))[module]

    def iter_weights(self, params: tuple[str, ...] = ("weight", "bias")) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """``(module, {param: tensor})`` one module at a time, in storage order."""
        for name in self.modules():
            yield name, {p: self.weight(name, p) for p in params if self.has(name, p)}

    # ---- writing ------------------------------------------------------------------------
    def rewrite(
        self,
        out: str | os.PathLike,
        changed: set[tuple[str, str]],
        update: Callable[[str, str, torch.Tensor], torch.Tensor | None],
        metadata: dict[str, str] | None = None,
        progress: Callable[[int], None] | None = None,
        extra_files: dict[str, bytes] | None = None,
        new_shapes: dict[tuple[str, str], tuple[int, ...]] | None = None,
        dtype: torch.dtype | None = None,
    ) -> list[str]:
        """Write the model to ``out`` in this reader's layout with the canonical parameters in
        ``changed`` (``(module, param)``) replaced by ``update(module, param, current)`` (None:
        keep). Everything else is copied. ``metadata`` is merged into the (single file's or
        changed files') safetensors metadata. ``extra_files`` (folder layout only): relative path
        -> bytes written instead of the source's file (tokenizer files). ``new_shapes``: parameters
        whose shape ``update`` changes (appended embedding rows; unfused tensors only). ``dtype``:
        every floating tensor (F64/F32/F16/BF16) is written in this dtype, the untouched ones too
        (then they are decoded and cast instead of copied byte for byte, and every weight file of a
        folder is rewritten); integer tensors (position ids) keep theirs. Returns notes."""
        self._new_shapes = dict(new_shapes or {})
        self._out_dtype = None if dtype is None else dtype_name(dtype)
        missing = sorted(n for n, p in changed if (n, p) not in self._index)
        if missing:
            raise ArchError(f"{self.path}: has no module {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        touched: dict[Path, list[Stored]] = {}
        for st in self.stored:
            if any((n, st.param) in changed for n, _ in st.parts):
                touched.setdefault(st.file, []).append(st)
        out = Path(out)
        if self.layout == "file":
            if out.resolve() == self.path.resolve():
                raise FormatError(f"{out}: is the input; write to another path")
            self._write_file(self.files[0], out, changed, update, metadata, progress)
            return []
        return self._write_folder(out, touched, changed, update, metadata, progress, extra_files or {})

    def _producer(self, st: Stored, changed, update) -> Callable[[], torch.Tensor]:
        def make() -> torch.Tensor:
            from loradex.core.archs import Arch

            t = self._load(st)
            view = t.T if st.transpose else t
            split = Arch.split_rows(st.parts, view)
            any_change = False
            for n in split:
                if (n, st.param) in changed:
                    new = update(n, st.param, split[n])
                    if new is not None:
                        want = self._new_shapes.get((n, st.param), tuple(split[n].shape))
                        if tuple(new.shape) != tuple(want):
                            raise FormatError(f"{n}.{st.param}: new shape {tuple(new.shape)} != {tuple(want)}")
                        split[n] = new.to(t.dtype)
                        any_change = True
            self._cache = None
            if not any_change:
                return t
            fused = Arch.fuse_rows(st.parts, split)
            return (fused.T if st.transpose else fused).contiguous()

        return make

    def _write_file(self, f: _File, dst: Path, changed, update, metadata, progress) -> None:
        entries = []
        want = self._out_dtype
        for st in self.stored:
            if st.file != f.path:
                continue
            cast = want is not None and st.dtype != want and st.dtype in FLOAT_NAMES
            dtype = want if cast else st.dtype
            if any((n, st.param) in changed for n, _ in st.parts) or f.kind == "pickle" or cast:
                if any((n, st.param) in changed for n, _ in st.parts):
                    shape = st.shape
                    if len(st.parts) == 1 and (st.parts[0][0], st.param) in self._new_shapes:
                        shape = tuple(self._new_shapes[(st.parts[0][0], st.param)])
                    produce = self._producer(st, changed, update)
                else:
                    shape, produce = st.shape, (lambda st=st: self._load(st))
                if cast:
                    produce = casting(produce, sio.DTYPES[want][0])
                entries.append((st.key, dtype, shape, produce))
            else:
                info = f.header.tensors[st.key]
                entries.append((st.key, st.dtype, st.shape, (f.path, f.header.data_offset + info.start, info.nbytes)))
        meta = dict(f.header.metadata) if f.header is not None else {"format": "pt"}
        meta.update(metadata or {})
        stream_safetensors(dst, entries, meta, progress)

    def _write_folder(self, out: Path, touched, changed, update, metadata, progress, extra_files) -> list[str]:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FormatError(f"{out}: exists; give a new folder name")
        parent = out.parent if str(out.parent) else Path(".")
        if not parent.is_dir():
            raise FormatError(f"{parent}: output folder does not exist")
        notes: list[str] = []
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
        try:
            os.chmod(tmp, 0o777 & ~sio.umask())  # mkdtemp makes it 0700
            by_path = {f.path.resolve(): f for f in self.files}
            for src in sorted(self.path.rglob("*")):
                rel = src.relative_to(self.path)
                dst = tmp / rel
                if src.is_dir():
                    dst.mkdir(parents=True, exist_ok=True)
                    continue
                dst.parent.mkdir(parents=True, exist_ok=True)
                if str(rel) in extra_files:
                    continue
                f = by_path.get(src.resolve())
                if f is not None and (f.path in touched or self._out_dtype is not None):
                    if f.kind == "pickle":
                        dst = dst.with_name(("model" if f.path.name == "pytorch_model.bin" else "diffusion_pytorch_model")
                                            + ".safetensors")
                        notes.append(f"{rel}: a pickle; written as {dst.name}")
                    self._write_file(f, dst, changed, update, metadata, progress)
                elif self._out_dtype is not None and src.suffix == ".safetensors":
                    cast_copy(src, dst, self._out_dtype)  # the VAE and other parts loradex does not map
                else:
                    shutil.copy2(src, dst)
            for rel, data in extra_files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
            for d in [tmp, *[p for p in tmp.rglob("*") if p.is_file()]]:
                fd = os.open(d, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return notes
