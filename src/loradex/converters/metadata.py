"""Metadata written with adapters: ModelSpec 1.0.1 (``modelspec.*``) and kohya's ``ss_*`` keys.

ModelSpec (Stability AI, v1.0.1): MUST ``sai_model_spec``, ``architecture``, ``implementation``,
``title``; we add ``date`` and keep any value the source already had. kohya tools read
``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha`` and ``ss_base_model_version``
(``sd_v1``, ``sd_v2``, ``sdxl_base_v1-0``, ``flux1``); we fill them when the source had none.
"""

from __future__ import annotations

import datetime as _dt
from collections import Counter

from loradex.core.adapter import Adapter
from loradex.core.kinds.base import scalar

MODELSPEC_ARCH = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
    "flux1": "flux-1-dev",
}
MODELSPEC_IMPL = {
    "sd1": "diffusers",
    "sd2": "diffusers",
    "sdxl": "https://github.com/Stability-AI/generative-models",
    "flux1": "https://github.com/black-forest-labs/flux",
}
KOHYA_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "flux1": "flux1"}


def modelspec(adapter: Adapter, title: str, suffix: str | None = None) -> dict[str, str]:
    """ModelSpec keys for ``adapter``; existing ``modelspec.*`` values of the source are kept."""
    if suffix is None:
        kinds = set(adapter.kinds())
        suffix = "textual-inversion" if not kinds else ("lora" if kinds <= {"lora"} else "lycoris")
    arch = MODELSPEC_ARCH.get(adapter.arch or "", adapter.arch or "unknown")
    out = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{arch}/{suffix}",
        "modelspec.implementation": MODELSPEC_IMPL.get(adapter.arch or "", "diffusers"),
        "modelspec.title": title,
        "modelspec.date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    out.update({k: v for k, v in adapter.metadata.items() if k.startswith("modelspec.") and k != "modelspec.architecture"})
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
    if adapter.arch in KOHYA_BASE_VERSION:
        out["ss_base_model_version"] = KOHYA_BASE_VERSION[adapter.arch]
    out.update({k: v for k, v in adapter.metadata.items() if k.startswith("ss_")})
    return out
