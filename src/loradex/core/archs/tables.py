"""Module tables: every adaptable module of a model, built from its config on the meta device.

A table maps ``<component>.<module path>`` to a :class:`ModuleInfo` (layer type, weight shape,
bias). It is built by instantiating the component's class (a diffusers model from its
``_class_name``, a transformers model from ``architectures[0]``) on the meta device: no weights,
no downloads, seconds at most (mostly the library import), and any config works, so custom widths
and depths (distilled models, a user's own config, the embedded tiny models) get exact tables.

Tables are cached in memory per config and on disk between processes (``$LORADEX_CACHE``,
default ``$XDG_CACHE_HOME/loradex``; ``LORADEX_CACHE=off`` disables it), keyed by the config's
content and the versions of the libraries whose classes name the modules.

CLIP text encoders are always spelled with the ``text_model.`` level
(``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``) although transformers 5's
``CLIPTextModel`` has no such level (``CLIPTextModelWithProjection`` still has it): the files in
the wild (kohya, A1111, ComfyUI, older diffusers) use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loradex.errors import ArchError
from loradex.log import quiet

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# Seconds spent building each table (config label -> seconds), for benchmarks and tests.
BUILD_TIMES: dict[str, float] = {}

#: Config keys that never change a module table (provenance, dtype, library versions): dropped
#: before a config is hashed, so the same model saved by two library versions is one arch.
_VOLATILE_KEYS = ("_name_or_path", "_diffusers_version", "transformers_version", "_loradex_source", "_commit_hash",
                  "torch_dtype", "dtype", "_use_default_values", "_attn_implementation_autoset", "use_cache")


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


Table = dict[str, ModuleInfo]


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


def text_kind(class_name: str) -> str | None:
    """``clip`` | ``t5`` for the text-encoder classes whose naming rules loradex knows, else None."""
    if class_name.startswith("CLIPTextModel"):
        return "clip"
    if class_name.startswith("T5EncoderModel"):
        return "t5"
    return None


def model_kind(model: torch.nn.Module) -> str:
    """What naming rules apply to a live component: ``clip`` | ``t5`` | ``other`` (denoisers: the
    family's naming)."""
    return text_kind(type(model).__name__) or "other"


def needs_text_model_level(model: torch.nn.Module) -> bool:
    """transformers 5's ``CLIPTextModel`` dropped the ``text_model`` level that canonical names keep
    (``CLIPTextModelWithProjection`` still has it)."""
    return model_kind(model) == "clip" and not isinstance(getattr(model, "text_model", None), torch.nn.Module)


def module_table(component: str, model: torch.nn.Module) -> Table:
    """Canonical name -> ModuleInfo for every adaptable module of ``model`` (live or on meta)."""
    add_text_model = needs_text_model_level(model)
    table: Table = {}
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


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------


def load_config(filename: str) -> dict:
    """A config bundled in ``core/configs`` (published configs and the embedded tiny models')."""
    with open(CONFIG_DIR / filename) as f:
        return json.load(f)


def class_name(cfg: Mapping) -> str:
    """The class a config instantiates: diffusers ``_class_name`` or transformers ``architectures[0]``."""
    if cfg.get("_class_name"):
        return str(cfg["_class_name"])
    archs = cfg.get("architectures") or []
    if archs:
        return str(archs[0])
    raise ArchError("a component config names no class (_class_name or architectures)")


def normalize_config(cfg: Mapping) -> dict:
    """The config without the keys that never change a table (see ``_VOLATILE_KEYS``), with the
    class named, JSON-clean (tuples as lists)."""
    out = {k: v for k, v in cfg.items() if k not in _VOLATILE_KEYS}
    out = json.loads(json.dumps(out, default=list))
    class_name(out)  # raises when no class is named
    return out


def config_hash(cfg: Mapping) -> str:
    """sha256 of a normalized config (sorted JSON)."""
    return hashlib.sha256(json.dumps(normalize_config(cfg), sort_keys=True).encode()).hexdigest()


def live_config(model: torch.nn.Module) -> dict:
    """A live model's config as a compact dict naming its class, so an arch built from it can be
    rebuilt later from the config alone: transformers ``to_diff_dict()`` (values that differ from
    the config class's defaults), diffusers ``config`` without the constructor's default values."""
    cfg = getattr(model, "config", None)
    cls = type(model).__name__
    if cfg is None:
        raise ArchError(f"a {cls} has no config: cannot derive its module table")
    if hasattr(cfg, "to_diff_dict") and not isinstance(cfg, Mapping):  # transformers PretrainedConfig
        d = cfg.to_diff_dict()
        d["architectures"] = [cls]
        d.pop("_class_name", None)
    else:  # diffusers FrozenDict: the constructor's arguments
        import inspect

        params = inspect.signature(type(model).__init__).parameters
        d = {k: v for k, v in dict(cfg).items() if not k.startswith("_")
             and not (k in params and _same(params[k].default, v))}
        d["_class_name"] = cls
    return normalize_config(d)


def _same(default, value) -> bool:
    try:
        return json.dumps(default, default=list) == json.dumps(value, default=list)
    except (TypeError, ValueError):
        return False


def _model_class(cfg: Mapping) -> type:
    t0 = time.perf_counter()
    name = class_name(cfg)
    if "_class_name" in cfg:
        import diffusers

        lib, cls = "diffusers", getattr(diffusers, name, None)
    else:
        import transformers

        lib, cls = "transformers", getattr(transformers, name, None)
    if cls is None:
        raise ArchError(f"{lib} has no class {name!r} (a newer {lib} may have it)")
    # The first use pays the library import (seconds for diffusers); keep it apart from build times.
    BUILD_TIMES.setdefault(f"import:{lib}", time.perf_counter() - t0)
    return cls


def build_table(cfg: Mapping, label: str | None = None) -> Table:
    """Instantiate a config on the meta device and return its table keyed by bare module path.
    The time it takes (library import excluded) is kept in ``BUILD_TIMES[label]``."""
    cfg = normalize_config(cfg)
    with quiet():
        cls = _model_class(cfg)
    t0 = time.perf_counter()
    kwargs = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"}
    try:
        with quiet(), torch.device("meta"):
            if "_class_name" in cfg:  # diffusers: the config keys are the constructor's arguments
                import inspect

                params = inspect.signature(cls.__init__).parameters
                if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                    kwargs = {k: v for k, v in kwargs.items() if k in params}
                model = cls(**kwargs)
            else:  # transformers: build the config object first
                model = cls(cls.config_class(**kwargs))
            table = module_table("_", model)
    except ArchError:
        raise
    except Exception as e:  # a config the class rejects
        raise ArchError(f"cannot build a {class_name(cfg)} from its config ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]})") from None
    BUILD_TIMES[label or class_name(cfg)] = time.perf_counter() - t0
    return {n[2:]: ModuleInfo(n[2:], i.type, i.shape, i.has_bias) for n, i in table.items()}


# ----------------------------------------------------------------------------------------------
# the cache
# ----------------------------------------------------------------------------------------------


def cache_root() -> Path | None:
    """``$LORADEX_CACHE`` (default ``$XDG_CACHE_HOME/loradex`` or ``~/.cache/loradex``); None when
    ``LORADEX_CACHE=off``."""
    root = os.environ.get("LORADEX_CACHE")
    if root == "off":
        return None
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "loradex")
    return Path(root)


def _versions_key() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for lib in ("loradex", "diffusers", "transformers"):
        try:
            out.append(f"{lib}={version(lib)};")
        except PackageNotFoundError:
            out.append(f"{lib}=?;")
    return "".join(out)


def table_cache_file(cfg: Mapping) -> Path | None:
    """Where the table of ``cfg`` is cached between processes: keyed by the normalized config and
    the versions of the libraries whose classes name the modules. Building a table costs the
    diffusers import plus the meta instantiation (seconds); reading it, a few ms."""
    root = cache_root()
    if root is None:
        return None
    key = hashlib.sha256((config_hash(cfg) + _versions_key()).encode()).hexdigest()[:16]
    return root / "arch" / f"{class_name(cfg)}-{key}.json"


def _read_table_cache(path: Path | None) -> Table | None:
    if path is None or not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        return {n: ModuleInfo(n, t, tuple(shape), bool(b)) for n, (t, shape, b) in raw["modules"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged cache is rebuilt


def write_json_atomic(path: Path, obj) -> None:
    """Best-effort atomic JSON write of a cache file (a read-only home just means no cache)."""
    import tempfile

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


_MEMO: dict[str, Table] = {}
_MEMO_LOCK = threading.Lock()


def config_table(cfg: Mapping, label: str | None = None) -> Table:
    """The table of one component config (keyed by bare module path): from memory, else from the
    disk cache, else built on the meta device and cached. CLIP-L is built once for every arch that
    has it."""
    key = config_hash(cfg)
    with _MEMO_LOCK:
        hit = _MEMO.get(key)
    if hit is not None:
        return hit
    cache_file = table_cache_file(cfg)
    table = _read_table_cache(cache_file)
    if table is None:
        table = build_table(cfg, label)
        if cache_file is not None:
            write_json_atomic(cache_file, {"modules": {n: [i.type, list(i.shape), i.has_bias]
                                                       for n, i in table.items()}})
    with _MEMO_LOCK:
        _MEMO[key] = table
    return table


def clear_memo() -> None:
    """Forget the in-memory tables (tests of the disk cache)."""
    with _MEMO_LOCK:
        _MEMO.clear()


def prefixed(component: str, table: Table) -> Table:
    """A bare-path table with ``<component>.`` put in front of every name."""
    return {f"{component}.{p}": ModuleInfo(f"{component}.{p}", i.type, i.shape, i.has_bias) for p, i in table.items()}
