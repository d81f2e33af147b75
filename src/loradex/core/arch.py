"""Architectures: every adaptable module of SD1, SD2, SDXL and FLUX.1, and the name maps between tools.

Why this exists
---------------
Adapter files name the modules they patch in at least five spellings, and two of them cannot be
parsed without knowing the model:

* kohya / A1111 / ComfyUI flatten the module path with ``_`` (``lora_unet_down_blocks_0_...``), and
  module names themselves contain ``_`` (``to_q``, ``transformer_blocks``), so the flat name can only
  be un-flattened by looking it up in the model's module list;
* SDXL kohya files use the SGM/"ldm" layout of Stability's original code (``input_blocks.4.1``), FLUX
  kohya files use Black Forest Labs' layout (``double_blocks.0.img_attn.qkv``), where one fused
  Linear holds what diffusers splits into several (q, k, v and, in single blocks, the MLP input).

This module provides the module lists (from the published configs bundled in ``core/configs``,
instantiated on the meta device: no weights, no downloads) and the maps
canonical <-> kohya <-> SGM/BFL. It does no I/O on adapter files and imports nothing of loradex
above ``core``.

Canonical names
---------------
``<component>.<module path as diffusers/transformers name it>``, e.g.
``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``. CLIP text encoders are always
spelled with the ``text_model.`` level (``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``)
although transformers 5's ``CLIPTextModel`` has no such level (``CLIPTextModelWithProjection`` still
has it): the files in the wild (kohya, A1111, ComfyUI, older diffusers) use it.

Sources of the naming conventions (facts checked against the public code, none copied)
-------------------------------------------------------------------------------------
* kohya sd-scripts ``networks/lora.py``: ``<prefix>_<module path with . -> _>``; prefixes
  ``lora_unet``, ``lora_te`` (SD1/2), ``lora_te1``/``lora_te2`` (SDXL), ``lora_te1``/``lora_te3``
  (FLUX: CLIP-L / T5-XXL). SD1/2 unet paths are diffusers paths; SDXL ones are SGM paths because kohya
  trains SDXL on its own SGM-layout UNet (``library/sdxl_original_unet.py``).
* SGM <-> diffusers UNet layout: diffusers ``scripts/convert_original_stable_diffusion_to_diffusers.py``
  / ``loaders/single_file_utils.py`` and ComfyUI ``comfy/utils.py`` (``unet_to_diffusers``):
  ``input_blocks.{1 + i*(L+1) + j}.0`` = ``down_blocks.i.resnets.j``, ``.1`` = its attention,
  ``input_blocks.{(i+1)*(L+1)}.0.op`` = downsampler; ``output_blocks.{i*(L+1) + j}``; the upsampler
  sits in the last output block of a level at index 1 (no attention) or 2; resnet internals
  ``in_layers.0/2``, ``emb_layers.1``, ``out_layers.0/3``, ``skip_connection``; ``time_embed.0/2``,
  ``label_emb.0.0/2``, ``out.0/2``. Computed here from the module list, so it holds for any
  UNet2DConditionModel config (tiny test models included), not only SD1/SDXL.
* BFL <-> diffusers FLUX layout: diffusers ``scripts/convert_flux_to_diffusers.py``, kohya
  ``library/flux_utils.py`` (``BFL_TO_DIFFUSERS_MAP``) and ``networks/convert_flux_lora.py``.
  ``img_attn.qkv`` = rows [to_q | to_k | to_v], ``txt_attn.qkv`` = [add_q_proj | add_k_proj |
  add_v_proj], ``single_blocks.N.linear1`` = [to_q | to_k | to_v | proj_mlp],
  ``final_layer.adaLN_modulation.1`` = diffusers ``norm_out.linear`` with its two row halves swapped
  (BFL stores [shift | scale], diffusers [scale | shift]).

Fused and permuted rows
-----------------------
``from_kohya``/``from_sgm``/``kohya_fusions`` return ``(canonical, (start, stop))`` parts: rows
``start:stop`` of the stored (fused) weight belong to ``canonical``; a canonical module's rows are the
concatenation, *in list order*, of the row slices listed for it. A canonical may appear more than once:
that is a row permutation (FLUX ``final_layer.adaLN_modulation.1`` -> ``[(norm_out.linear, (D, 2D)),
(norm_out.linear, (0, D))]``). ``Arch.split_rows`` / ``Arch.fuse_rows`` implement exactly this
convention; use them rather than slicing by hand.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from loradex.errors import ArchError

CONFIG_DIR = Path(__file__).with_name("configs")

Part = tuple[str, "tuple[int, int] | None"]

# Component -> kohya prefix, per naming style (kohya sd-scripts conventions; see the module docstring).
KOHYA_PREFIXES: dict[str, dict[str, str]] = {
    "sd": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    "flux": {"transformer": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te3"},
}
# Other prefixes some trainers write for the same component (accepted by from_kohya, never written).
_KOHYA_ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "flux": {"transformer": ("lora_transformer",)},
}
STYLES = tuple(KOHYA_PREFIXES)

# Seconds spent building each bundled table (config file name -> seconds), for benchmarks and tests.
BUILD_TIMES: dict[str, float] = {}


@dataclass(frozen=True)
class ModuleInfo:
    """One adaptable module: a Linear, Conv, norm (with a weight) or Embedding.

    ``shape`` is the module's weight shape: ``(out, in)`` for linear, ``(out, in, kh, kw)`` for conv,
    ``(C,)`` for norm, ``(num, dim)`` for embedding. Norms without an affine weight (FLUX's
    ``norm1.norm`` and friends) are not listed: no adapter can patch them.
    """

    name: str
    type: str
    shape: tuple[int, ...]
    has_bias: bool

    @property
    def out_features(self) -> int:
        """Rows of the weight (output channels; ``C`` for a norm; ``num`` for an embedding)."""
        return self.shape[0]

    @property
    def in_features(self) -> int:
        """Input features (``C`` for a norm, ``dim`` for an embedding)."""
        return self.shape[1] if len(self.shape) > 1 else self.shape[0]

    @property
    def kernel(self) -> tuple[int, ...]:
        """Conv kernel size (``()`` for non-conv modules)."""
        return tuple(self.shape[2:]) if self.type == "conv" else ()


# ----------------------------------------------------------------------------------------------
# building module tables
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet(extra_loggers: tuple[str, ...] = ()):
    """Silence the config chatter of diffusers/transformers (and ``extra_loggers``) while models are
    built: their loggers, transformers' own verbosity, warnings and stderr. ``loradex.tiny.quiet``
    is this with peft's and LyCORIS' loggers added."""
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", *extra_loggers)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as tlog

        tlevel = tlog.get_verbosity()
        tlog.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        tlog = None
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        if tlog is not None:
            tlog.set_verbosity(tlevel)


def _classify(mod: torch.nn.Module) -> tuple[str, tuple[int, ...], bool] | None:
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    if isinstance(mod, torch.nn.Linear):
        kind = "linear"
    elif isinstance(mod, torch.nn.modules.conv._ConvNd):
        kind = "conv"
    elif isinstance(mod, torch.nn.Embedding):
        kind = "embedding"
    elif isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)) or (
        "Norm" in type(mod).__name__ and w.dim() == 1
    ):
        kind = "norm"  # GroupNorm, LayerNorm, diffusers RMSNorm, T5LayerNorm
    else:
        return None
    b = getattr(mod, "bias", None)
    return kind, tuple(int(s) for s in w.shape), isinstance(b, torch.Tensor)


def model_kind(model: torch.nn.Module) -> str:
    """What naming rules apply to a component: ``unet`` | ``flux`` | ``clip`` | ``t5`` | ``other``."""
    cls = type(model).__name__
    if cls == "UNet2DConditionModel":
        return "unet"
    if cls.startswith("FluxTransformer2D"):
        return "flux"
    if cls.startswith("CLIPTextModel"):
        return "clip"
    if cls.startswith("T5EncoderModel"):
        return "t5"
    return "other"


def module_table(component: str, model: torch.nn.Module) -> dict[str, ModuleInfo]:
    """Canonical name -> ModuleInfo for every adaptable module of ``model`` (live or on meta)."""
    kind = model_kind(model)
    # transformers 5's CLIPTextModel dropped the `text_model` level; CLIPTextModelWithProjection has it.
    add_text_model = kind == "clip" and not isinstance(getattr(model, "text_model", None), torch.nn.Module)
    table: dict[str, ModuleInfo] = {}
    for path, mod in model.named_modules():
        if not path:
            continue
        got = _classify(mod)
        if got is None:
            continue
        if add_text_model:
            path = "text_model." + path
        name = f"{component}.{path}"
        table[name] = ModuleInfo(name, got[0], got[1], got[2])
    return table


def _load_config(filename: str) -> dict:
    with open(CONFIG_DIR / filename) as f:
        return json.load(f)


def _model_class(cfg: dict) -> type:
    """The class a bundled config instantiates: diffusers ``_class_name`` or transformers ``architectures``."""
    t0 = time.perf_counter()
    if "_class_name" in cfg:
        import diffusers

        cls = getattr(diffusers, cfg["_class_name"])
        lib = "diffusers"
    else:
        import transformers

        cls = getattr(transformers, cfg["architectures"][0])
        lib = "transformers"
    # The first use pays the library import (seconds for diffusers); keep it apart from build times.
    BUILD_TIMES.setdefault(f"import:{lib}", time.perf_counter() - t0)
    return cls


def _table_cache_file(filename: str) -> Path | None:
    """Where the table built from ``filename`` is cached between processes: under
    ``$LORADEX_CACHE`` (default ``$XDG_CACHE_HOME/loradex`` or ``~/.cache/loradex``), keyed by the
    config's bytes and the versions of the libraries whose classes name the modules. Building a
    table costs the diffusers import plus the meta instantiation (seconds); reading it, a few ms.
    ``LORADEX_CACHE=off`` disables it."""
    import hashlib
    import os
    from importlib.metadata import PackageNotFoundError, version

    root = os.environ.get("LORADEX_CACHE")
    if root == "off":
        return None
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "loradex")
    key = hashlib.sha256((CONFIG_DIR / filename).read_bytes())
    for lib in ("loradex", "diffusers", "transformers"):
        try:
            key.update(f"{lib}={version(lib)};".encode())
        except PackageNotFoundError:
            key.update(f"{lib}=?;".encode())
    return Path(root) / "arch" / f"{Path(filename).stem}-{key.hexdigest()[:16]}.json"


def _read_table_cache(path: Path | None) -> tuple[str, dict[str, ModuleInfo]] | None:
    if path is None or not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        table = {n: ModuleInfo(n, t, tuple(shape), bool(b)) for n, (t, shape, b) in raw["modules"].items()}
        return raw["kind"], table
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged cache is rebuilt


def _write_table_cache(path: Path | None, kind: str, table: dict[str, ModuleInfo]) -> None:
    if path is None:
        return
    import os
    import tempfile

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"kind": kind, "modules": {n: [i.type, list(i.shape), i.has_bias] for n, i in table.items()}}, f)
        os.replace(tmp, path)
    except OSError:
        pass  # read-only home: build every time


@cache
def _bundled_model_table(filename: str) -> tuple[str, dict[str, ModuleInfo]]:
    """One bundled config's table: from the cache file if present, else built on the meta device
    and cached (see ``_table_cache_file``). Cached in memory per config file too, so CLIP-L is
    built once for sd1, sdxl and flux1."""
    cache_file = _table_cache_file(filename)
    cached = _read_table_cache(cache_file)
    if cached is not None:
        return cached
    kind, table = _build_model_table(filename)
    _write_table_cache(cache_file, kind, table)
    return kind, table


def _build_model_table(filename: str) -> tuple[str, dict[str, ModuleInfo]]:
    """Instantiate one bundled config on the meta device; return (kind, table keyed by bare path).
    The time it takes (library import excluded) is kept in ``BUILD_TIMES[filename]``."""
    cfg = _load_config(filename)
    with _quiet():
        cls = _model_class(cfg)
    t0 = time.perf_counter()
    kwargs = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"}
    with _quiet(), torch.device("meta"):
        if "_class_name" in cfg:  # diffusers: the config keys are the constructor's arguments
            model = cls(**kwargs)
        else:  # transformers: build the config object first
            model = cls(cls.config_class(**kwargs))
        table = module_table("_", model)
        kind = model_kind(model)
    BUILD_TIMES[filename] = time.perf_counter() - t0
    return kind, {n[2:]: ModuleInfo(n[2:], i.type, i.shape, i.has_bias) for n, i in table.items()}


def _bundled_loader(component: str, filename: str) -> Callable[[], tuple[str, dict[str, ModuleInfo]]]:
    def load() -> tuple[str, dict[str, ModuleInfo]]:
        kind, table = _bundled_model_table(filename)
        return kind, {
            f"{component}.{p}": ModuleInfo(f"{component}.{p}", i.type, i.shape, i.has_bias)
            for p, i in table.items()
        }

    return load


# ----------------------------------------------------------------------------------------------
# SGM ("ldm") naming of a UNet2DConditionModel
# ----------------------------------------------------------------------------------------------

_RESNET_SGM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_SGM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_BLOCK_RE = re.compile(
    r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$"
)
_MID_RE = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")


def _sub_sgm(kind: str, rest: str | None) -> str | None:
    """Map the inside of a diffusers sub-block to SGM (None when it has no SGM name)."""
    if rest is None:
        return None
    if kind == "resnets":
        head, _, tail = rest.partition(".")
        mapped = _RESNET_SGM.get(head)
        if mapped is None:
            return None
        return mapped + ("." + tail if tail else "")
    if kind == "downsamplers":
        return "op" if rest == "conv" else None
    if kind == "upsamplers":
        return "conv" if rest == "conv" else None
    return rest  # attentions: Transformer2DModel internals keep their names


def sgm_paths(paths: Iterable[str]) -> dict[str, str]:
    """diffusers UNet module path -> SGM path, for the given module paths (no component prefix).

    The block indices are computed from the paths themselves (resnets per level, which levels
    down/upsample or have attention), so any UNet2DConditionModel layout works.
    """
    paths = list(paths)
    n_res: dict[tuple[str, int], set[int]] = {}
    has_down: set[int] = set()
    up_attn: set[int] = set()
    mid_attn = False
    for p in paths:
        m = _BLOCK_RE.match(p)
        if m:
            side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
            if kind == "resnets":
                n_res.setdefault((side, i), set()).add(j)
            elif kind == "downsamplers":
                has_down.add(i)
            elif kind == "attentions" and side == "up_blocks":
                up_attn.add(i)
        elif p.startswith("mid_block.attentions."):
            mid_attn = True
    downs = sorted(i for s, i in n_res if s == "down_blocks")
    ups = sorted(i for s, i in n_res if s == "up_blocks")
    in_start: dict[int, int] = {}
    k = 1
    for i in downs:
        in_start[i] = k
        k += len(n_res[("down_blocks", i)]) + (1 if i in has_down else 0)
    out_start: dict[int, int] = {}
    k = 0
    for i in ups:
        out_start[i] = k
        k += len(n_res[("up_blocks", i)])

    out: dict[str, str] = {}
    for p in paths:
        if p in _TOP_SGM:
            out[p] = _TOP_SGM[p]
            continue
        m = _BLOCK_RE.match(p)
        if m:
            side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            sub = _sub_sgm(kind, rest)
            if sub is None or (side, i) not in n_res:
                continue
            nres = len(n_res[(side, i)])
            if side == "down_blocks":
                if kind == "downsamplers":
                    out[p] = f"input_blocks.{in_start[i] + nres}.0.{sub}"
                else:
                    out[p] = f"input_blocks.{in_start[i] + j}.{0 if kind == 'resnets' else 1}.{sub}"
            else:
                if kind == "upsamplers":
                    slot = 2 if i in up_attn else 1
                    out[p] = f"output_blocks.{out_start[i] + nres - 1}.{slot}.{sub}"
                else:
                    out[p] = f"output_blocks.{out_start[i] + j}.{0 if kind == 'resnets' else 1}.{sub}"
            continue
        m = _MID_RE.match(p)
        if m:
            kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
            sub = _sub_sgm(kind, rest)
            if sub is None:
                continue
            idx = (2 * j if kind == "resnets" else 2 * j + 1) if mid_attn else j
            out[p] = f"middle_block.{idx}.{sub}"
    return out


# ----------------------------------------------------------------------------------------------
# BFL naming of a FluxTransformer2DModel
# ----------------------------------------------------------------------------------------------

# diffusers sub-path inside transformer_blocks.N -> (BFL sub-path inside double_blocks.N, fused index)
_FLUX_DOUBLE = {
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.norm_q": ("img_attn.norm.query_norm", None),
    "attn.norm_k": ("img_attn.norm.key_norm", None),
    "attn.norm_added_q": ("txt_attn.norm.query_norm", None),
    "attn.norm_added_k": ("txt_attn.norm.key_norm", None),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
}
_FLUX_SINGLE = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation.lin", None),
    "attn.norm_q": ("norm.query_norm", None),
    "attn.norm_k": ("norm.key_norm", None),
}
_FLUX_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # rows [shift | scale] vs diffusers [scale | shift]
}
_FLUX_SWAPPED = {"norm_out.linear"}
_FLUX_BLOCK_RE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def bfl_paths(
    table: Mapping[str, ModuleInfo], component: str
) -> tuple[dict[str, str], dict[str, list[Part]]]:
    """(canonical -> BFL path, BFL path -> parts) for a FLUX transformer table.

    Row ranges come from the table's shapes, so any width (FLUX.1 3072, tiny test models) works.
    """
    pre = component + "."
    to_bfl: dict[str, str] = {}
    grouped: dict[str, list[tuple[int, str]]] = {}
    for name in table:
        path = name[len(pre) :]
        bfl: str | None = None
        idx: int | None = None
        m = _FLUX_BLOCK_RE.match(path)
        if m:
            mapping = _FLUX_DOUBLE if m.group(1) == "transformer_blocks" else _FLUX_SINGLE
            got = mapping.get(m.group(3))
            if got is not None:
                head = "double_blocks" if m.group(1) == "transformer_blocks" else "single_blocks"
                bfl, idx = f"{head}.{m.group(2)}.{got[0]}", got[1]
        elif path in _FLUX_TOP:
            bfl = _FLUX_TOP[path]
        if bfl is None:
            continue
        to_bfl[name] = bfl
        grouped.setdefault(bfl, []).append((idx or 0, name))
    parts: dict[str, list[Part]] = {}
    for bfl, members in grouped.items():
        members.sort()
        if len(members) == 1:
            name = members[0][1]
            if name[len(pre) :] in _FLUX_SWAPPED:
                rows = table[name].out_features
                half = rows // 2
                parts[bfl] = [(name, (half, rows)), (name, (0, half))]
            else:
                parts[bfl] = [(name, None)]
            continue
        start = 0
        lst: list[Part] = []
        for _, name in members:
            rows = table[name].out_features
            lst.append((name, (start, start + rows)))
            start += rows
        parts[bfl] = lst
    return to_bfl, parts


# ----------------------------------------------------------------------------------------------
# Arch
# ----------------------------------------------------------------------------------------------


class _Component:
    """One component's table and name maps, built on first use (thread-safe)."""

    def __init__(self, arch: Arch, name: str, loader: Callable[[], tuple[str, dict[str, ModuleInfo]]]):
        self.arch = arch
        self.name = name
        self._loader = loader
        self._lock = threading.Lock()
        self.kind: str | None = None
        self.table: dict[str, ModuleInfo] | None = None
        # native = SGM (unet) / BFL (flux): canonical -> native path; native path -> parts
        self.native: dict[str, str] = {}
        self.native_parts: dict[str, list[Part]] = {}
        self.kohya_path: dict[str, str] = {}  # canonical -> path kohya flattens (no component)
        self.flat: dict[str, list[Part]] = {}  # flat (no prefix) -> parts, native + alternates
        self.flat_lower: dict[str, list[Part]] = {}

    def ensure(self) -> _Component:
        if self.table is None:
            with self._lock:
                if self.table is None:
                    kind, table = self._loader()
                    self._index(kind, table)
                    self.kind, self.table = kind, table
        return self

    def _index(self, kind: str, table: dict[str, ModuleInfo]) -> None:
        pre = self.name + "."
        paths = {n: n[len(pre) :] for n in table}
        style = self.arch.style
        if kind == "unet":
            sgm = sgm_paths(paths.values())
            self.native = {n: sgm[p] for n, p in paths.items() if p in sgm}
            self.native_parts = {v: [(n, None)] for n, v in self.native.items()}
        elif kind == "flux":
            self.native, self.native_parts = bfl_paths(table, self.name)
        use_native = (kind == "unet" and style == "sdxl") or (kind == "flux" and style == "flux")
        flat: dict[str, list[Part]] = {}
        for n, p in paths.items():
            kp = self.native.get(n, p) if use_native else p
            self.kohya_path[n] = kp
            f = kp.replace(".", "_")
            if f not in flat:
                flat[f] = self.native_parts[kp] if use_native and kp in self.native_parts else [(n, None)]
        # Alternate spellings, accepted on reading only (never shadow a native name):
        for n, p in paths.items():
            flat.setdefault(p.replace(".", "_"), [(n, None)])  # diffusers path (lycoris, OneTrainer, ...)
            if kind == "clip" and p.startswith("text_model."):
                flat.setdefault(p[len("text_model.") :].replace(".", "_"), [(n, None)])  # transformers 5
        if not use_native:
            for nat, parts in self.native_parts.items():
                flat.setdefault(nat.replace(".", "_"), parts)  # e.g. SGM-named SD1 files
        self.flat = flat
        lower: dict[str, list[Part]] = {}
        for f, parts in flat.items():
            lower.setdefault(f.lower(), parts)
        self.flat_lower = lower


class Arch:
    """The modules of one model family and the name maps between tools.

    Built-in archs (``get_arch("sd1"|"sd2"|"sdxl"|"flux1")``) build each component's table on first
    use from the bundled configs on the meta device; archs made by ``arch_from_models`` index live
    models at once. ``style`` names the kohya naming convention: ``"sd"`` (unet flattened as diffusers
    paths), ``"sdxl"`` (SGM paths), ``"flux"`` (BFL paths, fused qkv).

    ``components`` maps each component to a loader returning ``(kind, table)``; build archs with
    ``get_arch`` / ``arch_from_models`` rather than by hand. ``kohya_prefixes`` defaults to the
    style's (``KOHYA_PREFIXES``).
    """

    def __init__(
        self,
        name: str,
        components: Mapping[str, Callable[[], tuple[str, dict[str, ModuleInfo]]]],
        style: str,
        kohya_prefixes: Mapping[str, str] | None = None,
    ) -> None:
        if style not in KOHYA_PREFIXES:
            raise ArchError(f"unknown naming style {style!r} (expected one of {', '.join(STYLES)})")
        self.name = name
        self.style = style
        self.components: tuple[str, ...] = tuple(components)
        prefixes = dict(kohya_prefixes) if kohya_prefixes is not None else dict(KOHYA_PREFIXES[style])
        missing = [c for c in self.components if c not in prefixes]
        if missing:
            raise ArchError(
                f"arch {name!r}: no kohya prefix for component(s) {', '.join(missing)} in style {style!r}"
            )
        self.kohya_prefixes: dict[str, str] = {c: prefixes[c] for c in self.components}
        self._comps = {c: _Component(self, c, loader) for c, loader in components.items()}
        # prefix (native or alias) -> component, longest first so "lora_te1" never reads as "lora_te"
        pmap = {p: c for c, p in self.kohya_prefixes.items()}
        for c, aliases in _KOHYA_ALIASES.get(style, {}).items():
            if c in self._comps:
                for a in aliases:
                    pmap.setdefault(a, c)
        self._prefix_order = sorted(pmap.items(), key=lambda kv: -len(kv[0]))
        self._modules: dict[str, ModuleInfo] | None = None

    def __repr__(self) -> str:
        return f"Arch({self.name!r}, components={self.components}, style={self.style!r})"

    # ---- tables ---------------------------------------------------------------------------
    def _comp(self, component: str) -> _Component:
        c = self._comps.get(component)
        if c is None:
            raise ArchError(
                f"arch {self.name!r} has no component {component!r} ({', '.join(self.components)})"
            )
        return c.ensure()

    def component_modules(self, component: str) -> dict[str, ModuleInfo]:
        """The table of one component (builds only that one)."""
        return self._comp(component).table  # type: ignore[return-value]

    def component_kind(self, component: str) -> str:
        """``unet`` | ``flux`` | ``clip`` | ``t5`` | ``other``."""
        return self._comp(component).kind  # type: ignore[return-value]

    @property
    def modules(self) -> dict[str, ModuleInfo]:
        """Canonical name -> ModuleInfo for every component (builds all of them)."""
        if self._modules is None:
            allm: dict[str, ModuleInfo] = {}
            for c in self.components:
                allm.update(self.component_modules(c))
            self._modules = allm
        return self._modules

    @property
    def denoiser(self) -> str:
        """The component that denoises: ``unet`` or ``transformer``."""
        for c in ("unet", "transformer"):
            if c in self._comps:
                return c
        raise ArchError(f"arch {self.name!r} has no unet/transformer component")

    @property
    def text_encoders(self) -> tuple[str, ...]:
        return tuple(c for c in self.components if c.startswith("text_encoder"))

    def text_encoder_width(self, component: str) -> int | None:
        """Width of a text encoder's token embeddings (768 CLIP-L, 1024 OpenCLIP-H, 1280 bigG, 4096 T5)."""
        for n, info in self.component_modules(component).items():
            if info.type == "embedding" and (
                n.endswith("embeddings.token_embedding") or n.endswith(".shared")
            ):
                return info.shape[1]
        return None

    def module(self, canonical: str) -> ModuleInfo:
        """The ModuleInfo of a canonical name; ArchError if the arch has no such module."""
        comp = canonical.split(".", 1)[0]
        if comp in self._comps:
            info = self.component_modules(comp).get(canonical)
            if info is not None:
                return info
        raise ArchError(f"{canonical!r} is not a module of {self.name}")

    def canonical(self, name: str, component: str | None = None) -> str:
        """Normalise a dotted module name as other tools spell it to the canonical name.

        Accepts CLIP names with or without ``text_model.``, and strips peft's ``.base_layer``. With
        ``component`` the name may omit the component (``down_blocks.0...`` + ``component="unet"``).
        """
        n = name
        while n.endswith(".base_layer"):
            n = n[: -len(".base_layer")]
        n = n.replace(".base_layer.", ".")
        if component is not None and not n.startswith(component + "."):
            n = f"{component}.{n}"
        comp, _, rest = n.partition(".")
        if comp in self._comps:
            c = self._comp(comp)
            if n in c.table:  # type: ignore[operator]
                return n
            if c.kind == "clip" and not rest.startswith("text_model."):
                alt = f"{comp}.text_model.{rest}"
                if alt in c.table:  # type: ignore[operator]
                    return alt
        raise ArchError(f"{name!r} is not a module of {self.name}")

    # ---- kohya ----------------------------------------------------------------------------
    def kohya_name(self, canonical: str) -> str:
        """The flat kohya name (prefix included) kohya sd-scripts would write for this module.

        For a FLUX module that kohya stores fused (q/k/v, single-block linear1) or permuted
        (final_layer.adaLN_modulation.1) this is the fused module's name.
        """
        comp = canonical.split(".", 1)[0]
        c = self._comp(comp) if comp in self._comps else None
        if c is None or canonical not in c.kohya_path:
            raise ArchError(f"{canonical!r} is not a module of {self.name}")
        return f"{self.kohya_prefixes[comp]}_{c.kohya_path[canonical].replace('.', '_')}"

    def _split_prefix(self, flat: str) -> tuple[str, str]:
        for p, comp in self._prefix_order:
            if flat.startswith(p + "_"):
                return comp, flat[len(p) + 1 :]
        raise ArchError(
            f"{flat!r} has no kohya prefix of {self.name} ({', '.join(self.kohya_prefixes.values())})"
        )

    def resolve_flat(self, component: str, flat: str) -> list[Part]:
        """Un-flatten a module name without prefix (``down_blocks_0_..._to_q``) for one component.

        Accepts the native kohya spelling and the alternates other tools write: diffusers paths
        (lycoris' standalone ``lycoris_`` names, SDXL/FLUX files from other trainers), SGM paths for
        SD1/SD2, CLIP names without ``text_model_``, and any letter case.
        """
        c = self._comp(component)
        parts = c.flat.get(flat) or c.flat_lower.get(flat.lower())
        if parts is None:
            raise ArchError(f"{flat!r} is not a {component} module of {self.name}")
        return list(parts)

    def from_kohya(self, flat: str) -> list[Part]:
        """Flat kohya name (prefix included, no ``.lora_down.weight`` suffix) -> canonical parts.

        Each part is ``(canonical, rows)``; ``rows`` is the ``(start, stop)`` slice of the stored
        weight's rows that belongs to it, or None when the name is not fused. See the module
        docstring for the convention when a canonical appears twice (a row permutation).
        """
        comp, rest = self._split_prefix(flat)
        try:
            return self.resolve_flat(comp, rest)
        except ArchError:
            raise ArchError(f"{flat!r} is not a module of {self.name}") from None

    def kohya_fusions(self) -> dict[str, list[tuple[str, tuple[int, int]]]]:
        """Fused (or row-permuted) flat kohya name -> its ordered parts. Empty for SD-family archs."""
        if self.style != "flux":
            return {}
        comp = self.denoiser
        c = self._comp(comp)
        return {
            f"{self.kohya_prefixes[comp]}_{nat.replace('.', '_')}": list(parts)  # type: ignore[misc]
            for nat, parts in c.native_parts.items()
            if parts[0][1] is not None
        }

    # ---- SGM / BFL ------------------------------------------------------------------------
    def sgm_name(self, canonical: str) -> str:
        """The original-layout name of a denoiser module, without ``model.diffusion_model.``.

        UNet archs: SGM/"ldm" (``input_blocks.4.1.transformer_blocks.0.attn2.to_k``), as in single-file
        checkpoints (``model.diffusion_model.`` + this) and ComfyUI LoRA keys (``diffusion_model.`` +
        this). FLUX: the BFL name (``double_blocks.0.img_attn.qkv``; fused/permuted like kohya's).
        Text encoder modules have no such name here (ArchError).
        """
        comp = canonical.split(".", 1)[0]
        if comp in self._comps:
            c = self._comp(comp)
            if canonical in c.native:
                return c.native[canonical]
        raise ArchError(f"{canonical!r} has no SGM/BFL name in {self.name}")

    def from_sgm(self, name: str) -> list[Part]:
        """SGM/BFL module name (with or without ``model.diffusion_model.``/``diffusion_model.``) -> parts."""
        n = name
        for p in ("model.diffusion_model.", "diffusion_model."):
            if n.startswith(p):
                n = n[len(p) :]
                break
        c = self._comp(self.denoiser)
        parts = c.native_parts.get(n)
        if parts is None:
            raise ArchError(f"{name!r} is not an SGM/BFL module name of {self.name}")
        return list(parts)

    # ---- fused rows -----------------------------------------------------------------------
    @staticmethod
    def split_rows(parts: list[Part], tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a stored (fused/permuted) tensor's rows into the canonical modules' rows.

        ``parts`` is what ``from_kohya``/``from_sgm``/``kohya_fusions`` return. Works for anything
        whose dim 0 is the output rows (weights, biases, LoRA ``up``). Not fused -> ``{name: tensor}``.
        """
        out: dict[str, list[torch.Tensor]] = {}
        for name, rows in parts:
            out.setdefault(name, []).append(tensor if rows is None else tensor[rows[0] : rows[1]])
        return {n: (ts[0] if len(ts) == 1 else torch.cat(ts, 0)) for n, ts in out.items()}

    @staticmethod
    def fuse_rows(parts: list[Part], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The inverse of ``split_rows``: assemble the stored tensor from per-canonical tensors."""
        if len(parts) == 1 and parts[0][1] is None:
            return tensors[parts[0][0]]
        offsets: dict[str, int] = {}
        pieces: list[tuple[int, torch.Tensor]] = []
        for name, rows in parts:
            assert rows is not None
            n = rows[1] - rows[0]
            off = offsets.get(name, 0)
            t = tensors[name]
            if off + n > t.shape[0]:
                raise ArchError(f"{name}: {t.shape[0]} rows, parts need {off + n}")
            pieces.append((rows[0], t[off : off + n]))
            offsets[name] = off + n
        pieces.sort(key=lambda p: p[0])
        return torch.cat([p[1] for p in pieces], 0)


# ----------------------------------------------------------------------------------------------
# registry of archs
# ----------------------------------------------------------------------------------------------

_BUILTIN_SPECS: dict[str, tuple[str, dict[str, str]]] = {
    "sd1": ("sd", {"unet": "sd15_unet.json", "text_encoder": "clip_vit_l14_text.json"}),
    "sd2": ("sd", {"unet": "sd21_unet.json", "text_encoder": "openclip_vit_h14_text.json"}),
    "sdxl": (
        "sdxl",
        {
            "unet": "sdxl_base_unet.json",
            "text_encoder": "clip_vit_l14_text.json",
            "text_encoder_2": "openclip_vit_bigg14_text.json",
        },
    ),
    "flux1": (
        "flux",
        {
            "transformer": "flux1_dev_transformer.json",
            "text_encoder": "clip_vit_l14_text.json",
            "text_encoder_2": "t5_v1_1_xxl_encoder.json",
        },
    ),
}
BUILTIN_ARCHS = tuple(_BUILTIN_SPECS)

_CUSTOM: dict[str, Arch] = {}


@cache
def _builtin(name: str) -> Arch:
    style, files = _BUILTIN_SPECS[name]
    return Arch(name, {c: _bundled_loader(c, f) for c, f in files.items()}, style)


def get_arch(name: str) -> Arch:
    """A built-in (``sd1``, ``sd2``, ``sdxl``, ``flux1``) or registered arch; cached."""
    if name in _BUILTIN_SPECS:
        return _builtin(name)
    if name in _CUSTOM:
        return _CUSTOM[name]
    known = ", ".join(list(BUILTIN_ARCHS) + list(_CUSTOM))
    raise ArchError(f"unknown architecture {name!r} (known: {known})")


def register_arch(arch: Arch) -> None:
    """Make a custom arch (e.g. a tiny test model) known to get_arch and detect_arch.

    Registering a name again replaces the earlier arch; built-in names cannot be replaced.
    """
    if arch.name in _BUILTIN_SPECS:
        raise ArchError(f"{arch.name!r} is a built-in architecture and cannot be re-registered")
    _CUSTOM[arch.name] = arch


def list_archs() -> list[str]:
    """Built-in names, then registered ones."""
    return list(BUILTIN_ARCHS) + list(_CUSTOM)


def arch_from_models(name: str, models: Mapping[str, torch.nn.Module], style: str) -> Arch:
    """Build an arch from live models (``{"unet": ..., "text_encoder": ...}``); not registered.

    ``style``: ``"sd"`` (kohya names are diffusers paths), ``"sdxl"`` (SGM names, te1/te2),
    ``"flux"`` (BFL names, te1/te3). Tables are read at once; the models are not kept.
    """
    if style not in KOHYA_PREFIXES:
        raise ArchError(f"unknown naming style {style!r} (expected one of {', '.join(STYLES)})")
    loaders = {}
    for comp, model in models.items():
        kind, table = model_kind(model), module_table(comp, model)
        loaders[comp] = lambda kind=kind, table=table: (kind, table)
    return Arch(name, loaders, style)


# ----------------------------------------------------------------------------------------------
# detection
# ----------------------------------------------------------------------------------------------

_DOWN_SUFFIXES = {
    "lora_down.weight",
    "lora_A.weight",
    "lora.down.weight",
    "lora_linear_layer.down.weight",
    "down.weight",
    "hada_w1_b",
    "hada_w2_b",
}
_UP_SUFFIXES = {
    "lora_up.weight",
    "lora_B.weight",
    "lora.up.weight",
    "lora_linear_layer.up.weight",
    "up.weight",
    "hada_w1_a",
    "hada_w2_a",
}
_COMPONENT_PREFIXES = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.", "text_encoder_3.")
# ComfyUI's text encoder key names -> which component of an arch they address
_COMFY_TE = {"clip_l": "text_encoder", "clip_h": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "t5"}
_TI_KEYS = ("emb_params", "clip_l", "clip_g")
_FLUX_HINTS = (
    "double_blocks",
    "single_blocks",
    "single_transformer_blocks",
    "lora_te3_",
    "t5xxl",
    "final_layer",
)
_UNET_HINTS = (
    "input_blocks",
    "output_blocks",
    "middle_block",
    "down_blocks",
    "up_blocks",
    "mid_block",
    "lora_te_",
)


def _is_ti_key(key: str) -> bool:
    return key in _TI_KEYS or key.startswith(("string_to_param.", "bundle_emb."))


def _resolve_dotted(arch: Arch, comp: str, dotted: str, sgm: bool) -> tuple[list[Part], str] | None:
    """Longest module-name prefix of ``dotted`` (the rest is the tensor suffix)."""
    segs = dotted.split(".")
    c = arch._comp(comp)
    for i in range(len(segs) - 1, max(0, len(segs) - 5), -1):
        head, suffix = ".".join(segs[:i]), ".".join(segs[i:])
        if sgm:
            parts = c.native_parts.get(head)
            if parts is not None:
                return list(parts), suffix
        else:
            try:
                return [(arch.canonical(head, comp), None)], suffix
            except ArchError:
                continue
    return None


_OLD_ATTN_LORA = re.compile(r"\.(to_q|to_k|to_v|to_out)_lora\.")


def _old_diffusers_spelling(comp_kind: str | None, dotted: str) -> str:
    """Rewrite pre-peft diffusers LoRA names (``attn1.processor.to_q_lora.down.weight``) to module paths."""
    if "_lora." not in dotted and ".processor." not in dotted:
        return dotted
    dotted = dotted.replace(".processor.", ".")

    def sub(m: re.Match) -> str:
        which = m.group(1)
        if comp_kind == "clip":
            return ".out_proj.lora." if which == "to_out" else f".{which[-1]}_proj.lora."
        return ".to_out.0.lora." if which == "to_out" else f".{which}.lora."

    return _OLD_ATTN_LORA.sub(sub, dotted)


def _resolve_key(arch: Arch, key: str) -> tuple[list[Part], str] | None:
    """Which modules of ``arch`` a tensor key of any supported adapter format addresses."""
    comps = arch.components
    den = next((c for c in ("unet", "transformer") if c in comps), None)
    if key.startswith("lycoris_"):
        flat, _, suffix = key.partition(".")
        for comp in comps:
            try:
                return arch.resolve_flat(comp, flat[len("lycoris_") :]), suffix
            except ArchError:
                continue
        return None
    if key.startswith("lora_"):
        flat, _, suffix = key.partition(".")
        try:
            return arch.from_kohya(flat), suffix
        except ArchError:
            return None
    for p in ("model.diffusion_model.", "diffusion_model."):
        if key.startswith(p):
            return None if den is None else _resolve_dotted(arch, den, key[len(p) :], sgm=True)
    if key.startswith("text_encoders."):
        _, enc, rest = key.split(".", 2) if key.count(".") >= 2 else ("", "", "")
        target = _COMFY_TE.get(enc)
        if target is None:
            return None
        if target == "t5":
            target = next((c for c in arch.text_encoders if arch.component_kind(c) == "t5"), "")
        if target not in comps:
            return None
        if rest.startswith("transformer."):
            rest = rest[len("transformer.") :]
        return _resolve_dotted(arch, target, rest, sgm=False)
    if key.startswith("base_model.model."):
        rest = key[len("base_model.model.") :]
        for comp in comps:
            got = _resolve_dotted(
                arch, comp, _old_diffusers_spelling(arch.component_kind(comp), rest), sgm=False
            )
            if got is not None:
                return got
        return None
    for p in _COMPONENT_PREFIXES:
        if key.startswith(p):
            comp = p[:-1]
            if comp not in comps:
                return None
            rest = _old_diffusers_spelling(arch.component_kind(comp), key[len(p) :])
            return _resolve_dotted(arch, comp, rest, sgm=False)
    return None


def _shape_verdict(arch: Arch, parts: list[Part], suffix: str, shape: tuple[int, ...]) -> int:
    """+1 when the tensor's shape fits the module, -1 when it cannot belong to it, 0 when unknown."""
    if suffix not in _DOWN_SUFFIXES and suffix not in _UP_SUFFIXES and suffix != "diff":
        return 0
    info = arch.module(parts[0][0])
    if info.type not in ("linear", "conv") or not shape:
        return 0
    ranges = [r for _, r in parts if r is not None]
    out = max(r[1] for r in ranges) if ranges else info.out_features
    inn = info.in_features
    k = math.prod(info.kernel) if info.kernel else 1
    if suffix in _DOWN_SUFFIXES:
        if len(shape) < 2:
            return -1
        ok = shape[1] == inn or math.prod(shape[1:]) in (inn, inn * k)
    elif suffix in _UP_SUFFIXES:
        ok = shape[0] == out or (suffix.startswith("hada") and len(shape) == 2 and shape[1] == out)
    else:  # full diff
        ok = shape[0] == out and math.prod(shape) == out * inn * k
    return 1 if ok else -1


def _lokr_verdict(arch: Arch, parts: list[Part], lokr: Mapping[str, tuple[int, ...]]) -> int:
    """``_shape_verdict`` for a module's LoKr tensors taken together (no single LoKr factor has the
    module's rows or columns): ``kron(w1, w2)`` must be ``(out, in * kh * kw)``."""
    info = arch.module(parts[0][0])
    if info.type not in ("linear", "conv"):
        return 0

    def half(i: int) -> tuple[int, int] | None:  # (rows, columns with the kernel flattened)
        full, a, b, t = (lokr.get(f"lokr_{x}") for x in (f"w{i}", f"w{i}_a", f"w{i}_b", f"t{i}"))
        if full is not None and len(full) >= 2:
            return full[0], math.prod(full[1:])
        if a is None or b is None or len(a) != 2 or len(b) < 2:
            return None
        if t is not None:  # Tucker: w_a (r, rows), w_b (r, cols), t (r, r, kh, kw)
            return a[1], b[1] * math.prod(t[2:])
        return a[0], math.prod(b[1:])

    h1, h2 = half(1), half(2)
    if h1 is None or h2 is None:
        return 0
    ranges = [r for _, r in parts if r is not None]
    out = max(r[1] for r in ranges) if ranges else info.out_features
    k = math.prod(info.kernel) if info.kernel else 1
    ok = h1[0] * h2[0] == out and h1[1] * h2[1] in (info.in_features, info.in_features * k)
    return 1 if ok else -1


def _score(arch: Arch, shapes: Mapping[str, tuple[int, ...]], keys: list[str]) -> tuple[int, int, int, int]:
    """(keys resolved, shape contradictions, shape confirmations, keys of uncontradicted modules).

    Scored per module: one tensor whose shape cannot belong to a module discredits all the keys of
    that module (its ``alpha`` included), so a wrong arch does not score on shape-less keys.
    """
    per_mod: dict[tuple, list[int]] = {}
    lokr: dict[tuple, dict[str, tuple[int, ...]]] = {}
    for key in keys:
        got = _resolve_key(arch, key)
        if got is None:
            continue
        parts, suffix = got
        rec = per_mod.setdefault(tuple(parts), [0, 0, 0])
        rec[0] += 1
        if suffix.startswith("lokr_"):
            lokr.setdefault(tuple(parts), {})[suffix] = tuple(shapes[key])
            continue
        v = _shape_verdict(arch, parts, suffix, tuple(shapes[key]))
        if v < 0:
            rec[1] += 1
        elif v > 0:
            rec[2] += 1
    for parts_, halves in lokr.items():
        v = _lokr_verdict(arch, list(parts_), halves)
        if v:
            per_mod[parts_][1 if v < 0 else 2] += 1
    matched = sum(r[0] for r in per_mod.values())
    contra = sum(r[1] for r in per_mod.values())
    confirm = sum(r[2] for r in per_mod.values() if r[1] == 0)
    ok = sum(r[0] for r in per_mod.values() if r[1] == 0)
    return matched, contra, confirm, ok


def _ti_widths(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Text-encoder widths named by a textual-inversion file: {"clip_l": 768, "clip_g": 1280} / {"te": d}."""
    out: dict[str, int] = {}
    for k, s in shapes.items():
        if not s:
            continue
        leaf = k.rsplit(".", 1)[-1] if k.startswith("bundle_emb.") else k
        if leaf in ("clip_l", "clip_g"):
            out[leaf] = s[-1]
        elif k == "emb_params" or "string_to_param" in k:
            out["te"] = s[-1]
    return out


def _match_ti(archs: list[Arch], widths: dict[str, int]) -> str | None:
    if "clip_l" in widths or "clip_g" in widths:
        # SDXL-style {clip_l, clip_g}: an arch with two CLIP text encoders of these widths.
        want = [("text_encoder", widths.get("clip_l")), ("text_encoder_2", widths.get("clip_g"))]

        def fits(a: Arch) -> bool:
            if a.text_encoders != ("text_encoder", "text_encoder_2"):
                return False
            return all(
                a.component_kind(c) == "clip" and (w is None or a.text_encoder_width(c) == w) for c, w in want
            )

        hits = [a.name for a in archs if fits(a)]
        return hits[0] if hits else None
    d = widths.get("te")
    if d is None:
        return None
    # A one-vector-set embedding belongs to an arch with exactly one text encoder (SD1: 768, SD2: 1024).
    hits = [
        a.name
        for a in archs
        if a.text_encoders == ("text_encoder",) and a.text_encoder_width("text_encoder") == d
    ]
    return hits[0] if hits else None


def detect_arch(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Name the arch an adapter file is for, from its tensor keys and shapes; None when unsure.

    Reads every supported naming: kohya (``lora_unet_``, ``lora_te``/``te1``/``te2``/``te3``, SGM and
    BFL names), lycoris' ``lycoris_``, diffusers (``unet.``, ``text_encoder.``, ``transformer.``),
    peft (``base_model.model.``), ComfyUI (``diffusion_model.``, ``text_encoders.clip_l.``), and
    textual-inversion files (``emb_params``, ``clip_l``/``clip_g``, ``string_to_param.*``, diffusers
    ``{token: [n, d]}``). Every key is resolved against each candidate arch and its tensor shape
    checked against the module (cross-attention 768/1024/2048, TE 768/1024, FLUX 3072); the arch
    whose modules explain the most keys without contradiction wins, a tie is "unsure".
    Registered custom archs are tried first and win when they explain every key with no
    contradicting shape.
    """
    keys = [k for k in shapes if k != "__metadata__"]
    if not keys:
        return None
    module_keys = [k for k in keys if not _is_ti_key(k)]
    customs = list(_CUSTOM.values())

    if module_keys:
        # Registered custom archs first: one that explains every key, with shapes that confirm it.
        perfect = []
        for a in customs:
            matched, contra, confirm, _ = _score(a, shapes, module_keys)
            if matched == len(module_keys) and contra == 0 and confirm > 0:
                perfect.append(a.name)
        if len(perfect) == 1:
            return perfect[0]
        if len(perfect) > 1:
            return None  # several custom archs share these modules (e.g. the same tiny CLIP)

        text = " ".join(module_keys)
        flux_hint = any(h in text for h in _FLUX_HINTS)
        unet_hint = any(h in text for h in _UNET_HINTS)
        names = list(BUILTIN_ARCHS)
        if flux_hint and not unet_hint:
            names = ["flux1"]
        elif unet_hint and not flux_hint:
            names = ["sd1", "sd2", "sdxl"]
        scored = sorted(
            ((_score(a, shapes, module_keys)[3], a.name) for a in [get_arch(n) for n in names] + customs),
            reverse=True,
        )
        top = scored[0][0] if scored else 0
        if top > 0:
            if top * 2 < len(module_keys):
                return None  # most keys are not modules of any arch we know
            if len(scored) > 1 and scored[1][0] == top:
                return None  # a tie: the keys fit several archs equally well
            return scored[0][1]
        # No key is a module anywhere: maybe a diffusers TI file {token: [n, d]} (any key names).
        if all(len(s) in (1, 2) for s in shapes.values()) and len({s[-1] for s in shapes.values() if s}) == 1:
            d = next(s[-1] for s in shapes.values() if s)
            return _match_ti(customs + [get_arch(n) for n in ("sd1", "sd2", "sdxl")], {"te": d})
        return None

    widths = _ti_widths(shapes)
    return _match_ti(customs + [get_arch(n) for n in ("sd1", "sd2", "sdxl")], widths)
