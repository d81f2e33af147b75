"""Diag-OFT (kind ``oft``): a block-diagonal orthogonal rotation of the weight's output rows.

On-disk suffixes (LyCORIS ``DiagOFTModule``): ``oft_blocks`` ``(n, s, s)`` with ``n * s = out``,
``alpha`` = the constraint (0: none), optional ``rescale`` ``(out, 1, ...)``. Math (checked
against LyCORIS' forward):

* ``Q = B - B^T`` per block; with a constraint ``c = alpha * out > 0`` and
  ``q = ||Q||_F + 1e-8`` over *all* blocks, ``Q <- Q * c / q`` when ``q > c``;
* Cayley: ``R = (I + Q) (I - Q)^-1`` per block (orthogonal);
* multiplier ``m`` interpolates each block: ``A = I + m (R - I)``;
* ``W'[k*s + j] = sum_i A_k[i, j] W[k*s + i]`` -- i.e. ``A_k^T`` applied to each group of ``s``
  output rows -- then ``W' <- rescale * W'`` (the rescale is *not* scaled by ``m``);
* ``dW = W' - W``: it needs the base weight. Computed in float64 (LyCORIS inverts in float32).

There is no low-rank form: ``to_lora(rank)`` is a truncated SVD of ``dW`` (base weight needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from loradex.core.kinds.base import (
    Patch,
    Shape,
    as_alpha,
    as_shape,
    fields_from,
    fit_to,
    register_kind,
    require,
    scalar,
)
from loradex.errors import FormatError

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)


def cayley(blocks: torch.Tensor, constraint: float = 0.0) -> torch.Tensor:
    """Orthogonal blocks ``(I + Q)(I - Q)^-1`` of ``Q = B - B^T`` (batched over the leading axes),
    with LyCORIS' norm constraint on ``Q`` (all blocks together), in float64."""
    b = blocks.double()
    q = b - b.transpose(-1, -2)
    if constraint > 0:
        qn = float(torch.linalg.vector_norm(q)) + 1e-8
        if qn > constraint:
            q = q * (constraint / qn)
    eye = torch.eye(b.shape[-1], dtype=torch.float64, device=b.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


def check_rescale(kind: str, rescale: torch.Tensor | None, out: int) -> None:
    """FormatError unless ``rescale`` (when given) holds one factor per output row: ``(out,)``,
    ``(out, 1)`` or ``(out, 1, 1, 1)``."""
    if rescale is not None:
        require(
            rescale.ndim >= 1 and rescale.shape[0] == out and rescale.numel() == out,
            f"{kind}: rescale {tuple(rescale.shape)} does not fit {out} output rows",
        )


@dataclass(eq=False)
class OrthogonalPatch(Patch):
    """What Diag-OFT and BOFT share: the stored ``oft_blocks`` (Diag-OFT ``(n, s, s)``, BOFT
    ``(stages, n, b, b)``, which is how a file tells them apart), ``alpha`` (the norm constraint,
    ``alpha * out``; 0 or missing = none), an optional ``rescale`` per output row, and the module
    weight's shape (not stored in files; needed for ``shape``). Subclasses give ``out_features``,
    ``_check_blocks`` and ``delta``."""

    oft_blocks: torch.Tensor
    alpha: torch.Tensor | None = None
    rescale: torch.Tensor | None = None
    weight_shape: Shape | None = None

    always_needs_base = True
    MARKERS = ("oft_blocks",)
    SUFFIXES = {"oft_blocks": "oft_blocks", "alpha": "alpha", "rescale": "rescale"}
    #: ``oft_blocks.ndim`` of each kind (LyCORIS ``DiagOFTModule`` 3-D, ``ButterflyOFTModule`` 4-D).
    BLOCK_NDIM: ClassVar[int] = 0

    @classmethod
    def claims(cls, tensors) -> str | None:
        blocks = tensors.get("oft_blocks")
        if blocks is None:
            return None
        nd = len(blocks) if isinstance(blocks, tuple) else getattr(blocks, "ndim", None)
        if nd not in (3, 4):
            raise FormatError(f"oft_blocks must be 3-D (Diag-OFT) or 4-D (BOFT), got {nd}-D")
        return cls.kind if nd == cls.BLOCK_NDIM else None

    def __post_init__(self) -> None:
        self.alpha = as_alpha(self.alpha)
        self.weight_shape = as_shape(self.weight_shape)
        self._check_blocks()
        out = self.out_features
        check_rescale(self.kind, self.rescale, out)
        if self.weight_shape is not None:
            require(self.weight_shape[0] == out, f"{self.kind}: blocks cover {out} rows, weight is {self.weight_shape}")

    def _check_blocks(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def out_features(self) -> int:  # pragma: no cover - interface
        """Output rows the blocks rotate (``n * s`` for Diag-OFT, ``n * b`` for BOFT)."""
        raise NotImplementedError

    @property
    def constraint(self) -> float:
        """The norm bound on ``Q``: ``alpha * out`` (0 = none)."""
        a = scalar(self.alpha)
        return 0.0 if a is None or a != a else a * self.out_features

    @property
    def shape(self) -> Shape:
        if self.weight_shape is None:
            raise ValueError(f"the full shape of a {self.kind} patch is unknown: build it with weight_shape")
        return self.weight_shape

    def _base(self, base_weight: torch.Tensor | None) -> torch.Tensor:
        """The base weight as float64, checked against the rows the blocks cover."""
        if base_weight is None:
            raise ValueError(f"a {self.kind} patch needs the base weight")
        out = self.out_features
        require(base_weight.shape[0] == out, f"{self.kind}: blocks cover {out} rows, weight has {base_weight.shape[0]}")
        return base_weight.double()

    def _rescaled(self, rotated: torch.Tensor) -> torch.Tensor:
        if self.rescale is None:
            return rotated
        return rotated * self.rescale.double().reshape(rotated.shape[0], *([1] * (rotated.ndim - 1)))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], weight_shape: Shape | None = None) -> OrthogonalPatch:
        return cls(**fields_from(cls.kind, tensors, cls.SUFFIXES, ("oft_blocks",)), weight_shape=weight_shape)


@register_kind
@dataclass(eq=False)
class OftPatch(OrthogonalPatch):
    """Diag-OFT: ``oft_blocks`` ``(n, s, s)``; see :class:`OrthogonalPatch` for the rest."""

    kind = "oft"
    BLOCK_NDIM = 3

    def _check_blocks(self) -> None:
        b = self.oft_blocks
        require(b.ndim == 3 and b.shape[1] == b.shape[2], f"oft: oft_blocks must be (n, s, s), got {tuple(b.shape)}")

    @property
    def out_features(self) -> int:
        return int(self.oft_blocks.shape[0] * self.oft_blocks.shape[1])

    def rotations(self) -> torch.Tensor:
        """The orthogonal blocks ``R`` ``(n, s, s)`` (float64)."""
        return cayley(self.oft_blocks, self.constraint)

    def delta(self, base_weight: torch.Tensor | None = None, multiplier: float = 1.0) -> torch.Tensor:
        w = self._base(base_weight)
        n, s, _ = self.oft_blocks.shape
        eye = torch.eye(s, dtype=torch.float64, device=w.device)
        a = eye + multiplier * (self.rotations() - eye)
        rotated = torch.einsum("kji,kj...->ki...", a, w.reshape(n, s, *w.shape[1:])).reshape(w.shape)
        return fit_to((self._rescaled(rotated) - w).float(), base_weight)
