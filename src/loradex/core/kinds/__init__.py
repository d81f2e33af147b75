"""Patch kinds: one dataclass per kind, pure math, no file I/O (see ``base.py`` for the contract).

``KINDS`` maps each kind name to its class; :func:`patch_from_tensors` builds the right kind from
one module's on-disk suffix dictionary (``{"lora_up.weight": ..., "alpha": ...}``), raising
``loradex.errors.FormatError`` with a one-line message for unknown, mixed or malformed sets.
:func:`split_kind` is the lenient first step readers use: which kind a module's tensors are, the
tensors that kind owns, and the others -- tensors no kind explains, which readers report by name
(``Adapter.unexplained``) instead of failing the module or dropping them silently.
"""

from __future__ import annotations

import torch

from loradex.core.kinds.base import INTEGER_SUFFIXES, Patch, Shape
from loradex.core.kinds.boft import BoftPatch
from loradex.core.kinds.full import FullPatch
from loradex.core.kinds.glora import GloraPatch
from loradex.core.kinds.ia3 import IA3Patch
from loradex.core.kinds.loha import LohaPatch
from loradex.core.kinds.lokr import LokrPatch
from loradex.core.kinds.lora import LoraPatch
from loradex.core.kinds.norm import NormPatch
from loradex.core.kinds.oft import OftPatch
from loradex.errors import FormatError, LoradexError

KINDS: dict[str, type[Patch]] = {
    cls.kind: cls
    for cls in (LoraPatch, LohaPatch, LokrPatch, FullPatch, NormPatch, IA3Patch, GloraPatch, OftPatch, BoftPatch)
}

#: Suffixes that identify a kind (shared ones -- alpha, dora_scale, rescale -- identify nothing).
_MARKERS: dict[str, tuple[str, ...]] = {
    "lora": ("lora_up.weight", "lora_down.weight", "lora_mid.weight", "lora_up.bias"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2"),
    "full": ("diff", "diff_b"),
    "norm": ("w_norm", "b_norm"),
    "ia3": ("on_input",),
    "glora": ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"),
    "oft": ("oft_blocks",),
}


def detect_kind(tensors: dict[str, torch.Tensor]) -> str:
    """The kind name for a suffix dictionary (FormatError when none or several match). OFT and
    BOFT share ``oft_blocks`` and are told apart by its rank: 3 (Diag-OFT) or 4 (BOFT)."""
    keys = set(tensors)
    found = [kind for kind, marks in _MARKERS.items() if keys & set(marks)]
    if not found:
        shown = ", ".join(sorted(keys)[:8]) or "none"
        raise FormatError(f"unknown patch kind (tensors: {shown})")
    if len(found) > 1:
        raise FormatError(f"tensors of several patch kinds mixed in one module: {', '.join(found)}")
    kind = found[0]
    if kind == "oft":
        blocks = tensors["oft_blocks"]
        nd = getattr(blocks, "ndim", None)
        if nd == 4:
            return "boft"
        if nd != 3:
            raise FormatError(f"oft_blocks must be 3-D (Diag-OFT) or 4-D (BOFT), got {nd}-D")
    return kind


def split_kind(tensors: dict[str, torch.Tensor]) -> tuple[str | None, dict, dict]:
    """``(kind, own, rest)`` for one module's suffix dictionary: the kind its marker suffixes name
    (None when none does), the tensors that kind owns (its ``SUFFIXES``: the shared ``alpha``,
    ``dora_scale``, ``rescale`` included where the kind has them) and every other tensor. With no
    kind, ``rest`` is the whole dictionary. Tensors of several kinds mixed in one module still
    raise FormatError (that is a malformed file, not an unknown extra). Values are never read, so
    it works on meta tensors."""
    keys = set(tensors)
    if not any(keys & set(marks) for marks in _MARKERS.values()):
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
    "patch_from_tensors",
    "split_kind",
]
