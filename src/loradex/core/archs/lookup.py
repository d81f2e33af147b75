"""Named archs: built-in sizes, embedded tiny models, archs derived from a user's base, and
archs registered in-process.

Names
-----
* built-in: the published sizes each family bundles (``sd1``, ``sd2``, ``sdxl``, ``flux1``,
  ``sd3``, ...), built on first use from ``core/configs``;
* embedded: ``tiny-<family>``, the tiny models of ``loradex demo`` and the tests (``tiny`` =
  ``tiny-sd1``), also from bundled configs;
* derived: ``<family>-<10 hex>`` for any other size, from the base's own component configs
  (:func:`arch_from_configs`). The hex is the start of the arch's *signature* (every module's name,
  type, shape and bias), so two bases with the same modules are one arch, and a base whose modules
  equal a built-in's gets the built-in's name. Derived archs are cached on disk
  (``$LORADEX_CACHE/arch/derived/<name>.json``: the family and component configs), so a later call
  — another process — resolves the name without the base; files loradex writes for them also carry
  the descriptor (``loradex.arch_spec`` metadata), and the registry keeps it too;
* registered: anything passed to :func:`register_arch` (in this process only).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from functools import cache
from typing import TYPE_CHECKING

from loradex.core.archs.arch import Arch, config_loader
from loradex.core.archs.family import TINY_PREFIX, Family, families, get_family
from loradex.core.archs.tables import (
    cache_root,
    live_config,
    load_config,
    model_kind,
    module_table,
    normalize_config,
    write_json_atomic,
)
from loradex.errors import ArchError

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)

ALIASES = {"tiny": "tiny-sd1"}
_DERIVED_NAME = re.compile(r"^([a-z0-9.]+)-([0-9a-f]{10})$")

_CUSTOM: dict[str, Arch] = {}
_DERIVED: dict[str, Arch] = {}
_LOCK = threading.Lock()


def _builtin_files() -> dict[str, tuple[Family, dict[str, str]]]:
    out: dict[str, tuple[Family, dict[str, str]]] = {}
    for fam in families().values():
        for name, files in fam.builtins.items():
            out[name] = (fam, files)
        if fam.tiny:
            out[TINY_PREFIX + fam.name] = (fam, fam.tiny)
    return out


def builtin_names() -> tuple[str, ...]:
    """The published sizes, family by family (``sd1``, ``sd2``, ``sdxl``, ``flux1``, ``sd3``...)."""
    return tuple(n for fam in families().values() for n in fam.builtins)


def tiny_names() -> tuple[str, ...]:
    """The embedded tiny models (``tiny-sd1``, ...)."""
    return tuple(TINY_PREFIX + fam.name for fam in families().values() if fam.tiny)


@cache
def _bundled(name: str) -> Arch:
    fam, files = _builtin_files()[name]
    configs = {c: load_config(f) for c, f in files.items()}
    return Arch(name, fam, {c: config_loader(c, cfg, files[c]) for c, cfg in configs.items()},
                configs={c: normalize_config(cfg) for c, cfg in configs.items()})


def get_arch(name: str | Arch) -> Arch:
    """A built-in, embedded, derived (cached on disk) or registered arch by name; cached."""
    if isinstance(name, Arch):
        return name
    name = ALIASES.get(name, name)
    if name in _builtin_files():
        return _bundled(name)
    with _LOCK:
        hit = _CUSTOM.get(name) or _DERIVED.get(name)
    if hit is not None:
        return hit
    if _DERIVED_NAME.match(name):
        desc = _read_derived(name)
        if desc is not None:
            return arch_from_descriptor(desc, name=name)
    raise ArchError(f"unknown architecture {name!r} (known: {', '.join(list_archs())}; "
                    "name a custom base with --base)")


def register_arch(arch: Arch) -> Arch:
    """Make an arch known to :func:`get_arch` and detection in this process.

    Registering a name again replaces the earlier arch; built-in and embedded names cannot be
    replaced."""
    if arch.name in _builtin_files() or arch.name in ALIASES:
        raise ArchError(f"{arch.name!r} is a built-in architecture and cannot be re-registered")
    with _LOCK:
        _CUSTOM[arch.name] = arch
    return arch


def list_archs() -> list[str]:
    """Built-in names, embedded tiny ones, then those derived or registered in this process."""
    with _LOCK:
        extra = list(_DERIVED) + [n for n in _CUSTOM if n not in _DERIVED]
    return [*builtin_names(), *tiny_names(), *extra]


def registered_archs() -> list[Arch]:
    """Archs derived or registered in this process (candidates for detection after the built-ins)."""
    with _LOCK:
        return list(_CUSTOM.values()) + [a for n, a in _DERIVED.items() if n not in _CUSTOM]


# ----------------------------------------------------------------------------------------------
# derived archs
# ----------------------------------------------------------------------------------------------


def _derived_file(name: str):
    root = cache_root()
    return None if root is None else root / "arch" / "derived" / f"{name}.json"


def _read_derived(name: str) -> dict | None:
    path = _derived_file(name)
    if path is None or not path.is_file():
        return None
    try:
        desc = json.loads(path.read_text())
        return desc if isinstance(desc, dict) and "family" in desc and "components" in desc else None
    except (OSError, ValueError):
        return None


def check_descriptor(desc: object) -> dict:
    """Validate an arch descriptor ``{"family", "components": {component: config}}`` (from a
    file's metadata, the registry or the cache) without building anything."""
    if not isinstance(desc, Mapping) or not isinstance(desc.get("components"), Mapping):
        raise ArchError("an architecture descriptor needs a family and component configs")
    fam = get_family(str(desc.get("family")))
    comps = desc["components"]
    unknown = [c for c in comps if c not in fam.component_names]
    if unknown or fam.denoiser not in comps:
        raise ArchError(f"an architecture descriptor of {fam.label} with components {sorted(comps)}")
    return {"family": fam.name, "components": {c: normalize_config(cfg) for c, cfg in comps.items()}}


def arch_from_descriptor(desc: Mapping, name: str | None = None) -> Arch:
    """The arch of a descriptor (see :func:`check_descriptor`)."""
    d = check_descriptor(desc)
    return arch_from_configs(d["family"], d["components"], name=name)


def arch_from_configs(family: str | Family, configs: Mapping[str, Mapping], name: str | None = None) -> Arch:
    """The arch of a base given its family and component configs (diffusers / transformers
    ``config.json`` contents), any size. Named after its signature (a built-in's name when the
    modules are a built-in's), kept in memory and cached on disk. ``name``: a name recorded
    earlier for the same descriptor (a cache hit, no check beyond the build)."""
    fam = get_family(family)
    configs = {c: normalize_config(cfg) for c, cfg in configs.items()}
    order = [c for c in fam.component_names if c in configs]
    if fam.denoiser not in configs:
        raise ArchError(f"a {fam.label} base needs its {fam.denoiser} config")
    extra = [c for c in configs if c not in order]
    if extra:
        raise ArchError(f"{fam.label} has no component(s) {', '.join(extra)}")
    configs = {c: configs[c] for c in order}
    arch = Arch(name or "?", fam, {c: config_loader(c, cfg) for c, cfg in configs.items()}, configs=configs)
    if name is None:
        arch.name = _signature_name(arch)
        if arch.name in _builtin_files():
            return _bundled(arch.name)
    with _LOCK:
        known = _DERIVED.get(arch.name)
        if known is not None:
            return known
        _DERIVED[arch.name] = arch
    path = _derived_file(arch.name)
    if path is not None and not path.is_file():
        write_json_atomic(path, arch.descriptor())
    return arch


def _signature_name(arch: Arch) -> str:
    """A built-in or embedded name of the same family with the same modules, else
    ``<family>-<signature[:10]>``."""
    sig = arch.signature()
    for name, (fam, _files) in _builtin_files().items():
        if fam is arch.family and _builtin_signature(name) == sig:
            return name
    return f"{arch.family.name}-{sig[:10]}"


@cache
def _builtin_signature(name: str) -> str:
    return _bundled(name).signature()


def select_family(configs: Mapping[str, Mapping], pipeline: str | None = None) -> Family:
    """The family whose spec fits a pipeline's component configs best (``pipeline``: the
    ``model_index.json`` class); ArchError when none does."""
    scored = sorted(((fam.pipeline_score(pipeline, configs), i, fam) for i, fam in enumerate(families().values())),
                    key=lambda t: (-t[0], t[1]))
    if not scored or scored[0][0] <= 0:
        from loradex.core.archs.tables import class_name

        what = ", ".join(f"{c}: {class_name(cfg)}" for c, cfg in configs.items())
        raise ArchError(f"no model family loradex knows has these components ({what or 'none'})")
    return scored[0][2]


def arch_from_models(models: Mapping[str, torch.nn.Module], family: str | Family | None = None,
                     pipeline: str | None = None) -> Arch:
    """The arch of live models (``{"unet": ..., "text_encoder": ...}``, e.g. a loaded pipeline's
    components): their configs give a derived (or built-in) arch, checked against the live modules.
    Where a model was changed after it was built (its modules no longer match its config), the
    live tables are used as they are, under a name of their own that is not cached on disk."""
    configs = {c: live_config(m) for c, m in models.items()}
    fam = get_family(family) if family is not None else select_family(configs, pipeline)
    arch = arch_from_configs(fam, configs)
    for comp, model in models.items():
        if module_table(comp, model) != arch.component_modules(comp):
            tables = {c: (model_kind(m), module_table(c, m)) for c, m in models.items()}
            live = Arch("?", fam, {c: (lambda t=t: t) for c, t in tables.items()})
            live.name = f"live-{fam.name}-{live.signature()[:10]}"
            return register_arch(live)
    return arch
