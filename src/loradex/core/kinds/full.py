"""Full difference (kind ``full``): ``dW = m * diff``, ``db = m * diff_b``.

On-disk suffixes (LyCORIS ``FullModule``): ``diff`` shaped like the weight, optional ``diff_b``
``(out,)`` when the module has a bias (``W' = W + m * diff``, ``b' = b + m * diff_b``, checked
against LyCORIS' forward). ``to_lora(rank)`` is a truncated SVD of ``diff``; ``diff_b`` becomes the
LoRA's ``bias`` (exact).
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
class FullPatch(DensePatch):
    """``diff`` (weight-shaped) and optional ``diff_b`` ``(out,)``."""

    diff: torch.Tensor
    diff_b: torch.Tensor | None = None

    kind = "full"
    WEIGHT, BIAS = "diff", "diff_b"
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
