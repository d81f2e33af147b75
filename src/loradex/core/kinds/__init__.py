"""Patch kinds: one dataclass per kind, pure math, no file I/O (see ``base.py`` for the contract).

``KINDS`` maps each kind name to its class; :func:`patch_from_tensors` builds the right kind from
one module's on-disk suffix dictionary (``{"lora_up.weight": ..., "alpha": ...}``), raising
``loradex.errors.FormatError`` with a one-line message for unknown, mixed or malformed sets.
:func:`split_kind` is the lenient first step readers use: which kind a module's tensors are, the
tensors that kind owns, and the others -- tensors no kind explains, which readers report by name
(``Adapter.unexplained``) instead of failing the module or dropping them silently.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

from loradex.core.kinds.base import (
    INTEGER_SUFFIXES,
    KINDS,
    Patch,
    Shape,
    kinds_generation,
    register_kind,
    unregister_kind,
)
from loradex.errors import FormatError, LoradexError

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)

#: The kinds shipped with loradex, one module each (``core/kinds/<name>.py``, registering itself
#: with ``@register_kind``). A new kind is one file plus its name here; a kind defined elsewhere
#: (a plugin, a test) registers by being imported.
BUILTIN = ("lora", "loha", "lokr", "full", "norm", "ia3", "glora", "oft", "boft")
for _m in BUILTIN:
    importlib.import_module(f"loradex.core.kinds.{_m}")

from loradex.core.kinds.boft import BoftPatch  # noqa: E402
from loradex.core.kinds.full import FullPatch  # noqa: E402
from loradex.core.kinds.glora import GloraPatch  # noqa: E402
from loradex.core.kinds.ia3 import IA3Patch  # noqa: E402
from loradex.core.kinds.loha import LohaPatch  # noqa: E402
from loradex.core.kinds.lokr import LokrPatch  # noqa: E402
from loradex.core.kinds.lora import LoraPatch  # noqa: E402
from loradex.core.kinds.norm import NormPatch  # noqa: E402
from loradex.core.kinds.oft import OftPatch  # noqa: E402


# ---- tables derived from the registry (cached per registry generation) ---------------------------
@functools.lru_cache(maxsize=4)
def _suffix_tables(generation: int) -> tuple[tuple[str, ...], frozenset[str], tuple[str, ...]]:
    suffixes = {s for cls in KINDS.values() for s in cls.SUFFIXES}
    markers = frozenset(m for cls in KINDS.values() for m in cls.MARKERS)
    exact = tuple(k for k, cls in KINDS.items() if cls.exact_lora)
    return tuple(sorted(suffixes, key=lambda x: (-len(x), x))), markers, exact


def kind_suffixes() -> tuple[str, ...]:
    """Every on-disk suffix some kind owns (kohya/LyCORIS names: ``lora_down.weight``,
    ``hada_w1_a``, ``alpha``...), longest first so that a key splits at the longest match
    (``lora_down.weight`` before ``weight``)."""
    return _suffix_tables(kinds_generation())[0]


def marker_suffixes() -> frozenset[str]:
    """The suffixes that identify some kind (``Patch.MARKERS`` of every kind)."""
    return _suffix_tables(kinds_generation())[1]


def exact_lora_kinds() -> tuple[str, ...]:
    """Kinds whose patches have an exact plain-LoRA form when they carry no DoRA."""
    return _suffix_tables(kinds_generation())[2]


@functools.lru_cache(maxsize=4)
def _roles(generation: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for cls in KINDS.values():
        out.update(cls.FACTOR_ROLES)
        for spelling, own in cls.SPELLINGS.items():
            if own in cls.FACTOR_ROLES:
                out[spelling] = cls.FACTOR_ROLES[own]
    return out


def factor_roles() -> dict[str, str]:
    """Suffix (any kind's, and other tools' spellings of them) -> ``"in"`` (the factor's trailing
    axes hold the module's inputs), ``"out"`` (its first axis the outputs) or ``"full"`` (a dense
    update shaped like the weight): the shapes architecture detection reads a module's size from."""
    return _roles(kinds_generation())


def detect_kind(tensors: dict[str, torch.Tensor]) -> str:
    """The kind name for a suffix dictionary: the kind whose :meth:`Patch.claims` accepts it.
    FormatError when none or several do (OFT and BOFT share ``oft_blocks`` and claim it by its
    rank: 3-D Diag-OFT, 4-D BOFT)."""
    found = [k for k in dict.fromkeys(cls.claims(tensors) for cls in KINDS.values()) if k]
    if not found:
        shown = ", ".join(sorted(tensors)[:8]) or "none"
        raise FormatError(f"unknown patch kind (tensors: {shown})")
    if len(found) > 1:
        raise FormatError(f"tensors of several patch kinds mixed in one module: {', '.join(found)}")
    return found[0]


def split_kind(tensors: dict[str, torch.Tensor]) -> tuple[str | None, dict, dict]:
    """``(kind, own, rest)`` for one module's suffix dictionary: the kind its marker suffixes name
    (None when none does), the tensors that kind owns (its ``SUFFIXES``: the shared ``alpha``,
    ``dora_scale``, ``rescale`` included where the kind has them) and every other tensor. With no
    kind, ``rest`` is the whole dictionary. Tensors of several kinds mixed in one module still
    raise FormatError (that is a malformed file, not an unknown extra). Values are never read, so
    it works on meta tensors."""
    if not marker_suffixes() & set(tensors):
        return None, {}, dict(tensors)
    kind = detect_kind(tensors)
    own_suffixes = KINDS[kind].SUFFIXES
    own = {k: v for k, v in tensors.items() if k in own_suffixes}
    rest = {k: v for k, v in tensors.items() if k not in own_suffixes}
    return kind, own, rest


def patch_from_tensors(tensors: dict[str, torch.Tensor], weight_shape: Shape | None = None) -> Patch:
    """Build the patch for one module from its suffix dictionary. ``weight_shape`` (the module
    weight's shape, from the architecture table) is checked against the tensors and gives
    flattened LoHa/LoKr conv factors their 4-D shape; (IA)^3/OFT/BOFT keep it as their shape."""
    if not isinstance(tensors, dict):
        raise FormatError("a patch needs a dictionary of tensors")
    kind = detect_kind(tensors)
    try:
        return KINDS[kind].from_tensors(tensors, weight_shape)
    except LoradexError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, AttributeError) as exc:
        raise FormatError(f"malformed {kind} patch: {exc}") from exc


__all__ = [
    "BUILTIN",
    "INTEGER_SUFFIXES",
    "KINDS",
    "BoftPatch",
    "FullPatch",
    "GloraPatch",
    "IA3Patch",
    "LohaPatch",
    "LokrPatch",
    "LoraPatch",
    "NormPatch",
    "OftPatch",
    "Patch",
    "detect_kind",
    "exact_lora_kinds",
    "factor_roles",
    "kind_suffixes",
    "marker_suffixes",
    "patch_from_tensors",
    "register_kind",
    "split_kind",
    "unregister_kind",
]
