"""BOFT (kind ``boft``): butterfly-factored orthogonal rotation of the weight's output rows.

On-disk suffixes (LyCORIS ``ButterflyOFTModule``): ``oft_blocks`` ``(m, n, b, b)`` -- ``m``
butterfly stages of ``n`` blocks of size ``b`` (``n * b = out``) --, ``alpha`` = the constraint,
optional ``rescale`` ``(out, 1, ...)``. Math (checked against LyCORIS' forward):

* ``R = cayley(oft_blocks)`` with the Diag-OFT constraint (``alpha * out``, norm over all stages);
* stage ``i`` (``k = 2^i * b / 2``): permute the rows by
  ``perm = arange(out).view(-1, 2, k).transpose(1, 2).flatten()`` (``x <- x[perm]``), multiply each
  group of ``b`` consecutive rows by ``B_i = m R_i + (1 - m) I`` (``x <- B_i @ x``; note: ``R``, not
  ``R^T`` as in Diag-OFT), and undo the permutation (``x[perm] <- x``);
* then ``W' = rescale * x`` (rescale not scaled by ``m``) and ``dW = W' - W``; float64.

The multiplier interpolates each stage toward the identity, not the product. No low-rank form:
``to_lora(rank)`` is a truncated SVD of ``dW`` (base weight needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loradex.core.kinds.base import fit_to, register_kind, require
from loradex.core.kinds.oft import OrthogonalPatch, cayley

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)


def butterfly_perm(out: int, stage: int, block: int) -> torch.Tensor:
    """Row order of butterfly stage ``stage`` for blocks of ``block`` rows."""
    k = (2**stage) * (block // 2)
    return torch.arange(out).view(-1, 2, k).transpose(1, 2).reshape(-1)


@register_kind
@dataclass(eq=False)
class BoftPatch(OrthogonalPatch):
    """BOFT: ``oft_blocks`` ``(m, n, b, b)`` (m butterfly stages); see :class:`OrthogonalPatch`."""

    kind = "boft"
    BLOCK_NDIM = 4

    def _check_blocks(self) -> None:
        t = self.oft_blocks
        require(
            t.ndim == 4 and t.shape[2] == t.shape[3] and t.shape[2] % 2 == 0,
            f"boft: oft_blocks must be (stages, n, b, b) with b even, got {tuple(t.shape)}",
        )
        m, n, b, _ = t.shape
        for i in range(m):
            require((n * b) % ((2**i) * b) == 0, f"boft: {m} butterfly stages of size {b} do not fit {n * b} rows")

    @property
    def out_features(self) -> int:
        return int(self.oft_blocks.shape[1] * self.oft_blocks.shape[2])

    def delta(self, base_weight: torch.Tensor | None = None, multiplier: float = 1.0) -> torch.Tensor:
        w = self._base(base_weight)
        m, n, b, _ = self.oft_blocks.shape
        out = n * b
        rest = w.shape[1:]
        r = cayley(self.oft_blocks, self.constraint)
        eye = torch.eye(b, dtype=torch.float64, device=w.device)
        x = w
        for i in range(m):
            bi = multiplier * r[i] + (1 - multiplier) * eye
            perm = butterfly_perm(out, i, b).to(w.device)
            y = torch.einsum("nij,nj...->ni...", bi, x[perm].reshape(n, b, *rest)).reshape(out, *rest)
            x = torch.empty_like(y)
            x[perm] = y
        return fit_to((self._rescaled(x) - w).float(), base_weight)
