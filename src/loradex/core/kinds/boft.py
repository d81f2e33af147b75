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

import torch

from loradex.core.kinds.base import Patch, Shape, as_alpha, as_shape, fields_from, fit_to, require, scalar
from loradex.core.kinds.oft import cayley, check_rescale


def butterfly_perm(out: int, stage: int, block: int) -> torch.Tensor:
    """Row order of butterfly stage ``stage`` for blocks of ``block`` rows."""
    k = (2**stage) * (block // 2)
    return torch.arange(out).view(-1, 2, k).transpose(1, 2).reshape(-1)


@dataclass(eq=False)
class BoftPatch(Patch):
    """``oft_blocks`` ``(m, n, b, b)``, ``alpha`` (constraint), optional ``rescale``.
    ``weight_shape`` (not stored in files) is the module weight's shape when known."""

    oft_blocks: torch.Tensor
    alpha: torch.Tensor | None = None
    rescale: torch.Tensor | None = None
    weight_shape: Shape | None = None

    kind = "boft"
    always_needs_base = True
    detect_suffixes = ("oft_blocks",)
    SUFFIXES = {"oft_blocks": "oft_blocks", "alpha": "alpha", "rescale": "rescale"}

    def __post_init__(self) -> None:
        self.alpha = as_alpha(self.alpha)
        self.weight_shape = as_shape(self.weight_shape)
        t = self.oft_blocks
        require(
            t.ndim == 4 and t.shape[2] == t.shape[3] and t.shape[2] % 2 == 0,
            f"boft: oft_blocks must be (stages, n, b, b) with b even, got {tuple(t.shape)}",
        )
        m, n, b, _ = t.shape
        out = n * b
        for i in range(m):
            require(out % ((2**i) * b) == 0, f"boft: {m} butterfly stages of size {b} do not fit {out} rows")
        check_rescale("boft", self.rescale, out)
        if self.weight_shape is not None:
            require(self.weight_shape[0] == out, f"boft: blocks cover {out} rows, weight is {self.weight_shape}")

    @property
    def out_features(self) -> int:
        return int(self.oft_blocks.shape[1] * self.oft_blocks.shape[2])

    @property
    def constraint(self) -> float:
        a = scalar(self.alpha)
        return 0.0 if a is None or a != a else a * self.out_features

    @property
    def shape(self) -> Shape:
        if self.weight_shape is None:
            raise ValueError("the full shape of a BOFT patch is unknown: build it with weight_shape")
        return self.weight_shape

    def delta(self, base_weight: torch.Tensor | None = None, multiplier: float = 1.0) -> torch.Tensor:
        if base_weight is None:
            raise ValueError("a BOFT patch needs the base weight")
        m, n, b, _ = self.oft_blocks.shape
        out = n * b
        require(base_weight.shape[0] == out, f"boft: blocks cover {out} rows, weight has {base_weight.shape[0]}")
        w = base_weight.double()
        rest = w.shape[1:]
        r = cayley(self.oft_blocks, self.constraint)
        eye = torch.eye(b, dtype=torch.float64)
        x = w
        for i in range(m):
            bi = multiplier * r[i] + (1 - multiplier) * eye
            perm = butterfly_perm(out, i, b)
            y = torch.einsum("nij,nj...->ni...", bi, x[perm].reshape(n, b, *rest)).reshape(out, *rest)
            x = torch.empty_like(y)
            x[perm] = y
        if self.rescale is not None:
            x = x * self.rescale.double().reshape(out, *([1] * len(rest)))
        return fit_to((x - w).float(), base_weight)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], weight_shape: Shape | None = None) -> BoftPatch:
        return cls(**fields_from("boft", tensors, cls.SUFFIXES, ("oft_blocks",)), weight_shape=weight_shape)
