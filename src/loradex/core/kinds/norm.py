"""Norm layer difference (kind ``norm``): ``dw = m * w_norm``, ``db = m * b_norm``.

On-disk suffixes (LyCORIS ``NormModule``, ``train_norm=True``, on LayerNorm/GroupNorm): ``w_norm``
``(C,)`` and ``b_norm`` ``(C,)``. The norm's affine weight and bias change additively (checked
against LyCORIS' forward). A 1-D update has no LoRA form: ``to_lora`` raises ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loradex.core.kinds.base import (
    Patch,
    Shape,
    check_fits,
    compute_dtype,
    fields_from,
    fit_to,
    register_kind,
    require,
)


@register_kind
@dataclass(eq=False)
class NormPatch(Patch):
    """``w_norm`` ``(C,)`` and optional ``b_norm`` ``(C,)``."""

    w_norm: torch.Tensor
    b_norm: torch.Tensor | None = None

    kind = "norm"
    MARKERS = ("w_norm", "b_norm")
    SUFFIXES = {"w_norm": "w_norm", "b_norm": "b_norm"}

    def __post_init__(self) -> None:
        require(self.w_norm.ndim == 1, f"norm: w_norm must be 1-D, got {tuple(self.w_norm.shape)}")
        if self.b_norm is not None:
            require(
                tuple(self.b_norm.shape) == tuple(self.w_norm.shape),
                f"norm: b_norm {tuple(self.b_norm.shape)} does not match w_norm {tuple(self.w_norm.shape)}",
            )

    @property
    def shape(self) -> Shape:
        return tuple(self.w_norm.shape)

    def delta(self, base_weight: torch.Tensor | None = None, multiplier: float = 1.0) -> torch.Tensor:
        return fit_to((self.w_norm.to(compute_dtype(self.w_norm)) * multiplier).float(), base_weight)

    def bias_delta(self, base_bias: torch.Tensor | None = None, multiplier: float = 1.0) -> torch.Tensor | None:
        if self.b_norm is None:
            return None
        return (self.b_norm.to(compute_dtype(self.b_norm)) * multiplier).float()

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], weight_shape: Shape | None = None) -> NormPatch:
        patch = cls(**fields_from("norm", tensors, cls.SUFFIXES, ("w_norm",)))
        check_fits("norm", patch.shape, weight_shape)
        return patch

    def to_lora(self, rank: int | None = None, base_weight: torch.Tensor | None = None):
        raise ValueError("a norm patch (1-D update of a norm layer) has no LoRA form")

    def scaled(self, factor: float) -> NormPatch:
        return NormPatch(
            w_norm=(self.w_norm.double() * factor).to(self.w_norm.dtype),
            b_norm=None if self.b_norm is None else (self.b_norm.double() * factor).to(self.b_norm.dtype),
        )
