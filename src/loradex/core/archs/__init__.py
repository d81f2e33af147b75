"""Architectures: one spec per model family, and the archs (family + size) built from them.

* ``family.py``: the :class:`Family` contract and the family registry; one file per family
  (``sd1.py``, ``sd2.py``, ``sdxl.py``, ``flux1.py``, ``sd3.py``) subclasses it and registers
  itself. A new family is one file plus its import below.
* ``tables.py``: module tables built from configs on the meta device (any size), cached on disk.
* ``arch.py``: :class:`Arch`, the name maps canonical <-> kohya <-> native (SGM/BFL/MMDiT).
* ``lookup.py``: names -> archs (built-in sizes, embedded tiny models, archs derived from a base's
  configs, registered ones); ``detect.py``: which arch an adapter file is for.

Nothing here reads adapter or checkpoint files; ``converters`` parse them and ask these specs.
"""

from loradex.core.archs import flux1, sd1, sd2, sd3, sdxl  # noqa: F401  (each registers its family)
from loradex.core.archs.arch import Arch, Part, config_loader
from loradex.core.archs.detect import ARCH_KEY, ARCH_SPEC_KEY, archs_named_by, detect_arch, match_embedding
from loradex.core.archs.family import ComponentSpec, Family, families, get_family, register_family
from loradex.core.archs.lookup import (
    ALIASES,
    arch_from_configs,
    arch_from_descriptor,
    arch_from_models,
    builtin_names,
    check_descriptor,
    get_arch,
    list_archs,
    register_arch,
    registered_archs,
    select_family,
    tiny_names,
)
from loradex.core.archs.tables import BUILD_TIMES, CONFIG_DIR, ModuleInfo, model_kind, module_table

__all__ = [
    "ALIASES", "ARCH_KEY", "ARCH_SPEC_KEY", "BUILD_TIMES", "CONFIG_DIR", "Arch", "ComponentSpec", "Family",
    "ModuleInfo", "Part", "arch_from_configs", "arch_from_descriptor", "arch_from_models", "archs_named_by",
    "builtin_names", "check_descriptor", "config_loader", "detect_arch", "families", "get_arch", "get_family",
    "list_archs", "match_embedding", "model_kind", "module_table", "register_arch", "register_family", "registered_archs",
    "select_family", "tiny_names",
]
