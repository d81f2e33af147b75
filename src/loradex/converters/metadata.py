"""Metadata written with adapters: ModelSpec 1.0.1 (``modelspec.*``) and kohya's ``ss_*`` keys.

ModelSpec (Stability AI, v1.0.1): MUST ``sai_model_spec``, ``architecture``, ``implementation``,
``title``; we add ``date`` and keep any value the source already had. kohya tools read
``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha`` and ``ss_base_model_version``;
we fill them when the source had none. The architecture ids and base versions are the family
specs' (``core/archs``). ``loradex.arch`` / ``loradex.arch_spec`` name the arch the file was
written for (the spec: a derived arch's family and configs), read first by detection.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections import Counter

from loradex.core.adapter import Adapter
from loradex.core.kinds.base import scalar

#: the base model's identity (registry REF, Hub id or path) an adapter was made against
BASE_KEY = "loradex.base_model"


def _arch(name: str | None):
    """The Arch of an adapter's arch name, or None when unknown (metadata is then generic)."""
    if not name:
        return None
    from loradex.core.archs import get_arch
    from loradex.errors import ArchError

    try:
        return get_arch(name)
    except ArchError:
        return None


def arch_record(name: str | None) -> dict[str, str]:
    """``loradex.arch`` (and, for an arch derived from a custom base, ``loradex.arch_spec``: its
    family and component configs as JSON) so the file names its base wherever it goes."""
    from loradex.core.archs import ARCH_KEY, ARCH_SPEC_KEY, builtin_names, tiny_names

    a = _arch(name)
    if a is None:
        return {}
    out = {ARCH_KEY: a.name}
    desc = a.descriptor()
    if desc is not None and a.name not in builtin_names() and a.name not in tiny_names():
        out[ARCH_SPEC_KEY] = json.dumps(desc, sort_keys=True, separators=(",", ":"))
    return out


def modelspec(adapter: Adapter, title: str, suffix: str | None = None) -> dict[str, str]:
    """ModelSpec keys for ``adapter``; existing ``modelspec.*`` values of the source are kept."""
    if suffix is None:
        kinds = set(adapter.kinds())
        suffix = "textual-inversion" if not kinds else ("lora" if kinds <= {"lora"} else "lycoris")
    a = _arch(adapter.arch)
    arch = a.family.modelspec_id(a) if a is not None else (adapter.arch or "unknown")
    out = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{arch}/{suffix}",
        "modelspec.implementation": a.family.modelspec_implementation if a is not None else "diffusers",
        "modelspec.title": title,
        "modelspec.date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    out.update({k: v for k, v in adapter.metadata.items() if k.startswith("modelspec.") and k != "modelspec.architecture"})
    out.update(arch_record(adapter.arch))
    if adapter.metadata.get(BASE_KEY):  # the base it was trained / extracted against (every writer keeps it)
        out[BASE_KEY] = adapter.metadata[BASE_KEY]
    return out


def kohya_ss(adapter: Adapter, title: str) -> dict[str, str]:
    """The ``ss_*`` keys kohya tools look for, keeping every ``ss_*`` value the source had."""
    ranks = Counter(p.rank for p in adapter.patches.values() if p.rank is not None)
    alphas = Counter(
        scalar(getattr(p, "alpha", None)) if scalar(getattr(p, "alpha", None)) else p.rank
        for p in adapter.patches.values()
        if p.rank is not None
    )
    kinds = set(adapter.kinds())
    out = {
        "ss_network_module": "networks.lora" if kinds <= {"lora"} else "lycoris.kohya",
        "ss_output_name": title,
    }
    if ranks:
        out["ss_network_dim"] = str(ranks.most_common(1)[0][0])
        a = alphas.most_common(1)[0][0]
        out["ss_network_alpha"] = str(int(a) if float(a).is_integer() else a)
    a = _arch(adapter.arch)
    version = a.family.kohya_base_version(a) if a is not None else None
    if version:
        out["ss_base_model_version"] = version
    out.update({k: v for k, v in adapter.metadata.items() if k.startswith("ss_")})
    return out
