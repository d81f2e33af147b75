"""Full difference (kind ``full``): ``dW = m * diff``, ``db = m * diff_b``.

On-disk suffixes (LyCORIS ``FullModule``): ``diff`` shaped like the weight, optional ``diff_b``
``(out,)`` when the module has a bias (``W' = W + m * diff``, ``b' = b + m * diff_b``, checked
against LyCORIS' forward). ``to_lora(rank)`` is a truncated SVD of ``diff``; ``diff_b`` becomes the
LoRA's ``bias`` (exact).
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
class FullPatch(Patch):
    """``diff`` (weight-shaped) and optional ``diff_b`` ``(out,)``."""

    diff: torch.Tensor
    diff_b: torch.Tensor | None = None

    kind = "full"
    MARKERS = ("diff", "diff_b")
    FACTOR_ROLES = {"diff": "full"}
    SUFFIXES = {"diff": "diff", "diff_b": "diff_b"}

    def __post_init__(self) -> None:
        require(self.diff.ndim >= 1, f"full: diff must be at least 1-D, got {tuple(self.diff.shape)}")
        if self.diff_b is not None:
            require(
                self.diff_b.ndim == 1 and self.diff_b.shape[0] == self.diff.shape[0],
                f"full: diff_b {tuple(self.diff_b.shape)} does not fit diff {tuple(self.diff.shape)}",
            )

    @property
    def shape(self) -> Shape:
        return tuple(self.diff.shape)

    def delta(self, base_weight: torch.Tensor | None = None, multiplier: float = 1.0) -> torch.Tensor:
        return fit_to((self.diff.to(compute_dtype(self.diff)) * multiplier).float(), base_weight)

    def bias_delta(self, base_bias: torch.Tensor | None = None, multiplier: float = 1.0) -> torch.Tensor | None:
        if self.diff_b is None:
            return None
        return (self.diff_b.to(compute_dtype(self.diff_b)) * multiplier).float()

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], weight_shape: Shape | None = None) -> FullPatch:
        patch = cls(**fields_from("full", tensors, cls.SUFFIXES, ("diff",)))
        check_fits("full", patch.shape, weight_shape)
        return patch

    def to_lora(self, rank: int | None = None, base_weight: torch.Tensor | None = None):
        """Truncated SVD of ``diff`` at ``rank`` (required); ``diff_b`` carried as the LoRA bias."""
        from loradex.core.kinds.lora import LoraPatch

        if rank is None:
            raise ValueError("a full patch has no exact low-rank form: a rank is needed")
        lora, err = LoraPatch.from_dense(self.diff, rank)
        if self.diff_b is not None:
            lora.bias = self.diff_b.to(lora.up.dtype)
        return lora, err

    def scaled(self, factor: float) -> FullPatch:
        return FullPatch(
            diff=(self.diff.double() * factor).to(self.diff.dtype),
            diff_b=None if self.diff_b is None else (self.diff_b.double() * factor).to(self.diff_b.dtype),
        )
