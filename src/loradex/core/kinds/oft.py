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

import torch

from loradex.core.kinds.base import Patch, Shape, as_alpha, as_shape, fields_from, fit_to, require, scalar


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
    if rescale is not None:
        require(
            rescale.ndim >= 1 and rescale.shape[0] == out and rescale.numel() == out,
            f"{kind}: rescale {tuple(rescale.shape)} does not fit {out} output rows",
        )


@dataclass(eq=False)
class OftPatch(Patch):
    """``oft_blocks`` ``(n, s, s)``, ``alpha`` (constraint), optional ``rescale``. ``weight_shape``
    (not stored in files) is the module weight's shape when known."""

    oft_blocks: torch.Tensor
    alpha: torch.Tensor | None = None
    rescale: torch.Tensor | None = None
    weight_shape: Shape | None = None

    kind = "oft"
    always_needs_base = True
    detect_suffixes = ("oft_blocks",)
    SUFFIXES = {"oft_blocks": "oft_blocks", "alpha": "alpha", "rescale": "rescale"}

    def __post_init__(self) -> None:
        self.alpha = as_alpha(self.alpha)
        self.weight_shape = as_shape(self.weight_shape)
        b = self.oft_blocks
        require(b.ndim == 3 and b.shape[1] == b.shape[2], f"oft: oft_blocks must be (n, s, s), got {tuple(b.shape)}")
        check_rescale("oft", self.rescale, self.out_features)
        if self.weight_shape is not None:
            require(self.weight_shape[0] == self.out_features, f"oft: blocks cover {self.out_features} rows, weight is {self.weight_shape}")

    @property
    def out_features(self) -> int:
        return int(self.oft_blocks.shape[0] * self.oft_blocks.shape[1])

    @property
    def constraint(self) -> float:
        """The norm bound on ``Q``: ``alpha * out`` (0 = none)."""
        a = scalar(self.alpha)
        return 0.0 if a is None or a != a else a * self.out_features

    @property
    def shape(self) -> Shape:
        if self.weight_shape is None:
            raise ValueError("the full shape of an OFT patch is unknown: build it with weight_shape")
        return self.weight_shape

    def rotations(self) -> torch.Tensor:
        """The orthogonal blocks ``R`` ``(n, s, s)`` (float64)."""
        return cayley(self.oft_blocks, self.constraint)

    def delta(self, base_weight: torch.Tensor | None = None, multiplier: float = 1.0) -> torch.Tensor:
        if base_weight is None:
            raise ValueError("an OFT patch needs the base weight")
        n, s, _ = self.oft_blocks.shape
        require(base_weight.shape[0] == n * s, f"oft: blocks cover {n * s} rows, weight has {base_weight.shape[0]}")
        w = base_weight.double()
        eye = torch.eye(s, dtype=torch.float64)
        a = eye + multiplier * (self.rotations() - eye)
        rotated = torch.einsum("kji,kj...->ki...", a, w.reshape(n, s, *w.shape[1:])).reshape(w.shape)
        if self.rescale is not None:
            rotated = rotated * self.rescale.double().reshape(w.shape[0], *([1] * (w.ndim - 1)))
        return fit_to((rotated - w).float(), base_weight)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], weight_shape: Shape | None = None) -> OftPatch:
        return cls(**fields_from("oft", tensors, cls.SUFFIXES, ("oft_blocks",)), weight_shape=weight_shape)
