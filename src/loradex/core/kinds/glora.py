"""GLoRA (kind ``glora``): ``dW = gamma * (W A + B)`` -- a LoRA plus a low-rank map of the input
that goes through the base weight, so it needs ``W``.

On-disk suffixes: ``a1.weight``, ``a2.weight``, ``b1.weight``, ``b2.weight``, ``alpha`` (and
``bm.weight``, a Tucker core for ``b``, which LyCORIS 4.1.3 declares but never creates). Two
layouts, told apart by shape (``r`` the rank):

* current LyCORIS (``GLoRAModule``): ``a1`` ``(in, r)``, ``a2`` ``(r, in)``, ``b1`` ``(out, r)``,
  ``b2`` ``(r, in[, kh, kw])`` (conv: ``a1``, ``a2``, ``b1`` carry trailing ``1, 1``)::

      dW = gamma * (einsum('o i ..., i j -> o j ...', W, a1) @_1 a2 + b1 @ b2)

  i.e. ``W a1 a2 + b1 b2`` for a Linear, with the kernel window of a conv staying on ``W``;
  ``r = a2.shape[0]``. With ``bm`` ``(r, r, kh, kw)`` the ``b`` part is Tucker like LoCon.
* pre-3.0 LyCORIS (A1111 and ComfyUI still read it): ``a1`` ``(r, in)``, ``a2`` ``(in, r)``,
  ``b1`` ``(r, in)``, ``b2`` ``(out, r)``, ``dW = gamma * (W a2 a1 + b2 b1)`` on the flattened
  ``(out, in*kh*kw)`` weight; ``r = a1.shape[0]``.

Only a weight with ``out == in == r`` fits both; it is read as the current layout (ComfyUI picks
the old one there). ``gamma = alpha / r``; the multiplier is linear (``m * dW``, checked against
LyCORIS' forward).

Exact LoRA form given ``W`` (Linear, 1x1 conv, and any legacy layout): ``dW = [gamma W a1 | gamma b1]
@ [a2 ; b2]``, rank ``2r``. A ``kh x kw`` conv in the current layout has none (its ``W a1 a2``
term keeps the kernel on the left factor): truncated SVD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loradex.core.kinds.base import (
    Patch,
    Shape,
    alpha_scale,
    as_alpha,
    as_shape,
    check_fits,
    compute_dtype,
    fields_from,
    fit_to,
    register_kind,
    require,
)
from loradex.core.linalg import truncate_factors

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)


def _mat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def glora_layout(a1: torch.Tensor, a2: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor) -> str | None:
    """``"current"``, ``"legacy"`` or None (neither) from the four factor shapes."""
    s = [tuple(t.shape) for t in (a1, a2, b1, b2)]
    if all(len(x) >= 2 for x in s):
        (a10, a11), (a20, a21), (b10, b11), (b20, b21) = (x[:2] for x in s)
        current = a10 == a21 == b21 and a11 == a20 == b11 == b20 and all(
            all(d == 1 for d in x[2:]) for x in s[:3]
        )
        if current:
            return "current"
        fa1, fa2, fb1, fb2 = (_mat(t).shape for t in (a1, a2, b1, b2))
        legacy = (
            fa1[0] == fb1[0] == fb2[1] and fa2[1] == fa1[0] and fa1[1] == fb1[1] == fa2[0]
        )
        if legacy:
            return "legacy"
    return None


@register_kind
@dataclass(eq=False)
class GloraPatch(Patch):
    """``a1``, ``a2``, ``b1``, ``b2`` (the ``*.weight`` tensors), ``alpha``, optional ``bm``.
    ``weight_shape`` (not stored in files) is the module weight's shape when known."""

    a1: torch.Tensor
    a2: torch.Tensor
    b1: torch.Tensor
    b2: torch.Tensor
    alpha: torch.Tensor | None = None
    bm: torch.Tensor | None = None
    weight_shape: Shape | None = None

    kind = "glora"
    always_needs_base = True
    MARKERS = ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight")
    REQUIRED = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")
    SUFFIXES = {
        "a1.weight": "a1",
        "a2.weight": "a2",
        "b1.weight": "b1",
        "b2.weight": "b2",
        "bm.weight": "bm",
        "alpha": "alpha",
    }

    def __post_init__(self) -> None:
        self.alpha = as_alpha(self.alpha)
        self.weight_shape = as_shape(self.weight_shape)
        layout = glora_layout(self.a1, self.a2, self.b1, self.b2)
        require(
            layout is not None,
            "glora: a1 {} a2 {} b1 {} b2 {} fit neither GLoRA layout".format(
                *(tuple(t.shape) for t in (self.a1, self.a2, self.b1, self.b2))
            ),
        )
        self._layout = layout
        if self.bm is not None:
            r = self.rank
            require(
                layout == "current" and self.bm.ndim >= 3 and tuple(self.bm.shape[:2]) == (r, r),
                f"glora: bm.weight {tuple(self.bm.shape)} does not fit rank {r}",
            )
        check_fits("glora", self._stored_shape(), self.weight_shape)

    @property
    def layout(self) -> str:
        """``"current"`` (LyCORIS >= 3.0) or ``"legacy"`` (pre-3.0)."""
        return self._layout

    @property
    def rank(self) -> int:
        return int(self.a2.shape[0] if self._layout == "current" else self.a1.shape[0])

    @property
    def scale(self) -> float:
        """``gamma = alpha / rank`` (1 when alpha is missing or 0)."""
        return alpha_scale(self.alpha, self.rank)

    def _stored_shape(self) -> Shape:
        if self._layout == "current":
            k = self.bm.shape[2:] if self.bm is not None else self.b2.shape[2:]
            return (self.b1.shape[0], self.b2.shape[1], *k)
        return (self.b2.shape[0], _mat(self.b1).shape[1])

    @property
    def shape(self) -> Shape:
        return self.weight_shape if self.weight_shape is not None else self._stored_shape()

    def _b_part(self, dt: torch.dtype) -> torch.Tensor:
        """``b1 b2`` (current) or ``b2 b1`` (legacy) as ``(out, in*kh*kw)``."""
        if self._layout == "legacy":
            return _mat(self.b2).to(dt) @ _mat(self.b1).to(dt)
        if self.bm is not None:
            d = torch.einsum("mn...,ni->mi...", self.bm.to(dt), _mat(self.b2).to(dt))
            return _mat(self.b1).to(dt) @ d.reshape(d.shape[0], -1)
        return _mat(self.b1).to(dt) @ _mat(self.b2).to(dt)

    def _dense(self, w0: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        shape = self.shape
        w = w0.to(dt).reshape(shape)
        if self._layout == "legacy":
            wa = _mat(w) @ _mat(self.a2).to(dt) @ _mat(self.a1).to(dt)
        else:
            wa1 = torch.einsum("oi...,ij->oj...", w, _mat(self.a1).to(dt))
            wa = torch.einsum("oi...,ij->oj...", wa1, _mat(self.a2).to(dt))
        return (wa.reshape(shape) + self._b_part(dt).reshape(shape)) * self.scale

    def delta(self, base_weight: torch.Tensor | None = None, multiplier: float = 1.0) -> torch.Tensor:
        if base_weight is None:
            raise ValueError("a GLoRA patch needs the base weight")
        if base_weight.numel() != math.prod(self.shape):
            raise ValueError(f"glora: base weight {tuple(base_weight.shape)} does not fit {self.shape}")
        dt = compute_dtype(self.a1, self.b1, base_weight)
        return fit_to((self._dense(base_weight, dt) * multiplier).float(), base_weight)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], weight_shape: Shape | None = None) -> GloraPatch:
        vals = fields_from("glora", tensors, cls.SUFFIXES, cls.REQUIRED)
        return cls(**vals, weight_shape=weight_shape)

    def to_lora(self, rank: int | None = None, base_weight: torch.Tensor | None = None):
        """Exact rank-``2r`` LoRA given ``base_weight`` where one exists (see the module
        docstring), truncated optimally from the factors when ``rank`` is smaller; otherwise a
        truncated SVD of the dense delta (``rank`` required)."""
        from loradex.core.kinds.lora import LoraPatch

        if base_weight is None:
            raise ValueError("a GLoRA patch needs the base weight")
        shape = self.shape
        kernel_free = len(shape) == 2 or all(s == 1 for s in shape[2:])
        if (self._layout == "current" and not kernel_free) or self.bm is not None:
            if rank is None:
                raise ValueError("a GLoRA patch on a kxk conv has no exact LoRA form: a rank is needed")
            return LoraPatch.from_dense(self.delta(base_weight), rank)
        dt = torch.float64
        w = _mat(base_weight.to(dt).reshape(shape))
        if self._layout == "current":
            up = torch.cat([w @ _mat(self.a1).to(dt), _mat(self.b1).to(dt)], dim=1)
            down = torch.cat([_mat(self.a2).to(dt), _mat(self.b2).to(dt)], dim=0)
        else:
            up = torch.cat([w @ _mat(self.a2).to(dt), _mat(self.b2).to(dt)], dim=1)
            down = torch.cat([_mat(self.a1).to(dt), _mat(self.b1).to(dt)], dim=0)
        up = up * self.scale
        err = 0.0
        if rank is not None and rank < up.shape[1]:
            up, down, err = truncate_factors(up, down, rank)
        return LoraPatch._from_2d(up, down, shape, self.a1.dtype), err
