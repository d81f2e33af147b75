"""Norm layer difference (kind ``norm``): ``dw = m * w_norm``, ``db = m * b_norm``.

On-disk suffixes (LyCORIS ``NormModule``, ``train_norm=True``, on LayerNorm/GroupNorm): ``w_norm``
``(C,)`` and ``b_norm`` ``(C,)``. The norm's affine weight and bias change additively (checked
against LyCORIS' forward). A 1-D update has no LoRA form: ``to_lora`` raises ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loradex.core.kinds.base import (
    DensePatch,
    register_kind,
    require,
)

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)


@register_kind
@dataclass(eq=False)
class NormPatch(DensePatch):
    """``w_norm`` ``(C,)`` and optional ``b_norm`` ``(C,)``."""

    w_norm: torch.Tensor
    b_norm: torch.Tensor | None = None

    kind = "norm"
    WEIGHT, BIAS = "w_norm", "b_norm"
    MARKERS = ("w_norm", "b_norm")
    SUFFIXES = {"w_norm": "w_norm", "b_norm": "b_norm"}

    def __post_init__(self) -> None:
        require(self.w_norm.ndim == 1, f"norm: w_norm must be 1-D, got {tuple(self.w_norm.shape)}")
        if self.b_norm is not None:
            require(
                tuple(self.b_norm.shape) == tuple(self.w_norm.shape),
                f"norm: b_norm {tuple(self.b_norm.shape)} does not match w_norm {tuple(self.w_norm.shape)}",
            )

    def to_lora(self, rank: int | None = None, base_weight: torch.Tensor | None = None):
        raise ValueError("a norm patch (1-D update of a norm layer) has no LoRA form")

    def scaled(self, factor: float) -> NormPatch:
        return NormPatch(
            w_norm=(self.w_norm.double() * factor).to(self.w_norm.dtype),
            b_norm=None if self.b_norm is None else (self.b_norm.double() * factor).to(self.b_norm.dtype),
        )
